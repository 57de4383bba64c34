"""The run record (run.json): what one run made, how it was made and what it measured.

ptq/run.py writes it. Everything that reads records (the report, the tracker in ptq/tracking.py, `python -m
ptq.status` and the sweep) reads them through `RunRecord.parse`, which checks the layout version and the fields
every reader relies on, and gives each top-level field one type: a reader never guesses whether `calib_size` is a
number, `kv_cache` may be missing or the evaluation tag must be read off a folder name.

Layout versions (`record_version`): 1 is every record written before the field existed; 2 adds `record_version`,
`eval_tag`, `details.applied_recipe` and the recovery settings in `config.recover`. A reader takes every version up
to RECORD_VERSION and refuses a newer one with a message naming it. The measured sections (fidelity, evaluation,
validation, size, timings_s, ...) stay JSON objects, kept in `sections` and read with `section(name)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ptq.layout import RECORD_NAME
from ptq.recipe_files import WRITTEN_NAME

RECORD_VERSION = 2

# The BF16 baseline's recipe name (conf/recipe/bf16.yaml): a record of the unquantized model.
BF16 = "bf16"

# An output folder's name ends with the evaluation settings' tag (conf/config.yaml): how version 1 records say it.
_EVAL_TAG = re.compile(r"-(eval_[A-Za-z0-9_.]+_[0-9a-f]{6})$")


class RecordProblem(ValueError):
    """A JSON object that is not a run record this launcher can read; the message says why."""


def version_problem(obj: dict) -> Optional[str]:
    """Why this launcher cannot read the record `obj` (a newer layout, or a version that is not a number), or None."""
    version = obj.get("record_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        return f"not a run record: record_version={version!r} is not a positive whole number"
    if version > RECORD_VERSION:
        return (
            f"written by a newer ptq-launcher (record_version {version}; this one reads up to {RECORD_VERSION}): "
            "update the launcher to read it"
        )
    return None


def load(output_dir) -> Optional["RunRecord"]:
    """The run record in `output_dir`: None when it holds none, RecordProblem when its run.json is not a record
    this launcher reads (not JSON, or version_problem)."""
    if not output_dir:
        return None
    path = Path(os.path.expanduser(str(output_dir))) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RecordProblem(f"unreadable JSON: {exc}") from exc
    return RunRecord.parse(obj)


def _text(value) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def _whole(value) -> Optional[int]:
    """A whole number from JSON (which may carry 512.0); None for anything else, booleans included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _object(value) -> dict:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class RunRecord:
    """One run record. `sections` holds every other top-level entry (fidelity, evaluation, validation, size,
    timings_s, layers, details, serving, hardware, versions, plan, tracking, ...) as written."""

    model: str
    recipe: str
    status: str = "running"
    record_version: int = RECORD_VERSION
    # The calibration choice when it is not the recipe's own (ptq/formats.py algorithm_tag), else None.
    algorithm: Optional[str] = None
    kv_cache: str = "none"
    calib_size: Optional[int] = None
    calib_seq_len: Optional[int] = None
    # "text", or "image_text": a vision-language model calibrated on image-text pairs (ptq/vlm.py).
    calib_kind: str = "text"
    # What fidelity was measured on: "text", or "image_text" (the text positions of image-text pairs).
    fidelity_kind: str = "text"
    # The evaluation settings' tag (`eval_<suite>_<hash>`), "" with evaluation off.
    eval_tag: str = ""
    hardware_profile: Optional[str] = None
    backend: Optional[str] = None
    output_dir: Optional[str] = None
    checkpoint: Optional[str] = None
    config_hash: Optional[str] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    error: Optional[str] = None
    # The composed Hydra config the run was made with.
    config: dict = field(default_factory=dict)
    sections: dict = field(default_factory=dict)

    @classmethod
    def problem(cls, obj) -> Optional[str]:
        """Why `obj` (parsed JSON) cannot be read as a run record, or None when it can."""
        if not isinstance(obj, dict):
            return f"not a run record: top-level JSON is {type(obj).__name__}, not an object"
        version = version_problem(obj)
        if version:
            return version
        for key in ("model", "recipe"):
            if key not in obj:
                return f"not a run record: missing '{key}'"
            if not _text(obj[key]):
                return f"not a run record: '{key}' is not a non-empty string"
        return None

    @classmethod
    def parse(cls, obj) -> "RunRecord":
        """The record `obj` (parsed JSON) describes; RecordProblem when it is none (see `problem`). Fields of the
        wrong type read as absent (None, or the field's default)."""
        if isinstance(obj, RunRecord):
            return obj
        problem = cls.problem(obj)
        if problem:
            raise RecordProblem(problem)
        own_tag = obj.get("eval_tag")
        folder = _text(obj.get("output_dir"))
        if not isinstance(own_tag, str):  # version 1: the tag is the end of the output folder's name
            match = _EVAL_TAG.search(Path(folder).name) if folder else None
            own_tag = match.group(1) if match else ""
        names = {f.name for f in dataclasses.fields(cls)} - {"sections"}
        return cls(
            model=obj["model"],
            recipe=obj["recipe"],
            status=_text(obj.get("status")) or "unknown",
            record_version=obj.get("record_version", 1),
            algorithm=_text(obj.get("algorithm")),
            kv_cache=_text(obj.get("kv_cache")) or "none",
            calib_size=_whole(obj.get("calib_size")),
            calib_seq_len=_whole(obj.get("calib_seq_len")),
            calib_kind=_text(obj.get("calib_kind")) or "text",
            fidelity_kind=_text(obj.get("fidelity_kind")) or "text",
            eval_tag=own_tag,
            hardware_profile=_text(obj.get("hardware_profile")),
            backend=_text(obj.get("backend")),
            output_dir=folder,
            checkpoint=_text(obj.get("checkpoint")),
            config_hash=_text(obj.get("config_hash")),
            started_at=_text(obj.get("started_at")),
            finished_at=_text(obj.get("finished_at")),
            error=obj.get("error") if obj.get("error") is None else str(obj.get("error")),
            config=_object(obj.get("config")),
            sections={k: v for k, v in obj.items() if k not in names},
        )

    def to_dict(self) -> dict:
        """The record as run.json holds it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sections"}
        out.update(self.sections)
        return out

    def replace(self, **changes) -> "RunRecord":
        return dataclasses.replace(self, **changes)

    def section(self, name: str) -> dict:
        """A measured section (fidelity, evaluation, validation, size, timings_s, ...), {} where there is none."""
        return _object(self.sections.get(name))

    @property
    def is_bf16(self) -> bool:
        return self.recipe == BF16

    @property
    def parallelism(self) -> str:
        """The parallel layout's name (`single`, `tp2`, ...), "" where the config has none."""
        return _text(_object(self.config.get("parallelism")).get("name")) or ""

    @property
    def recover(self) -> dict:
        """The training-after-PTQ settings (config.recover), {} when the run had none (recover=none)."""
        recover = _object(self.config.get("recover"))
        return recover if recover.get("method") not in (None, "", "none") else {}

    @property
    def recipe_file(self) -> str:
        """The recipe file written beside the checkpoint (the configuration ModelOpt applied), "" when none."""
        if not self.checkpoint or not self.section("details").get("applied_recipe"):
            return ""
        return str(Path(self.checkpoint) / WRITTEN_NAME)
