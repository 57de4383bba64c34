"""Tables: parsed records in, DataFrames out (pure)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ptq.report.calib_kinds import CALIB_KIND_COLUMNS, calib_kind_table
from ptq.report.common import (
    BASELINE_STATUS,
    BENCHMARK_SUMMARY_COLUMNS,
    BF16,
    FIDELITY_METRIC,
    FIDELITY_ROWS,
    FIDELITY_SUMMARY_COLUMNS,
    FROM_BF16_RUN,
    FROM_EMBEDDED_BASELINE,
    LAYER_KIND_COLUMNS,
    SCORE_COLUMNS,
    SKIPPED_COLUMNS,
    SUMMARY_COLUMNS,
    SUPERSEDED_COLUMNS,
    Z_95,
    within_noise,
)
from ptq.report.read import (
    as_number,
    as_timestamp,
    baseline_scores,
    calib_source,
    difference_error,
    fidelity_fingerprint,
    fidelity_setting,
    fidelity_summary,
    record_scores,
    recover_key,
    section,
    served_by,
    status_note,
    variant_label,
    variant_sort_key,
)
from ptq.report.training import TRAINING_COLUMNS, training_table
from ptq.run_record import RecordProblem, RunRecord
from ptq.stats import paired_delta_stderr


@dataclass
class Report:
    scores: pd.DataFrame
    summary: pd.DataFrame
    superseded: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SKIPPED_COLUMNS))
    layer_kinds: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=LAYER_KIND_COLUMNS))
    # Training after PTQ against the PTQ point it started from (ptq/report/training.py).
    training: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TRAINING_COLUMNS))
    # Vision-language models: image-text calibration against text calibration (ptq/report/calib_kinds.py).
    calib_kinds: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CALIB_KIND_COLUMNS))

    @property
    def models(self) -> List[str]:
        return sorted(set(self.summary["model"]) | set(self.scores["model"]))


def _points(records: Sequence[RunRecord], sources: Sequence[str]) -> pd.DataFrame:
    """One row per record: what identifies it and what the summary shows about it."""
    rows = []
    for index, (record, source) in enumerate(zip(records, sources)):
        status = record.status
        size, timings = record.section("size"), record.section("timings_s")
        finished_at = record.finished_at or ""
        bf16 = record.is_bf16
        # What the checkpoint is made from (BF16 makes none: its calibration settings mean nothing) and how it was
        # measured (evaluation settings, fidelity text and sampling): records that differ in any are different points.
        seq_len = math.nan if bf16 else as_number(record.calib_seq_len)
        recover = record.recover
        rows.append(
            {
                "index": index,
                "model": record.model,
                "base": variant_label(record),
                "base_seq": variant_label(record, with_seq_len=True),
                "eval_tag": record.eval_tag,
                "fidelity_fp": fidelity_fingerprint(record),
                "fidelity_setting": fidelity_setting(record),
                "recipe": record.recipe,
                "kv_cache": record.kv_cache,
                "calib_size": np.nan if bf16 else as_number(record.calib_size),
                "calib_seq_len": seq_len,
                "seq_key": "" if math.isnan(seq_len) else format(seq_len, "g"),
                "calib_source": "" if bf16 else calib_source(record),
                "status": status,
                "finished_at": finished_at,
                # Running records have no finish time yet; their start orders them among themselves.
                "time": as_timestamp(finished_at or record.started_at),
                "checkpoint_mb": as_number(size.get("checkpoint_bytes")) / 1e6,
                "compression": as_number(size.get("compression")),
                "bits_per_weight": as_number(size.get("bits_per_weight")),
                "calibrate_s": as_number(timings.get("calibrate")),
                **peak_gpu(record),
                **fidelity_summary(record.section("fidelity")),
                "served_by": served_by(record),
                "recipe_file": record.recipe_file,
                "note": status_note(status, record.error),
                "source": source,
                # Training after PTQ: its settings make another point of the recipe; `ptq_base` is the PTQ point's label.
                "recover_key": recover_key(recover),
                "ptq_base": variant_label(record, with_recover=False),
                "recover_method": recover.get("method", ""),
                "recover_steps": as_number(recover.get("steps")),
                "recover_lr": as_number(recover.get("lr")),
                # The same run's fidelity before training, on the same held-out tokens (recovery.ptq_fidelity).
                **{
                    f"own_ptq_{k}": v
                    for k, v in fidelity_summary(record.section("recovery").get("ptq_fidelity")).items()
                },
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "index",
            "model",
            "base",
            "base_seq",
            "eval_tag",
            "fidelity_fp",
            "fidelity_setting",
            "recipe",
            "kv_cache",
            "calib_size",
            "calib_seq_len",
            "seq_key",
            "calib_source",
            "status",
            "finished_at",
            "time",
            "checkpoint_mb",
            "compression",
            "bits_per_weight",
            "calibrate_s",
            "peak_gpu_gb",
            "peak_gpu_x_bf16",
            *FIDELITY_SUMMARY_COLUMNS,
            "served_by",
            "recipe_file",
            "note",
            "source",
            "recover_key",
            "ptq_base",
            "recover_method",
            "recover_steps",
            "recover_lr",
            *(f"own_ptq_{c}" for c in FIDELITY_SUMMARY_COLUMNS),
        ],
    )


# Records that agree on all of these are one point measured again (the newest finished one is used); records that
# differ in any are different points, each kept and named by what differs (see _name_points).
POINT_KEY = ["model", "base", "seq_key", "calib_source", "eval_tag", "fidelity_fp", "recover_key"]


def _name_points(kept: pd.DataFrame) -> List[str]:
    """Labels that name every setting in which a model's points differ.

    The calibration sequence length is named after the size wherever a model's quantized points differ in it
    (`fp8@32x256`, `fp8@32x128`, `int4_awq@32x256`). Where two points would still share a label, what tells them
    apart is named too: the calibration text and its seed (`[calib valid.txt seed 7]`), the evaluation settings' tag
    (`[eval_local_quick_3fa2c1]`) and the fidelity setting (`[fidelity 128 tok x 32]`, with the fingerprint's start
    where the setting reads the same); the tables split rows measured differently anyway."""
    labels = kept["base"].tolist()
    quantized = (kept["recipe"] != BF16).to_numpy()
    models = kept["model"].to_numpy()
    for model in set(kept["model"]):
        mine = (models == model) & quantized
        if kept.loc[mine, "seq_key"].nunique() > 1:
            for i in np.flatnonzero(mine):
                labels[i] = kept["base_seq"].iat[i]
    groups: dict = {}
    for i, (model, label) in enumerate(zip(kept["model"].tolist(), labels)):
        groups.setdefault((model, label), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        texts = {kept["calib_source"].iat[i] for i in members}
        tags = {kept["eval_tag"].iat[i] for i in members}
        prints = {kept["fidelity_fp"].iat[i] for i in members}
        settings = {kept["fidelity_setting"].iat[i] for i in members}
        trainings = {kept["recover_key"].iat[i] for i in members}
        for i in members:
            parts = []
            if len(trainings) > 1:  # the label names method and steps; the learning rate (or the rest) tells apart
                lrs = {kept["recover_lr"].iat[i] for i in members}
                parts.append(
                    f"lr {kept['recover_lr'].iat[i]:g}"
                    if len(lrs) == len(members)
                    else f"training #{kept['recover_key'].iat[i][:6] or 'none'}"
                )
            if len(texts) > 1:
                parts.append(f"calib {kept['calib_source'].iat[i] or 'unknown'}")
            if len(tags) > 1:
                parts.append(kept["eval_tag"].iat[i] or "no eval")
            if len(prints) > 1:
                fid = f"fidelity {kept['fidelity_setting'].iat[i] or 'unknown'}"
                if len(settings) < len(prints):  # e.g. another seed: the fingerprint tells them apart
                    fid += f" #{kept['fidelity_fp'].iat[i][:6] or 'none'}"
                parts.append(fid)
            labels[i] += f" [{'; '.join(parts)}]"
    return labels


def _select(points: pd.DataFrame) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, superseded): one record per point (POINT_KEY: model, variant, calibration, evaluation and fidelity
    settings), finished before unfinished, newest first. BF16 runs measured in different ways are different points
    too: each one's results stay, compared with the variants measured the same way."""
    ordered = points.assign(finished=points["status"] == "finished").sort_values(
        [*POINT_KEY, "finished", "time", "source"],
        ascending=[True] * len(POINT_KEY) + [False, False, True],
        kind="stable",
    )
    duplicate = ordered.duplicated(POINT_KEY, keep="first")
    kept, dropped = ordered[~duplicate].copy(), ordered[duplicate]
    kept["variant"] = _name_points(kept.reset_index(drop=True))
    # A superseded record is listed under the label of the point that replaced it.
    winners = kept[[*POINT_KEY, "variant", "source", "finished"]].rename(
        columns={"source": "kept", "finished": "kept_finished"}
    )
    dropped = dropped.merge(winners, on=POINT_KEY, how="left")
    reasons = []
    for finished, kept_finished, finished_at, status, note in zip(
        *(dropped[c].tolist() for c in ("finished", "kept_finished", "finished_at", "status", "note"))
    ):
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


