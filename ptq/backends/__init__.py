"""Backends: where the quantization runs. Each one is a small class (ptq/backends/base.py's `Backend`).

The registry names each backend's class instead of importing it: a backend pulls in its whole stack
(torch and ModelOpt, or the Megatron tooling), which planning, dry runs and sweep submission never need.
This is the one place the project imports its own code by name at run time. What a backend would run is
described without it (describe.py), so a dry run imports no torch.
"""

from __future__ import annotations

import importlib

from ptq.backends.base import Backend, BackendResult
from ptq.backends.describe import DESCRIBERS, describe
from ptq.errors import ConfigError

REGISTRY = {
    "hf_modelopt": "ptq.backends.hf_modelopt:HFModelOptBackend",
    "megatron_bridge": "ptq.backends.megatron_bridge:MegatronBridgeBackend",
}


def get_backend(name: str) -> Backend:
    if name not in REGISTRY:
        raise ConfigError(f"backend={name} is unknown; choose one of: {', '.join(REGISTRY)}.")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Backend", "BackendResult", "DESCRIBERS", "REGISTRY", "describe", "get_backend"]
