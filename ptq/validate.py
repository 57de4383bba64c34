"""Check an exported checkpoint: every layer meant to be quantized carries its scales,
the quantization metadata matches the recipe, and nothing was silently left in BF16."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from safetensors import safe_open

FLOAT_DTYPES = {"BF16", "F16", "F32"}


def read_tensor_index(checkpoint: Path) -> Dict[str, Dict]:
    """name -> {"dtype", "shape"} for every tensor of every safetensors file (headers only)."""
    index = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                index[name] = {"dtype": sl.get_dtype(), "shape": list(sl.get_shape())}
    return index


def checkpoint_bytes(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))


def validate_checkpoint(checkpoint: Path, *, expect_quantized: List[str], expect_quant_algo: Optional[str],
                        expect_kv_cache: str, unexpected_bf16: List[str]) -> dict:
    """Problems make `passed` false. `expect_quantized`: module names whose weights must be quantized;
    `unexpected_bf16`: modules the backend found unquantized though no exclude pattern names them."""
    problems: List[str] = []
    index = read_tensor_index(checkpoint)
    if not index:
        problems.append(f"no safetensors weights in {checkpoint}")
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
        problems.append(f"{len(missing_scales)} layers meant to be quantized have no weight scale: {missing_scales[:8]}")
    if still_float:
        problems.append(f"{len(still_float)} layers meant to be quantized still hold float weights: {still_float[:8]}")
    if unexpected_bf16:
        problems.append(f"{len(unexpected_bf16)} layers were left in BF16 though no exclude pattern names them: {unexpected_bf16[:8]}")

    quant_algo = kv_algo = None
    quant_file = checkpoint / "hf_quant_config.json"
    if expect_quantized:
        if not quant_file.exists():
            problems.append("hf_quant_config.json is missing")
        else:
            quantization = json.loads(quant_file.read_text()).get("quantization", {})
            quant_algo, kv_algo = quantization.get("quant_algo"), quantization.get("kv_cache_quant_algo")
            if expect_quant_algo and quant_algo != expect_quant_algo:
                problems.append(f"hf_quant_config.json says quant_algo={quant_algo}, the recipe expects {expect_quant_algo}")
            want_kv = None if expect_kv_cache == "none" else expect_kv_cache.upper()
            if (kv_algo or None) != want_kv:
                problems.append(f"hf_quant_config.json says kv_cache_quant_algo={kv_algo}, the recipe expects {want_kv}")
        config = json.loads((checkpoint / "config.json").read_text())
        if config.get("quantization_config", {}).get("quant_method") != "modelopt":
            problems.append("config.json has no quantization_config with quant_method=modelopt")
    return {
        "passed": not problems,
        "problems": problems,
        "quantized_layers": len(expect_quantized) - len(missing_scales) - len(still_float),
        "expected_quantized_layers": len(expect_quantized),
        "unexpected_bf16": unexpected_bf16,
        "quant_algo": quant_algo,
        "kv_cache_quant_algo": kv_algo,
        "tensors": len(index),
    }
