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
# Recorded only where installed (the megatron_bridge backend's stack).
OPTIONAL_PACKAGES = ("megatron-core", "megatron-bridge", "transformer-engine", "transformer-engine-cu13")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# Keys that change how or where a run is launched, not what it makes.
NOT_IDENTITY = ("overwrite", "dry_run", "detach", "cluster", "cache_dir")


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


def package_versions() -> Dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    for name in OPTIONAL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
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
