"""The `eval` group: benchmarks through lm-eval, run in-process on the BF16 and fake-quantized model.

Local data files (no Hub access) are scored by lm-eval tasks defined as YAML in evaluate/tasks/, one per
kind: multiple choice (ARC JSONL, MMLU CSV, HellaSwag text, or a generic JSONL), generation scored by exact
match (GSM8K-style JSONL), and perplexity on a text file. Every local file is first normalised into a
small JSONL under the run's work folder, with a task file that includes its kind's template, so one
template per kind serves every format. Any task name lm-eval knows works too (kind lm_eval).

- readers.py: the benchmark file layouts, read and checked item by item; the check of the benchmark definitions.
- tasks.py: the lm-eval task files of a run, its item limits, and the fingerprint of what a result measured.
- scores.py: per-item scores, standard errors of ratio metrics, rows per subject and their macro average.
- runner.py: the lm-eval call on an in-memory model (run_benchmarks).
- baseline.py: the cached BF16 baseline, evaluated once per model and settings.
"""

from ptq.evaluation.baseline import baseline_key, cached_baseline
from ptq.evaluation.readers import (
    benchmark_path,
    check_eval_config,
    read_benchmark,
    read_documents,
    read_generation,
    read_last_words,
    read_multiple_choice,
)
from ptq.evaluation.runner import run_benchmarks
from ptq.evaluation.scores import item_scores, macro_row, ratio_stderr, subject_name, subject_rows
from ptq.evaluation.tasks import data_digest, fingerprint, load_tasks, stratified_indices, task_file, task_template

__all__ = [
    "baseline_key",
    "benchmark_path",
    "cached_baseline",
    "check_eval_config",
    "data_digest",
    "fingerprint",
    "item_scores",
    "load_tasks",
    "macro_row",
    "ratio_stderr",
    "read_benchmark",
    "read_documents",
    "read_generation",
    "read_last_words",
    "read_multiple_choice",
    "run_benchmarks",
    "stratified_indices",
    "subject_name",
    "subject_rows",
    "task_file",
    "task_template",
]
