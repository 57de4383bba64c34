"""What the launcher knows about number formats, in one place. Imports nothing of the project.

Three tables:
- EXPORT_FORMATS, keyed by the `quant_algo` a ModelOpt unified checkpoint names in hf_quant_config.json:
  the weight dtype a quantized layer holds, how its input is quantized, whether the read-back
  (ptq/exported/) can compute with it, and whether ModelOpt's Megatron-Core export writes it.
  tests/test_formats.py checks every key against the installed ModelOpt's own format names.
- CANDIDATES, keyed by ModelOpt config name: what AutoQuantize (ptq/auto_quantize.py) may choose per
  layer, with the bits it charges; the same test checks the bits against ModelOpt's.
- ALGORITHMS, keyed by ModelOpt's calibration `method` names (`recipe.algorithm`): which exported formats
  each applies to and what it makes of them; the test checks every name against the installed ModelOpt's
  algorithm configs, and ptq/recipes.py checks `recipe.algorithm_args` with ModelOpt's own config classes.
Both are plain data so that planning never imports ModelOpt or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class ExportFormat:
    # safetensors dtype of a quantized layer's `weight`.
    weight_dtype: str
    # How the layer's input is quantized: None (weight-only), "fp8", "int8" (static scales) or "nvfp4"
    # (dynamic per-block scales under a static global one); "fp8_dynamic" is per-token at run time.
    activation: Optional[str]
    # The read-back of ptq/exported/ can compute with it.
    readback: bool = True
    # ModelOpt 0.47's Megatron-Core export (Megatron-Bridge's export.py) writes it. Measured on H200s: it
    # raises on SmoothQuant scales and writes AWQ models without hf_quant_config.json.
    megatron_export: bool = False
    # The stored-weight check (ptq/exported/): the largest relative error |stored - source| / |source| of a
    # layer's dequantized weight, above the rounding of the grid (FP8 E4M3 about 0.03, NVFP4 about 0.1, INT8
    # about 0.01 on Gaussian weights); None where the check cannot judge the format.
    weight_error_bound: Optional[float] = None
    # The layers were smoothed (AWQ, SmoothQuant): their weights are divided by per-channel factors folded into
    # other tensors, so a layer alone no longer matches its source weight.
    smoothed: bool = False
    # Serving engines whose loaders read this quant_algo from a ModelOpt unified checkpoint (SERVING_SOURCE).
    serving: Tuple[str, ...] = ()
    # Bits a quantized weight takes in the export, its share of the scales included: NVFP4 4 + one FP8 scale per
    # 16, MXFP8 8 + one E8M0 scale per 32, INT4 AWQ 4 + one 32-bit scale per block (weight_bits takes the block
    # size); 8 for the FP8 and INT8 formats. Measured on SmolLM2's exports (bench/results/algorithms-smollm2-h200/);
    # ptq/plan.py estimates a checkpoint's size from it.
    bits: float = 8.0


VLLM, SGLANG, TRTLLM = "vLLM", "SGLang", "TensorRT-LLM"
# Where `serving` comes from: the engines' ModelOpt loaders and quantization documentation, read 2026-11.
SERVING_SOURCE = (
    "vLLM's ModelOpt loader (FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, W4A16_NVFP4, MXFP8, "
    "MIXED_PRECISION), SGLang's modelopt_fp8 / modelopt_fp4 / modelopt_mixed, TensorRT-LLM's ModelOpt "
    "checkpoint formats; documentation and loader code as of 2026-11"
)

EXPORT_FORMATS: Dict[str, ExportFormat] = {
    "FP8": ExportFormat(
        "F8_E4M3", "fp8", megatron_export=True, weight_error_bound=0.08, serving=(VLLM, SGLANG, TRTLLM)
    ),
    "FP8_PER_CHANNEL_PER_TOKEN": ExportFormat(
        "F8_E4M3", "fp8_dynamic", readback=False, weight_error_bound=0.08, serving=(VLLM, TRTLLM)
    ),
    "FP8_PB_WO": ExportFormat("F8_E4M3", None, megatron_export=True, weight_error_bound=0.08, serving=(VLLM, TRTLLM)),
    "FP8_PB_REAL": ExportFormat("F8_E4M3", "fp8_dynamic", readback=False, megatron_export=True, serving=(TRTLLM,)),
    "W8A8_SQ_PER_CHANNEL": ExportFormat("I8", "int8", smoothed=True, serving=(TRTLLM,)),
    "W8A16": ExportFormat("I8", None, weight_error_bound=0.04, serving=(TRTLLM,)),
    "INT8_WO": ExportFormat("I8", None, weight_error_bound=0.04, serving=(TRTLLM,)),
    "W4A16_AWQ": ExportFormat("U8", None, smoothed=True, serving=(TRTLLM,), bits=4.25),
    "W4A8_AWQ": ExportFormat("U8", "fp8", smoothed=True, serving=(TRTLLM,), bits=4.25),
    "NVFP4": ExportFormat(
        "U8", "nvfp4", megatron_export=True, weight_error_bound=0.25, serving=(VLLM, SGLANG, TRTLLM), bits=4.5
    ),
    "NVFP4_AWQ": ExportFormat("U8", "nvfp4", smoothed=True, serving=(TRTLLM,), bits=4.5),
    "W4A16_NVFP4": ExportFormat("U8", None, megatron_export=True, weight_error_bound=0.25, serving=(VLLM,), bits=4.5),
    # SVDQuant: NVFP4 weights plus a BF16 low-rank branch per layer; ModelOpt's export writes it, no engine
    # above names it.
    "NVFP4_SVD": ExportFormat("U8", "nvfp4", readback=False, bits=4.5),
    # MXFP8: FP8 values with one power-of-two (E8M0) scale per 32, weights and activations.
    "MXFP8": ExportFormat("F8_E4M3", "mxfp8", readback=False, serving=(VLLM,), bits=8.25),
}
# Activation quantizations whose scale is calibrated and stored (`input_scale`); "fp8_dynamic" and "mxfp8" scale
# each token or block at run time and store none.
STATIC_INPUT_SCALES = ("fp8", "int8", "nvfp4")
# The check of a written checkpoint that could not run (its format can be neither read back nor judged layer by
# layer here); the record says why.
NO_CHECK = "none"
# A checkpoint whose layers have different formats lists them per layer.
MIXED_PRECISION = "MIXED_PRECISION"
# Engines that load a mixed-precision ModelOpt checkpoint (vLLM's MIXED_PRECISION, SGLang's modelopt_mixed,
# TensorRT-LLM's), and a quantized KV cache of each kind (SERVING_SOURCE).
MIXED_PRECISION_SERVING = (VLLM, SGLANG, TRTLLM)
KV_CACHE_SERVING = {"FP8": (VLLM, TRTLLM), "NVFP4": (TRTLLM,)}


def serving_engines(quant_algo: Optional[str], kv_cache_quant_algo: Optional[str] = None) -> List[str]:
    """Engines whose ModelOpt loaders take a checkpoint of these formats (and its KV cache), per SERVING_SOURCE."""
    algo = str(quant_algo or "").upper()
    engines = (
        MIXED_PRECISION_SERVING
        if algo == MIXED_PRECISION
        else (EXPORT_FORMATS[algo].serving if algo in EXPORT_FORMATS else ())
    )
    if kv_cache_quant_algo:
        engines = tuple(e for e in engines if e in KV_CACHE_SERVING.get(str(kv_cache_quant_algo).upper(), ()))
    return list(engines)


# The `check` a record names for ptq/exported/'s check_stored_weights (validate.py reads it back).
STORED_WEIGHTS_CHECK = "stored weights"


# INT4 AWQ exports store one 32-bit scale per block of weights (measured: 4.5 bits per weight at block 64, 5 at 32).
AWQ_SCALE_BITS = 32


def weight_bits(quant_algo: Optional[str], awq_block_size: Optional[int] = None) -> Optional[float]:
    """Stored bits per quantized weight of an export of `quant_algo`, scales included (None: unknown format)."""
    algo = str(quant_algo or "").upper()
    if algo not in EXPORT_FORMATS:
        return None
    if awq_block_size and algo in ("W4A16_AWQ", "W4A8_AWQ"):
        return 4 + AWQ_SCALE_BITS / awq_block_size
    return EXPORT_FORMATS[algo].bits


def export_algos(**where) -> Tuple[str, ...]:
    """quant_algo names whose ExportFormat fields equal `where`, e.g. export_algos(activation="fp8")."""
    return tuple(a for a, f in EXPORT_FORMATS.items() if all(getattr(f, k) == v for k, v in where.items()))


# Formats a recipe may compute in (recipe.formats, hardware.calibrate); NVFP4 and MX need CUDA.
CUDA_ONLY_FORMATS = ("nvfp4", "mxfp8")
# recipe.kv_cache -> the ModelOpt config that adds KV-cache quantizers (affine: with a per-channel bias;
# rotate: keys rotated by a Hadamard transform before they are quantized).
KV_CACHE_CONFIGS = {
    "fp8": "FP8_KV_CFG",
    "nvfp4": "NVFP4_KV_CFG",
    "nvfp4_affine": "NVFP4_AFFINE_KV_CFG",
    "nvfp4_rotate": "NVFP4_KV_ROTATE_CFG",
}
# The number format a KV-cache choice computes in (checked against hardware.calibrate).
KV_CACHE_FORMATS = {"fp8": "fp8", "nvfp4": "nvfp4", "nvfp4_affine": "nvfp4", "nvfp4_rotate": "nvfp4"}
# The kv_cache_quant_algo ModelOpt's export writes for each (its get_kv_cache_dtype tells FP8, NVFP4 and
# NVFP4_AFFINE apart; the rotation is applied before quantization and leaves no trace in the name).
KV_CACHE_EXPORTS = {"fp8": "FP8", "nvfp4": "NVFP4", "nvfp4_affine": "NVFP4_AFFINE", "nvfp4_rotate": "NVFP4"}


@dataclass(frozen=True)
class Candidate:
    # Label in the run record's per-layer assignment (ModelOpt's export names the same formats alike).
    label: str
    # Number formats it computes in, checked against hardware.calibrate.
    formats: Tuple[str, ...]
    # Bits per weight AutoQuantize charges against the budget for a layer in this format.
    bits: float
    # INT4 weights in blocks along the input dimension: the AWQ block size applies.
    int4_blocks: bool = False


CANDIDATES: Dict[str, Candidate] = {
    "FP8_DEFAULT_CFG": Candidate("fp8", ("fp8",), 8.0),
    "FP8_PER_CHANNEL_PER_TOKEN_CFG": Candidate("fp8_pc_pt", ("fp8",), 8.0),
    "INT8_DEFAULT_CFG": Candidate("int8", ("int8",), 8.0),
    "INT8_SMOOTHQUANT_CFG": Candidate("int8_sq", ("int8",), 8.0),
    "INT8_WEIGHT_ONLY_CFG": Candidate("int8_wo", ("int8",), 8.0),
    "INT4_AWQ_CFG": Candidate("int4_awq", ("int4",), 4.0, int4_blocks=True),
    "W4A8_AWQ_BETA_CFG": Candidate("w4a8_awq", ("int4", "fp8"), 4.0, int4_blocks=True),
    "NVFP4_DEFAULT_CFG": Candidate("nvfp4", ("nvfp4",), 4.5),
    "NVFP4_AWQ_LITE_CFG": Candidate("nvfp4_awq", ("nvfp4",), 4.5),
    "MXFP8_DEFAULT_CFG": Candidate("mxfp8", ("mxfp8",), 8.0),
}
# The label of a layer AutoQuantize leaves unquantized.
BF16 = "bf16"


def unknown_candidates(names: List[str]) -> List[str]:
    return [n for n in names if n not in CANDIDATES]


def candidate_formats(names: List[str]) -> List[str]:
    """The number formats a list of (known) candidates computes in, in order, without repeats."""
    return list(dict.fromkeys(f for n in names if n in CANDIDATES for f in CANDIDATES[n].formats))


def uses_int4_blocks(names: List[str]) -> bool:
    return any(CANDIDATES[n].int4_blocks for n in names if n in CANDIDATES)


@dataclass(frozen=True)
class Algorithm:
    # What it does, for `--help`-like messages and the report.
    does: str
    # quant_algo values (EXPORT_FORMATS keys) of the recipes it applies to; a recipe is named by the quant_algo
    # its export carries (recipe.export_quant_algo).
    applies_to: Tuple[str, ...]
    # (recipe's quant_algo, the export's quant_algo with this algorithm) where the algorithm changes it.
    exports_as: Tuple[Tuple[str, str], ...] = ()


_WEIGHT_SCALED = (
    "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN",
    "FP8_PB_WO",
    "W8A8_SQ_PER_CHANNEL",
    "INT8_WO",
    "W8A16",
    "W4A16_AWQ",
    "W4A8_AWQ",
    "NVFP4",
    "W4A16_NVFP4",
)
_AWQ_EXPORTS = (("NVFP4", "NVFP4_AWQ"),)
ALGORITHMS: Dict[str, Algorithm] = {
    "max": Algorithm("scales from the largest magnitude seen in calibration", _WEIGHT_SCALED + ("NVFP4_AWQ",)),
    "mse": Algorithm(
        "weight scales searched to minimise the squared rounding error (fp8_scale_sweep: NVFP4's FP8 block scales too)",
        _WEIGHT_SCALED,
    ),
    "local_hessian": Algorithm(
        "NVFP4 weight block scales searched against a per-block Hessian of the layer's inputs", ("NVFP4", "W4A16_NVFP4")
    ),
    "smoothquant": Algorithm(
        "activation outliers moved into the weights by per-channel factors (alpha)", ("W8A8_SQ_PER_CHANNEL",)
    ),
    "awq_lite": Algorithm(
        "AWQ: per-channel weight scales searched on the calibration activations (alpha_step)",
        ("W4A16_AWQ", "W4A8_AWQ", "NVFP4", "NVFP4_AWQ"),
        _AWQ_EXPORTS,
    ),
    # Clipping alone leaves no pre-quantization scale, and ModelOpt's export names NVFP4_AWQ only by that scale:
    # an NVFP4 model clipped this way is written as plain NVFP4 (measured on an H200, ModelOpt 0.47).
    "awq_clip": Algorithm(
        "AWQ: weight clipping ratios searched per block",
        ("W4A16_AWQ", "W4A8_AWQ", "NVFP4", "NVFP4_AWQ"),
        (("NVFP4_AWQ", "NVFP4"),),
    ),
    "awq_full": Algorithm("AWQ: scales, then clipping", ("W4A16_AWQ", "W4A8_AWQ", "NVFP4", "NVFP4_AWQ"), _AWQ_EXPORTS),
    "gptq": Algorithm(
        "GPTQ: weights rounded column by column, each error spread over the columns not yet rounded",
        ("W4A16_AWQ", "NVFP4", "W4A16_NVFP4"),
    ),
    "svdquant": Algorithm(
        "SVDQuant: a BF16 low-rank branch (lowrank) takes the outliers, the rest is NVFP4",
        ("NVFP4",),
        (("NVFP4", "NVFP4_SVD"),),
    ),
}


def algorithm_export(method: Optional[str], quant_algo: Optional[str]) -> Optional[str]:
    """The quant_algo of the export of a recipe exporting `quant_algo`, calibrated with `method`."""
    if method is None or method not in ALGORITHMS:
        return quant_algo
    return dict(ALGORITHMS[method].exports_as).get(quant_algo, quant_algo)


# Calibration algorithms that reach fused routed experts (transformers 5 keeps a MoE layer's experts in 3-D weights;
# ModelOpt gives each expert its own weight quantizer): max and mse (run and validated on the tiny NemotronH,
# tests/test_moe.py), and local_hessian (ModelOpt 0.47 hooks fused experts for it; read in its source, not run here:
# it searches NVFP4 block scales, which need CUDA). The others work on linear layers with a 2-D weight only.
FUSED_EXPERT_ALGORITHMS = ("max", "mse", "local_hessian")


def may_have_fused_experts(arch: str, num_experts: Optional[int]) -> bool:
    """Whether a model of this `model.arch` may keep routed experts fused: MoE models, and hybrid Mamba models
    unless the model group says they have none (`model.num_experts: 0`, Nemotron-H 8B)."""
    return arch == "moe" or (arch == "mamba_hybrid" and num_experts != 0)


def fused_expert_problem(method: Optional[str], export: Optional[str], formats: Sequence[str]) -> Optional[str]:
    """Why ModelOpt cannot quantize and export fused routed experts with this calibration `method`, export
    `quant_algo` and number `formats`, or None. Measured on the tiny shapes (CPU, ModelOpt 0.47): INT4 and AWQ
    formats fail in the export step that averages AWQ pre-quant scales over a list of expert modules (`object of type
    'QuantQwen3MoeExperts' has no len()`, after calibrating, also at recipe.algorithm=max); SmoothQuant writes
    experts the written-checkpoint check cannot read back."""
    export = (export or "").upper()
    if "int4" in formats or "AWQ" in export or "SVD" in export:
        return f"exports {export or 'INT4 weight blocks'}, whose ModelOpt export step fails on fused experts"
    if method == "smoothquant" or "_SQ" in export:
        return "calibrates with SmoothQuant, whose export of fused experts cannot be read back"
    if method is not None and method not in FUSED_EXPERT_ALGORITHMS:
        return f"calibrates with {method}, which ModelOpt applies to linear layers with a 2-D weight only"
    return None


def fused_expert_refusal(what: str, problem: str, model: str, arch: str) -> str:
    return (
        f"{what} {problem}; model={model} (model.arch={arch}) keeps its routed experts fused in 3-D weights. Pick a "
        "recipe calibrated with max or mse: fp8 or mamba_moe_fp8_* (any hardware), nvfp4, nvfp4_mse or "
        "mamba_moe_nvfp4_* (a GPU)."
    )


def algorithm_tag(method: Optional[str], args: Optional[Dict], block_size: Optional[int] = 0) -> str:
    """A short, folder-safe name of a calibration choice: '' for the recipe's own, else e.g. 'mse',
    'smoothquant-alpha0.5', 'svdquant-lowrank64'; an AWQ block size chosen by hand adds 'block32'."""
    args = dict(args or {})
    if not method and not args and not block_size:
        return ""
    parts = [method] if method else []
    if block_size:
        parts.append(f"block{block_size}")
    for key in sorted(args):
        value = args[key]
        value = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
        parts.append(f"{key}{value}")
    return "-".join(str(p) for p in parts).replace("/", "_").replace(" ", "")