def _bf16_values(records: Sequence[RunRecord], kept: pd.DataFrame) -> pd.DataFrame:
    """The BF16 column: per (model, benchmark, metric), from the finished bf16 run, else embedded baselines."""
    rows = []
    # Newest first: of two BF16 runs that measured a row the same way, the newer one's value is shown.
    bf16_runs = kept[(kept["recipe"] == BF16) & (kept["status"] == "finished")].sort_values(
        "time", ascending=False, kind="stable"
    )
    for index, model, source in _plain_rows(bf16_runs, ("index", "model", "source")):
        for score in record_scores(records[index]):
            rows.append({"model": model, **score, "bf16_source": FROM_BF16_RUN, "status": "finished", "source": source})
    # Newest finished records first, so a stale baseline never hides a fresh one.
    carriers = (
        kept[kept["recipe"] != BF16]
        .assign(finished=lambda df: df["status"] == "finished")
        .sort_values(["finished", "time"], ascending=[False, False], kind="stable")
    )
    for index, model, source in _plain_rows(carriers, ("index", "model", "source")):
        for score in baseline_scores(records[index]):
            rows.append(
                {
                    "model": model,
                    **score,
                    "bf16_source": FROM_EMBEDDED_BASELINE,
                    "status": BASELINE_STATUS,
                    "source": source,
                }
            )
    table = pd.DataFrame(
        rows,
        columns=[
            "model",
            "benchmark",
            "subject",
            "metric",
            "setting",
            "value",
            "stderr",
            "higher_is_better",
            "fingerprint",
            "items",
            "bf16_source",
            "status",
            "source",
        ],
    )
    # One BF16 value per way of measuring (fingerprint): results on other items or settings stay, as rows of
    # their own, and are compared only with variants measured the same way.
    return table.drop_duplicates(["model", "benchmark", "metric", "fingerprint"], keep="first").reset_index(drop=True)


