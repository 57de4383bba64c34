"""Results collector: gathers run records into the accuracy comparison against BF16.

    python -m ptq.report <folder or run.json>... [--out DIR]

Every `run.json` below the given paths is read; the report lands in DIR (default: `report/` under the
first given folder, or beside the first given file) as `results.md` (also printed to stdout),
`results.csv`, `results.html` and one `recovery_vs_bits_<model>.png` per model.

Naming rules
------------
Variant label: the recipe name, then `+kv_<format>` when the KV cache is quantized, then
`@<calib_size>`, so one recipe at several calibration sizes gives several columns: `fp8@512`,
`fp8+kv_fp8@512`, `int4_awq@128`. The BF16 baseline is always just `bf16`.

Benchmark rows are (benchmark, metric) pairs. Entries of `evaluation.results` keep their own names
(`arc_easy` / `acc_norm`). The fidelity figures become three rows whose metric is `fidelity`:

    perplexity / fidelity              quantized_perplexity (BF16: bf16_perplexity), lower is better
    mean_kl_vs_bf16 / fidelity         mean_kl (BF16: 0), lower is better
    top1_agreement_vs_bf16 / fidelity  top1_agreement (BF16: 1), higher is better

Comparison with BF16
--------------------
The BF16 column of a model comes, row by row, from its finished `bf16` run; rows that run lacks (or
every row, without such a run) come from the baselines carried inside that model's quantized records
(`evaluation.baseline`, `fidelity.bf16_perplexity`), newest finished record first.
delta = value - BF16; recovery = value / BF16 when higher is better, BF16 / value when lower is better,
undefined (NaN) where BF16 is 0 or missing. A variant's median recovery is taken over its defined rows.

One record per (model, variant) is used: the finished one with the latest `finished_at`, or, when
none finished, the latest failed/running one. Every other record is listed as superseded. Files that
are not run records are listed as skipped with the reason; neither stops the report.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

RUN_RECORD_NAME = "run.json"
# A Slurm sweep's list of points (ptq/cluster.py); its submitted points show as pending until they write a record.
MANIFEST_NAME = "sweep.json"
BF16 = "bf16"
FIDELITY_METRIC = "fidelity"
DEFAULT_BACKEND = "hf_modelopt"
PERPLEXITY = "perplexity"
MEAN_KL = "mean_kl_vs_bf16"
TOP1_AGREEMENT = "top1_agreement_vs_bf16"
FIDELITY_ROWS = (PERPLEXITY, MEAN_KL, TOP1_AGREEMENT)
# Where a BF16 value came from (the `bf16_source` column).
FROM_BF16_RUN = "bf16 run"
FROM_EMBEDDED_BASELINE = "embedded baseline"
# Status of BF16 rows that come from embedded baselines rather than from a run of their own.
BASELINE_STATUS = "baseline"
# lm-eval metrics where smaller is better, for entries that do not say `higher_is_better`.
LOWER_IS_BETTER_METRICS = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ppl", "loss"}
KV_CACHE_ORDER = {"none": 0, "fp8": 1, "nvfp4": 2}
PROGRESS_THRESHOLD = 200
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"

SCORE_COLUMNS = ["model", "variant", "recipe", "kv_cache", "calib_size", "benchmark", "metric", "value", "stderr",
                 "higher_is_better", "bf16", "bf16_source", "delta", "recovery", "status", "note", "source"]
SUMMARY_COLUMNS = ["model", "variant", "status", "median_recovery", "checkpoint_mb", "compression",
                   "bits_per_weight", "calib_size", "calibrate_s", "note", "source"]
SUPERSEDED_COLUMNS = ["model", "variant", "status", "finished_at", "source", "kept", "reason"]
SKIPPED_COLUMNS = ["source", "reason"]


# ----------------------------------------------------------------------------------------------
# Reading one record


def record_problem(obj) -> Optional[str]:
    """Why `obj` cannot be used as a run record, or None when it can."""
    if not isinstance(obj, dict):
        return f"not a run record: top-level JSON is {type(obj).__name__}, not an object"
    for key in ("model", "recipe"):
        if key not in obj:
            return f"not a run record: missing '{key}'"
        if not isinstance(obj[key], str) or not obj[key]:
            return f"not a run record: '{key}' is not a non-empty string"
    return None


def _number(x) -> float:
    """A finite-or-NaN float from anything JSON may hold; bools and strings are not numbers."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    return float(x)


