"""lm-eval task files for local benchmarks (each includes its kind's template from evaluate/tasks/ and names the
normalised data), the tasks of a run with their item limits, and the fingerprint that says what a result was
measured on."""

from __future__ import annotations

import functools
import hashlib
import json
import random
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from ptq.errors import ConfigError
from ptq.evaluation.readers import KINDS, benchmark_path, read_benchmark
from ptq.schema import BenchmarkConfig, EvalConfig
from ptq.textfiles import checked_once

# The kind scored in process, not through lm-eval: multiple choice over images (lm-eval 0.4.13's multimodal model
# has no log-likelihood scoring; ptq/evaluation/images.py).
IN_PROCESS = "image_choice"
# lm-eval task templates, one per local kind (ptq_<kind>.yaml).
TASKS_DIR = Path(__file__).resolve().parents[2] / "evaluate" / "tasks"
# Under a run's eval work folder: the task files lm-eval reads.
TASK_FILES_NAME = "tasks"


def task_template(bench: BenchmarkConfig) -> Path:
    """The lm-eval task template a local benchmark's task file includes (evaluate/tasks/)."""
    if bench.kind == "multiple_choice" and bench.format == "winogrande_jsonl":
        return TASKS_DIR / "ptq_partial_choice.yaml"
    return TASKS_DIR / f"ptq_{bench.kind}.yaml"


def stratified_indices(subjects: List[str], n: int, seed: int = 0) -> List[int]:
    """`n` item indices spread evenly over the subjects (round robin over the subjects in name order, each
    subject's items in a fixed random order), sorted; the first `n` when there is one subject."""
    by_subject: Dict[str, List[int]] = {}
    for index, subject in enumerate(subjects):
        by_subject.setdefault(subject, []).append(index)
    if len(by_subject) < 2:
        return list(range(min(n, len(subjects))))
    rng = random.Random(seed)
    pools = [rng.sample(ids, len(ids)) for _, ids in sorted(by_subject.items())]
    picked: List[int] = []
    while len(picked) < min(n, len(subjects)):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return sorted(picked)


def _write_jsonl(rows: List[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def task_file(bench: BenchmarkConfig, work_dir: Path, data_dir: Optional[str] = None) -> Tuple[Path, List[str]]:
    """Normalise a local benchmark file into `work_dir` and write its lm-eval task file there: (task YAML, the
    subject of each item: one per file of a folder benchmark, "" otherwise).

    The task file includes the kind's template from evaluate/tasks/ and adds the data file (and, for
    generation, the benchmark's token budget)."""
    path = benchmark_path(bench, data_dir)
    if not path.exists():
        raise ConfigError(f"eval benchmark {bench.name}: path {path} does not exist; set eval.benchmarks[...].path.")
    rows = read_benchmark(bench, path)
    if rows is None:
        raise ConfigError(
            f"eval benchmark {bench.name}: kind={bench.kind} has no local data; "
            f"choose one of: {', '.join(k for k in KINDS if k != 'lm_eval')}."
        )
    data = _write_jsonl(rows, work_dir / f"{bench.name}.jsonl")
    template = task_template(bench)
    task = {
        "include": str(template),
        "task": f"ptq_{bench.name}",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
    }
    if bench.kind == "multiple_choice":
        task["target_delimiter"] = bench.delimiter
    if bench.kind == "generation":
        generation = yaml.safe_load(template.read_text())["generation_kwargs"]
        task["generation_kwargs"] = {**generation, "max_gen_toks": bench.max_gen_toks}
    out = work_dir / TASK_FILES_NAME / f"ptq_{bench.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(task, sort_keys=False))
    return out, [str(row.get("subject", "")) for row in rows]


@functools.lru_cache(maxsize=1)
def _task_manager():
    """lm-eval's index of its task files, built once per process: building it takes about 11 s on the
    GPU machine (bench/results/evaluation-throughput-h100.md), every evaluation of a sweep reuses it."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def load_tasks(cfg: EvalConfig, work_dir: Path):
    """(tasks for lm-eval, {task name: benchmark name}, {task name: items to evaluate}, task manager,
    {task name: the subject of each item} for local benchmarks of several subjects).

    Local benchmarks become Task objects, built by an lm-eval TaskManager over this run's task files only
    (indexing lm-eval's own few thousand task files takes seconds); benchmarks of kind lm_eval stay names,
    which simple_evaluate resolves through lm-eval's full index, built once per process."""
    from lm_eval.tasks import TaskManager

    tasks, names, samples, local, by_subject = [], {}, {}, {}, {}
    for bench in cfg.benchmarks:
        if bench.kind == IN_PROCESS:  # scored without lm-eval (ptq/evaluation/images.py)
            continue
        if bench.kind == "lm_eval":
            key, subjects = bench.task or bench.name, None
            tasks.append(key)
        else:
            _, subjects = task_file(bench, work_dir, cfg.data_dir)
            key = f"ptq_{bench.name}"
            local[key] = None
        names[key] = bench.name
        if subjects is not None and len(set(subjects)) > 1:
            by_subject[key] = subjects
        # Per-benchmark item limits go through `samples`: the first n items of a one-subject set; spread evenly
        # over the subjects of a folder of subjects (MMLU), so a limit never means "the first subject only".
        n = bench.limit or cfg.limit
        if n:
            samples[key] = stratified_indices(subjects, n) if subjects is not None else list(range(n))
    manager = None
    if local:
        manager = TaskManager(include_path=str(work_dir / TASK_FILES_NAME), include_defaults=False)
        built = manager.load(list(local))["tasks"]
        tasks += [built[key] for key in local]
    if len(tasks) > len(local):
        manager = _task_manager()
    return tasks, names, samples, manager, by_subject


# Bump when what a fingerprint covers changes: cached BF16 baselines of another version are not reused.
FINGERPRINT_VERSION = 3  # 2: a limit on a folder of subjects samples across them; 3: prompt template, delimiter


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_digest(path: Path) -> str:
    """sha256 of a benchmark's data: the file, or a folder's .csv files (names and contents) in order."""
    if path.is_dir():
        parts = [(f.name, checked_once(_file_digest, f)) for f in sorted(path.glob("*.csv"))]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    return checked_once(_file_digest, path)


def fingerprint(bench: BenchmarkConfig, cfg: EvalConfig, items: Optional[List[int]]) -> dict:
    """What a benchmark result was measured on: two results are comparable only when these are equal."""
    from importlib import metadata

    local = bench.kind != "lm_eval"
    template = task_template(bench) if bench.kind != IN_PROCESS else None
    parts = {
        "version": FINGERPRINT_VERSION,
        "benchmark": bench.name,
        "kind": str(bench.kind),
        "format": str(bench.format) if bench.kind == "multiple_choice" else None,
        "data": data_digest(benchmark_path(bench, cfg.data_dir)) if local else (bench.task or bench.name),
        "template": checked_once(_file_digest, template) if template is not None and local else None,
        "prompt": bench.template if local else None,
        "delimiter": bench.delimiter if bench.kind == "multiple_choice" else None,
        "items": items,  # the indices evaluated; None: all
        "num_fewshot": cfg.num_fewshot,
        "chat_template": cfg.apply_chat_template,
        "max_gen_toks": bench.max_gen_toks if bench.kind == "generation" else None,
        "lm_eval": metadata.version("lm_eval"),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return {"fingerprint": digest, "items": len(items) if items is not None else None}
