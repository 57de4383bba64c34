"""The lm-eval call: an in-memory model evaluated on a run's benchmarks, its results flattened into rows and its
samples written beside them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

from ptq.evaluation import images
from ptq.evaluation.readers import benchmark_path, read_image_choice
from ptq.evaluation.scores import RATIO_METRICS, item_scores, macro_row, ratio_stderr, subject_rows
from ptq.evaluation.tasks import IN_PROCESS, fingerprint, load_tasks
from ptq.files import write_text_atomic
from ptq.schema import EvalConfig

log = logging.getLogger(__name__)

CPU_BATCH_SIZE = 8


def _flatten(
    results: dict,
    names: Dict[str, str],
    prints: Optional[Dict[str, dict]] = None,
    subjects: Optional[Dict[str, List[str]]] = None,
) -> List[dict]:
    prints, subjects = prints or {}, subjects or {}
    logged = results.get("samples") or {}
    rows = []
    for task, metrics in results["results"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            if not isinstance(stderr, (int, float)) and metric in RATIO_METRICS:
                stderr = ratio_stderr(logged.get(task) or [], metric, filt)
            row = {
                "benchmark": names.get(task, task),
                "metric": metric if filt in ("none", "last-number") else key,
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "higher_is_better": bool(better.get(metric, True)),
                **prints.get(task, {}),
            }
            # Per-item scores, so a comparison with BF16 on the same items can be paired (ptq/report).
            items = item_scores(logged.get(task) or [], metric, filt, float(value))
            if items:
                row["items"] = items
            rows.append(row)
            if items and task in subjects:
                # Per subject (each with its items, so the report pairs it with BF16's), and the macro average
                # over subjects beside lm-eval's mean over items.
                per_subject = subject_rows(row, subjects[task])
                rows += per_subject + [macro_row(row, per_subject)]
    return sorted(rows, key=lambda r: (r["benchmark"], r["metric"]))


def run_benchmarks(model, tokenizer, cfg: EvalConfig, work_dir: Path, label: str) -> List[dict]:
    """Evaluate an in-memory model on every benchmark of `cfg`; rows of benchmark/metric/value/stderr."""
    rows = image_benchmarks(model, cfg, label)
    if all(bench.kind == IN_PROCESS for bench in cfg.benchmarks):
        return rows
    return sorted(
        rows + lm_eval_benchmarks(model, tokenizer, cfg, work_dir, label), key=lambda r: (r["benchmark"], r["metric"])
    )


def image_benchmarks(model, cfg: EvalConfig, label: str) -> List[dict]:
    """The image_choice benchmarks, scored in process with the model's processor (read from where the model came
    from: the source checkpoint, or the export, which holds the processor's files)."""
    benches = [bench for bench in cfg.benchmarks if bench.kind == IN_PROCESS]
    if not benches:
        return []
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model.name_or_path)
    rows = []
    for bench in benches:
        items = read_image_choice(benchmark_path(bench, cfg.data_dir), bench.template)
        n = bench.limit or cfg.limit
        indices = list(range(min(n, len(items)) if n else len(items)))
        log.info("Evaluating %s on %s (%d items, in process)", label, bench.name, len(indices))
        rows += images.rows(
            bench.name,
            images.score(model, processor, items, indices),
            indices,
            fingerprint(bench, cfg, indices if n else None),
        )
    return rows


def lm_eval_benchmarks(model, tokenizer, cfg: EvalConfig, work_dir: Path, label: str) -> List[dict]:
    """The benchmarks lm-eval scores, through its Python API on the in-memory model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks, names, samples, manager, subjects = load_tasks(cfg, work_dir)
    prints = {
        key: fingerprint(bench, cfg, samples.get(key))
        for bench in cfg.benchmarks
        for key, name in names.items()
        if name == bench.name
    }
    log.info("Evaluating %s on %s", label, ", ".join(names.values()))
    # lm-eval's automatic batch size probes with full-length batches: minutes per probe on a CPU.
    on_cpu = next(model.parameters()).device.type == "cpu"
    batch_size = cfg.batch_size or (CPU_BATCH_SIZE if on_cpu else "auto")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=64)
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot or None,
        samples=samples or None,
        apply_chat_template=cfg.apply_chat_template,
        log_samples=True,
        bootstrap_iters=cfg.bootstrap_iters,
        verbosity="WARNING",
        task_manager=manager,
    )
    _write_samples(results.get("samples") or {}, names, work_dir / f"samples-{_safe(label)}.jsonl")
    return _flatten(results, names, prints, subjects)


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _write_samples(samples: Dict[str, List[dict]], names: Dict[str, str], path: Path) -> None:
    """What each item was asked, answered and scored (generation outputs included), one JSON line per item, in
    the run's evaluation folder."""
    lines = []
    for task, items in samples.items():
        for item in items:
            metrics = {m: item.get(m) for m in item.get("metrics", []) if isinstance(item.get(m), (int, float, bool))}
            lines.append(
                json.dumps(
                    {
                        "benchmark": names.get(task, task),
                        "doc_id": item.get("doc_id"),
                        "filter": item.get("filter"),
                        "target": item.get("target"),
                        "response": item.get("filtered_resps"),
                        **metrics,
                    },
                    default=str,
                )
            )
    if lines:
        write_text_atomic(path, "\n".join(lines) + "\n")
