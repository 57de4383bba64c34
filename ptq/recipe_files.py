"""ModelOpt recipe files (nvidia-modelopt >= 0.45): finding one, naming it, and writing the configuration a run
applied as one. Torch-free: planning uses it before anything heavy is imported; loading a recipe (ModelOpt's
own loader, which resolves `$import` units and validates every field) is ptq/recipes.py's job.

A recipe is named either by its path inside the installed `modelopt_recipes` package (`general/ptq/
fp8_default-kv_fp8`, the suffix optional, as ModelOpt's `load_recipe` takes it) or by a file of the user's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any, List, Optional

from ptq.errors import ConfigError

SUFFIXES = (".yaml", ".yml")
# Written into every quantized checkpoint folder: the configuration ModelOpt applied, as a PTQ recipe file that
# ModelOpt's loader reads back (and `python launch.py recipe=<this file>` runs again).
WRITTEN_NAME = "modelopt_recipe.yaml"


def builtin_library() -> Optional[Path]:
    """The folder of ModelOpt's shipped recipes (the `modelopt_recipes` package), found without importing it."""
    spec = importlib.util.find_spec("modelopt_recipes")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _candidates(ref: str) -> List[str]:
    return [ref] if ref.endswith(SUFFIXES) else [ref + s for s in SUFFIXES]


def resolve(ref: str) -> Path:
    """The recipe file `ref` names: a file of the user's (absolute, or relative to the working folder) or a recipe
    shipped with ModelOpt. Raises ConfigError naming what exists when neither is found."""
    path = Path(ref).expanduser()
    for candidate in _candidates(str(path)):
        if Path(candidate).is_file():
            return Path(candidate).resolve()
    library = builtin_library()
    if library is not None and not path.is_absolute():
        for candidate in _candidates(ref):
            if (library / candidate).is_file():
                return library / candidate
    shipped = shipped_recipes()
    close = [name for name in shipped if Path(ref).stem.split("-")[0] in name][:8] or shipped[:8]
    where = (
        f"ModelOpt's shipped PTQ recipes include {', '.join(close)}"
        if shipped
        else "no ModelOpt recipe library is installed (nvidia-modelopt >= 0.45 ships one)"
    )
    raise ConfigError(
        f"recipe.modelopt_recipe={ref}: no such recipe file here or in ModelOpt's recipe library; {where}. "
        "Name a shipped recipe by its path in the library (e.g. general/ptq/fp8_default-kv_fp8) or give "
        "the path of a recipe file."
    )


def shipped_recipes(kind: str = "ptq") -> List[str]:
    """Names of the installed library's recipes of `kind` (their paths without the suffix), sorted."""
    library = builtin_library()
    if library is None:
        return []
    names = []
    for path in sorted(library.rglob("*")):
        if path.suffix in SUFFIXES and f"/{kind}/" in f"/{path.relative_to(library).as_posix()}":
            if "configs/" not in path.relative_to(library).as_posix() and _typed(path) == kind:
                names.append(path.relative_to(library).with_suffix("").as_posix())
    return names


def _typed(path: Path) -> Optional[str]:
    try:
        return recipe_type(path)
    except ConfigError:
        return None


def recipe_type(path: Path) -> Optional[str]:
    """`metadata.recipe_type` of a recipe file (ptq, auto_quantize, ...), None when it has none."""
    import yaml

    try:  # a recipe may be several YAML documents (ModelOpt's units put their `imports` in a first one)
        documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"recipe.modelopt_recipe={path}: cannot be read as YAML ({exc}); fix or replace the file.")
    for data in documents:
        metadata = data.get("metadata") if isinstance(data, dict) else None
        value = metadata.get("recipe_type") if isinstance(metadata, dict) else None
        if value is not None:
            return str(value)
    return None


def check(ref: str) -> Path:
    """The recipe file of `ref`, refused before anything is loaded unless it is a PTQ recipe."""
    path = resolve(ref)
    kind = recipe_type(path)
    if kind != "ptq":
        raise ConfigError(
            f"recipe.modelopt_recipe={ref} is a{'n' if (kind or 'x')[0] in 'aeiou' else ''} "
            f"{kind or 'untyped'} recipe ({path}); this recipe group runs PTQ recipes (metadata.recipe_type: "
            "ptq). For mixed precision use recipe=auto_quantize."
        )
    return path


