"""Tables: parsed records in, DataFrames out (pure)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ptq.report.common import (
    BASELINE_STATUS, BF16, FIDELITY_METRIC, FIDELITY_ROWS, FIDELITY_SUMMARY_COLUMNS, FROM_BF16_RUN, FROM_EMBEDDED_BASELINE,
    LAYER_KIND_COLUMNS, SCORE_COLUMNS,
    SKIPPED_COLUMNS, SUMMARY_COLUMNS, SUPERSEDED_COLUMNS,
)
from ptq.report.read import (
    as_number, as_timestamp, baseline_scores, difference_error, fidelity_summary, record_calib_size, record_eval_tag, record_kv_cache, record_problem, record_scores,
    section, served_by, status_note, variant_label, variant_sort_key,
)
from ptq.stats import paired_delta_stderr


@dataclass
class Report:
    scores: pd.DataFrame
    summary: pd.DataFrame
    superseded: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SKIPPED_COLUMNS))
    layer_kinds: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=LAYER_KIND_COLUMNS))

    @property
    def models(self) -> List[str]:
        return sorted(set(self.summary["model"]) | set(self.scores["model"]))


def _points(records: Sequence[dict], sources: Sequence[str]) -> pd.DataFrame:
    """One row per record: what identifies it and what the summary shows about it."""
    rows = []
    for index, (record, source) in enumerate(zip(records, sources)):
        status = record.get("status") if isinstance(record.get("status"), str) else "unknown"
        size, timings = section(record, "size"), section(record, "timings_s")
        finished_at = record.get("finished_at") if isinstance(record.get("finished_at"), str) else ""
        calib = record_calib_size(record)
        rows.append({
            "index": index, "model": record["model"], "variant": variant_label(record),
            # BF16's results are matched by fingerprint whatever the folder; a variant evaluated two ways is two.
            "eval_tag": "" if record["recipe"] == BF16 else record_eval_tag(record),
            "recipe": record["recipe"], "kv_cache": record_kv_cache(record),
            "calib_size": np.nan if record["recipe"] == BF16 else as_number(calib),
            "status": status, "finished_at": finished_at,
            # Running records have no finish time yet; their start orders them among themselves.
            "time": as_timestamp(finished_at or record.get("started_at")),
            "checkpoint_mb": as_number(size.get("checkpoint_bytes")) / 1e6,
            "compression": as_number(size.get("compression")),
            "bits_per_weight": as_number(size.get("bits_per_weight")),
            "calibrate_s": as_number(timings.get("calibrate")),
            **fidelity_summary(record),
            "served_by": served_by(record),
            "note": status_note(status, record.get("error")), "source": source,
        })
    return pd.DataFrame(rows, columns=["index", "model", "variant", "eval_tag", "recipe", "kv_cache", "calib_size", "status",
                                       "finished_at", "time", "checkpoint_mb", "compression", "bits_per_weight",
                                       "calibrate_s", *FIDELITY_SUMMARY_COLUMNS, "served_by", "note", "source"])


def _select(points: pd.DataFrame) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, superseded): one record per (model, variant, evaluation settings), finished before unfinished, newest
    first. A variant kept under several evaluation settings is named with each one's tag."""
    ordered = points.assign(finished=points["status"] == "finished").sort_values(
        ["model", "variant", "eval_tag", "finished", "time", "source"], ascending=[True, True, True, False, False, True],
        kind="stable")
    key = ["model", "variant", "eval_tag"]
    duplicate = ordered.duplicated(key, keep="first")
    kept, dropped = ordered[~duplicate].copy(), ordered[duplicate]
    winners = kept[[*key, "source", "finished"]].rename(columns={"source": "kept", "finished": "kept_finished"})
    dropped = dropped.merge(winners, on=key, how="left")
    ways = kept.groupby(["model", "variant"])["eval_tag"].transform("nunique")
    several = (ways > 1).to_numpy()
    kept.loc[several, "variant"] = [f"{v} [{t or 'no eval'}]" for v, t in
                                    zip(kept.loc[several, "variant"], kept.loc[several, "eval_tag"])]
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
    table = pd.DataFrame(rows, columns=["model", "benchmark", "subject", "metric", "value", "stderr", "higher_is_better",
                                        "fingerprint", "items", "bf16_source", "status", "source"])
    # One BF16 value per way of measuring (fingerprint): results on other items or settings stay, as rows of
    # their own, and are compared only with variants measured the same way.
    return table.drop_duplicates(["model", "benchmark", "metric", "fingerprint"], keep="first").reset_index(drop=True)


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
                                 "higher_is_better": True, "items": None, "subject": ""}]:
            rows.append({**identity, **score})
    quantized = pd.DataFrame(rows, columns=["model", "variant", "recipe", "kv_cache", "calib_size", "status",
                                            "note", "source", "benchmark", "subject", "metric", "value", "stderr",
                                            "higher_is_better", "fingerprint", "items"])
    # The BF16 run itself may be failed or unfinished: its point shows in the summary, not here.
    frames = [frame for frame in (bf16_rows, quantized) if not frame.empty]
    scores = pd.concat(frames, ignore_index=True) if frames else quantized.iloc[0:0]
    scores["fingerprint"] = scores["fingerprint"].astype(object).fillna("")
    scores["subject"] = scores["subject"].astype(object).fillna("")
    reference = bf16[["model", "benchmark", "metric", "fingerprint", "value", "items", "bf16_source"]].rename(
        columns={"value": "bf16", "items": "bf16_items"})
    scores = scores.drop(columns=["bf16_source"], errors="ignore").merge(
        reference, on=["model", "benchmark", "metric", "fingerprint"], how="left")
    scores["bf16_source"] = scores["bf16_source"].fillna("")
    # A BF16 result exists for the row, but none measured on the same items and settings: not a comparison.
    measured = set(zip(bf16["model"].tolist(), bf16["benchmark"].tolist(), bf16["metric"].tolist()))
    unmatched = [variant != BF16 and math.isnan(b) and (m, bench, metric) in measured
                 for variant, b, m, bench, metric in zip(*(scores[c].tolist() for c in (
                     "variant", "bf16", "model", "benchmark", "metric")))]
    scores.loc[unmatched, "note"] = [(f"{n}; " if n else "") + UNMATCHED_NOTE for n in scores.loc[unmatched, "note"]]
    for column in ("value", "stderr", "bf16", "calib_size"):
        scores[column] = scores[column].astype(float)
    scores["higher_is_better"] = scores["higher_is_better"].astype(bool)
    scores["delta"] = scores["value"] - scores["bf16"]
    scores["recovery"] = _recovery(scores["value"], scores["bf16"], scores["higher_is_better"])
    # The difference's standard error from the same items scored by both (paired), where both kept them.
    paired = [paired_delta_stderr(items, bf16_items) if variant != BF16 else (math.nan, 0) for variant, items, bf16_items
              in zip(scores["variant"].tolist(), scores["items"].tolist(), scores["bf16_items"].tolist())]
    scores["delta_stderr"] = [se for se, _ in paired]
    scores["paired_items"] = [n for _, n in paired]
    scores["delta_error"] = [math.nan if variant == BF16 else difference_error(metric, dse, se) for variant, metric, dse, se
                             in zip(*(scores[c].tolist() for c in ("variant", "metric", "delta_stderr", "stderr")))]
    return scores.drop(columns=["items", "bf16_items"])