def _section(record: dict, key: str) -> dict:
    value = record.get(key)
    return value if isinstance(value, dict) else {}


def _calib_size(record: dict):
    """Calibration size as an int where it is one (JSON may carry 512.0), else as recorded."""
    size = record.get("calib_size")
    if isinstance(size, float) and size.is_integer():
        return int(size)
    if isinstance(size, bool):
        return None
    return size


def _kv_cache(record: dict) -> str:
    kv = record.get("kv_cache")
    return kv if isinstance(kv, str) and kv else "none"


def variant_label(record: dict) -> str:
    """`<recipe>[+kv_<fmt>][@<calib_size>][ (<backend>[ <parallelism>])]`; the BF16 baseline is just `bf16`.

    The in-process backend is the default and is not named; a checkpoint the Megatron-Bridge backend made
    is its own variant, so both backends' checkpoints of one recipe stand side by side, and so is each
    parallel layout other than `single` (tp2 and pp2 runs of one recipe are different checkpoints)."""
    recipe = record["recipe"]
    if recipe == BF16:
        return BF16
    label = recipe
    kv = _kv_cache(record)
    if kv != "none":
        label += f"+kv_{kv}"
    calib = _calib_size(record)
    if calib is not None and calib != "":
        label += f"@{calib}"
    backend = record.get("backend")
    if isinstance(backend, str) and backend not in ("", DEFAULT_BACKEND):
        layout = ((record.get("config") or {}).get("parallelism") or {}).get("name")
        label += f" ({backend} {layout})" if isinstance(layout, str) and layout not in ("", "single") else f" ({backend})"
    return label


def variant_sort_key(recipe: str, kv_cache: str, calib_size) -> tuple:
    """BF16 first, then by recipe, KV-cache format and numeric calibration size (128 before 1024)."""
    calib = _number(calib_size)
    return (recipe != BF16, recipe, KV_CACHE_ORDER.get(kv_cache, len(KV_CACHE_ORDER)), kv_cache,
            math.isnan(calib), 0.0 if math.isnan(calib) else calib)


def _higher_is_better(entry: dict) -> bool:
    flag = entry.get("higher_is_better")
    if isinstance(flag, bool):
        return flag
    return str(entry.get("metric", "")).lower() not in LOWER_IS_BETTER_METRICS


def _benchmark_entries(entries) -> List[dict]:
    """Usable entries of an `evaluation.results`/`baseline` list, first of each (benchmark, metric)."""
    if not isinstance(entries, list):
        return []
    rows, seen = [], set()
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        benchmark, metric, value = entry.get("benchmark"), entry.get("metric"), _number(entry.get("value"))
        if not isinstance(benchmark, str) or not isinstance(metric, str) or math.isnan(value):
            continue
        if (benchmark, metric) in seen:
            continue
        seen.add((benchmark, metric))
        rows.append({"benchmark": benchmark, "metric": metric, "value": value,
                     "stderr": _number(entry.get("stderr")), "higher_is_better": _higher_is_better(entry)})
    return rows


def _fidelity_row(benchmark: str, value: float, higher_is_better: bool) -> dict:
    return {"benchmark": benchmark, "metric": FIDELITY_METRIC, "value": value, "stderr": math.nan,
            "higher_is_better": higher_is_better}


def _bf16_fidelity_rows(fidelity: dict) -> List[dict]:
    """The BF16 model's fidelity figures: its own perplexity, and by definition KL 0 and agreement 1."""
    ppl = _number(fidelity.get("bf16_perplexity"))
    if math.isnan(ppl):
        return []
    return [_fidelity_row(PERPLEXITY, ppl, False), _fidelity_row(MEAN_KL, 0.0, False),
            _fidelity_row(TOP1_AGREEMENT, 1.0, True)]


