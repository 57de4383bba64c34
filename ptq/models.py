"""The `model` group: find and load the BF16 checkpoint a run starts from."""

from __future__ import annotations

import copy
import gc
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ptq.layerkinds import MAMBA_KERNEL_PACKAGES
from ptq.plan import ModelSource
from ptq.record_parts import installed_version
from ptq.state import ProcessState

log = logging.getLogger(__name__)
_COMPLETE_MARK = ".complete"


def _clear_gguf_marks(model) -> None:
    # Newer transformers refuse to save a model loaded from GGUF while it still
    # carries the GGUF quantizer; the weights are already dequantized, so drop it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf(gguf_path: str, target_dir: str) -> str:
    """Convert a GGUF file once into a cached Hugging Face folder and return the folder.

    The folder is written under a temporary name and renamed when complete, so an
    interrupted conversion is never mistaken for a finished one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target_dir)
    if (target / _COMPLETE_MARK).exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    folder, name = str(Path(gguf_path).parent), Path(gguf_path).name
    log.info("Converting %s to a Hugging Face checkpoint in %s (once)", gguf_path, target)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    _clear_gguf_marks(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _COMPLETE_MARK).write_text(f"converted from {gguf_path}\n")
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process finished the same conversion first; theirs is as good.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / _COMPLETE_MARK).exists():
            raise
    log.info("Converted in %.1f s", time.perf_counter() - start)
    return str(target)


def resolve_checkpoint(source: ModelSource) -> str:
    """A path or hub id that from_pretrained accepts."""
    if source.kind == "gguf":
        return convert_gguf(source.location, source.converted_dir)
    return source.location


@dataclass
class Loaded:
    """What load_model got: the model, its tokenizer, the checkpoint it came from, and how (`how`: from disk or a
    copy, seconds, whether the process keeps a pristine copy and why, the devices; the run record keeps it)."""

    model: Any
    tokenizer: Any
    checkpoint: str
    how: dict


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory where a copy of the model would go: the GPU's free memory, or the RAM available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def room_for_a_copy(model) -> Tuple[bool, str]:
    """Whether a second copy of `model` fits beside it, with as much again left over for calibration."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or any(hasattr(m, "_hf_hook") for m in model.modules()):
        # accelerate's dispatch hooks point at the original modules; a deep copy would share them.
        return False, "the model is spread over several devices"
    size = _model_bytes(model)
    free = available_bytes(next(iter(devices)))
    if free is None:
        return False, "free memory unknown"
    why = f"{free / 2**30:.1f} GiB free on {next(iter(devices))}, a copy takes {size / 2**30:.2f} GiB"
    return free >= 2 * size, why


def clear_model_cache(state: ProcessState) -> None:
    """Drop the pristine model `state` keeps, and return its memory."""
    state.models.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _key(
    source: ModelSource,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    max_gpu_memory_gb: float,
    vision_language: bool = False,
    mamba_kernels: Optional[bool] = None,
) -> tuple:
    return (
        mamba_kernels,
        source.kind,
        source.location,
        source.converted_dir,
        device,
        dtype,
        trust_remote_code,
        max_gpu_memory_gb,
        vision_language,
    )


def kept_model(
    state: ProcessState,
    source: ModelSource,
    *,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    max_gpu_memory_gb: float = 0.0,
    vision_language: bool = False,
    mamba_kernels: Optional[bool] = None,
):
    """The pristine BF16 model `state` keeps for `load_model(..., reuse=True)` with these settings, or None.
    Callers use it read-only (e.g. as a distillation teacher) and leave it as they found it."""
    key = _key(source, device, dtype, trust_remote_code, max_gpu_memory_gb, vision_language, mamba_kernels)
    kept = state.models.get(key)
    return kept[0] if kept else None


def load_model(
    source: ModelSource,
    state: ProcessState,
    *,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    reuse: bool = False,
    max_gpu_memory_gb: float = 0.0,
    vision_language: bool = False,
    mamba_kernels: Optional[bool] = None,
) -> Loaded:
    """The BF16 model. With `reuse`, a copy of the model an earlier run of this process (`state`) loaded with the
    same settings, or a fresh load that `state` keeps for later runs when two copies fit. `max_gpu_memory_gb` caps
    the weights device_map=auto puts on each GPU (0: no cap). `vision_language`: the whole vision-language model
    (AutoModelForImageTextToText), vision tower included. `mamba_kernels`: the model config's use_mamba_kernels
    (None: as the checkpoint says)."""
    key = _key(source, device, dtype, trust_remote_code, max_gpu_memory_gb, vision_language, mamba_kernels)
    start = time.perf_counter()
    if reuse and key in state.models:
        model, tokenizer, checkpoint = state.models[key]
        # The previous run's quantized copy holds reference cycles (ModelOpt's hooks and hparams): collect
        # it now, so its memory is free before it is measured and the next copy is made.
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        fits, why = room_for_a_copy(model)
        if not fits:  # memory got tighter since: hand over the pristine model itself and forget it
            state.models.clear()
            log.info("Using the BF16 model loaded earlier in this process without copying it (%s)", why)
            return Loaded(model, tokenizer, checkpoint, {"from": "memory (handed over, no longer kept)", "reason": why})
        model, tokenizer = copy.deepcopy(model), copy.deepcopy(tokenizer)
        state.loads["copy"] += 1
        log.info("Using a copy of the BF16 model loaded earlier in this process (%.1f s)", time.perf_counter() - start)
        how = {"from": "copy", "seconds": round(time.perf_counter() - start, 3), "kept": True, "reason": why}
        return Loaded(model, tokenizer, checkpoint, {**how, "devices": placement(model)})
    if state.models:
        clear_model_cache(state)  # another model or other settings: free the kept one before loading
    model, tokenizer, checkpoint = _load_from_disk(
        source,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        max_gpu_memory_gb=max_gpu_memory_gb,
        vision_language=vision_language,
        mamba_kernels=mamba_kernels,
    )
    state.loads["disk"] += 1
    how = {"from": "disk", "seconds": round(time.perf_counter() - start, 3), "kept": False, "devices": placement(model)}
    if not reuse:
        return Loaded(model, tokenizer, checkpoint, how)
    fits, why = room_for_a_copy(model)
    how["reason"] = why
    if not fits:
        log.info("Not keeping the BF16 model for later runs of this process (%s): each run loads it afresh", why)
        return Loaded(model, tokenizer, checkpoint, how)
    state.models[key] = (model, tokenizer, checkpoint)
    how["kept"] = True
    log.info("Keeping the BF16 model for later runs of this process (%s); this run quantizes a copy", why)
    return Loaded(copy.deepcopy(model), copy.deepcopy(tokenizer), checkpoint, how)


