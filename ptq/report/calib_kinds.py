"""Image-text calibration against text calibration of the same vision-language model (ptq/vlm.py): the difference
in mean KL to BF16, paired over the held-out sequences both measured, with its 95% interval.

A point calibrated on image-text pairs (`+images`) is paired with the point of the same model, recipe, calibration
size, evaluation tag, fidelity setting and training settings calibrated on text. Both were measured on the same
held-out inputs (the fidelity fingerprint), so each held-out sequence gives one difference of the two KLs; the
interval is mean +- 1.96 x sd / sqrt(sequences). A difference whose interval holds 0 is reported as within noise.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import pandas as pd

from ptq.report.common import Z_95
from ptq.report.read import section
from ptq.run_record import RunRecord
from ptq.stats import paired_delta_stderr

IMAGES = "+images"

CALIB_KIND_COLUMNS = [
    "model",
    "text_variant",
    "images_variant",
    "fidelity",
    "sequences",
    "text_mean_kl",
    "images_mean_kl",
    "kl_difference",
    "kl_difference_lo",
    "kl_difference_hi",
    "finding",
]


def _sequence_kl(record: RunRecord) -> Optional[List[float]]:
    values = section(record.section("fidelity"), "per_sequence").get("kl")
    return [float(v) for v in values] if isinstance(values, list) and values else None


def paired_difference(images: Sequence[float], text: Sequence[float]) -> tuple:
    """(mean, lo, hi) of images - text over paired sequences (NaN bounds with fewer than 2)."""
    mean = sum(a - b for a, b in zip(images, text)) / len(images)
    stderr, _ = paired_delta_stderr(dict(enumerate(images)), dict(enumerate(text)))
    return mean, mean - Z_95 * stderr, mean + Z_95 * stderr


def finding(lo: float, hi: float) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "no interval (fewer than 2 sequences)"
    if lo > 0:
        return "images calibrate worse (higher KL)"
    if hi < 0:
        return "images calibrate better (lower KL)"
    return "within noise"


def calib_kind_table(records: Sequence[RunRecord], kept: pd.DataFrame) -> pd.DataFrame:
    """One row per image-text-calibrated point with a text-calibrated twin measured on the same held-out inputs.
    `kept`: tables._select's points (their `index` is the record's position in `records`)."""
    rows = []
    finished = kept[kept["status"] == "finished"]
    key = ["model", "seq_key", "eval_tag", "fidelity_fp", "recover_key"]
    for point in finished[finished["base"].str.contains(IMAGES, regex=False)].itertuples():
        twins = finished[
            (finished["base"] == point.base.replace(IMAGES, "", 1))
            & (finished[key] == pd.Series({k: getattr(point, k) for k in key})).all(axis=1)
        ]
        if len(twins) != 1:
            continue
        twin = twins.iloc[0]
        images, text = _sequence_kl(records[point.index]), _sequence_kl(records[int(twin["index"])])
        if not images or not text or len(images) != len(text):
            continue
        mean, lo, hi = paired_difference(images, text)
        rows.append(
            {
                "model": point.model,
                "text_variant": twin["variant"],
                "images_variant": point.variant,
                "fidelity": point.fidelity_setting,
                "sequences": len(images),
                "text_mean_kl": sum(text) / len(text),
                "images_mean_kl": sum(images) / len(images),
                "kl_difference": mean,
                "kl_difference_lo": lo,
                "kl_difference_hi": hi,
                "finding": finding(lo, hi),
            }
        )
    return pd.DataFrame(rows, columns=CALIB_KIND_COLUMNS)