def _recovery(value: pd.Series, bf16: pd.Series, higher_is_better: pd.Series) -> pd.Series:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(higher_is_better.astype(bool), value / bf16, bf16 / value)
    ratio = pd.Series(ratio, index=value.index, dtype=float)
    undefined = (bf16 == 0) | bf16.isna() | value.isna() | ~np.isfinite(ratio)
    return ratio.mask(undefined)


def _score_rows(records: Sequence[RunRecord], kept: pd.DataFrame, bf16: pd.DataFrame) -> pd.DataFrame:
    """Long table: BF16 rows, then one row per score of every kept quantized record."""
    bf16_rows = bf16.assign(variant=BF16, recipe=BF16, kv_cache="none", calib_size=np.nan, note="")
    rows = []
    identity_columns = ("model", "variant", "recipe", "kv_cache", "calib_size", "status", "note", "source")
    for index, *identity_values in _plain_rows(kept[kept["recipe"] != BF16], ("index", *identity_columns)):
        identity = dict(zip(identity_columns, identity_values))
        scores = record_scores(records[index])
        # A point without scores still gets a row, so failures stay visible in the CSV too.
        for score in scores or [
            {
                "benchmark": "",
                "metric": "",
                "value": np.nan,
                "stderr": np.nan,
                "higher_is_better": True,
                "items": None,
                "subject": "",
                "setting": "",
                "fingerprint": "",
            }
        ]:
            rows.append({**identity, **score})
    quantized = pd.DataFrame(
        rows,
        columns=[
            "model",
            "variant",
            "recipe",
            "kv_cache",
            "calib_size",
            "status",
            "note",
            "source",
            "benchmark",
            "subject",
            "metric",
            "setting",
            "value",
            "stderr",
            "higher_is_better",
            "fingerprint",
            "items",
        ],
    )
    # The BF16 run itself may be failed or unfinished: its point shows in the summary, not here.
    frames = [frame for frame in (bf16_rows, quantized) if not frame.empty]
    scores = pd.concat(frames, ignore_index=True) if frames else quantized.iloc[0:0]
    scores["fingerprint"] = scores["fingerprint"].astype(object).fillna("")
    scores["subject"] = scores["subject"].astype(object).fillna("")
    scores["setting"] = scores["setting"].astype(object).fillna("")
    reference = bf16[["model", "benchmark", "metric", "fingerprint", "value", "items", "bf16_source"]].rename(
        columns={"value": "bf16", "items": "bf16_items"}
    )
    scores = scores.drop(columns=["bf16_source"], errors="ignore").merge(
        reference, on=["model", "benchmark", "metric", "fingerprint"], how="left"
    )
    scores["bf16_source"] = scores["bf16_source"].fillna("")
    # A BF16 result exists for the row, but none measured on the same items and settings: not a comparison.
    measured = set(zip(bf16["model"].tolist(), bf16["benchmark"].tolist(), bf16["metric"].tolist()))
    unmatched = [
        variant != BF16 and math.isnan(b) and (m, bench, metric) in measured
        for variant, b, m, bench, metric in zip(
            *(scores[c].tolist() for c in ("variant", "bf16", "model", "benchmark", "metric"))
        )
    ]
    scores.loc[unmatched, "note"] = [(f"{n}; " if n else "") + UNMATCHED_NOTE for n in scores.loc[unmatched, "note"]]
    for column in ("value", "stderr", "bf16", "calib_size"):
        scores[column] = scores[column].astype(float)
    scores["higher_is_better"] = scores["higher_is_better"].astype(bool)
    scores["delta"] = scores["value"] - scores["bf16"]
    scores["recovery"] = _recovery(scores["value"], scores["bf16"], scores["higher_is_better"])
    # The difference's standard error from the same items scored by both (paired), where both kept them.
    paired = [
        paired_delta_stderr(items, bf16_items) if variant != BF16 else (math.nan, 0)
        for variant, items, bf16_items in zip(
            scores["variant"].tolist(), scores["items"].tolist(), scores["bf16_items"].tolist()
        )
    ]
    scores["delta_stderr"] = [se for se, _ in paired]
    scores["paired_items"] = [n for _, n in paired]
    scores["delta_error"] = [
        math.nan if variant == BF16 else difference_error(metric, dse, se)
        for variant, metric, dse, se in zip(
            *(scores[c].tolist() for c in ("variant", "metric", "delta_stderr", "stderr"))
        )
    ]
    return scores.drop(columns=["items", "bf16_items"])


