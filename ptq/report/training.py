"""Training after PTQ (recover=qat|qad) against the PTQ checkpoint it started from: the share of the PTQ gap to
BF16 that the training closed, on the mean KL, the perplexity ratio and each benchmark, with 95% intervals.

A trained point is paired with the PTQ point of the same model, recipe, calibration, evaluation tag and fidelity
setting (tables.POINT_KEY with the recovery settings left out). For a figure x whose BF16 value is x_bf16 (KL 0,
perplexity ratio 1, a benchmark's BF16 score):

    gap closed = (x_ptq - x_trained) / (x_ptq - x_bf16)

1 means the training brought the figure back to BF16, 0 that it changed nothing, below 0 that it made it worse.
Its standard error comes from both points' errors by the delta method, treating the two as independent (they
are measured on the same held-out tokens or items, so this overstates the error rather than hiding it). Where
the PTQ point's own gap is within noise there is nothing to close: the share is left out and the note says so.
A trained point with no PTQ point of its own is set against the fidelity its own run measured before training
(`recovery.ptq_fidelity`, the same held-out tokens; no benchmarks). A trained point whose held-out KL or perplexity ratio is worse than its PTQ point's beyond noise is flagged.
"""

from __future__ import annotations

import math
import statistics
from collections import namedtuple
from typing import Optional, Tuple

import pandas as pd

from ptq.report.common import BF16, FIDELITY_METRIC, Z_95

TRAINING_COLUMNS = [
    "model",
    "ptq_variant",
    "variant",
    "method",
    "steps",
    "lr",
    "ptq_mean_kl",
    "mean_kl",
    "mean_kl_stderr",
    "kl_gap_closed",
    "kl_gap_closed_lo",
    "kl_gap_closed_hi",
    "ptq_perplexity_ratio",
    "perplexity_ratio",
    "ppl_gap_closed",
    "ppl_gap_closed_lo",
    "ppl_gap_closed_hi",
    "benchmark_gap_closed",
    "benchmarks_closed",
    "worse_than_ptq",
    "note",
]

WORSE = "held-out {what} worse than PTQ beyond noise"


def ratio_stderr(interval_lo: float, interval_hi: float) -> float:
    """The standard error behind a 95% normal interval."""
    return (interval_hi - interval_lo) / (2 * Z_95)


def gap_closed(ptq: float, ptq_error: float, trained: float, trained_error: float, bf16: float) -> Tuple[float, float]:
    """(share of the PTQ gap to `bf16` closed, its standard error); (NaN, NaN) where the PTQ gap is within noise
    or an input is missing."""
    gap = ptq - bf16
    if any(math.isnan(x) for x in (ptq, trained, bf16)) or gap == 0:
        return math.nan, math.nan
    if not math.isnan(ptq_error) and abs(gap) < Z_95 * ptq_error:
        return math.nan, math.nan
    share = (ptq - trained) / gap
    errors = [0.0 if math.isnan(e) else e for e in (trained_error, ptq_error)]
    stderr = math.sqrt(errors[0] ** 2 + ((1 - share) * errors[1]) ** 2) / abs(gap)
    return share, stderr


def worse_than(ptq: float, ptq_error: float, trained: float, trained_error: float) -> bool:
    """Whether `trained` (lower is better) is above `ptq` beyond 1.96 standard errors of the difference."""
    if math.isnan(ptq) or math.isnan(trained):
        return False
    error = math.sqrt(sum(0.0 if math.isnan(e) else e**2 for e in (ptq_error, trained_error)))
    return trained - ptq > Z_95 * error


def _benchmark_rows(scores: pd.DataFrame, model: str, variant: str) -> dict:
    rows = scores[
        (scores["model"] == model)
        & (scores["variant"] == variant)
        & (scores["metric"] != FIDELITY_METRIC)
        & (scores["subject"] == "")
        & (scores["benchmark"] != "")
    ]
    return {
        (b, m, f): (d, e, h)
        for b, m, f, d, e, h in zip(
            *(
                rows[c].tolist()
                for c in ("benchmark", "metric", "fingerprint", "delta", "delta_error", "higher_is_better")
            )
        )
    }


def _benchmarks(scores: pd.DataFrame, model: str, ptq_variant: str, variant: str) -> Tuple[float, int]:
    """(median share of the PTQ loss closed over the benchmark rows where PTQ lost beyond noise, that count)."""
    before, after = _benchmark_rows(scores, model, ptq_variant), _benchmark_rows(scores, model, variant)
    shares = []
    for key, (delta0, error0, higher) in before.items():
        lost = delta0 < 0 if higher is not False else delta0 > 0
        if key not in after or not lost:  # a benchmark PTQ did not lose on has no gap to close
            continue
        delta, error, _ = after[key]
        share, _ = gap_closed(delta0, error0, delta, error, 0.0)
        if not math.isnan(share):
            shares.append(share)
    return (statistics.median(shares) if shares else math.nan), len(shares)


