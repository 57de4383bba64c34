"""Results collector: gathers run records into the accuracy comparison against BF16.

    python -m ptq.report <folder or run.json>... [--out DIR] [--budget 1%]

Parts: read.py (records and manifests) -> tables.py (DataFrames) -> render.py (Markdown, HTML, files),
plots.py (figures), recommend.py (--budget: the smallest checkpoint within a loss budget with confidence);
cli.py is the command line.

Every `run.json` below the given paths is read; the report lands in DIR (default: `report/` under the
first given folder, or beside the first given file) as `results.md` (also printed to stdout),
`results.csv`, `summary.csv`, `results.html` and, per model, the plots that have something to show: `recovery_vs_bits_<model>.png`,
`perplexity_vs_bits_<model>.png` (with 95% intervals and the Pareto front), `deltas_<model>.png` (each benchmark
difference from BF16 with its interval) and `vs_calib_size_<model>.png` (when a recipe ran at several calibration
sizes). Points trained after PTQ (recover=qat|qad) are also set against the PTQ point they started from in
`training.csv`, a "training after PTQ" table and `training_<model>.png` (training.py).

Naming rules
------------
Variant label: the recipe name, then `+kv_<format>` when the KV cache is quantized, then
`@<calib_size>`, so one recipe at several calibration sizes gives several columns: `fp8@512`,
`fp8+kv_fp8@512`, `int4_awq@128`. Every setting in which a model's variants differ is named: the calibration
sequence length after the size where the model's variants were calibrated at several (`fp8@32x256`), and, where two
points would otherwise share a label, the calibration text and seed (`[calib valid.txt seed 7]`), the evaluation
tag or the fidelity setting (`fp8@512 [eval_local_quick_3fa2c1]`, `[fidelity 256 tok x 16]`; tables._name_points).
The BF16 baseline is `bf16` (`bf16 [<what differs>]` in the summary when it was run in several ways).

Benchmark rows are (benchmark, metric) pairs. Entries of `evaluation.results` keep their own names
(`arc_easy` / `acc_norm`; a subject of a benchmark of several, `mmlu:<subject>`). A (benchmark, metric) measured in
several ways (fingerprints) is a row per way in the tables, named with what it was measured on
(`perplexity [256 tok x 32]`, `arc [300 items]`). The fidelity figures become three rows whose metric is `fidelity`:

    perplexity / fidelity              quantized_perplexity (BF16: bf16_perplexity), lower is better
    mean_kl_vs_bf16 / fidelity         mean_kl (BF16: 0), lower is better
    top1_agreement_vs_bf16 / fidelity  top1_agreement (BF16: 1), higher is better

Comparison with BF16
--------------------
The BF16 column of a model comes, row by row and fingerprint by fingerprint, from its finished `bf16` runs (newest
first); rows they lack (or every row, without such a run) come from the baselines carried inside that model's
quantized records (`evaluation.baseline`, `fidelity.bf16_perplexity`, measured on that record's own held-out
tokens), newest finished record first. A variant's row is compared only with the BF16 row of its fingerprint.
delta = value - BF16; recovery = value / BF16 when higher is better, BF16 / value when lower is better,
undefined (NaN) where BF16 is 0 or missing. A variant's median recovery is taken over its defined benchmark
rows, with the median of their 95% bounds, beside its worst significant loss (the largest loss beyond 1.96
standard errors, as a share of BF16); its fidelity figures are summarised apart (perplexity ratio with its
interval, mean KL with its error).

One record per point (model, variant, calibration sequence length and text, evaluation tag, fidelity setting:
tables.POINT_KEY) is used: the finished one with the latest `finished_at`, or, when none finished, the latest
failed/running one. Every other record is listed as superseded. Files that
are not run records are listed as skipped with the reason; neither stops the report.
"""

from ptq.report.cli import main
from ptq.report.common import BF16
from ptq.report.read import find_run_records, load_records, pending_points, variant_label
from ptq.report.render import render_markdown, wide_table, write_report
from ptq.report.tables import Report, build_report, scores_table, summary_table

__all__ = [
    "BF16",
    "Report",
    "build_report",
    "find_run_records",
    "load_records",
    "main",
    "pending_points",
    "render_markdown",
    "scores_table",
    "summary_table",
    "variant_label",
    "wide_table",
    "write_report",
]