def record_scores(record: dict) -> List[dict]:
    """Scores of the model a record describes: its evaluation results plus its fidelity figures."""
    rows = _benchmark_entries(_section(record, "evaluation").get("results"))
    fidelity = _section(record, "fidelity")
    if record.get("recipe") == BF16:
        return rows + _bf16_fidelity_rows(fidelity)
    figures = ((PERPLEXITY, "quantized_perplexity", False), (MEAN_KL, "mean_kl", False),
               (TOP1_AGREEMENT, "top1_agreement", True))
    for benchmark, key, higher in figures:
        value = _number(fidelity.get(key))
        if not math.isnan(value):
            rows.append(_fidelity_row(benchmark, value, higher))
    return rows


def baseline_scores(record: dict) -> List[dict]:
    """BF16 scores a quantized record carries for comparison (evaluation baseline, BF16 fidelity)."""
    return (_benchmark_entries(_section(record, "evaluation").get("baseline"))
            + _bf16_fidelity_rows(_section(record, "fidelity")))


def status_note(status: str, error) -> str:
    """Why a point is not a finished result ("" when it is)."""
    if status == "finished":
        return ""
    if status == "failed":
        lines = str(error).strip().splitlines() if error else []
        return f"failed: {lines[0].strip()}" if lines else "failed: no error recorded"
    if status == "running":
        return "running (unfinished)"
    if status == "pending":
        return "pending (submitted, not started)"
    return f"{status} (unrecognised status)"


def _timestamp(text) -> float:
    """Seconds since the epoch for ordering; -inf for a missing or unreadable time (counts as oldest)."""
    if not isinstance(text, str):
        return -math.inf
    for parse in (lambda s: datetime.strptime(s, TIME_FORMAT), datetime.fromisoformat):
        try:
            return parse(text).timestamp()
        except ValueError:
            continue
    return -math.inf


# ----------------------------------------------------------------------------------------------
# Tables (pure: parsed records in, DataFrames out)


@dataclass
class Report:
    scores: pd.DataFrame
    summary: pd.DataFrame
    superseded: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SKIPPED_COLUMNS))

    @property
    def models(self) -> List[str]:
        return sorted(set(self.summary["model"]) | set(self.scores["model"]))


def _points(records: Sequence[dict], sources: Sequence[str]) -> pd.DataFrame:
    """One row per record: what identifies it and what the summary shows about it."""
    rows = []
    for index, (record, source) in enumerate(zip(records, sources)):
        status = record.get("status") if isinstance(record.get("status"), str) else "unknown"
        size, timings = _section(record, "size"), _section(record, "timings_s")
        finished_at = record.get("finished_at") if isinstance(record.get("finished_at"), str) else ""
        calib = _calib_size(record)
        rows.append({
            "index": index, "model": record["model"], "variant": variant_label(record),
            "recipe": record["recipe"], "kv_cache": _kv_cache(record),
            "calib_size": np.nan if record["recipe"] == BF16 else _number(calib),
            "status": status, "finished_at": finished_at,
            # Running records have no finish time yet; their start orders them among themselves.
            "time": _timestamp(finished_at or record.get("started_at")),
            "checkpoint_mb": _number(size.get("checkpoint_bytes")) / 1e6,
            "compression": _number(size.get("compression")),
            "bits_per_weight": _number(size.get("bits_per_weight")),
            "calibrate_s": _number(timings.get("calibrate")),
            "note": status_note(status, record.get("error")), "source": source,
        })
    return pd.DataFrame(rows, columns=["index", "model", "variant", "recipe", "kv_cache", "calib_size", "status",
                                       "finished_at", "time", "checkpoint_mb", "compression", "bits_per_weight",
                                       "calibrate_s", "note", "source"])