UNMATCHED_NOTE = "not compared: no BF16 result measured on the same items, data and settings"


def row_sort_key(benchmark: str, metric: str) -> tuple:
    """Evaluation benchmarks alphabetically, the fidelity rows last in their fixed order."""
    if metric == FIDELITY_METRIC and benchmark in FIDELITY_ROWS:
        return (1, FIDELITY_ROWS.index(benchmark), "", "")
    return (0, 0, benchmark, metric)


def measured_names(rows: pd.DataFrame) -> List[str]:
    """Per row, its benchmark as the tables name it: the benchmark alone where every row of that (model, benchmark,
    metric) was measured the same way (one fingerprint), else with what this row was measured on
    (`perplexity [256 tok x 32]`, `arc [300 items]`) and, where that does not tell two apart, the fingerprint's start
    (`#3fa2c1`)."""
    keys = list(zip(*(rows[c].tolist() for c in ("model", "benchmark", "metric", "fingerprint"))))
    setting_of: dict = {}
    for key, setting in zip(keys, rows["setting"].tolist()):
        if not setting_of.get(key):
            setting_of[key] = setting
    ways: dict = {}
    for key, setting in setting_of.items():
        ways.setdefault(key[:3], []).append(setting)
    names = []
    for key in keys:
        settings = ways[key[:3]]
        if len(settings) < 2:
            names.append(key[1])
            continue
        setting = setting_of[key]
        shared = not setting or settings.count(setting) > 1
        described = " ".join(part for part in (setting, f"#{key[3][:6] or 'none'}" if shared else "") if part)
        names.append(f"{key[1]} [{described}]")
    return names


