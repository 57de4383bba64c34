"""Backends: where the quantization runs. Each one is a small class with `run(plan, export_dir, timer)`."""

from __future__ import annotations

from ptq.backends.base import Backend, BackendResult


def get_backend(name: str) -> Backend:
    if name == "hf_modelopt":
        from ptq.backends.hf_modelopt import HFModelOptBackend

        return HFModelOptBackend()
    if name == "megatron_bridge":
        from ptq.backends.megatron_bridge import MegatronBridgeBackend

        return MegatronBridgeBackend()
    raise ValueError(f"backend={name} is unknown; choose hf_modelopt or megatron_bridge.")


__all__ = ["Backend", "BackendResult", "get_backend"]