def _select(points: pd.DataFrame) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, superseded): one record per (model, variant), finished before unfinished, newest first."""
    ordered = points.assign(finished=points["status"] == "finished").sort_values(
        ["model", "variant", "finished", "time", "source"], ascending=[True, True, False, False, True],
        kind="stable")
    duplicate = ordered.duplicated(["model", "variant"], keep="first")
    kept, dropped = ordered[~duplicate], ordered[duplicate]
    winners = kept[["model", "variant", "source", "finished"]].rename(
        columns={"source": "kept", "finished": "kept_finished"})
    dropped = dropped.merge(winners, on=["model", "variant"], how="left")
    reasons = []
    for finished, kept_finished, finished_at, status, note in zip(*(dropped[c].tolist() for c in (
            "finished", "kept_finished", "finished_at", "status", "note"))):
        if finished:
            reasons.append(f"older duplicate (finished_at {finished_at or 'unknown'})")
        elif kept_finished:
            reasons.append(f"{note}; a finished record of this variant is used")
        else:
            reasons.append(f"older {status} record ({note})")
    superseded = dropped.assign(reason=reasons)[SUPERSEDED_COLUMNS].reset_index(drop=True)
    return kept.drop(columns="finished").reset_index(drop=True), superseded


def _plain_rows(frame: pd.DataFrame, columns: Sequence[str]):
    """(column values...) per row as plain Python objects; itertuples over Arrow strings is slow."""
    return zip(*(frame[c].tolist() for c in columns))


def _bf16_values(records: Sequence[dict], kept: pd.DataFrame) -> pd.DataFrame:
    """The BF16 column: per (model, benchmark, metric), from the finished bf16 run, else embedded baselines."""
    rows = []
    bf16_runs = kept[(kept["recipe"] == BF16) & (kept["status"] == "finished")]
    for index, model, source in _plain_rows(bf16_runs, ("index", "model", "source")):
        for score in record_scores(records[index]):
            rows.append({"model": model, **score, "bf16_source": FROM_BF16_RUN, "status": "finished",
                         "source": source})
    # Newest finished records first, so a stale baseline never hides a fresh one.
    carriers = kept[kept["recipe"] != BF16].assign(finished=lambda df: df["status"] == "finished").sort_values(
        ["finished", "time"], ascending=[False, False], kind="stable")
    for index, model, source in _plain_rows(carriers, ("index", "model", "source")):
        for score in baseline_scores(records[index]):
            rows.append({"model": model, **score, "bf16_source": FROM_EMBEDDED_BASELINE,
                         "status": BASELINE_STATUS, "source": source})
    table = pd.DataFrame(rows, columns=["model", "benchmark", "metric", "value", "stderr", "higher_is_better",
                                        "bf16_source", "status", "source"])
    return table.drop_duplicates(["model", "benchmark", "metric"], keep="first").reset_index(drop=True)


def _recovery(value: pd.Series, bf16: pd.Series, higher_is_better: pd.Series) -> pd.Series:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(higher_is_better.astype(bool), value / bf16, bf16 / value)
    ratio = pd.Series(ratio, index=value.index, dtype=float)
    undefined = (bf16 == 0) | bf16.isna() | value.isna() | ~np.isfinite(ratio)
    return ratio.mask(undefined)


def _score_rows(records: Sequence[dict], kept: pd.DataFrame, bf16: pd.DataFrame) -> pd.DataFrame:
    """Long table: BF16 rows, then one row per score of every kept quantized record."""
    bf16_rows = bf16.assign(variant=BF16, recipe=BF16, kv_cache="none", calib_size=np.nan, note="")
    rows = []
    identity_columns = ("model", "variant", "recipe", "kv_cache", "calib_size", "status", "note", "source")
    for index, *identity_values in _plain_rows(kept[kept["recipe"] != BF16], ("index", *identity_columns)):
        identity = dict(zip(identity_columns, identity_values))
        scores = record_scores(records[index])
        # A point without scores still gets a row, so failures stay visible in the CSV too.
        for score in scores or [{"benchmark": "", "metric": "", "value": np.nan, "stderr": np.nan,
                                 "higher_is_better": True}]:
            rows.append({**identity, **score})
    quantized = pd.DataFrame(rows, columns=["model", "variant", "recipe", "kv_cache", "calib_size", "status",
                                            "note", "source", "benchmark", "metric", "value", "stderr",
                                            "higher_is_better"])
    # The BF16 run itself may be failed or unfinished: its point shows in the summary, not here.
    frames = [frame for frame in (bf16_rows, quantized) if not frame.empty]
    scores = pd.concat(frames, ignore_index=True) if frames else quantized.iloc[0:0]
    reference = bf16[["model", "benchmark", "metric", "value", "bf16_source"]].rename(columns={"value": "bf16"})
    scores = scores.drop(columns=["bf16_source"], errors="ignore").merge(
        reference, on=["model", "benchmark", "metric"], how="left")
    scores["bf16_source"] = scores["bf16_source"].fillna("")
    for column in ("value", "stderr", "bf16", "calib_size"):
        scores[column] = scores[column].astype(float)
    scores["higher_is_better"] = scores["higher_is_better"].astype(bool)
    scores["delta"] = scores["value"] - scores["bf16"]
    scores["recovery"] = _recovery(scores["value"], scores["bf16"], scores["higher_is_better"])
    return scores


def _row_sort_key(benchmark: str, metric: str) -> tuple:
    """Evaluation benchmarks alphabetically, the fidelity rows last in their fixed order."""
    if metric == FIDELITY_METRIC and benchmark in FIDELITY_ROWS:
        return (1, FIDELITY_ROWS.index(benchmark), "", "")
    return (0, 0, benchmark, metric)


def _order_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Sort by model, variant (see variant_sort_key) and benchmark row (see _row_sort_key)."""
    # Ranked by label, not by (recipe, kv, calib): calib_size may be NaN, which never equals itself as a key.
    variants = scores.drop_duplicates("variant")
    variant_order = sorted(zip(*(variants[c].tolist() for c in ("variant", "recipe", "kv_cache", "calib_size"))),
                           key=lambda v: (variant_sort_key(*v[1:]), v[0]))
    variant_rank = {variant[0]: rank for rank, variant in enumerate(variant_order)}
    row_keys = list(zip(scores["benchmark"].tolist(), scores["metric"].tolist()))
    row_rank = {row: rank for rank, row in enumerate(sorted(set(row_keys), key=lambda r: (_row_sort_key(*r), r)))}
    ranked = scores.assign(_variant=[variant_rank[v] for v in scores["variant"].tolist()],
                           _row=[row_rank[row] for row in row_keys])
    ordered = ranked.sort_values(["model", "_variant", "_row"], kind="stable")
    return ordered.drop(columns=["_variant", "_row"]).reset_index(drop=True)


