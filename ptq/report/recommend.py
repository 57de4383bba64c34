"""A recommendation from the tables: per model, and per serving engine, the smallest checkpoint whose loss
against BF16 is within a budget with 95% confidence (`python -m ptq.report RUNS --budget 1%`).

A variant qualifies when, for every benchmark result compared with a matched BF16 result, the upper 95% bound
of its relative loss is at most the budget, its median recovery is at least 1 - budget, and the upper bound of
its perplexity ratio (ptq/fidelity.py) is at most 1 + budget. Bounds: delta -/+ 1.96 standard errors (a
benchmark's difference is given sqrt(2) x the variant's own error, as in the table's n.s. marks; the perplexity
ratio's interval is paired with BF16 on the same tokens; a benchmark whose per-item scores both sides kept uses
the error of the per-item differences instead). A result without a standard error counts with its
value alone, and the evidence says so. Among the variants that qualify the smallest checkpoint wins (then the
higher median recovery). Everything else is listed with the reason it was left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pandas as pd

from ptq.report.common import BF16, FIDELITY_METRIC, Z_95
from ptq.report.tables import Report

ENGINES = ("vLLM", "SGLang", "TensorRT-LLM")


@dataclass
class Verdict:
    variant: str
    checkpoint_mb: float
    median_recovery: float
    served_by: List[str]
    qualifies: bool
    # What was weighed (worst bounds), or why it was left out.
    evidence: List[str] = field(default_factory=list)
    reasons: List[str] = field(default_factory=list)


def parse_budget(text: str) -> float:
    """'1%' or '0.01' -> 0.01; refuses what is not a fraction between 0 and 1."""
    value = text.strip()
    try:
        budget = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise ValueError(f"--budget {text!r} is not a number; give a loss such as 1% or 0.01") from None
    if not 0 < budget < 1:
        raise ValueError(f"--budget {text!r} must be a loss between 0 and 100% (e.g. 1%)")
    return budget


def _loss_bound(row) -> tuple:
    """(relative loss, its upper 95% bound, whether an error was known) of one benchmark row against BF16."""
    sign = -1.0 if row.higher_is_better else 1.0
    loss = sign * row.delta / abs(row.bf16)
    if pd.isna(row.delta_error):
        return loss, loss, False
    return loss, loss + Z_95 * row.delta_error / abs(row.bf16), True


def judge(report: Report, model: str, budget: float) -> List[Verdict]:
    summary = report.summary[(report.summary["model"] == model) & (report.summary["recipe"] != BF16)]
    scores = report.scores[report.scores["model"] == model]
    verdicts = []
    for point in summary.itertuples():
        served = [e.strip() for e in str(point.served_by or "").split(",") if e.strip() in ENGINES]
        verdict = Verdict(point.variant, point.checkpoint_mb, point.median_recovery, served, qualifies=False)
        verdicts.append(verdict)
        if point.status != "finished":
            verdict.reasons.append(f"{point.status}: {point.note}" if point.note else point.status)
            continue
        rows = scores[
            (scores["variant"] == point.variant)
            & (scores["metric"] != FIDELITY_METRIC)
            & (scores["subject"] == "")
            & scores["bf16"].notna()
            & scores["delta"].notna()
        ]
        unsure = []
        for row in rows.itertuples():
            loss, bound, known = _loss_bound(row)
            if not known:
                unsure.append(f"{row.benchmark}/{row.metric}")
            if bound > budget:
                verdict.reasons.append(
                    f"{row.benchmark}/{row.metric}: loss {100 * loss + 0.0:.1f}%, up to {100 * bound:.1f}% "
                    f"at 95% confidence (budget {100 * budget:g}%)"
                )
            else:
                verdict.evidence.append(f"{row.benchmark}/{row.metric} loss at most {100 * bound:.1f}%")
        if not pd.isna(point.median_recovery) and point.median_recovery < 1 - budget:
            verdict.reasons.append(
                f"median recovery {100 * point.median_recovery:.1f}% is below {100 * (1 - budget):g}%"
            )
        ratio_bound = point.perplexity_ratio_hi if not pd.isna(point.perplexity_ratio_hi) else point.perplexity_ratio
        if not pd.isna(ratio_bound):
            if ratio_bound > 1 + budget:
                verdict.reasons.append(
                    f"perplexity ratio {point.perplexity_ratio:.3f}, up to {ratio_bound:.3f} at 95% "
                    f"confidence (budget {1 + budget:.3f})"
                )
            else:
                verdict.evidence.append(f"perplexity ratio at most {ratio_bound:.3f}")
        if rows.empty and pd.isna(ratio_bound):
            verdict.reasons.append("no result compared with a matched BF16 result")
        if unsure:
            verdict.evidence.append(f"without a standard error (value alone): {', '.join(unsure)}")
        verdict.qualifies = not verdict.reasons
    return verdicts


def _best(verdicts: List[Verdict]) -> Optional[Verdict]:
    fitting = [v for v in verdicts if v.qualifies and not pd.isna(v.checkpoint_mb)]
    if not fitting:
        return None
    return min(fitting, key=lambda v: (v.checkpoint_mb, -(0 if pd.isna(v.median_recovery) else v.median_recovery)))


def recommend(report: Report, budget: float) -> Dict[str, dict]:
    """{model: {"budget", "pick", "per_engine": {engine: variant or None}, "verdicts": [...]}}."""
    out = {}
    for model in report.models:
        verdicts = judge(report, model, budget)
        best = _best(verdicts)
        per_engine = {}
        for engine in ENGINES:
            pick = _best([v for v in verdicts if engine in v.served_by])
            per_engine[engine] = pick.variant if pick else None
        out[model] = {
            "budget": budget,
            "pick": best.variant if best else None,
            "per_engine": per_engine,
            "verdicts": [
                {**v.__dict__, "checkpoint_mb": _plain(v.checkpoint_mb), "median_recovery": _plain(v.median_recovery)}
                for v in verdicts
            ],
        }
    return out


def _plain(x) -> Optional[float]:
    """A number for JSON: None for NaN."""
    return None if x is None or pd.isna(x) else float(x)


def render_recommendation(recommendation: Dict[str, dict]) -> List[str]:
    """Markdown lines of the recommendation section."""
    lines = []
    for model, result in recommendation.items():
        budget = result["budget"]
        lines += ["", f"## {model}: recommendation (loss budget {100 * budget:g}%)", ""]
        pick = result["pick"]
        lines.append(
            f"Smallest checkpoint within the budget at 95% confidence: **{pick}**."
            if pick
            else "No checkpoint is within the budget at 95% confidence."
        )
        engines = [f"{engine}: {variant or 'none'}" for engine, variant in result["per_engine"].items()]
        lines += ["", "Per serving engine (smallest that the engine loads): " + "; ".join(engines) + ".", ""]
        for verdict in result["verdicts"]:
            size = f"{verdict['checkpoint_mb']:.1f} MB" if verdict["checkpoint_mb"] is not None else "no checkpoint"
            if verdict["qualifies"]:
                lines.append(f"- {verdict['variant']} ({size}): within budget; " + "; ".join(verdict["evidence"]))
            else:
                lines.append(f"- {verdict['variant']} ({size}): left out: " + "; ".join(verdict["reasons"]))
    return lines
