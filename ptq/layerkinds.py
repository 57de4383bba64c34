"""What kind of layer each weight of a checkpoint belongs to, and in which format it is stored.

Mixture-of-Experts and hybrid Mamba models (Nemotron 3, Qwen3-MoE) mix layer kinds that recipes treat
differently: routed experts, shared experts, the router, Mamba's in/out projections and conv1d, attention.
`summarize` turns a checkpoint's tensor index (name -> dtype, shape) into kind -> format -> layers and
parameters, so a run record and the report can say what "conservative" or "aggressive" means on a model, and
`promise_problems` checks that summary against what a recipe promises per kind.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional

KINDS = (
    "vision",
    "routed_expert",
    "shared_expert",
    "router",
    "mamba_in_proj",
    "mamba_out_proj",
    "mamba_conv1d",
    "attention",
    "mlp",
    "embedding",
    "lm_head",
    "other",
)
QUANTIZED, BF16 = "quantized", "bf16"
# The CUDA packages transformers' Mamba layers (NemotronH and other Mamba-2 hybrids) use when the model config's
# use_mamba_kernels is on and they import; otherwise the layers run transformers' pure-PyTorch path.
MAMBA_KERNEL_PACKAGES = ("mamba-ssm", "causal-conv1d")
# Kinds no recipe quantizes: the router decides which experts run, conv1d is a depthwise convolution ModelOpt's
# linear-layer recipes leave alone, embeddings are looked up, not multiplied, and a vision-language model's vision
# tower and projector stay as trained (only its language model is quantized, ptq/vlm.py).
ALWAYS_BF16 = ("vision", "router", "mamba_conv1d", "embedding")

# A vision encoder or the projector into the language model, by a component of the module's path (Qwen-VL: visual;
# LLaVA, Gemma 3: vision_tower and multi_modal_projector; others: vision_model, mm_projector).
_VISION = re.compile(
    r"(^|\.)(visual|vision_tower|vision_model|vision_encoder|multi_modal_projector|mm_projector)(\.|$)"
)
_EXPERT = re.compile(r"^(?P<layer>.*\.experts)\.(?P<index>\d+)\.")
_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value"}
_MLP = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "c_proj"}
# safetensors dtypes of weights left unquantized (stored_format names them as they are).
FLOAT_DTYPES = {"BF16", "F16", "F32"}


# Wrapper modules transformers adds or drops, or orders differently, between a model in memory and its checkpoint:
# NemotronH's `model.` is `backbone.` on disk; a vision-language model's `model.language_model.layers.N` is
# `model.layers.N` (Qwen2.5-VL) or `language_model.model.layers.N` (Gemma 3) on disk, `model.visual` is `visual`.
WRAPPERS = ("model", "language_model", "backbone")


def unwrapped(name: str) -> str:
    """A module name past its leading wrapper modules (WRAPPERS): the same for a layer in memory and on disk."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in WRAPPERS:
        parts.pop(0)
    return ".".join(parts)


def match_names(names: Iterable[str], candidates: Iterable[str]) -> Dict[str, str]:
    """name -> the one candidate with the same unwrapped name (a name with none or several is left out); a name
    among the candidates maps to itself."""
    pool = set(candidates)
    by_tail: Dict[str, List[str]] = {}
    for candidate in pool:
        by_tail.setdefault(unwrapped(candidate), []).append(candidate)
    out = {}
    for name in names:
        found = [name] if name in pool else by_tail.get(unwrapped(name), [])
        if len(found) == 1:
            out[name] = found[0]
    return out


def is_vision(name: str) -> bool:
    """Whether a module or tensor name belongs to a vision encoder or its projector."""
    return bool(_VISION.search(name))


def kind_of(module: str) -> str:
    """The kind of the layer named `module` (a checkpoint's tensor name without `.weight`)."""
    last = module.rsplit(".", 1)[-1]
    if _VISION.search(module):
        return "vision"
    if _EXPERT.match(module + "."):
        return "routed_expert"
    if "shared_expert" in module:
        return "shared_expert"
    if last in ("gate", "router") or module.endswith(".router.linear"):
        return "router"
    if last == "conv1d":
        return "mamba_conv1d"
    if last == "in_proj":
        return "mamba_in_proj"
    if last == "out_proj":
        return "mamba_out_proj"
    if last in _ATTENTION:
        return "attention"
    if last in _MLP:
        return "mlp"
    if last == "lm_head":
        return "lm_head"
    if "embed" in last or last == "wte":
        return "embedding"
    return "other"