def recipe_name(ref: Optional[str]) -> str:
    """The recipe's name in output folders and tables: a shipped recipe's path in the library with dots for
    slashes (`general.ptq.fp8_default-kv_fp8`: file names repeat across the library's folders, and `fp8` is also
    one of this launcher's recipes); a user's file's name and the start of its content's hash
    (`modelopt_recipe-3fa2c1`), so two files of one name, or one file edited, never share an output folder."""
    if not ref:
        return "modelopt"
    try:
        path = resolve(str(ref))
    except ConfigError:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(ref)).stem) or "modelopt"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)
    library = builtin_library()
    if library is not None and library in path.parents:
        return ".".join(
            re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in path.relative_to(library).with_suffix("").parts
        )
    return f"{stem}-{hashlib.sha256(path.read_bytes()).hexdigest()[:6]}"


def format_name(cfg: dict) -> str:
    """The number format one quantizer's settings compute in: fp8, nvfp4, mxfp8, int8, int4, and for others mxfp4,
    mxint8 or `num_bits=<bits>` (ModelOpt's num_bits: (4, 3) E4M3, (2, 1) E2M1; block scale_bits (8, 0): a shared
    power-of-two scale per block, the MX formats)."""
    bits, blocks = cfg.get("num_bits"), cfg.get("block_sizes") or {}
    bits = tuple(bits) if isinstance(bits, (list, tuple)) else bits
    scale = blocks.get("scale_bits")
    scale = tuple(scale) if isinstance(scale, (list, tuple)) else scale
    name = {
        (4, 3): "fp8",
        (5, 2): "fp8",
        (2, 1): "nvfp4" if scale in (None, (4, 3)) else "mxfp4",
        8: "int8",
        4: "int4",
    }.get(bits, f"num_bits={bits}")
    if scale == (8, 0) and name in ("fp8", "int8"):
        name = {"fp8": "mxfp8", "int8": "mxint8"}[name]
    return name


def kv_cache_of(quant_cfg: dict) -> str:
    """The KV-cache format (recipe.kv_cache's names: none, fp8, nvfp4) the entries of an applied configuration give
    the KV cache: the last enabled `*_bmm_quantizer` entry wins, as in ModelOpt's ordered list."""
    found = "none"
    for entry in quant_cfg.get("quant_cfg") or []:
        if "bmm_quantizer" not in str(entry.get("quantizer_name", "")):
            continue
        cfg = entry.get("cfg")
        cfg = cfg[0] if isinstance(cfg, list) and cfg else cfg
        if entry.get("enable") is False or not isinstance(cfg, dict) or cfg.get("enable") is False:
            found = "none"
            continue
        found = format_name(cfg)
    return found


def _plain(value: Any) -> Any:
    """JSON/YAML-safe copy: tuples as lists, mapping keys kept (ints stay ints)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def applied_recipe(quant_cfg: dict, description: str) -> dict:
    """The configuration ModelOpt applied (`quant_cfg` as given to mtq.quantize: its ordered entries and its
    algorithm) as a PTQ recipe document."""
    quantize = {"algorithm": _plain(quant_cfg.get("algorithm")), "quant_cfg": _plain(quant_cfg["quant_cfg"])}
    return {"metadata": {"recipe_type": "ptq", "description": description}, "quantize": quantize}


def write_applied(folder: Path, recipe: dict) -> Path:
    """Write `recipe` (applied_recipe) into `folder` as WRITTEN_NAME, the entries in their order and their keys'
    types kept (block sizes are keyed by the axis, an int)."""
    target = folder / WRITTEN_NAME
    text = (
        "# The quantization configuration this checkpoint was made with, as a ModelOpt PTQ recipe\n"
        "# (modelopt.recipe.load_recipe reads it; `python launch.py recipe=<this file>` runs it again).\n"
        + recipe_text(recipe)
    )
    target.write_text(text, encoding="utf-8")
    return target


def recipe_text(recipe: dict) -> str:
    """`recipe` (applied_recipe) as YAML, the entries in their order and their keys' types kept."""
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=120)
