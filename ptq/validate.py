"""Check an exported checkpoint: every layer meant to be quantized carries its scales,
the quantization metadata matches the recipe, and nothing was silently left in BF16."""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional

from ptq import layerkinds
from ptq.files import safetensors_header, write_text_atomic
from ptq.formats import EXPORT_FORMATS, KV_CACHE_EXPORTS, MIXED_PRECISION, NO_CHECK, STORED_WEIGHTS_CHECK
from ptq.layout import QUANT_CONFIG_NAME

FLOAT_DTYPES = layerkinds.FLOAT_DTYPES
# Weight dtype (safetensors names) a layer of each per-layer quant_algo must hold in a mixed-precision export.
WEIGHT_DTYPES = {algo: fmt.weight_dtype for algo, fmt in EXPORT_FORMATS.items()}


def check_layer_map(layers, expect_quantized: List[str], index: Dict[str, Dict]) -> List[str]:
    """Problems of a MIXED_PRECISION export's per-layer map (`quantized_layers`: module -> {"quant_algo", ...}):
    it must list every layer the run quantized, and every layer it lists must carry its scales and the weight
    dtype of its format."""
    if not isinstance(layers, dict) or not layers:
        return ["hf_quant_config.json says MIXED_PRECISION but has no quantized_layers map"]
    problems = []
    unlisted = sorted(set(expect_quantized) - set(layers))
    if unlisted:
        problems.append(
            f"{len(unlisted)} quantized layers are missing from hf_quant_config.json's quantized_layers: {unlisted[:8]}"
        )
    unscaled, wrong_dtype = [], []
    for module, layer_cfg in sorted(layers.items()):
        weight = index.get(f"{module}.weight")
        if weight is None or f"{module}.weight_scale" not in index:
            unscaled.append(module)
            continue
        want = WEIGHT_DTYPES.get((layer_cfg or {}).get("quant_algo"))
        if weight["dtype"] in FLOAT_DTYPES or (want and weight["dtype"] != want):
            wrong_dtype.append(f"{module} ({(layer_cfg or {}).get('quant_algo')}: {weight['dtype']})")
    if unscaled:
        problems.append(
            f"{len(unscaled)} layers listed in quantized_layers have no quantized weight and scale: {unscaled[:8]}"
        )
    if wrong_dtype:
        problems.append(
            f"{len(wrong_dtype)} layers listed in quantized_layers hold weights of the wrong dtype: {wrong_dtype[:8]}"
        )
    return problems


def read_tensor_index(checkpoint: Path) -> Dict[str, Dict]:
    """name -> {"dtype", "shape"} for every tensor of every safetensors file (headers only)."""
    return {name: {"dtype": e[3], "shape": e[4]} for name, e in _tensor_extents(checkpoint).items()}


def _tensor_extents(folder: Path) -> Dict[str, tuple]:
    """name -> (file, first byte, end byte, dtype, shape) of every tensor in a folder's safetensors files."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        _, length, header = safetensors_header(file)
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                out[name] = (file, 8 + length + start, 8 + length + end, entry["dtype"], list(entry["shape"]))
    return out


def _same_bytes(a: tuple, b: tuple, chunk: int = 16 << 20) -> bool:
    if a[2] - a[1] != b[2] - b[1]:
        return False
    with open(a[0], "rb") as fa, open(b[0], "rb") as fb:
        fa.seek(a[1])
        fb.seek(b[1])
        left = a[2] - a[1]
        while left:
            n = min(chunk, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def compare_vision_tensors(export: Path, source: Path) -> dict:
    """Every tensor of a vision-language model's vision tower and projector (ptq/layerkinds.py is_vision) in the
    export against the BF16 source checkpoint, byte for byte: only the language model may change."""
    exported, original = _tensor_extents(export), _tensor_extents(source)
    names = sorted(name for name in exported if layerkinds.is_vision(name))
    missing = [name for name in names if name not in original]
    differing = [
        name
        for name in names
        if name in original
        and (exported[name][3:] != original[name][3:] or not _same_bytes(exported[name], original[name]))
    ]
    return {
        "tensors": len(names),
        "parameters": sum(math.prod(exported[name][4]) for name in names),
        "identical": bool(names) and not missing and not differing,
        "differing": differing[:8],
        "missing_in_source": missing[:8],
    }


def vision_problems(check: dict) -> List[str]:
    if not check["tensors"]:
        return ["the export holds no vision-tower tensors, though the model is a vision-language model"]
    problems = []
    if check["differing"]:
        problems.append(
            f"vision-tower tensors differ from the BF16 source (they must be written unchanged): {check['differing']}"
        )
    if check["missing_in_source"]:
        problems.append(f"vision-tower tensors the source checkpoint does not hold: {check['missing_in_source']}")
    return problems


def checkpoint_bytes(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))


# A module name or glob pattern; anything else in exclude_modules matches no module of any loader.
_MODULE_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]-]+")
# Layer kinds a serving engine's ModelOpt loader builds as (possibly quantized) linear layers: each one stored in
# BF16 must be named by exclude_modules, or the loader expects scales it will not find.
LOADER_LINEAR_KINDS = (
    "routed_expert",
    "shared_expert",
    "router",
    "mamba_in_proj",
    "mamba_out_proj",
    "attention",
    "mlp",
    "lm_head",
)


def _repaired(entry: str) -> str:
    head, _, tail = entry.partition("\x00")
    if not tail:
        return entry
    return head + "*" if entry.endswith("*") else head.rstrip(".")


def repair_exclude_modules(checkpoint: Path) -> List[str]:
    """Fix a ModelOpt 0.47 export defect in place and return the entries it fixed (empty: nothing to fix).

    For models whose weights transformers renames on save (NemotronH: `model.` -> `backbone.`), ModelOpt maps
    the exclude_modules names with the same rename rules after appending a marker segment (`\x00modelopt_name_
    sentinel`) that it strips afterwards; the `model` -> `backbone` rule also rewrites the marker, so it is never
    stripped and every entry ends in `\x00backbone.pt_name_sentinel`. No loader then matches any exclude entry and
    every layer left in BF16 would be loaded as quantized. The entries are cut at the marker (keeping a trailing
    `*`) in hf_quant_config.json and in config.json's quantization_config."""
    fixed: List[str] = []
    for name, section in ((QUANT_CONFIG_NAME, "quantization"), ("config.json", "quantization_config")):
        path = checkpoint / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        quantization = data.get(section)
        if not isinstance(quantization, dict) or not quantization.get("exclude_modules"):
            continue
        entries = quantization["exclude_modules"]
        repaired = [_repaired(e) for e in entries]
        if repaired != entries:
            fixed = [e for e in entries if "\x00" in e] or fixed
            quantization["exclude_modules"] = repaired
            write_text_atomic(path, json.dumps(data, indent=4) + "\n")
    return fixed