def _summary(kept: pd.DataFrame, scores: pd.DataFrame, bf16: pd.DataFrame) -> pd.DataFrame:
    medians = scores.groupby(["model", "variant"])["recovery"].median().rename("median_recovery").reset_index()
    points = kept.copy()
    # A model compared only against embedded baselines still gets a BF16 line saying so.
    baseline_only = sorted(set(bf16.loc[bf16["bf16_source"] == FROM_EMBEDDED_BASELINE, "model"])
                           - set(kept.loc[kept["recipe"] == BF16, "model"]))
    if baseline_only:
        extra = pd.DataFrame({"model": baseline_only, "variant": BF16, "recipe": BF16, "kv_cache": "none",
                              "calib_size": np.nan, "status": BASELINE_STATUS, "compression": 1.0,
                              "bits_per_weight": 16.0,
                              "note": "no bf16 run: BF16 scores from baselines embedded in quantized records",
                              "source": ""})
        points = pd.concat([points, extra], ignore_index=True)
    summary = points.merge(medians, on=["model", "variant"], how="left")
    keys = [(model, variant_sort_key(recipe, kv, calib), variant) for model, recipe, kv, calib, variant in
            zip(*(summary[c].tolist() for c in ("model", "recipe", "kv_cache", "calib_size", "variant")))]
    order = sorted(range(len(summary)), key=keys.__getitem__)
    return summary.iloc[order][SUMMARY_COLUMNS].reset_index(drop=True)


def build_report(records: Sequence[dict], sources: Optional[Sequence[str]] = None,
                 skipped: Iterable[Tuple[str, str]] = ()) -> Report:
    """All tables from parsed run records; `sources` names each record (its path) in the output.

    Records that are not usable run records are added to `skipped` rather than raising.
    """
    if sources is None:
        sources = [f"record #{i}" for i in range(len(records))]
    skipped = list(skipped)
    usable, usable_sources = [], []
    for record, source in zip(records, sources):
        problem = record_problem(record)
        if problem:
            skipped.append((source, problem))
        else:
            usable.append(record)
            usable_sources.append(source)
    kept, superseded = _select(_points(usable, usable_sources))
    bf16 = _bf16_values(usable, kept)
    scores = _order_scores(_score_rows(usable, kept, bf16))[SCORE_COLUMNS]
    return Report(scores=scores, summary=_summary(kept, scores, bf16), superseded=superseded,
                  skipped=pd.DataFrame(skipped, columns=SKIPPED_COLUMNS))


