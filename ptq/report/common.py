"""Names and constants every part of the report shares."""

from __future__ import annotations

import pandas as pd

from ptq import backend_spec
from ptq.layout import RECORD_NAME
from ptq.run_record import BF16 as BF16  # the baseline's recipe name, shared with the record type

RUN_RECORD_NAME = RECORD_NAME


FIDELITY_METRIC = "fidelity"

DEFAULT_BACKEND = backend_spec.DEFAULT


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

# delta_stderr: the standard error of the difference from BF16 over the items both scored (paired_items of them);
# NaN where either side kept no per-item scores. delta_error: the difference's error the report judges by
# (read.difference_error): the paired one, a fidelity row's own, or sqrt(2) x the variant's.
# setting: what the row was measured on, for a reader (`300 items`, `256 tok x 32`); fingerprint: the same exactly
# (read.py): a row is compared only with a BF16 row of the same fingerprint.
SCORE_COLUMNS = [
    "model",
    "variant",
    "recipe",
    "kv_cache",
    "calib_size",
    "benchmark",
    "subject",
    "metric",
    "setting",
    "value",
    "stderr",
    "higher_is_better",
    "bf16",
    "bf16_source",
    "delta",
    "delta_stderr",
    "paired_items",
    "delta_error",
    "recovery",
    "status",
    "note",
    "fingerprint",
    "source",
]

# 95% two-sided normal quantile: intervals, "n.s." marks and the recommendation's bounds use this one value.
Z_95 = 1.96


def within_noise(delta: float, error: float) -> bool:
    """Whether `delta` (variant - BF16) is within 95% noise, `error` being the difference's standard error (the
    one rule of the tables' "n.s." marks and the summary's significant losses)."""
    if pd.isna(delta) or pd.isna(error) or error <= 0:
        return False
    return abs(delta) < Z_95 * error


# A point's fidelity figures in the summary: the perplexity ratio to BF16 with its 95% interval, the mean KL with
# its standard error (ptq/fidelity.py).
FIDELITY_SUMMARY_COLUMNS = [
    "perplexity_ratio",
    "perplexity_ratio_lo",
    "perplexity_ratio_hi",
    "mean_kl",
    "mean_kl_stderr",
]

# A point's benchmark figures in the summary: the median recovery with its interval (the median of the rows' 95%
# recovery bounds), and its worst significant loss (benchmark, metric, delta, its standard error, delta / BF16) out
# of `significant_losses` among the `judged` rows (those with a known error).
BENCHMARK_SUMMARY_COLUMNS = [
    "median_recovery",
    "median_recovery_lo",
    "median_recovery_hi",
    "worst_benchmark",
    "worst_metric",
    "worst_delta",
    "worst_delta_error",
    "worst_relative",
    "worst_recovery",
    "worst_recovery_lo",
    "worst_recovery_hi",
    "significant_losses",
    "judged",
]

SUMMARY_COLUMNS = [
    "model",
    "variant",
    "recipe",
    "status",
    *BENCHMARK_SUMMARY_COLUMNS,
    *FIDELITY_SUMMARY_COLUMNS,
    "checkpoint_mb",
    "compression",
    "bits_per_weight",
    "calib_size",
    "calib_seq_len",
    "fidelity_setting",
    "calibrate_s",
    "peak_gpu_gb",
    "peak_gpu_x_bf16",
    "served_by",
    "recipe_file",
    "note",
    "source",
]

SUPERSEDED_COLUMNS = ["model", "variant", "status", "finished_at", "source", "kept", "reason"]


SKIPPED_COLUMNS = ["source", "reason"]
# MoE and hybrid models: per variant, how many layers of each kind (ptq/layerkinds.py) are stored in each format,
# and their share of the model's parameters.
LAYER_KIND_COLUMNS = ["model", "variant", "kind", "format", "layers", "params", "share"]