def _order_scores(scores: pd.DataFrame, kept: pd.DataFrame) -> pd.DataFrame:
    """Sort by model, variant (see variant_sort_key) and benchmark row (see row_sort_key, then setting)."""
    # Ranked by label, not by (recipe, kv, calib): calib_size may be NaN, which never equals itself as a key.
    seq_len = dict(zip(kept["variant"].tolist(), kept["calib_seq_len"].tolist()))
    variants = scores.drop_duplicates("variant")
    variant_order = sorted(
        zip(*(variants[c].tolist() for c in ("variant", "recipe", "kv_cache", "calib_size"))),
        key=lambda v: (variant_sort_key(*v[1:], seq_len.get(v[0], math.nan)), v[0]),
    )
    variant_rank = {variant[0]: rank for rank, variant in enumerate(variant_order)}
    row_keys = list(zip(scores["benchmark"].tolist(), scores["metric"].tolist(), scores["setting"].tolist()))
    row_rank = {row: rank for rank, row in enumerate(sorted(set(row_keys), key=lambda r: (row_sort_key(*r[:2]), r)))}
    ranked = scores.assign(
        _variant=[variant_rank[v] for v in scores["variant"].tolist()], _row=[row_rank[row] for row in row_keys]
    )
    ordered = ranked.sort_values(["model", "_variant", "_row"], kind="stable")
    return ordered.drop(columns=["_variant", "_row"]).reset_index(drop=True)


def _layer_kinds(records: Sequence[RunRecord], kept: pd.DataFrame) -> pd.DataFrame:
    """kind -> format -> layers and parameter share per kept variant, from each record's validation (models with
    routed experts or Mamba layers only: for dense models the summary's size columns say it all)."""
    rows = []
    for index, model, variant in _plain_rows(kept, ("index", "model", "variant")):
        summary = section(records[index].section("validation"), "layer_kinds")
        kinds, total = section(summary, "kinds"), as_number(summary.get("params"))
        if not any(k in kinds for k in ("routed_expert", "mamba_in_proj")) or not total or math.isnan(total):
            continue
        for kind, formats in kinds.items():
            for fmt, cell in (formats if isinstance(formats, dict) else {}).items():
                cell = cell if isinstance(cell, dict) else {}
                params = as_number(cell.get("params"))
                rows.append(
                    {
                        "model": model,
                        "variant": variant,
                        "kind": kind,
                        "format": fmt,
                        "layers": as_number(cell.get("layers")),
                        "params": params,
                        "share": params / total,
                    }
                )
    return pd.DataFrame(rows, columns=LAYER_KIND_COLUMNS)


def _recovery_bounds(value: float, bf16: float, error: float, higher_is_better: bool) -> Tuple[float, float]:
    """The recovery's 95% interval from the difference's standard error (BF16 taken as fixed: the error is the
    difference's, both sides' noise in it); NaN where no error is known."""
    if math.isnan(error) or error <= 0 or math.isnan(bf16) or bf16 == 0 or math.isnan(value):
        return math.nan, math.nan
    low, high = value - Z_95 * error, value + Z_95 * error
    if higher_is_better:
        return low / bf16, high / bf16
    return bf16 / high if high > 0 else 0.0, bf16 / low if low > 0 else math.inf


