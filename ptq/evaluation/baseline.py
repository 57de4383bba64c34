"""The BF16 baseline: benchmark scores of the unquantized model, evaluated once per (model, evaluation settings,
data, lm-eval version) and cached for every run that asks."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import List

from ptq.evaluation.readers import benchmark_path
from ptq.evaluation.runner import run_benchmarks
from ptq.evaluation.tasks import FINGERPRINT_VERSION, data_digest
from ptq.files import write_json_atomic
from ptq.schema import EvalConfig

log = logging.getLogger(__name__)


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
    """The cached BF16 baseline's identity: model, settings, and what the fingerprints cover that the settings do
    not (each data file's contents, lm-eval's version), so a changed file or an upgrade evaluates BF16 again."""
    from importlib import metadata

    data = [data_digest(benchmark_path(b, cfg.data_dir)) if b.kind != "lm_eval" else None for b in cfg.benchmarks]
    key = {
        "model": model_id,
        "eval": asdict(cfg),
        "fingerprint": FINGERPRINT_VERSION,
        "data": data,
        "lm_eval": metadata.version("lm_eval"),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_baseline(
    model, tokenizer, cfg: EvalConfig, *, model_id: str, model_name: str, cache_dir: str, work_dir: Path
) -> List[dict]:
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