UNMATCHED_NOTE = "not compared: no BF16 result measured on the same items, data and settings"


def row_sort_key(benchmark: str, metric: str) -> tuple:
    """Evaluation benchmarks alphabetically, the fidelity rows last in their fixed order."""
    if metric == FIDELITY_METRIC and benchmark in FIDELITY_ROWS:
        return (1, FIDELITY_ROWS.index(benchmark), "", "")
    return (0, 0, benchmark, metric)


def _order_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Sort by model, variant (see variant_sort_key) and benchmark row (see row_sort_key)."""
    # Ranked by label, not by (recipe, kv, calib): calib_size may be NaN, which never equals itself as a key.
    variants = scores.drop_duplicates("variant")
    variant_order = sorted(zip(*(variants[c].tolist() for c in ("variant", "recipe", "kv_cache", "calib_size"))),
                           key=lambda v: (variant_sort_key(*v[1:]), v[0]))
    variant_rank = {variant[0]: rank for rank, variant in enumerate(variant_order)}
    row_keys = list(zip(scores["benchmark"].tolist(), scores["metric"].tolist()))
    row_rank = {row: rank for rank, row in enumerate(sorted(set(row_keys), key=lambda r: (row_sort_key(*r), r)))}
    ranked = scores.assign(_variant=[variant_rank[v] for v in scores["variant"].tolist()],
                           _row=[row_rank[row] for row in row_keys])
    ordered = ranked.sort_values(["model", "_variant", "_row"], kind="stable")
    return ordered.drop(columns=["_variant", "_row"]).reset_index(drop=True)


def _layer_kinds(records: Sequence[dict], kept: pd.DataFrame) -> pd.DataFrame:
    """kind -> format -> layers and parameter share per kept variant, from each record's validation (models with
    routed experts or Mamba layers only: for dense models the summary's size columns say it all)."""
    rows = []
    for index, model, variant in _plain_rows(kept, ("index", "model", "variant")):
        summary = section(section(records[index], "validation"), "layer_kinds")
        kinds, total = section(summary, "kinds"), as_number(summary.get("params"))
        if not any(k in kinds for k in ("routed_expert", "mamba_in_proj")) or not total or math.isnan(total):
            continue
        for kind, formats in kinds.items():
            for fmt, cell in (formats if isinstance(formats, dict) else {}).items():
                cell = cell if isinstance(cell, dict) else {}
                params = as_number(cell.get("params"))
                rows.append({"model": model, "variant": variant, "kind": kind, "format": fmt,
                             "layers": as_number(cell.get("layers")), "params": params, "share": params / total})
    return pd.DataFrame(rows, columns=LAYER_KIND_COLUMNS)


