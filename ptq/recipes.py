"""The `recipe` group: build the ModelOpt quantization config a recipe names, and tell which layers it
quantized."""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ptq import recipe_files
from ptq.errors import ConfigError
from ptq.formats import (
    KV_CACHE_CONFIGS,
    algorithm_tag,
    fused_expert_problem,
    fused_expert_refusal,
    may_have_fused_experts,
)
from ptq.schema import RecipeConfig


def module_pattern_to_quantizer_pattern(pattern: str) -> str:
    """Exclude patterns name modules; ModelOpt matches quantizer names (`<module>.weight_quantizer`)."""
    return pattern if pattern.endswith("*") else pattern + ".*"


def set_block_size(entry_cfg, block: int) -> None:
    for cfg in entry_cfg if isinstance(entry_cfg, list) else [entry_cfg]:
        sizes = cfg.get("block_sizes")
        if sizes:
            key = -1 if -1 in sizes else "-1"
            sizes[key] = block


def load_recipe_file(ref: str) -> Dict:
    """The quantize section ({quant_cfg, algorithm}) of a ModelOpt PTQ recipe file, through ModelOpt's own loader
    (which resolves `$import` units and validates every field); a ConfigError names what is wrong with it."""
    from modelopt.recipe import load_recipe

    path = recipe_files.check(ref)
    try:
        loaded = load_recipe(path)
    except Exception as exc:  # pydantic's ValidationError, ValueError: an unknown field, a bad value, a missing unit
        first = str(exc).strip().splitlines()
        raise ConfigError(
            f"recipe.modelopt_recipe={ref}: ModelOpt's recipe loader refuses {path}: "
            f"{' '.join(first[:6])}. Fix the file."
        ) from None
    quantize = loaded.quantize.model_dump()
    return {"quant_cfg": quantize["quant_cfg"], "algorithm": quantize.get("algorithm")}


def _kv_entries(entries: List[Dict]) -> List[str]:
    """The enabled entries of a config that quantize the KV cache (ModelOpt's `*[kv]_bmm_quantizer` quantizers)."""
    return [
        e["quantizer_name"]
        for e in entries
        if "bmm_quantizer" in str(e.get("quantizer_name", "")) and e.get("enable", True) is not False
    ]


def build_quant_config(recipe: RecipeConfig, exclude_patterns: List[str], awq_block_size: Optional[int]) -> Dict:
    """The ModelOpt config dict for `recipe`, with the run's options applied in ModelOpt's list form: a ModelOpt
    config constant (recipe.modelopt_cfg) or a ModelOpt recipe file (recipe.modelopt_recipe)."""
    import modelopt.torch.quantization as mtq

    if recipe.modelopt_recipe:
        base = load_recipe_file(recipe.modelopt_recipe)
        if recipe.kv_cache != "none" and _kv_entries(base["quant_cfg"]):
            raise ConfigError(
                f"recipe.kv_cache={recipe.kv_cache} with recipe.modelopt_recipe={recipe.modelopt_recipe}, "
                f"which quantizes the KV cache itself ({', '.join(_kv_entries(base['quant_cfg']))}): "
                "leave recipe.kv_cache=none, or pick the recipe file of the KV-cache format you want."
            )
    else:
        base = getattr(mtq, recipe.modelopt_cfg or "", None)
    if not isinstance(base, dict):
        raise ConfigError(
            f"recipe.modelopt_cfg={recipe.modelopt_cfg!r} is not a config of the installed ModelOpt "
            f"({getattr(mtq, '__version__', '?')}); use a name such as FP8_DEFAULT_CFG or INT4_AWQ_CFG."
        )
    cfg = copy.deepcopy(base)
    entries = cfg["quant_cfg"]
    if not isinstance(entries, list):
        raise ConfigError(f"{recipe.modelopt_cfg} uses the pre-0.44 dict form; install nvidia-modelopt>=0.44.")
    if awq_block_size:
        for entry in entries:
            if entry.get("quantizer_name") == "*weight_quantizer" and "cfg" in entry:
                set_block_size(entry["cfg"], awq_block_size)
    if recipe.weight_only:
        entries.append({"quantizer_name": "*input_quantizer", "enable": False})
    if recipe.kv_cache != "none":
        kv = getattr(mtq, KV_CACHE_CONFIGS[recipe.kv_cache])
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, copy.deepcopy(kv["quant_cfg"]))
        entries = cfg["quant_cfg"]
    # A recipe file written by an earlier run holds these already: not added twice.
    present = {e.get("quantizer_name") for e in entries if e.get("enable") is False and not e.get("cfg")}
    for pattern in exclude_patterns:
        if module_pattern_to_quantizer_pattern(pattern) not in present:
            entries.append({"quantizer_name": module_pattern_to_quantizer_pattern(pattern), "enable": False})
    if recipe.algorithm is not None or recipe.algorithm_args:
        cfg["algorithm"] = algorithm_config(recipe, cfg.get("algorithm"))
        _check_block_scale_search(recipe, cfg)
    _check_rotation(recipe, cfg)
    return cfg


