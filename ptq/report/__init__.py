"""Results collector: gathers run records into the accuracy comparison against BF16.

    python -m ptq.report <folder or run.json>... [--out DIR] [--budget 1%]

Parts: read.py (records and manifests) -> tables.py (DataFrames) -> render.py (Markdown, HTML, files),
plots.py (figures), recommend.py (--budget: the smallest checkpoint within a loss budget with confidence);
cli.py is the command line.

Every `run.json` below the given paths is read; the report lands in DIR (default: `report/` under the
first given folder, or beside the first given file) as `results.md` (also printed to stdout),
`results.csv`, `results.html` and, per model, the plots that have something to show: `recovery_vs_bits_<model>.png`,
`perplexity_vs_bits_<model>.png` (with 95% intervals and the Pareto front), `deltas_<model>.png` (each benchmark
difference from BF16 with its interval) and `vs_calib_size_<model>.png` (when a recipe ran at several calibration
sizes).

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
undefined (NaN) where BF16 is 0 or missing. A variant's median recovery is taken over its defined benchmark
rows; its fidelity figures are summarised apart (perplexity ratio with its interval, mean KL with its error).

One record per (model, variant) is used: the finished one with the latest `finished_at`, or, when
none finished, the latest failed/running one. Every other record is listed as superseded. Files that
are not run records are listed as skipped with the reason; neither stops the report.
"""

from ptq.report.cli import main
from ptq.report.common import BF16
from ptq.report.read import find_run_records, load_records, pending_points, variant_label
from ptq.report.render import render_markdown, wide_table, write_report
from ptq.report.tables import Report, build_report, scores_table, summary_table

__all__ = ["BF16", "Report", "build_report", "find_run_records", "load_records", "main", "pending_points", "render_markdown",
           "scores_table", "summary_table", "variant_label", "wide_table", "write_report"]
