"""The files a run reads and the folder it writes, checked before any model is loaded.

`make_plan` (ptq/plan.py) is pure; this is its counterpart that reads the machine: calibration and held-out
text (there, UTF-8, with enough bytes for the tokens asked), benchmark files (every item parsed), the
source checkpoint's config.json and safetensors headers, and an output root and cache folder that can be written. Exact
token counts come after the tokenizer is loaded (ptq/calib_data.py); the byte count here can only refuse
requests that cannot be met (a token is at least one byte of text).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from ptq.backend_spec import recover_rows, spec_of
from ptq.errors import ConfigError
from ptq.evaluation.readers import check_eval_config
from ptq.files import nearest_existing, safetensors_header
from ptq.layerkinds import MAMBA_KERNEL_PACKAGES
from ptq.plan import Plan, calib_text_path
from ptq.schema import RunConfig
from ptq.textfiles import checked_once, read_texts
from ptq.vlm import processor_problem, read_pairs


def text_bytes(path: Path) -> int:
    return sum(len(text.encode("utf-8")) for text in read_texts(path))


def check_text(spec: str, samples: int, seq_len: int, key: str) -> Optional[int]:
    """Bytes of text in the local file `spec` names (None for "self" or a dataset name); refuses a file that is
    missing, not UTF-8, malformed, or too short for samples x seq_len tokens."""
    path = calib_text_path(spec)
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f'{key}={spec}: {path} is not a file; give a .txt or .jsonl file, "self", or a dataset name.')
    size = checked_once(text_bytes, path)
    need = samples * seq_len
    if size == 0:
        raise ConfigError(f"{key}={spec}: {path} holds no text.")
    if size < need:
        raise ConfigError(
            f"{key}={spec}: {path} holds {size:,} bytes of text, fewer than the {need:,} tokens asked "
            f"({samples} x {seq_len}; a token takes at least one byte): give a longer file, or fewer "
            "samples or a shorter sequence length."
        )
    return size


def check_pairs(spec: str, samples: int, key: str, size_key: str) -> int:
    """The pairs of an image-text file (every image present), at least `samples` of them."""
    pairs = checked_once(read_pairs, calib_text_path(spec))
    if len(pairs) < samples:
        raise ConfigError(
            f"{key}={spec} holds {len(pairs)} image-text pairs, fewer than {size_key}={samples}; add pairs or set "
            f"{size_key}={len(pairs)} (each pair is used once)."
        )
    return len(pairs)


def safetensors_problem(file: Path) -> Optional[str]:
    """What is wrong with a safetensors file's header (None when it is whole), without reading its tensors."""
    try:
        size, length, header = safetensors_header(file)
    except OSError as exc:
        return f"{file.name} cannot be read: {exc}"
    except ValueError as exc:
        return f"{file.name} {exc}"
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"{file.name} has a damaged header: tensor {name!r} has no valid data_offsets"
        ends.append(offsets[1])
    if ends and 8 + length + max(ends) > size:
        return f"{file.name} is truncated: its tensors need {8 + length + max(ends):,} bytes, the file has {size:,}"
    return None


def check_checkpoint(folder: Path) -> None:
    files = sorted(folder.glob("*.safetensors"))
    problems = [p for p in (safetensors_problem(f) for f in files) if p]
    if problems:
        raise ConfigError(f"model.path={folder}: {'; '.join(problems[:3])}. Copy or convert the checkpoint again.")


def check_writable(folder: Path, key: str, value: str) -> None:
    """`folder` (output_root's output folder, or cache_dir) is a folder that can be created and written."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        where = (
            f"{existing} is a file, not a folder"
            if existing == folder
            else f"cannot create {folder}: {existing} is a file, not a folder"
        )
        raise ConfigError(f"{key}={value}: {where}; choose another {key}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key}={value}: cannot write below {existing} (read-only file system or no permission); "
            f"choose another {key}."
        )


def check_mamba_packages(cfg: RunConfig) -> None:
    """model.mamba_kernels=true needs mamba-ssm and causal-conv1d importable here (CUDA builds of both)."""
    if not cfg.model.mamba_kernels:
        return
    missing = [name for name in MAMBA_KERNEL_PACKAGES if importlib.util.find_spec(name.replace("-", "_")) is None]
    if missing:
        raise ConfigError(
            f"model.mamba_kernels=true, and {', '.join(missing)} cannot be imported here. Both compile against the "
            "installed torch: build their wheels on a GPU host with scripts/mamba-wheels.sh and install them "
            "(docs/megatron.md), or set model.mamba_kernels=false for transformers' PyTorch path."
        )


def check_inputs(cfg: RunConfig, plan: Plan, here: bool = True) -> None:
    """Everything a run reads or writes that can be checked without loading the model (the room for the
    checkpoint is checked when planning, ptq/plan.py). `here`: the run runs on this machine (not a sweep point
    that runs later elsewhere, whose cache_dir may be a node's own folder)."""
    check_writable(plan.output_dir, "output_root", cfg.output_root)
    if here:
        check_writable(Path(os.path.expanduser(cfg.cache_dir)).resolve(), "cache_dir", cfg.cache_dir)
    if plan.source.kind == "local":
        check_checkpoint(Path(plan.source.location))
    if plan.quantize and plan.calib_kind == "image_text":
        check_pairs(cfg.calib.dataset, cfg.calib.size, "calib.dataset", "calib.size")
    elif plan.quantize:
        check_text(cfg.calib.dataset, cfg.calib.size, cfg.calib.seq_len, "calib.dataset")
    if cfg.fidelity.enabled and plan.fidelity_kind == "image_text":
        check_pairs(cfg.fidelity.text, cfg.fidelity.samples, "fidelity.text", "fidelity.samples")
    elif cfg.fidelity.enabled and (spec_of(cfg).measures_in_memory or plan.measure_export):
        check_text(cfg.fidelity.text, cfg.fidelity.samples, cfg.fidelity.seq_len, "fidelity.text")
    if cfg.recover.method != "none":
        check_text(cfg.recover.text, recover_rows(cfg), cfg.recover.seq_len, "recover.text")
    check_eval_config(cfg.eval)
    if here:  # a sweep point planned on a login node runs on a GPU node, with its own packages
        check_mamba_packages(cfg)
    images = plan.image_inputs
    if images and plan.source.kind == "local":
        problem = processor_problem(Path(plan.source.location))
        if problem:
            raise ConfigError(
                f"{images[0]} gives {cfg.model.name} images, which its processor reads and its chat template places "
                f"in the prompt, and {plan.source.location} has {problem}; save the model's processor there "
                "(AutoProcessor.from_pretrained(<model id>).save_pretrained(<folder>)), or give it text."
            )
