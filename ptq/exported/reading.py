"""Reading an export's files: its quantization config and each layer's format, which safetensors file holds each
tensor, tensors by name, and layers read ahead on worker threads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch

from ptq.errors import ConfigError
from ptq.exported.dequantize import SUPPORTED
from ptq.formats import MIXED_PRECISION
from ptq.layout import QUANT_CONFIG_NAME


def read_quant_config(export_dir: Path) -> dict:
    """The "quantization" section of a ModelOpt export's hf_quant_config.json."""
    path = export_dir / QUANT_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{export_dir} has no {QUANT_CONFIG_NAME}: it is not a ModelOpt export.")
    return json.loads(path.read_text()).get("quantization", {})


def layer_formats(quant: dict, module_names: List[str]) -> Dict[str, dict]:
    """{module: {"quant_algo", "group_size"}} for every module the checkpoint stores quantized."""
    algo = (quant.get("quant_algo") or "").upper()
    if algo == MIXED_PRECISION:
        return {
            name: {"quant_algo": (cfg.get("quant_algo") or "").upper(), "group_size": cfg.get("group_size")}
            for name, cfg in quant.get("quantized_layers", {}).items()
        }
    return {name: {"quant_algo": algo, "group_size": quant.get("group_size")} for name in module_names}


def tensor_files(export_dir: Path) -> Dict[str, Path]:
    """{tensor name: safetensors file holding it} for a checkpoint (headers only; no tensor is read)."""
    from safetensors import safe_open

    where = {}
    for file in sorted(Path(export_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                where[name] = file
    return where


def read_tensors(export_dir: Path, names: Optional[Iterable[str]] = None, device="cpu") -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint's safetensors files by name (all of them, or `names`), read onto `device`."""
    from safetensors import safe_open

    where = tensor_files(export_dir)
    wanted = list(where) if names is None else list(names)
    tensors = {}
    for file in sorted({where[name] for name in wanted}):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in wanted:
                if where[name] == file:
                    tensors[name] = f.get_tensor(name)
    return tensors


def tensors_by_module(names: Iterable[str]) -> Dict[str, Dict[str, str]]:
    """{module: {leaf: tensor name}} of a checkpoint's tensor names."""
    modules: Dict[str, Dict[str, str]] = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        modules.setdefault(module, {})[leaf] = name
    return modules


def read_ahead(keys: List[str], read: Callable, workers: int):
    """(key, read(key)) in the order of `keys`, while `workers` threads read the next few keys (at most
    2 x workers read ahead, so memory holds a handful of layers, not the checkpoint)."""
    if workers <= 1:
        for key in keys:
            yield key, read(key)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read-back") as pool:
        pending = [pool.submit(read, key) for key in keys[: 2 * workers]]
        for i, key in enumerate(keys):
            result = pending[i].result()
            pending[i] = None
            if i + 2 * workers < len(keys):
                pending.append(pool.submit(read, keys[i + 2 * workers]))
            yield key, result


@dataclass
class ExportIndex:
    """An export's files, read once: the quantization section, which file holds each tensor, the tensors of each
    module, the modules stored quantized (those with a weight_scale) and each one's format."""

    quant: dict
    where: Dict[str, Path]
    by_module: Dict[str, Dict[str, str]]
    quantized: List[str]
    formats: Dict[str, dict]


def index_export(export_dir: Path) -> ExportIndex:
    export_dir = Path(export_dir)
    quant = read_quant_config(export_dir)
    where = tensor_files(export_dir)
    by_module = tensors_by_module(where)
    quantized = [m for m, t in by_module.items() if "weight_scale" in t]
    return ExportIndex(quant, where, by_module, quantized, layer_formats(quant, quantized))


def unreadable_formats(export_dir: Path) -> List[str]:
    """quant_algo values of the export's quantized layers that the read-back cannot compute with."""
    index = index_export(export_dir)
    return sorted(
        {f["quant_algo"] for m, f in index.formats.items() if m in index.by_module and f["quant_algo"] not in SUPPORTED}
    )