def check_fused_experts(recipe: RecipeConfig, model, quant_cfg: Dict) -> None:
    """What ModelOpt cannot apply to fused routed experts, refused on a MoE model before it is loaded, from the built
    configuration: a recipe file's algorithm and formats, or those of a config constant set by hand
    (recipe.modelopt_cfg), known only now. The launcher's own recipes are refused in planning already
    (ptq/plan.py check_fused_experts); for them this repeats that answer."""
    if not may_have_fused_experts(model.arch, model.num_experts):
        return
    method = algorithm_entry(quant_cfg.get("algorithm")).get("method")
    problem = fused_expert_problem(method, recipe.export_quant_algo, formats_of(quant_cfg))
    if problem:
        what = f"recipe={recipe.name} ({recipe.modelopt_cfg or recipe.modelopt_recipe})"
        raise ConfigError(fused_expert_refusal(what, problem, model.name, model.arch))


def _check_rotation(recipe: RecipeConfig, cfg: Dict) -> None:
    """A quantizer with `rotate` applies a Hadamard transform through the separate fast_hadamard_transform
    package (a CUDA extension built from source); without it ModelOpt fails at the first calibration forward."""
    rotated = [
        e["quantizer_name"]
        for e in cfg["quant_cfg"]
        if isinstance(e.get("cfg"), dict) and e["cfg"].get("rotate") and e.get("enable", True)
    ]
    if rotated and importlib.util.find_spec("fast_hadamard_transform") is None:
        choice = f"recipe.kv_cache={recipe.kv_cache}" if recipe.kv_cache != "none" else f"recipe={recipe.name}"
        raise ConfigError(
            f"{choice} rotates {', '.join(rotated)} with a Hadamard transform, which needs the fast_hadamard_transform "
            "package (not installed here; it builds from source against torch and CUDA: pip install "
            "git+https://github.com/Dao-AILab/fast-hadamard-transform.git). Install it, or choose a KV cache "
            "without rotation (recipe.kv_cache=nvfp4 or nvfp4_affine)."
        )


def _check_block_scale_search(recipe: RecipeConfig, cfg: Dict) -> None:
    """The NVFP4 block-scale searches (local_hessian, mse with fp8_scale_sweep) choose stored per-block weight
    scales; with dynamic block scales (NVFP4_DEFAULT_CFG, W4A16_NVFP4_CFG) the scales are recomputed from the
    weights at every use and the search changes nothing (on SmolLM2 the mean KL came out identical to max)."""
    algorithm = cfg["algorithm"]
    if not (
        algorithm["method"] == "local_hessian" or (algorithm["method"] == "mse" and algorithm.get("fp8_scale_sweep"))
    ):
        return
    dynamic = [
        e
        for e in cfg["quant_cfg"]
        if e.get("quantizer_name") == "*weight_quantizer"
        and isinstance(e.get("cfg"), dict)
        and (e["cfg"].get("block_sizes") or {}).get("type") == "dynamic"
    ]
    if dynamic:
        raise ConfigError(
            f"recipe={recipe.name} with {algorithm_tag(recipe.algorithm, dict(recipe.algorithm_args))}: "
            f"{recipe.modelopt_cfg or recipe.modelopt_recipe} computes its NVFP4 weight block scales at run time, so a search of stored block "
            "scales has nothing to set. Use recipe=nvfp4_mse or recipe=nvfp4_local_hessian (static weight block "
            "scales, ModelOpt's own configs for these searches)."
        )