def gpu_memory_caps(max_gpu_memory_gb: float, gpus: int) -> Optional[Dict[object, int]]:
    """accelerate's `max_memory` for a cap in GiB on each of `gpus` GPUs (None: no cap). Nothing may go to
    the CPU or disk: a model that does not fit the caps fails to load instead of crawling."""
    if max_gpu_memory_gb <= 0:
        return None
    caps: Dict[object, int] = {i: int(max_gpu_memory_gb * 2**30) for i in range(gpus)}
    caps["cpu"] = 0
    return caps


def placement(model) -> Dict[str, int]:
    """Parameters per device, in millions (how device_map spread the model)."""
    counts: Dict[str, int] = {}
    for p in model.parameters():
        counts[str(p.device)] = counts.get(str(p.device), 0) + p.numel()
    return {device: round(n / 1e6, 1) for device, n in sorted(counts.items())}


def _load_from_disk(
    source: ModelSource,
    *,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    max_gpu_memory_gb: float = 0.0,
    vision_language: bool = False,
    mamba_kernels: Optional[bool] = None,
):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    checkpoint = resolve_checkpoint(source)
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if mamba_kernels is not None:
        kwargs["use_mamba_kernels"] = mamba_kernels
    if device == "cuda":
        kwargs["device_map"] = "auto"
        caps = gpu_memory_caps(max_gpu_memory_gb, torch.cuda.device_count())
        if caps:
            kwargs["max_memory"] = caps
    auto = AutoModelForImageTextToText if vision_language else AutoModelForCausalLM
    model = auto.from_pretrained(checkpoint, **kwargs)
    off_gpu = sorted({str(p.device) for p in model.parameters() if p.device.type != "cuda"}) if device == "cuda" else []
    if off_gpu:
        raise RuntimeError(
            f"{checkpoint} did not fit on the GPUs (parts went to {', '.join(off_gpu)}); raise "
            "backend.max_gpu_memory_gb or use more GPUs."
        )
    model.eval()
    if model.config.architectures is None:
        # ModelOpt's export reads the architecture name from the config.
        model.config.architectures = [type(model).__name__]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, checkpoint


def load_processor(checkpoint: str, trust_remote_code: bool):
    """A vision-language model's processor (image processor, tokenizer, chat template) from its checkpoint."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _mamba_mixers(model) -> list:
    """The Mamba mixer modules of `model` (those with an in_proj and a conv1d, as Mamba-2 layers have)."""
    return [m for m in model.modules() if hasattr(m, "in_proj") and hasattr(m, "conv1d") and hasattr(m, "A_log")]


def mamba_path(model) -> Optional[dict]:
    """Which path the model's Mamba layers take, for the record (None: a model without Mamba layers). transformers
    decides per forward: its modeling module's `is_fast_path_available` (set when the mixers were built: the config's
    use_mamba_kernels on and both kernels imported) and the mixer's weights on a GPU; both are read here. Where a
    transformers release keeps no such flag, the path is inferred from the config, the installed packages and the
    device, and the record says so."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_mamba_kernels"):
        return None
    versions = {name: installed_version(name) for name in MAMBA_KERNEL_PACKAGES}
    mixers = _mamba_mixers(model)
    on_gpu = bool(mixers) and all(m.in_proj.weight.device.type == "cuda" for m in mixers)
    module = sys.modules.get(type(mixers[0]).__module__) if mixers else None
    flag = getattr(module, "is_fast_path_available", None)
    if isinstance(flag, bool):
        kernels, how = flag and on_gpu, "read from transformers' modeling module"
    else:
        kernels, how = bool(config.use_mamba_kernels) and on_gpu and all(versions.values()), "inferred"
    return {
        "path": "CUDA kernels" if kernels else "PyTorch",
        "how": how,
        "use_mamba_kernels": bool(config.use_mamba_kernels),
        **versions,
    }