def scores_table(records: Sequence[dict], sources: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Long table: one row per model / variant / benchmark / metric (see SCORE_COLUMNS)."""
    return build_report(records, sources).scores


def summary_table(records: Sequence[dict], sources: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per model and variant: status, median recovery, size, calibration (see SUMMARY_COLUMNS)."""
    return build_report(records, sources).summary


# ----------------------------------------------------------------------------------------------
# Formatting


def _fmt(x: float, spec: str) -> str:
    return "" if pd.isna(x) else format(x, spec)


def format_cell(value: float, delta: float, recovery: float) -> str:
    """`0.330 (-0.022, 93.8%)`; parts that are undefined are left out."""
    if pd.isna(value):
        return ""
    details = []
    if not pd.isna(delta):
        details.append(format(delta, "+.3f").replace("-0.000", "+0.000"))
    if not pd.isna(recovery):
        details.append(format(100 * recovery, ".1f") + "%")
    return format(value, ".3f") + (f" ({', '.join(details)})" if details else "")


def wide_table(scores: pd.DataFrame, model: str) -> pd.DataFrame:
    """Model-card table of one model: rows benchmark/metric, columns BF16 then the variants, text cells."""
    rows = scores[scores["model"] == model]
    variants = list(dict.fromkeys(rows["variant"]))  # already in display order, BF16 first
    if BF16 not in variants:
        variants.insert(0, BF16)
    rows = rows[rows["benchmark"] != ""]
    row_order = sorted(set(zip(rows["benchmark"].tolist(), rows["metric"].tolist())),
                       key=lambda r: (_row_sort_key(*r), r))
    row_position = {row: i for i, row in enumerate(row_order)}
    column_position = {variant: j for j, variant in enumerate(variants)}
    # Filled cell by cell into a grid: pivoting thousands of variant columns in pandas is far slower.
    grid = np.full((len(row_order), len(variants)), "", dtype=object)
    # Plain lists: iterating pandas' Arrow-backed string columns element by element is slow.
    for benchmark, metric, variant, value, delta, recovery in zip(*(rows[c].tolist() for c in (
            "benchmark", "metric", "variant", "value", "delta", "recovery"))):
        # The BF16 column is the reference: its delta and recovery say nothing.
        cell = format_cell(value, math.nan, math.nan) if variant == BF16 else format_cell(value, delta, recovery)
        grid[row_position[(benchmark, metric)], column_position[variant]] = cell
    labels = np.array(row_order, dtype=object).reshape(len(row_order), 2)
    return pd.DataFrame(np.hstack([labels, grid]), columns=["benchmark", "metric", *variants], dtype=object)


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Summary rows of one model as display text."""
    return pd.DataFrame({
        "variant": summary["variant"],
        "status": summary["status"],
        "median recovery": [_fmt(100 * r, ".1f") + "%" if not pd.isna(r) else "" for r in summary["median_recovery"]],
        "size (MB)": [_fmt(x, ".1f") for x in summary["checkpoint_mb"]],
        "compression": [_fmt(x, ".2f") + "x" if not pd.isna(x) else "" for x in summary["compression"]],
        "bits/weight": [_fmt(x, ".2f") for x in summary["bits_per_weight"]],
        "calib size": [_fmt(x, ".0f") for x in summary["calib_size"]],
        "calibrate (s)": [_fmt(x, ".1f") for x in summary["calibrate_s"]],
        "note": summary["note"],
    })


def _variant_headers(summary: pd.DataFrame, columns: Sequence[str]) -> List[str]:
    """Column titles; variants that did not finish say so in their title."""
    status = dict(zip(summary["variant"].tolist(), summary["status"].tolist()))
    titles = []
    for column in columns:
        state = status.get(column)
        marked = column not in ("benchmark", "metric") and state not in (None, "finished", BASELINE_STATUS)
        titles.append(f"{column} ({state})" if marked else column)
    return titles


def markdown_table(table: pd.DataFrame, headers: Optional[Sequence[str]] = None) -> str:
    def clean(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    headers = list(headers if headers is not None else table.columns)
    lines = ["| " + " | ".join(clean(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in table.to_numpy(dtype=object).tolist()]
    return "\n".join(lines)


def _bf16_origin(scores: pd.DataFrame, model: str) -> str:
    rows = scores[(scores["model"] == model) & (scores["variant"] == BF16)]
    origins = set(rows["bf16_source"])
    if not origins:
        return "BF16: no scores (no bf16 run and no embedded baseline)."
    if origins == {FROM_BF16_RUN}:
        return f"BF16: from run `{rows['source'].iat[0]}`."
    if origins == {FROM_EMBEDDED_BASELINE}:
        return "BF16: from the baselines embedded in the quantized records (no finished bf16 run)."
    return (f"BF16: from run `{rows.loc[rows['bf16_source'] == FROM_BF16_RUN, 'source'].iat[0]}`, rows it lacks "
            "from the baselines embedded in the quantized records.")


LEGEND = ("Cells: value (delta vs BF16, recovery). Recovery = value / BF16 where higher is better, BF16 / value "
          "where lower is better (perplexity, KL); blank where BF16 is 0 or missing. Median recovery is over the "
          "rows where recovery is defined.")


def render_markdown(report: Report) -> str:
    parts = ["# Quantization results", "", LEGEND]
    for model in report.models:
        summary = report.summary[report.summary["model"] == model]
        wide = wide_table(report.scores, model)
        parts += ["", f"## {model}", "", _bf16_origin(report.scores, model), "",
                  markdown_table(wide, _variant_headers(summary, wide.columns)),
                  "", f"### {model}: summary", "", markdown_table(format_summary(summary))]
        superseded = report.superseded[report.superseded["model"] == model]
        if not superseded.empty:
            parts += ["", f"### {model}: superseded records", ""]
            parts += [f"- `{r.source}` ({r.variant}): {r.reason}; kept `{r.kept}`" for r in superseded.itertuples()]
    if not report.skipped.empty:
        parts += ["", "## Skipped files", ""]
        parts += [f"- `{r.source}`: {r.reason}" for r in report.skipped.itertuples()]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------
# Plots and files


def plot_recovery_vs_bits(summary: pd.DataFrame, model: str) -> bytes:
    """PNG: median recovery (%) against bits per weight of the finished variants, BF16 at 16 bits / 100%."""
    # The Agg canvas directly, so importing this module never changes the caller's pyplot backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = summary[(summary["model"] == model) & (summary["variant"] != BF16) & (summary["status"] == "finished")]
    points = points[points["median_recovery"].notna() & points["bits_per_weight"].notna()]
    figure = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter(points["bits_per_weight"], 100 * points["median_recovery"], color="tab:blue", zorder=3)
    for row in points.itertuples():
        axes.annotate(row.variant, (row.bits_per_weight, 100 * row.median_recovery), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)
    axes.scatter([16], [100], marker="*", s=160, color="tab:red", zorder=3, label="bf16")
    axes.annotate(BF16, (16, 100), textcoords="offset points", xytext=(4, -12), fontsize=8)
    axes.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    axes.margins(x=0.12, y=0.12)  # room for the point labels
    axes.set_xlabel("bits per weight (checkpoint size vs BF16)")
    axes.set_ylabel("median recovery vs BF16 (%)")
    axes.set_title(f"{model}: median recovery vs bits per weight (finished runs)", fontsize=10)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_file_name(model: str) -> str:
    return "recovery_vs_bits_" + re.sub(r"[^A-Za-z0-9._-]", "_", model) + ".png"


def render_html(report: Report, plots: dict) -> str:
    """Self-contained page: the tables of results.md plus the plots inlined as base64 PNG."""
    def table(frame: pd.DataFrame, headers: Optional[Sequence[str]] = None) -> str:
        frame = frame.copy()
        if headers is not None:
            frame.columns = list(headers)
        return frame.to_html(index=False, escape=True, border=0, na_rep="")

    body = ["<h1>Quantization results</h1>", f"<p>{html.escape(LEGEND)}</p>"]
    for model in report.models:
        summary = report.summary[report.summary["model"] == model]
        wide = wide_table(report.scores, model)
        body += [f"<h2>{html.escape(model)}</h2>", f"<p>{html.escape(_bf16_origin(report.scores, model))}</p>",
                 table(wide, _variant_headers(summary, wide.columns)),
                 f"<h3>{html.escape(model)}: summary</h3>", table(format_summary(summary))]
        if model in plots:
            encoded = base64.b64encode(plots[model]).decode("ascii")
            body.append(f'<p><img alt="median recovery vs bits per weight, {html.escape(model)}" '
                        f'src="data:image/png;base64,{encoded}"></p>')
        superseded = report.superseded[report.superseded["model"] == model]
        if not superseded.empty:
            body += [f"<h3>{html.escape(model)}: superseded records</h3>", table(superseded[SUPERSEDED_COLUMNS])]
    if not report.skipped.empty:
        body += ["<h2>Skipped files</h2>", table(report.skipped)]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f2f2f2}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Quantization results</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(report: Report, out_dir: Path) -> Tuple[str, List[Path]]:
    """Write results.md/.csv/.html and the plots into `out_dir`; returns (Markdown, written paths)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(report)
    plots = {model: plot_recovery_vs_bits(report.summary, model) for model in report.models}
    written = []
    for model, png in plots.items():
        path = out_dir / plot_file_name(model)
        path.write_bytes(png)
        written.append(path)
    for name, text in (("results.md", markdown), ("results.html", render_html(report, plots))):
        (out_dir / name).write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    report.scores.to_csv(out_dir / "results.csv", index=False)
    written.append(out_dir / "results.csv")
    return markdown, written


def find_run_records(paths: Iterable[Path]) -> List[Path]:
    """Every run.json below the given folders, plus the given files themselves; each once, in order."""
    found, seen = [], set()
    for path in map(Path, paths):
        if path.is_dir():
            candidates = sorted(p for p in path.rglob(RUN_RECORD_NAME) if p.is_file())
        elif path.is_file():
            candidates = [path]
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
    return found


def pending_points(paths: Iterable[Path]) -> List[dict]:
    """Points of Slurm sweeps (their sweep.json) submitted but without a run record yet, as records."""
    points = []
    for path in map(Path, paths):
        for manifest in (sorted(path.rglob(MANIFEST_NAME)) if path.is_dir() else []):
            try:
                entries = json.loads(manifest.read_text(encoding="utf-8"))["points"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            for point in entries:
                out = point.get("output_dir")
                if point.get("state") != "submitted" or not out or (Path(out).expanduser() / RUN_RECORD_NAME).exists():
                    continue
                if not record_problem(point):
                    points.append({**{k: point.get(k) for k in ("model", "recipe", "kv_cache", "calib_size", "calib_seq_len")},
                                   "status": "pending", "output_dir": out, "slurm_job": point.get("job_id"),
                                   "manifest": str(manifest)})
    return points


def load_records(files: Sequence[Path]) -> Tuple[List[dict], List[str], List[Tuple[str, str]]]:
    """(records, their paths, skipped (path, reason)): unreadable or non-record files never stop the load."""
    from tqdm import tqdm

    records, sources, skipped = [], [], []
    for path in tqdm(files, desc="reading run records", unit="file", file=sys.stderr,
                     disable=len(files) < PROGRESS_THRESHOLD):
        try:
            record = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            skipped.append((str(path), f"unreadable JSON: {exc}"))
            continue
        problem = record_problem(record)
        if problem:
            skipped.append((str(path), problem))
        else:
            records.append(record)
            sources.append(str(path))
    return records, sources, skipped


def default_out_dir(paths: Sequence[Path]) -> Path:
    first = Path(paths[0])
    return (first if first.is_dir() else first.parent) / "report"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptq.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="folders to search for run.json, or run.json files")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: report/ under the first given folder)")
    args = parser.parse_args(argv)
    try:
        files = find_run_records(args.paths)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    pending = pending_points(args.paths)
    if not files and not pending:
        print(f"no {RUN_RECORD_NAME} found under: {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 1
    records, sources, skipped = load_records(files)
    records += pending
    sources += [p["manifest"] for p in pending]
    report = build_report(records, sources, skipped)
    out_dir = args.out or default_out_dir(args.paths)
    markdown, written = write_report(report, out_dir)
    sys.stdout.write(markdown)
    print(f"{len(records)} records read, {len(skipped)} skipped; wrote {len(written)} files to {out_dir}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