def stored_format(module: str, index: Mapping[str, Mapping]) -> str:
    """The number format `module`'s weight is stored in, read from its dtype and the scales beside it."""
    dtype = index[f"{module}.weight"]["dtype"]
    if dtype in FLOAT_DTYPES:
        return dtype
    if dtype.startswith("F8"):
        return "FP8"
    if dtype == "U8":
        return "NVFP4" if f"{module}.weight_scale_2" in index else "INT4"
    if dtype == "I8":
        return "INT8"
    return dtype


def _parameters(entry: Mapping, fmt: str) -> int:
    count = 1
    for dim in entry["shape"]:
        count *= int(dim)
    return count * 2 if fmt in ("NVFP4", "INT4") else count  # two 4-bit codes per stored byte


def layers(index: Mapping[str, Mapping]) -> Dict[str, dict]:
    """module -> {"kind", "format", "params"} for every weight of two or more dimensions."""
    out = {}
    for name, entry in index.items():
        if not name.endswith(".weight") or len(entry["shape"]) < 2:
            continue  # norms, biases, scales, Mamba's A_log/D/dt_bias
        module = name[: -len(".weight")]
        fmt = stored_format(module, index)
        out[module] = {"kind": kind_of(module), "format": fmt, "params": _parameters(entry, fmt)}
    return out


def summarize(index: Mapping[str, Mapping]) -> dict:
    """{"kinds": {kind: {format: {"layers", "params"}}}, "params": total, "experts": {moe layer: count}}."""
    kinds: Dict[str, Dict[str, Dict[str, int]]] = {}
    experts: Dict[str, set] = {}
    total = 0
    for module, layer in sorted(layers(index).items()):
        cell = kinds.setdefault(layer["kind"], {}).setdefault(layer["format"], {"layers": 0, "params": 0})
        cell["layers"] += 1
        cell["params"] += layer["params"]
        total += layer["params"]
        match = _EXPERT.match(module + ".")
        if match:
            experts.setdefault(match["layer"], set()).add(int(match["index"]))
    ordered = {kind: kinds[kind] for kind in KINDS if kind in kinds}
    return {
        "kinds": ordered,
        "params": total,
        "experts": {layer: len(found) for layer, found in sorted(experts.items())},
    }


def promise_problems(summary: dict, promises: Mapping[str, str], expected_experts: Optional[int]) -> List[str]:
    """Where the checkpoint breaks what the recipe promises per kind (`promises`: kind -> quantized/bf16, plus
    ALWAYS_BF16 for every recipe), or an MoE layer holds fewer routed experts than the model has."""
    problems = []
    wanted = {kind: BF16 for kind in ALWAYS_BF16}
    wanted.update(promises)
    for kind, want in wanted.items():
        formats = summary["kinds"].get(kind, {})
        if want == BF16:
            wrong = {fmt: cell["layers"] for fmt, cell in formats.items() if fmt not in FLOAT_DTYPES}
        else:
            wrong = {fmt: cell["layers"] for fmt, cell in formats.items() if fmt in FLOAT_DTYPES}
        if wrong:
            counts = ", ".join(f"{n} in {fmt}" for fmt, n in sorted(wrong.items()))
            problems.append(f"{kind} layers should be {'left in BF16' if want == BF16 else 'quantized'} but {counts}")
    if expected_experts:
        short = {layer: n for layer, n in summary["experts"].items() if n != expected_experts}
        if short:
            sample = ", ".join(f"{layer}: {n}" for layer, n in list(short.items())[:4])
            problems.append(f"{len(short)} MoE layers do not hold all {expected_experts} routed experts ({sample})")
    return problems


def expected_experts(config: Mapping) -> Optional[int]:
    """The routed-expert count a model's config.json declares (None for dense models)."""
    for key in ("n_routed_experts", "num_experts", "num_local_experts"):
        if isinstance(config.get(key), int) and config[key] > 1:
            return config[key]
    return None