def _algorithm_classes() -> Dict[str, type]:
    """ModelOpt's calibration algorithm configs (pydantic models), by their `method` name."""
    from modelopt.torch.quantization.config import QuantizeAlgorithmConfig

    found, todo = {}, list(QuantizeAlgorithmConfig.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        method = getattr(cls, "model_fields", {}).get("method")
        if method is not None and isinstance(method.default, str):
            found[method.default] = cls
    return found


def algorithm_entry(entry) -> Dict:
    """A ModelOpt config's `algorithm` entry as a dict: ModelOpt writes it as a method name ("max"), a dict with a
    `method` and its settings, or None (no calibration)."""
    return {"method": entry} if isinstance(entry, str) else dict(entry or {})


def algorithm_config(recipe: RecipeConfig, own) -> Dict:
    """The `algorithm` entry of the recipe's ModelOpt config with recipe.algorithm / recipe.algorithm_args applied
    (`own`: the config's own entry, a method name, a dict or None), checked by ModelOpt's config class for the
    method. Raises ConfigError naming the bad setting and the method's settings."""
    own = algorithm_entry(own)
    args = dict(recipe.algorithm_args)
    method = recipe.algorithm or own.get("method")
    if method is None:
        raise ConfigError(
            f"recipe.algorithm_args={args}: {recipe.modelopt_cfg or recipe.modelopt_recipe} calibrates nothing (its scales are "
            "computed at run time); set recipe.algorithm too, or remove the arguments."
        )
    merged = {**own, **args} if method == own.get("method") else {"method": method, **args}
    classes = _algorithm_classes()
    if method not in classes:
        raise ConfigError(
            f"recipe.algorithm={method} is not an algorithm of the installed ModelOpt; it has "
            f"{', '.join(sorted(classes))}."
        )
    cls = classes[method]
    try:
        cls(**merged)
    except Exception as exc:  # pydantic's ValidationError: unknown setting, wrong type, out of range
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}"
            for e in getattr(exc, "errors", lambda: [])()
        ) or str(exc)
        settings = ", ".join(k for k in cls.model_fields if k not in ("method", "layerwise", "moe_calib_experts_ratio"))
        raise ConfigError(
            f"recipe.algorithm_args={args} for {method}: {problems}. {cls.__name__} takes: {settings}."
        ) from None
    return merged


# The formats a recipe file may compute in: those the hardware options calibrate and the validation checks.
CHECKED_FORMATS = ("fp8", "int8", "int4", "nvfp4", "mxfp8")


def formats_of(quant_cfg: Dict) -> List[str]:
    """The number formats the enabled quantizers of a ModelOpt config compute in (recipe_files.format_name), to
    check against what the hardware can calibrate."""
    found = []
    for entry in quant_cfg["quant_cfg"]:
        cfgs = entry.get("cfg")
        if entry.get("enable") is False or cfgs is None:
            continue
        for cfg in cfgs if isinstance(cfgs, list) else [cfgs]:
            if not isinstance(cfg, dict) or cfg.get("enable") is False:
                continue
            name = recipe_files.format_name(cfg)
            if name not in found:
                found.append(name)
    return found


def disabled_patterns(quant_cfg: Dict) -> List[str]:
    """Quantizer patterns the config switches off explicitly (not the leading catch-all '*')."""
    return [
        e["quantizer_name"]
        for e in quant_cfg["quant_cfg"]
        if e.get("enable") is False and e.get("quantizer_name") not in ("*", None)
    ]


def is_excluded(module_name: str, patterns: List[str]) -> bool:
    name = f"{module_name}.weight_quantizer"
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _enabled(quantizer) -> bool:
    if isinstance(quantizer, torch.nn.Sequential):  # SequentialQuantizer (e.g. W4A8: int4 then fp8)
        return any(_enabled(q) for q in quantizer)
    return bool(getattr(quantizer, "is_enabled", False))