def exclude_problems(exclude: List[str], index: Dict[str, Dict]) -> List[str]:
    """exclude_modules must be module names or patterns, and must name every linear layer stored in BF16."""
    problems = []
    bad = [e for e in exclude if not _MODULE_PATTERN.fullmatch(e)]
    if bad:
        problems.append(
            f"{len(bad)} of {len(exclude)} exclude_modules entries in hf_quant_config.json are not module "
            f"names or patterns (a loader matches none of them): {[e.encode('unicode_escape').decode() for e in bad[:4]]}"
        )
    unnamed = [
        module
        for module, layer in layerkinds.layers(index).items()
        if layer["kind"] in LOADER_LINEAR_KINDS
        and layer["format"] in FLOAT_DTYPES
        and not any(fnmatch.fnmatchcase(module, e) for e in exclude)
    ]
    if unnamed:
        problems.append(
            f"{len(unnamed)} layers are stored in BF16 but hf_quant_config.json's exclude_modules does not "
            f"name them, so a serving engine would load them as quantized: {unnamed[:6]}"
        )
    return problems


def export_names(modules: List[str], index: Dict[str, Dict]) -> List[str]:
    """The names the export gave in-memory modules. transformers renames wrapper modules when it saves some models
    (ptq/layerkinds.py WRAPPERS): a name the index lacks is matched to the one layer of the index with the same name
    past its leading wrappers, and kept as it is when none or several match."""
    found = layerkinds.match_names(modules, [n[: -len(".weight")] for n in index if n.endswith(".weight")])
    return [found.get(module, module) for module in modules]