# The score columns the summary of a point's benchmark rows reads, in this order (_benchmark_summary).
_SUMMARY_INPUTS = ("benchmark", "metric", "value", "bf16", "delta", "delta_error", "recovery", "higher_is_better")


def _benchmark_summary(rows: List[tuple]) -> dict:
    """Median recovery over a point's benchmark rows (tuples of _SUMMARY_INPUTS) with its interval, and its worst
    significant loss.

    The interval is the median of each row's 95% recovery bounds (the median never moves outside it while every row
    stays within its own interval); NaN when a row has no error. The worst significant loss: of the rows whose
    difference from BF16 is beyond 1.96 standard errors against the point, the largest as a share of BF16."""
    out = {
        "median_recovery": math.nan,
        "median_recovery_lo": math.nan,
        "median_recovery_hi": math.nan,
        "worst_benchmark": "",
        "worst_metric": "",
        "worst_delta": math.nan,
        "worst_delta_error": math.nan,
        "worst_relative": math.nan,
        "worst_recovery": math.nan,
        "worst_recovery_lo": math.nan,
        "worst_recovery_hi": math.nan,
        "significant_losses": 0,
        "judged": 0,
    }
    defined = [row for row in rows if not math.isnan(row[6])]
    if not defined:
        return out
    out["median_recovery"] = statistics.median([row[6] for row in defined])
    bounds = [_recovery_bounds(value, bf16, error, higher) for _, _, value, bf16, _, error, _, higher in defined]
    if all(not math.isnan(low) for low, _ in bounds):
        out["median_recovery_lo"] = statistics.median([low for low, _ in bounds])
        out["median_recovery_hi"] = statistics.median([high for _, high in bounds])
    worst = None
    for benchmark, metric, value, bf16, delta, error, recovery, higher in defined:
        if math.isnan(error) or error <= 0 or math.isnan(delta):
            continue
        out["judged"] += 1
        loss = (-delta if higher else delta) / abs(bf16)
        if within_noise(delta, error) or loss <= 0:
            continue
        out["significant_losses"] += 1
        if worst is None or loss > worst[0]:
            worst = (
                loss,
                benchmark,
                metric,
                delta,
                error,
                delta / abs(bf16),
                recovery,
                *_recovery_bounds(value, bf16, error, higher),
            )
    if worst is not None:
        out.update(
            worst_benchmark=worst[1],
            worst_metric=worst[2],
            worst_delta=worst[3],
            worst_delta_error=worst[4],
            worst_relative=worst[5],
            worst_recovery=worst[6],
            worst_recovery_lo=worst[7],
            worst_recovery_hi=worst[8],
        )
    return out


def peak_gpu(record) -> dict:
    """The run's peak GPU memory (the largest of its stages' peaks, as PyTorch allocated it, over all its GPUs) in
    GB and as a multiple of the model's BF16 weights; NaN for a run that used no GPU."""
    peaks = [as_number(v) for v in record.section("peak_gpu_memory_bytes").values()]
    peaks = [v for v in peaks if not math.isnan(v)]
    if not peaks:
        return {"peak_gpu_gb": math.nan, "peak_gpu_x_bf16": math.nan}
    bf16 = as_number(record.section("size").get("bf16_bytes"))
    return {"peak_gpu_gb": max(peaks) / 1e9, "peak_gpu_x_bf16": max(peaks) / bf16 if bf16 > 0 else math.nan}


