"""The run record: one JSON file per run, written atomically, read by the results tools."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Dict

PACKAGES = ("torch", "transformers", "nvidia-modelopt", "hydra-core", "omegaconf", "accelerate", "safetensors")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def config_hash(config: dict) -> str:
    """Identity of a composed config, ignoring `overwrite` (it changes what is done, not what is made)."""
    relevant = {k: v for k, v in config.items() if k != "overwrite"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_versions() -> Dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware_info() -> dict:
    import torch

    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


class StageTimer:
    """Wall time per named stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