def _interval(share: float, stderr: float) -> Tuple[float, float]:
    if math.isnan(share):
        return math.nan, math.nan
    return share - Z_95 * stderr, share + Z_95 * stderr


# What a trained point and its PTQ point share (tables.POINT_KEY without the training settings; the label column
# is `base` for the PTQ point and `ptq_base` for the trained one).
SHARED = ["model", "seq_key", "calib_source", "eval_tag", "fidelity_fp"]


# The PTQ side of a trained point without a PTQ point of its own: the run's fidelity before training.
SAME_RUN = "(same run, before training)"
_OwnPtq = namedtuple(
    "_OwnPtq", "variant mean_kl mean_kl_stderr perplexity_ratio perplexity_ratio_lo perplexity_ratio_hi"
)


def training_table(kept: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """One row per trained point of `kept` (tables._select's points) against its PTQ point; empty when nothing
    was trained."""
    trained = kept[(kept["recover_key"] != "") & (kept["recipe"] != BF16)]
    if trained.empty:
        return pd.DataFrame(columns=TRAINING_COLUMNS)
    plain = kept[(kept["recover_key"] == "") & (kept["recipe"] != BF16) & (kept["status"] == "finished")]
    by_key = {key: row for key, row in zip(zip(*(plain[c].tolist() for c in ["base", *SHARED])), plain.itertuples())}
    rows = []
    for key, point in zip(zip(*(trained[c].tolist() for c in ["ptq_base", *SHARED])), trained.itertuples()):
        ptq: Optional[tuple] = by_key.get(key)
        out = {
            "model": point.model,
            "variant": point.variant,
            "method": point.recover_method,
            "steps": point.recover_steps,
            "lr": point.recover_lr,
            "mean_kl": point.mean_kl,
            "mean_kl_stderr": point.mean_kl_stderr,
            "perplexity_ratio": point.perplexity_ratio,
            "worse_than_ptq": False,
            "note": "",
        }
        if point.status != "finished":
            out["note"] = point.note or point.status
        if ptq is None and not math.isnan(point.own_ptq_mean_kl):
            # No PTQ point of its own in the records: the run's fidelity before training, on the same tokens.
            ptq = _OwnPtq(
                variant=f"{point.ptq_base} {SAME_RUN}",
                mean_kl=point.own_ptq_mean_kl,
                mean_kl_stderr=point.own_ptq_mean_kl_stderr,
                perplexity_ratio=point.own_ptq_perplexity_ratio,
                perplexity_ratio_lo=point.own_ptq_perplexity_ratio_lo,
                perplexity_ratio_hi=point.own_ptq_perplexity_ratio_hi,
            )
        if ptq is None:
            out.update(
                ptq_variant="", note=out["note"] or "no finished PTQ point with the same settings to compare with"
            )
            rows.append(out)
            continue
        ratio_error = ratio_stderr(point.perplexity_ratio_lo, point.perplexity_ratio_hi)
        ptq_ratio_error = ratio_stderr(ptq.perplexity_ratio_lo, ptq.perplexity_ratio_hi)
        kl, kl_error = gap_closed(ptq.mean_kl, ptq.mean_kl_stderr, point.mean_kl, point.mean_kl_stderr, 0.0)
        ppl, ppl_error = gap_closed(ptq.perplexity_ratio, ptq_ratio_error, point.perplexity_ratio, ratio_error, 1.0)
        bench, counted = _benchmarks(scores, point.model, ptq.variant, point.variant)
        worse = [
            what
            for what, args in (
                ("KL", (ptq.mean_kl, ptq.mean_kl_stderr, point.mean_kl, point.mean_kl_stderr)),
                ("perplexity ratio", (ptq.perplexity_ratio, ptq_ratio_error, point.perplexity_ratio, ratio_error)),
            )
            if worse_than(*args)
        ]
        notes = [out["note"]] if out["note"] else []
        if worse:
            notes.append(WORSE.format(what=" and ".join(worse)))
        if math.isnan(kl) and not math.isnan(ptq.mean_kl):
            notes.append("PTQ's KL gap within noise")
        out.update(
            ptq_variant=ptq.variant,
            ptq_mean_kl=ptq.mean_kl,
            kl_gap_closed=kl,
            ptq_perplexity_ratio=ptq.perplexity_ratio,
            ppl_gap_closed=ppl,
            benchmark_gap_closed=bench,
            benchmarks_closed=counted,
            worse_than_ptq=bool(worse),
            note="; ".join(notes),
        )
        out["kl_gap_closed_lo"], out["kl_gap_closed_hi"] = _interval(kl, kl_error)
        out["ppl_gap_closed_lo"], out["ppl_gap_closed_hi"] = _interval(ppl, ppl_error)
        rows.append(out)
    table = pd.DataFrame(rows, columns=TRAINING_COLUMNS)
    return table.sort_values(["model", "ptq_variant", "method", "lr", "steps"], kind="stable").reset_index(drop=True)
