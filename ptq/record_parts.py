"""The run record's parts: config identity, package versions, hardware, stage timings (ptq/run.py writes it)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional

from ptq.files import read_json
from ptq.layout import RECORD_NAME

PACKAGES = (
    "torch",
    "transformers",
    "nvidia-modelopt",
    "hydra-core",
    "omegaconf",
    "accelerate",
    "safetensors",
    "lm_eval",
)
# Recorded only where installed (the megatron_bridge backend's stack; MLflow for tracking=mlflow).
OPTIONAL_PACKAGES = (
    "megatron-core",
    "megatron-bridge",
    "transformer-engine",
    "transformer-engine-cu13",
    "mlflow-skinny",
    "mlflow",
)


# Keys that change how or where a run is launched, not what it makes (tracking: where it is reported).
NOT_IDENTITY = ("overwrite", "dry_run", "detach", "cluster", "cache_dir", "tracking")


def identity(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_IDENTITY}


def config_hash(config: dict) -> str:
    """Identity of a composed config: two runs with the same hash make the same checkpoint."""
    return hashlib.sha256(json.dumps(identity(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(old: dict, new: dict, limit: int = 6) -> list:
    """Dotted keys whose values differ between two composed configs (identity keys only)."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(identity(old)), flat(identity(new))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[:limit]


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of a distribution (pip name), None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> Dict[str, str]:
    versions = {"python": platform.python_version(), **{name: installed_version(name) for name in PACKAGES}}
    for name in OPTIONAL_PACKAGES:
        version = installed_version(name)
        if version is not None:
            versions[name] = version
    return versions


def hardware_info() -> dict:
    import torch

    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def read_record(output_dir) -> Optional[dict]:
    """The run record in `output_dir`, or None when there is none (or it is not JSON)."""
    if not output_dir:
        return None
    return read_json(Path(os.path.expanduser(str(output_dir))) / RECORD_NAME)


def _cuda():
    """torch.cuda when this process already imported torch and uses a GPU; None otherwise (never imports torch)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


class StageTimer:
    """Wall time per named stage, in the order the stages ran, and the peak GPU memory PyTorch allocated during
    each stage (bytes, over all visible GPUs; stages that ran before the process touched a GPU have none)."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self.peak_gpu_bytes: Dict[str, int] = {}

    @contextmanager
    def stage(self, name: str):
        cuda = _cuda()
        if cuda is not None:
            for device in range(cuda.device_count()):
                cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
            cuda = _cuda()
            if cuda is not None:
                peak = sum(cuda.max_memory_allocated(device) for device in range(cuda.device_count()))
                self.peak_gpu_bytes[name] = max(peak, self.peak_gpu_bytes.get(name, 0))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
