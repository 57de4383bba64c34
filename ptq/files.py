"""Reading and publishing files so that no reader ever sees half of one. Imports nothing of the project."""

from __future__ import annotations

import json
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Tuple


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed onto `path` only if the block finishes. A file it
    replaces keeps its mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if path.exists():
            tmp.chmod(path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in `path`, or None when it is missing or not JSON."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def default_file_mode() -> int:
    """The mode a new file gets here (0o666 less the process's umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def publish_folder(partial: Path, final: Path) -> None:
    """Replace `final` with the complete folder `partial`; the final name appears only once it is complete.
    Every file gets the mode a new file gets here: safetensors writes its files 0600 where the other writers
    follow the umask, and a checkpoint others cannot read is no use on a shared file system."""
    mode = default_file_mode()
    for file in Path(partial).rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(mode)
    if final.exists():
        retired = final.with_name(final.name + ".replaced")
        shutil.rmtree(retired, ignore_errors=True)
        final.rename(retired)
        partial.rename(final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        partial.rename(final)


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else the nearest of its parents that does (where creating it would start)."""
    existing = Path(path)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return existing


def safetensors_header(file: Path) -> Tuple[int, int, dict]:
    """(file size, header length, header) of a safetensors file, read without its tensors. Raises OSError when the
    file cannot be read and ValueError saying what is wrong (the text follows the file's name in a message)."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"is {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ValueError(f"is truncated: its header alone claims {length:,} bytes of a {size:,}-byte file")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise ValueError(f"has a damaged header: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"has a damaged header: a JSON {type(header).__name__}, not an object")
    return size, length, header