def _summary(kept: pd.DataFrame, scores: pd.DataFrame, bf16: pd.DataFrame) -> pd.DataFrame:
    # The median recovery is over benchmark results only; the fidelity figures (KL, perplexity ratio) have
    # columns of their own, with their uncertainty.
    benchmarks = scores[(scores["metric"] != FIDELITY_METRIC) & (scores["subject"] == "")]
    medians = benchmarks.groupby(["model", "variant"])["recovery"].median().rename("median_recovery").reset_index()
    points = kept.copy()
    # A model compared only against embedded baselines still gets a BF16 line saying so.
    baseline_only = sorted(set(bf16.loc[bf16["bf16_source"] == FROM_EMBEDDED_BASELINE, "model"])
                           - set(kept.loc[kept["recipe"] == BF16, "model"]))
    if baseline_only:
        extra = pd.DataFrame({"model": baseline_only, "variant": BF16, "recipe": BF16, "kv_cache": "none",
                              "calib_size": np.nan, "status": BASELINE_STATUS, "compression": 1.0,
                              "bits_per_weight": 16.0, "served_by": "",
                              **{c: np.nan for c in FIDELITY_SUMMARY_COLUMNS},
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
                  skipped=pd.DataFrame(skipped, columns=SKIPPED_COLUMNS), layer_kinds=_layer_kinds(usable, kept))


def scores_table(records: Sequence[dict], sources: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Long table: one row per model / variant / benchmark / metric (see SCORE_COLUMNS)."""
    return build_report(records, sources).scores


def summary_table(records: Sequence[dict], sources: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per model and variant: status, median recovery, size, calibration (see SUMMARY_COLUMNS)."""
    return build_report(records, sources).summary
