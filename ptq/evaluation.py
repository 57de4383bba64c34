"""The `eval` group: benchmarks through lm-eval, run in-process on the BF16 and fake-quantized model.

Local data files (no Hub access) are scored by lm-eval tasks defined as YAML in evaluate/tasks/, one per
kind: multiple choice (ARC JSONL, MMLU CSV, HellaSwag text, or a generic JSONL), generation scored by exact
match (GSM8K-style JSONL), and perplexity on a text file. Every local file is first normalised into a
small JSONL under the run's work folder, with a task file that includes its kind's template, so one
template per kind serves every format. Any task name lm-eval knows works too (kind lm_eval).
"""

from __future__ import annotations

import bz2
import csv
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from ptq.errors import ConfigError
from ptq.files import write_json_atomic
from ptq.schema import BenchmarkConfig, BenchmarkKind, ChoiceFormat, EvalConfig

log = logging.getLogger(__name__)

KINDS = tuple(BenchmarkKind)
MC_FORMATS = tuple(ChoiceFormat)
# lm-eval task templates, one per local kind (ptq_<kind>.yaml).
TASKS_DIR = Path(__file__).resolve().parents[1] / "evaluate" / "tasks"
# Under a run's eval work folder: the task files lm-eval reads.
TASK_FILES_NAME = "tasks"
LETTERS = "ABCDEFGHIJ"
CPU_BATCH_SIZE = 8


def _open_text(path: Path):
    return bz2.open(path, "rt", encoding="utf-8") if path.suffix == ".bz2" else path.open(encoding="utf-8")


def _jsonl(path: Path):
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _gold_index(answer, labels: List[str], where: str) -> int:
    # Labels first: some ARC items are labelled "1".."4", where "2" means the second choice, not index 2.
    if isinstance(answer, str) and answer.strip() in labels:
        return labels.index(answer.strip())
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        return int(answer)
    raise ConfigError(f"{where}: answer {answer!r} is neither an index nor one of the labels {labels}.")