def fused_expert_layers(name: str, module) -> List[Tuple[str, object]]:
    """The per-expert linear layers of one of ModelOpt's fused-experts wrappers (transformers 5 stores a MoE
    layer's routed experts as 3-D tensors; ModelOpt gives each expert its own weight quantizers), named as the
    export writes them: `<name>.<i>.gate_proj`/`up_proj`/`down_proj` (gated, e.g. Qwen3-MoE) or
    `<name>.<i>.up_proj`/`down_proj` (non-gated, NemotronH), each with its weight quantizer. Empty for any other
    module."""
    first = getattr(module, "_first_proj_attr", None)
    down = getattr(module, "down_proj_weight_quantizers", None)
    firsts = getattr(module, f"{first}_weight_quantizers", None) if first else None
    if firsts is None or down is None:
        return []
    first_names = ["gate_proj", "up_proj"] if getattr(module, "_is_gated", True) else [first]
    layers = []
    for index, (first_q, down_q) in enumerate(zip(firsts, down)):
        layers += [(f"{name}.{index}.{proj}", first_q) for proj in first_names]
        layers.append((f"{name}.{index}.down_proj", down_q))
    return layers


def _entry_enables(entry: Dict) -> bool:
    """Whether a quant_cfg entry switches the quantizers it names on (an entry with settings and no `enable` does)."""
    if "enable" in entry:
        return bool(entry["enable"])
    cfg = entry.get("cfg")
    if isinstance(cfg, dict) and "enable" in cfg:
        return bool(cfg["enable"])
    return cfg is not None


def meant_off(module_name: str, entries: Sequence[Dict]) -> bool:
    """Whether the last quant_cfg entry that names this layer's weight quantizer switches it off: the layer is
    left in BF16 by the configuration itself (a recipe that disables everything, then enables the MLP, means its
    attention to stay BF16). Entries limited to a module class (parent_class) are not matched by name."""
    name, verdict = f"{module_name}.weight_quantizer", None
    for entry in entries if isinstance(entries, (list, tuple)) else ():
        if not isinstance(entry, dict):
            continue
        pattern = entry.get("quantizer_name")
        if entry.get("parent_class") or not isinstance(pattern, str):
            continue
        if fnmatch.fnmatch(name, pattern):
            verdict = _entry_enables(entry)
    return verdict is False


def classify_layers(model, patterns, entries: Sequence[Dict] = ()) -> Tuple[List[str], List[str], List[str]]:
    """Split the model's linear layers into quantized, excluded on purpose, and left in BF16 unexpectedly.
    Excluded on purpose: named by an exclude pattern, or switched off by the config's own `entries` (meant_off).
    Fused routed experts count one layer per expert and projection (fused_expert_layers)."""
    quantized, excluded, unexpected = [], [], []
    for name, module in model.named_modules():
        experts = fused_expert_layers(name, module)
        for layer, quantizer in experts:
            if _enabled(quantizer):
                quantized.append(layer)
            elif is_excluded(layer, patterns) or is_excluded(name, patterns) or meant_off(layer, entries):
                excluded.append(layer)
            else:
                unexpected.append(layer)
        if experts:
            continue
        quantizer = getattr(module, "weight_quantizer", None)
        if isinstance(module, torch.nn.Embedding) or (quantizer is None and not isinstance(module, torch.nn.Linear)):
            continue  # embeddings stay in BF16 in every recipe; only linear-like layers are judged
        if quantizer is not None and _enabled(quantizer):
            quantized.append(name)
        elif is_excluded(name, patterns) or meant_off(name, entries):
            excluded.append(name)
        else:
            unexpected.append(name)
    return quantized, excluded, unexpected


def check_awq_widths(model, block: int, patterns) -> None:
    """The plan checked the widths it knew; this checks the real layers before calibration starts."""
    bad = [
        (n, m.in_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not is_excluded(n, patterns) and m.in_features % block
    ]
    if bad:
        name, width = bad[0]
        raise ConfigError(
            f"AWQ block size {block} does not divide the input width {width} of {name} ({len(bad)} layers affected); "
            "set recipe.awq_block_size to a divisor of every width (0 picks one automatically)."
        )
