"""The `model` group: find and load the BF16 checkpoint a run starts from."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ptq.plan import ModelSource

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


def load_model(source: ModelSource, *, device: str, dtype: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = resolve_checkpoint(source)
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device == "cuda":
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    model.eval()
    if model.config.architectures is None:
        # ModelOpt's export reads the architecture name from the config.
        model.config.architectures = [type(model).__name__]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, checkpoint


def model_device(model) -> torch.device:
    return next(model.parameters()).device