def validate_checkpoint(
    checkpoint: Path,
    *,
    expect_quantized: List[str],
    expect_quant_algo: Optional[str],
    expect_kv_cache: str,
    unexpected_bf16: List[str],
    layer_kind_promises: Optional[Dict[str, str]] = None,
    vision_source: Optional[Path] = None,
) -> dict:
    """Problems make `passed` false. `expect_quantized`: module names whose weights must be quantized;
    `unexpected_bf16`: modules the backend found unquantized though no exclude pattern names them;
    `layer_kind_promises`: kind -> quantized/bf16 (ptq/layerkinds.py) the recipe promises; `vision_source`: the
    BF16 checkpoint folder of a vision-language model, whose vision tower the export must hold unchanged."""
    problems: List[str] = []
    vision = None
    if vision_source is not None:
        vision = compare_vision_tensors(checkpoint, vision_source)
        problems.extend(vision_problems(vision))
    index = read_tensor_index(checkpoint)
    if not index:
        problems.append(f"no safetensors weights in {checkpoint}")
    expect_quantized = export_names(expect_quantized, index)
    unexpected_bf16 = export_names(unexpected_bf16, index)
    kinds = layerkinds.summarize(index)
    config_path = checkpoint / "config.json"
    model_config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if expect_quantized or layer_kind_promises:
        problems.extend(
            layerkinds.promise_problems(kinds, layer_kind_promises or {}, layerkinds.expected_experts(model_config))
        )
    missing_scales, still_float = [], []
    for module in expect_quantized:
        weight = index.get(f"{module}.weight")
        if weight is None:
            missing_scales.append(module)
            continue
        if f"{module}.weight_scale" not in index:
            missing_scales.append(module)
        elif weight["dtype"] in FLOAT_DTYPES:
            still_float.append(module)
    if missing_scales:
        problems.append(
            f"{len(missing_scales)} layers meant to be quantized have no weight scale: {missing_scales[:8]}"
        )
    if still_float:
        problems.append(f"{len(still_float)} layers meant to be quantized still hold float weights: {still_float[:8]}")
    if unexpected_bf16:
        problems.append(
            f"{len(unexpected_bf16)} layers were left in BF16 though no exclude pattern names them: {unexpected_bf16[:8]}"
        )

    quant_algo = kv_algo = None
    layer_algos = None
    quant_file = checkpoint / QUANT_CONFIG_NAME
    if expect_quantized:
        if not quant_file.exists():
            problems.append("hf_quant_config.json is missing")
        else:
            quantization = json.loads(quant_file.read_text()).get("quantization", {})
            quant_algo, kv_algo = quantization.get("quant_algo"), quantization.get("kv_cache_quant_algo")
            if quant_algo == MIXED_PRECISION and expect_quant_algo in (MIXED_PRECISION, None):
                layers = quantization.get("quantized_layers")
                problems.extend(check_layer_map(layers, expect_quantized, index))
                if isinstance(layers, dict):
                    layer_algos = {}
                    for layer_cfg in layers.values():
                        algo = (layer_cfg or {}).get("quant_algo")
                        layer_algos[algo] = layer_algos.get(algo, 0) + 1
            elif expect_quant_algo == MIXED_PRECISION:
                # A search that picked one format for every quantized layer: ModelOpt then writes that
                # format's quant_algo (and exclude_modules) like a single-format recipe.
                if not quant_algo:
                    problems.append(
                        "hf_quant_config.json names no quant_algo, the recipe expects a mixed-precision export"
                    )
            # ModelOpt's names mix case (FP8, NVFP4, fp8_pb_wo): compare without it.
            elif expect_quant_algo and str(quant_algo).upper() != expect_quant_algo.upper():
                problems.append(
                    f"hf_quant_config.json says quant_algo={quant_algo}, the recipe expects {expect_quant_algo}"
                )
            if quant_algo != MIXED_PRECISION:  # a mixed-precision loader reads quantized_layers instead
                problems.extend(exclude_problems(list(quantization.get("exclude_modules") or []), index))
            want_kv = (
                None if expect_kv_cache == "none" else KV_CACHE_EXPORTS.get(expect_kv_cache, expect_kv_cache.upper())
            )
            if (kv_algo or None) != want_kv:
                problems.append(
                    f"hf_quant_config.json says kv_cache_quant_algo={kv_algo}, the recipe expects {want_kv}"
                )
        if model_config.get("quantization_config", {}).get("quant_method") != "modelopt":
            problems.append("config.json has no quantization_config with quant_method=modelopt")
    return {
        "passed": not problems,
        "problems": problems,
        "quantized_layers": len(expect_quantized) - len(missing_scales) - len(still_float),
        "expected_quantized_layers": len(expect_quantized),
        "unexpected_bf16": unexpected_bf16,
        "quant_algo": quant_algo,
        "kv_cache_quant_algo": kv_algo,
        # MIXED_PRECISION exports: how many layers carry each per-layer quant_algo.
        "layer_quant_algos": layer_algos,
        "tensors": len(index),
        # Layer kind -> stored format -> layers and parameters (ptq/layerkinds.py), and routed experts per MoE layer.
        "layer_kinds": kinds,
        # A vision-language model's vision tower against its BF16 source, byte for byte (None: not one).
        "vision_tower": vision,
    }


# Below this, KL differences are sampling noise of a short fidelity text, whatever the ratio.
EXPORT_KL_SLACK = 0.005


def export_fidelity_problems(fidelity: Optional[dict], tolerance: float) -> List[str]:
    """The checkpoint as written must hold what was calibrated: its stored weights match the source's (the
    weights check), or, read back from disk, it scores like the model that was measured in memory."""
    written = (fidelity or {}).get("exported_checkpoint")
    if not written:
        return []
    if written.get("check") == STORED_WEIGHTS_CHECK:
        return [f"stored-weight check: {p}" for p in written.get("problems", [])]
    if written.get("check") == NO_CHECK:
        return []
    in_memory, on_disk = fidelity["mean_kl"], written["mean_kl"]
    limit = tolerance * in_memory + EXPORT_KL_SLACK
    if on_disk <= limit:
        return []
    return [
        f"the exported checkpoint, read back from disk, has mean KL {on_disk:.4f} vs BF16 where the model "
        f"in memory had {in_memory:.4f} (limit {limit:.4f}): the written codes or scales do not reproduce the "
        "calibrated model"
    ]
