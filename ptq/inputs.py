"""The files a run reads and the folder it writes, checked before any model is loaded.

`make_plan` (ptq/plan.py) is pure; this is its counterpart that reads the machine: calibration and held-out
text (there, UTF-8, with enough bytes for the tokens asked), benchmark files (every item parsed), the
source checkpoint's config.json and safetensors headers, and an output root that can be written. Exact
token counts come after the tokenizer is loaded (ptq/calib_data.py); the byte count here can only refuse
requests that cannot be met (a token is at least one byte of text).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Optional

from ptq.errors import ConfigError
from ptq.evaluation import check_eval_config
from ptq.plan import Plan, calib_text_path
from ptq.schema import RunConfig
from ptq.textfiles import checked_once, read_texts


def text_bytes(path: Path) -> int:
    return sum(len(text.encode("utf-8")) for text in read_texts(path))


def check_text(spec: str, samples: int, seq_len: int, key: str) -> Optional[int]:
    """Bytes of text in the local file `spec` names (None for "self" or a dataset name); refuses a file that is
    missing, not UTF-8, malformed, or too short for samples x seq_len tokens."""
    path = calib_text_path(spec)
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"{key}={spec}: {path} is not a file; give a .txt or .jsonl file, \"self\", or a dataset name.")
    size = checked_once(text_bytes, path)
    need = samples * seq_len
    if size == 0:
        raise ConfigError(f"{key}={spec}: {path} holds no text.")
    if size < need:
        raise ConfigError(f"{key}={spec}: {path} holds {size:,} bytes of text, fewer than the {need:,} tokens asked "
                          f"({samples} x {seq_len}; a token takes at least one byte): give a longer file, or fewer "
                          "samples or a shorter sequence length.")
    return size


def safetensors_problem(file: Path) -> Optional[str]:
    """What is wrong with a safetensors file's header (None when it is whole), without reading its tensors."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{file.name} is {size} bytes, too short for a safetensors header"
            (length,) = struct.unpack("<Q", head)
            if 8 + length > size:
                return f"{file.name} is truncated: its header alone claims {length:,} bytes of a {size:,}-byte file"
            header = json.loads(f.read(length))
    except OSError as exc:
        return f"{file.name} cannot be read: {exc}"
    except ValueError as exc:
        return f"{file.name} has a damaged header: {exc}"
    if not isinstance(header, dict):
        return f"{file.name} has a damaged header: a JSON {type(header).__name__}, not an object"
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


def check_output_root(output_dir: Path, need_bytes: int) -> None:
    """The output folder can be created and written, with room for `need_bytes` (0: not checked)."""
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot create {output_dir}: {existing} is a file, not a folder; choose another output_root.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write below {existing} (read-only file system or no permission); choose another "
                          "output_root.")
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise ConfigError(f"{existing} has {free / 2**30:.2f} GiB free; the checkpoint needs at least "
                          f"{need_bytes / 2**30:.2f} GiB; free space or choose another output_root.")


def min_checkpoint_bytes(cfg: RunConfig, plan: Plan) -> int:
    """The least a checkpoint can take: 2 bytes a parameter in BF16, else half a byte (4-bit weights)."""
    return int(cfg.model.params_b * 1e9 * (0.5 if plan.quantize else 2.0))


def check_inputs(cfg: RunConfig, plan: Plan, space: bool = True) -> None:
    """Everything a run reads or writes that can be checked without loading the model. `space`: check the
    free space now (not for dry runs, nor for sweep points that run later, elsewhere)."""
    check_output_root(plan.output_dir, min_checkpoint_bytes(cfg, plan) if space and not cfg.dry_run else 0)
    if plan.source.kind == "local":
        check_checkpoint(Path(plan.source.location))
    if plan.quantize:
        check_text(cfg.calib.dataset, cfg.calib.size, cfg.calib.seq_len, "calib.dataset")
    if cfg.fidelity.enabled and (cfg.backend.name == "hf_modelopt" or plan.measure_export):
        check_text(cfg.fidelity.text, cfg.fidelity.samples, cfg.fidelity.seq_len, "fidelity.text")
    check_eval_config(cfg.eval)