def _summary(kept: pd.DataFrame, scores: pd.DataFrame, bf16: pd.DataFrame) -> pd.DataFrame:
    # The median recovery is over benchmark results only; the fidelity figures (KL, perplexity ratio) have
    # columns of their own, with their uncertainty.
    benchmarks = scores[(scores["metric"] != FIDELITY_METRIC) & (scores["subject"] == "") & (scores["benchmark"] != "")]
    points = kept.copy()
    # A model compared only against embedded baselines still gets a BF16 line saying so.
    baseline_only = sorted(
        set(bf16.loc[bf16["bf16_source"] == FROM_EMBEDDED_BASELINE, "model"])
        - set(kept.loc[kept["recipe"] == BF16, "model"])
    )
    if baseline_only:
        extra = pd.DataFrame(
            {
                "model": baseline_only,
                "variant": BF16,
                "recipe": BF16,
                "kv_cache": "none",
                "calib_size": np.nan,
                "calib_seq_len": np.nan,
                "fidelity_setting": "",
                "status": BASELINE_STATUS,
                "compression": 1.0,
                "bits_per_weight": 16.0,
                "served_by": "",
                "recipe_file": "",
                **{c: np.nan for c in FIDELITY_SUMMARY_COLUMNS},
                "note": "no bf16 run: BF16 scores from baselines embedded in quantized records",
                "source": "",
            }
        )
        points = pd.concat([points, extra], ignore_index=True)
    # Rows grouped as plain tuples: per-group DataFrames cost milliseconds each, and a sweep has thousands of points.
    groups: dict = {}
    for model, variant, source, origin, *row in zip(
        *(benchmarks[c].tolist() for c in ("model", "variant", "source", "bf16_source", *_SUMMARY_INPUTS))
    ):
        if variant != BF16:
            key = (model, variant)
        else:  # a BF16 run's own rows (recovery 1 by definition); the baseline line: the model's embedded ones
            key = (model, BF16, source if origin == FROM_BF16_RUN else "")
        groups.setdefault(key, []).append(tuple(row))
    stats = [
        _benchmark_summary(groups.get((model, variant) if recipe != BF16 else (model, BF16, source), []))
        for model, variant, recipe, source in zip(
            *(points[c].tolist() for c in ("model", "variant", "recipe", "source"))
        )
    ]
    summary = pd.concat([points.reset_index(drop=True), pd.DataFrame(stats, columns=BENCHMARK_SUMMARY_COLUMNS)], axis=1)
    keys = [
        (model, variant_sort_key(recipe, kv, calib, seq), variant)
        for model, recipe, kv, calib, seq, variant in zip(
            *(summary[c].tolist() for c in ("model", "recipe", "kv_cache", "calib_size", "calib_seq_len", "variant"))
        )
    ]
    order = sorted(range(len(summary)), key=keys.__getitem__)
    return summary.iloc[order][SUMMARY_COLUMNS].reset_index(drop=True)


def build_report(
    records: Sequence, sources: Optional[Sequence[str]] = None, skipped: Iterable[Tuple[str, str]] = ()
) -> Report:
    """All tables from run records (RunRecord, or parsed run.json objects); `sources` names each record (its path)
    in the output.

    Objects that are not usable run records are added to `skipped` rather than raising.
    """
    if sources is None:
        sources = [f"record #{i}" for i in range(len(records))]
    skipped = list(skipped)
    usable, usable_sources = [], []
    for record, source in zip(records, sources):
        try:
            usable.append(RunRecord.parse(record))
        except RecordProblem as problem:
            skipped.append((source, str(problem)))
        else:
            usable_sources.append(source)
    kept, superseded = _select(_points(usable, usable_sources))
    bf16 = _bf16_values(usable, kept)
    scores = _order_scores(_score_rows(usable, kept, bf16), kept)[SCORE_COLUMNS]
    return Report(
        scores=scores,
        summary=_summary(kept, scores, bf16),
        superseded=superseded,
        skipped=pd.DataFrame(skipped, columns=SKIPPED_COLUMNS),
        layer_kinds=_layer_kinds(usable, kept),
        training=training_table(kept, scores),
        calib_kinds=calib_kind_table(usable, kept),
    )


def scores_table(records: Sequence, sources: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Long table: one row per model / variant / benchmark / metric (see SCORE_COLUMNS)."""
    return build_report(records, sources).scores


def summary_table(records: Sequence, sources: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per model and variant: status, median recovery, size, calibration (see SUMMARY_COLUMNS)."""
    return build_report(records, sources).summary
