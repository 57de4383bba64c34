"""Reading the text files users give (calibration text, benchmark data): UTF-8 only, every problem named with
its file and line. Imports only ptq.errors."""

from __future__ import annotations

import bz2
import functools
import json
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

from ptq.errors import ConfigError


def read_text(path: Path) -> str:
    """The whole file as text (`.bz2` decompressed), refusing anything that is not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path} is not a file" + (" (it is a folder)" if path.is_dir() else " (it does not exist)") + "."
        )
    try:
        data = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}).") from None
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} is not UTF-8 text (line {line}, byte {exc.start}: {data[exc.start : exc.start + 1]!r}); "
            "give a text file (a binary or otherwise encoded file would be read as garbage)."
        ) from None


def lines(text: str) -> List[str]:
    """The lines of a text file: split at \n (and \r\n) only. str.splitlines would also split at U+2028,
    U+2029 and U+0085, which JSON strings and ordinary text may hold."""
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts]


def read_jsonl(path: Path) -> Iterator[Tuple[int, dict]]:
    """(line number, object) for every non-empty line; a line that is not a JSON object is an error naming it."""
    for number, line in enumerate(lines(read_text(path)), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(
                f"{path}:{number} is not valid JSON ({exc}); each line must be one JSON object."
            ) from None
        if not isinstance(row, dict):
            raise ConfigError(
                f"{path}:{number} is a JSON {type(row).__name__}, not an object; each line must be one object."
            )
        yield number, row


def is_pairs_file(path: Path) -> bool:
    """Whether a calibration file holds image-text pairs (ptq/vlm.py): a .jsonl file whose first row has an "image"
    key. False for anything else, a file that does not exist or cannot be read included (its own check says why)."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    try:  # the first row only: this is asked while composing every point, and a text file can be large
        with path.open(encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return isinstance(row, dict) and "image" in row
    except (OSError, ValueError):
        return False
    return False


def pairs_tag(dataset) -> str:
    """'-images' for calibration with image-text pairs, else '': text and image calibration write their own folders."""
    spec = str(dataset or "")
    if spec == "self":
        return ""
    return "-images" if is_pairs_file(Path(spec).expanduser()) else ""


def read_texts(path: Path) -> List[str]:
    """Calibration or held-out text: a `.jsonl` file's "text" fields, or the whole of any other file."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return [read_text(path)]
    texts = []
    for number, row in read_jsonl(path):
        if not isinstance(row.get("text"), str):
            raise ConfigError(f'{path}:{number} has no "text" string; each JSONL line must be {{"text": "..."}}.')
        texts.append(row["text"])
    return texts


def file_key(path: Path) -> Tuple[str, int, int]:
    """(resolved path, size, modification time): a file's identity for caching what was read from it."""
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _checked(key: Tuple[str, int, int], check: Callable, args: tuple):
    return check(Path(key[0]), *args)


def checked_once(check: Callable, path: Path, *args):
    """`check(path, *args)`, computed once per process for each version of the file: the points of a sweep
    check the same calibration and benchmark files. A check that raises is not remembered."""
    return _checked(file_key(path), check, args)