def read_multiple_choice(path: Path, fmt: str) -> List[dict]:
    """Items {"query", "choices", "gold"} from one of the supported file layouts."""
    items = []
    if fmt == "arc_jsonl":
        for row in _jsonl(path):
            labels = row["choices"]["label"]
            items.append({"query": f"Question: {row['question']}\nAnswer:", "choices": row["choices"]["text"],
                          "gold": _gold_index(row["answerKey"], labels, str(path))})
    elif fmt == "jsonl":
        for n, row in enumerate(_jsonl(path), 1):
            choices = row["choices"]
            items.append({"query": f"Question: {row['question']}\nAnswer:", "choices": choices,
                          "gold": _gold_index(row["answer"], list(LETTERS[: len(choices)]), f"{path}:{n}")})
    elif fmt == "mmlu_csv":
        files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
        for file in files:
            with file.open(encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    choices = [row[k] for k in sorted(row) if k.startswith("choice")]
                    items.append({"query": f"Question: {row['question']}\nAnswer:", "choices": choices,
                                  "gold": _gold_index(row["answer"], list(LETTERS[: len(choices)]), str(file))})
    elif fmt == "hellaswag_txt":
        with _open_text(path) as f:
            lines = [line.rstrip("\n") for line in f]
        for start in range(0, len(lines) - 5, 6):
            context, gold, *endings = lines[start:start + 6]
            items.append({"query": context, "choices": endings, "gold": int(gold)})
    else:
        raise ConfigError(f"format={fmt!r} is not a multiple-choice layout; choose one of: {', '.join(MC_FORMATS)}.")
    return items


def _final_number(text: str) -> str:
    if "####" in text:
        text = text.split("####")[-1]
    numbers = re.findall(r"-?[\d,]*\.?\d+", text)
    return numbers[-1].replace(",", "") if numbers else text.strip()


def _write_jsonl(rows: List[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _split_documents(text: str, max_chars: int = 4000) -> List[str]:
    """Line-aligned documents of bounded size, so rolling windows stay short on small machines."""
    docs, current = [], []
    size = 0
    for line in text.splitlines():
        if current and size + len(line) > max_chars:
            docs.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        docs.append("\n".join(current))
    return [d for d in docs if d.strip()]


FETCH_HINT = ("get the files with `bash scripts/fetch-evaldata.sh DIR` on a machine with internet access (it checks "
              "their checksums), then set PTQ_EVALDATA=DIR or eval.data_dir=DIR")


def benchmark_path(bench: BenchmarkConfig, data_dir: Optional[str]) -> Path:
    """The benchmark's file: its path as given when absolute (or ~), else under eval.data_dir."""
    path = Path(os.path.expanduser(bench.path or ""))
    if path.is_absolute():
        return path
    if not data_dir:
        raise ConfigError(f"eval benchmark {bench.name} reads {bench.path} from eval.data_dir, which is not set: "
                          f"{FETCH_HINT} (or eval=none to skip benchmarks).")
    return Path(os.path.expanduser(data_dir)) / path


def task_file(bench: BenchmarkConfig, work_dir: Path, data_dir: Optional[str] = None) -> Tuple[Path, int]:
    """Normalise a local benchmark file into `work_dir` and write its lm-eval task file there: (task YAML, items).

    The task file includes the kind's template from evaluate/tasks/ and adds the data file (and, for
    generation, the benchmark's token budget)."""
    path = benchmark_path(bench, data_dir)
    if not path.exists():
        raise ConfigError(f"eval benchmark {bench.name}: path {path} does not exist; set eval.benchmarks[...].path.")
    if bench.kind == "multiple_choice":
        rows = read_multiple_choice(path, bench.format)
    elif bench.kind == "generation":
        rows = [{"question": r["question"], "answer": _final_number(str(r["answer"]))} for r in _jsonl(path)]
    elif bench.kind == "perplexity":
        with _open_text(path) as f:
            rows = [{"text": d} for d in _split_documents(f.read())]
    else:
        raise ConfigError(f"eval benchmark {bench.name}: kind={bench.kind} has no local data; "
                          f"choose one of: {', '.join(k for k in KINDS if k != 'lm_eval')}.")
    data = _write_jsonl(rows, work_dir / f"{bench.name}.jsonl")
    template = TASKS_DIR / f"ptq_{bench.kind}.yaml"
    task = {"include": str(template), "task": f"ptq_{bench.name}", "dataset_kwargs": {"data_files": {"test": str(data)}}}
    if bench.kind == "generation":
        generation = yaml.safe_load(template.read_text())["generation_kwargs"]
        task["generation_kwargs"] = {**generation, "max_gen_toks": bench.max_gen_toks}
    out = work_dir / TASK_FILES_NAME / f"ptq_{bench.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(task, sort_keys=False))
    return out, len(rows)


def load_tasks(cfg: EvalConfig, work_dir: Path):
    """(tasks for lm-eval, {task name: benchmark name}, {task name: items to evaluate}, task manager).

    Local benchmarks become Task objects, built by an lm-eval TaskManager over this run's task files only
    (indexing lm-eval's own few thousand task files takes seconds); benchmarks of kind lm_eval stay names,
    which simple_evaluate resolves through lm-eval's full index, built once per process."""
    from lm_eval.tasks import TaskManager

    tasks, names, samples, local = [], {}, {}, {}
    for bench in cfg.benchmarks:
        if bench.kind == "lm_eval":
            key, count = bench.task or bench.name, None
            tasks.append(key)
        else:
            _, count = task_file(bench, work_dir, cfg.data_dir)
            key = f"ptq_{bench.name}"
            local[key] = None
        names[key] = bench.name
        # Per-benchmark item limits go through `samples` (the first n items of each task's test split).
        n = bench.limit or cfg.limit
        if n:
            samples[key] = list(range(min(n, count) if count else n))
    manager = None
    if local:
        manager = TaskManager(include_path=str(work_dir / TASK_FILES_NAME), include_defaults=False)
        built = manager.load(list(local))["tasks"]
        tasks += [built[key] for key in local]
    if len(tasks) > len(local):
        manager = _task_manager()
    return tasks, names, samples, manager


def check_eval_config(cfg: EvalConfig) -> None:
    """Refuse bad benchmark definitions before any model is loaded."""
    if not cfg.enabled:
        return
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval.enabled=true needs lm-eval: `pip install lm-eval==0.4.13` (or eval=none).")
    if not cfg.benchmarks:
        raise ConfigError("eval.enabled=true but eval.benchmarks is empty; choose eval=local_quick or eval=none.")
    names = [b.name for b in cfg.benchmarks]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.benchmarks has duplicate names {names}; give each benchmark its own name.")
    for bench in cfg.benchmarks:
        if bench.kind not in KINDS:
            raise ConfigError(f"eval benchmark {bench.name}: kind={bench.kind!r} is unknown; choose one of: {', '.join(KINDS)}.")
        if bench.kind != "lm_eval" and not benchmark_path(bench, cfg.data_dir).exists():
            where = f" under eval.data_dir={cfg.data_dir}" if not Path(os.path.expanduser(bench.path or "")).is_absolute() else ""
            raise ConfigError(f"eval benchmark {bench.name}: {benchmark_path(bench, cfg.data_dir)} does not exist{where}; "
                              f"point the path at your data file, or {FETCH_HINT}.")
        if bench.kind == "multiple_choice" and bench.format not in MC_FORMATS:
            raise ConfigError(f"eval benchmark {bench.name}: format={bench.format!r}; choose one of: {', '.join(MC_FORMATS)}.")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"eval.limit={cfg.limit}: use a positive number of items per benchmark, or null for all.")


def _flatten(results: dict, names: Dict[str, str]) -> List[dict]:
    rows = []
    for task, metrics in results["results"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"benchmark": names.get(task, task), "metric": metric if filt in ("none", "last-number") else key,
                         "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "higher_is_better": bool(better.get(metric, True))})
    return sorted(rows, key=lambda r: (r["benchmark"], r["metric"]))


@functools.lru_cache(maxsize=1)
def _task_manager():
    """lm-eval's index of its task files, built once per process: building it takes about 11 s on the
    GPU machine (bench/results/evaluation-throughput-h100.md), every evaluation of a sweep reuses it."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def run_benchmarks(model, tokenizer, cfg: EvalConfig, work_dir: Path, label: str) -> List[dict]:
    """Evaluate an in-memory model on every benchmark of `cfg`; rows of benchmark/metric/value/stderr."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks, names, samples, manager = load_tasks(cfg, work_dir)
    log.info("Evaluating %s on %s", label, ", ".join(names.values()))
    # lm-eval's automatic batch size probes with full-length batches: minutes per probe on a CPU.
    on_cpu = next(model.parameters()).device.type == "cpu"
    batch_size = cfg.batch_size or (CPU_BATCH_SIZE if on_cpu else "auto")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=64)
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=cfg.num_fewshot or None, samples=samples or None,
                              apply_chat_template=cfg.apply_chat_template, log_samples=False,
                              bootstrap_iters=cfg.bootstrap_iters, verbosity="WARNING", task_manager=manager)
    return _flatten(results, names)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def baseline_key(model_id: str, cfg: EvalConfig) -> str:
    return hashlib.sha256(json.dumps({"model": model_id, "eval": asdict(cfg)}, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_baseline(model, tokenizer, cfg: EvalConfig, *, model_id: str, model_name: str, cache_dir: str,
                    work_dir: Path) -> List[dict]:
    """BF16 scores for (model, evaluation settings), evaluated once and shared by every run that asks.

    A file lock makes concurrent jobs of a sweep wait for the first one instead of evaluating twice.
    """
    key = baseline_key(model_id, cfg)
    path = Path(os.path.expanduser(cache_dir)) / "baselines" / f"{model_name}-{key}.json"
    with _locked(path.with_suffix(".lock")):
        if path.exists():
            log.info("Using the cached BF16 baseline %s", path)
            return json.loads(path.read_text())["results"]
        rows = run_benchmarks(model, tokenizer, cfg, work_dir, "BF16 baseline")
        write_json_atomic(path, {"model": model_id, "eval": asdict(cfg), "results": rows})
        return rows
