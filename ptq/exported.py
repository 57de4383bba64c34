"""Read an exported (unified Hugging Face) checkpoint back into a model that computes what it stores.

Serving engines run these checkpoints with low-precision kernels; transformers cannot load them. To score
the file that was actually written (and to score checkpoints this process did not quantize, such as the
Megatron-Bridge backend's), every quantized linear layer gets its weight dequantized from the stored
integers/FP8/FP4 codes and scales, and a hook that applies the stored pre-quantization scale and quantizes
its input with the stored activation scale. Computation then runs in ordinary precision, so the numbers
match the quantized model up to rounding of the compute dtype. FP8 and INT8 weights are a code times its
scale; NVFP4 weights and activations go through ModelOpt's own NVFP4QTensor; the INT4 export packs two
output rows per byte, which no ModelOpt class reads back, so that unpacking is done here (and tested
against ModelOpt's packer).

Not simulated (reported in the summary): KV-cache scales (they apply inside attention after the rotary
embedding, which a hook on the projections cannot reproduce).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ptq.errors import ConfigError
from ptq.formats import MIXED_PRECISION, export_algos
from ptq.layout import QUANT_CONFIG_NAME

log = logging.getLogger(__name__)

FP8_MAX = 448.0
# ModelOpt's 2-D blockwise FP8 (fp8_blockwise recipe) uses 128 x 128 tiles.
FP8_BLOCK = 128
# The exported quant_algo names this loader can simulate, per layer.
WEIGHT_ONLY = set(export_algos(readback=True, activation=None))
FP8_INPUT = set(export_algos(readback=True, activation="fp8"))
INT8_INPUT = set(export_algos(readback=True, activation="int8"))
NVFP4_INPUT = set(export_algos(readback=True, activation="nvfp4"))
SUPPORTED = set(export_algos(readback=True))


@dataclass
class Simulation:
    """What was rebuilt from the checkpoint, for the run record."""
    layers: Dict[str, str] = field(default_factory=dict)  # module -> quant_algo
    kv_cache_quant_algo: Optional[str] = None
    not_simulated: List[str] = field(default_factory=list)

    def summary(self) -> dict:
        counts: Dict[str, int] = {}
        for algo in self.layers.values():
            counts[algo] = counts.get(algo, 0) + 1
        return {"layers": len(self.layers), "formats": counts, "kv_cache_quant_algo": self.kv_cache_quant_algo,
                "not_simulated": self.not_simulated}


def read_quant_config(export_dir: Path) -> dict:
    """The "quantization" section of a ModelOpt export's hf_quant_config.json."""
    path = export_dir / QUANT_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{export_dir} has no {QUANT_CONFIG_NAME}: it is not a ModelOpt export.")
    return json.loads(path.read_text()).get("quantization", {})


def layer_formats(quant: dict, module_names: List[str]) -> Dict[str, dict]:
    """{module: {"quant_algo", "group_size"}} for every module the checkpoint stores quantized."""
    algo = (quant.get("quant_algo") or "").upper()
    if algo == MIXED_PRECISION:
        return {name: {"quant_algo": (cfg.get("quant_algo") or "").upper(), "group_size": cfg.get("group_size")}
                for name, cfg in quant.get("quantized_layers", {}).items()}
    return {name: {"quant_algo": algo, "group_size": quant.get("group_size")} for name in module_names}


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Signed INT4 codes [out, in] from the export's bytes [out / 2, in] (two output rows per byte, low nibble first)."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    rows, cols = packed.shape
    return torch.stack([low, high], dim=1).reshape(rows * 2, cols)


def fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    scale = scale.to(x.dtype)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def int8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    scale = scale.to(x.dtype)
    return (x / scale).round().clamp(-127, 127) * scale


def nvfp4_fake_quant(x: torch.Tensor, global_scale: torch.Tensor, block: int) -> torch.Tensor:
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    q, scale, scale_2 = NVFP4QTensor.quantize(x.float(), block, weights_scaling_factor_2=global_scale.float().to(x.device))
    return q.dequantize(dtype=x.dtype, scale=scale, double_scale=scale_2, block_sizes={-1: block})


def dequantize_weight(algo: str, t: Dict[str, torch.Tensor], group_size: Optional[int], dtype) -> torch.Tensor:
    """The weight a quantized layer computes with, from its stored codes and scales."""
    weight, scale = t["weight"], t["weight_scale"].float()
    if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO"):
        codes = weight.view(torch.float8_e4m3fn).float()
        out, inp = codes.shape
        if algo == "FP8_PB_WO":  # one scale per block x block tile; the last tiles may hang over the edge
            block = group_size or FP8_BLOCK
            tiles = (-(-out // block), -(-inp // block))
            if scale.numel() != tiles[0] * tiles[1]:
                raise ConfigError(f"FP8 block scales of {tuple(scale.shape)} do not tile a {out}x{inp} weight in "
                                  f"{block}x{block} blocks")
            scale = scale.reshape(tiles).repeat_interleave(block, 0).repeat_interleave(block, 1)[:out, :inp]
        elif scale.numel() > 1:  # one scale per output channel
            scale = scale.reshape(-1, 1)
        return (codes * scale).to(dtype)
    if algo in ("W8A8_SQ_PER_CHANNEL", "W8A16", "INT8_WO"):
        return (weight.float() * scale.reshape(-1, 1)).to(dtype)
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        codes = unpack_int4(weight).float()
        group = group_size or codes.shape[1] // scale.shape[1]
        deq = codes * scale.repeat_interleave(group, dim=1)
        if algo == "W4A8_AWQ":  # the kernel holds the INT4 weight as FP8 with one more scale
            deq = fp8_fake_quant(deq, t["weight_scale_2"].float())
        return deq.to(dtype)
    if algo in ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4"):
        from modelopt.torch.quantization.qtensor import NVFP4QTensor

        block = group_size or 16
        shape = torch.Size([weight.shape[0], weight.shape[1] * 2])
        return NVFP4QTensor(shape, torch.float32, weight).dequantize(
            dtype=dtype, scale=scale.to(torch.float8_e4m3fn) if t["weight_scale"].dtype == torch.float8_e4m3fn else scale,
            double_scale=t["weight_scale_2"].float(), block_sizes={-1: block})
    raise ConfigError(f"cannot simulate quant_algo {algo}")


def input_transform(algo: str, t: Dict[str, torch.Tensor], group_size: Optional[int]) -> Optional[Callable]:
    """The stored pre-quantization scale, then the stored activation quantization, as one function."""
    pre = t.get("pre_quant_scale")
    act_scale = t.get("input_scale")
    if algo in WEIGHT_ONLY or act_scale is None:
        quant = None
    elif algo in FP8_INPUT:
        quant = lambda x: fp8_fake_quant(x, act_scale.to(x.device))  # noqa: E731
    elif algo in INT8_INPUT:
        quant = lambda x: int8_fake_quant(x, act_scale.to(x.device))  # noqa: E731
    else:  # NVFP4: dynamic per-block scales under the stored global one
        block = group_size or 16
        quant = lambda x: nvfp4_fake_quant(x, act_scale, block)  # noqa: E731
    if pre is None and quant is None:
        return None

    def transform(x: torch.Tensor) -> torch.Tensor:
        if pre is not None:
            x = x * pre.to(x.device, x.dtype)
        return quant(x) if quant is not None else x

    return transform


def read_tensors(export_dir: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's safetensors files, by name."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(export_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def simulate(model, export_dir: Path) -> Simulation:
    """Give every quantized linear layer of `model` (loaded from the export without its scales) the stored numbers."""
    quant = read_quant_config(export_dir)
    tensors = read_tensors(export_dir)
    by_module: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        by_module.setdefault(module, {})[leaf] = tensor
    quantized = [m for m, t in by_module.items() if "weight_scale" in t]
    formats = layer_formats(quant, quantized)
    modules = dict(model.named_modules())
    sim = Simulation()
    sim.kv_cache_quant_algo = quant.get("kv_cache_quant_algo")
    if sim.kv_cache_quant_algo:
        sim.not_simulated.append(f"KV cache ({sim.kv_cache_quant_algo})")
    unsupported = sorted({f["quant_algo"] for m, f in formats.items() if m in by_module and f["quant_algo"] not in SUPPORTED})
    if unsupported:
        raise ConfigError(
            f"{export_dir}: quant_algo {', '.join(unsupported)} cannot be simulated here (supported: "
            f"{', '.join(sorted(SUPPORTED))}); evaluate this checkpoint with a serving engine instead (eval=none here)."
        )
    for name in quantized:
        if name not in formats:
            raise ConfigError(f"{export_dir}: {name} stores scales but hf_quant_config.json names no format for it.")
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            raise ConfigError(
                f"{export_dir}: {name} is stored quantized but is a {type(module).__name__} in the model, not a linear "
                "layer; only linear layers can be simulated (fused MoE experts are not)."
            )
        algo, group = formats[name]["quant_algo"], formats[name]["group_size"]
        weight = dequantize_weight(algo, by_module[name], group, module.weight.dtype)
        if weight.shape != module.weight.shape:
            raise ConfigError(f"{export_dir}: {name} dequantizes to {tuple(weight.shape)}, the model expects "
                              f"{tuple(module.weight.shape)}.")
        with torch.no_grad():
            module.weight.copy_(weight.to(module.weight.device))
        transform = input_transform(algo, by_module[name], group)
        if transform is not None:
            module.register_forward_pre_hook(lambda _m, args, fn=transform: (fn(args[0]), *args[1:]))
        sim.layers[name] = algo
    return sim


def load_exported(export_dir: Path, device: str, dtype: torch.dtype, tokenizer_from: Optional[str] = None):
    """(model, tokenizer, Simulation) computing what the exported checkpoint in `export_dir` stores.

    The tokenizer comes from the export when it has one, else from `tokenizer_from` (the source model).
    """
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    export_dir = Path(export_dir)
    config = AutoConfig.from_pretrained(export_dir)
    # The quantization_config names ModelOpt, which transformers cannot load: read the plain
    # tensors through transformers, then put the quantized layers together here.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # every quantized weight is reported as mismatched, expectedly
        try:
            model = AutoModelForCausalLM.from_pretrained(export_dir, config=config, dtype=dtype,
                                                         ignore_mismatched_sizes=True)
        finally:
            hf_logging.set_verbosity(verbosity)
    model.to(device).eval()
    sim = simulate(model, export_dir)
    log.info("Exported checkpoint %s read back: %s", export_dir, sim.summary())
    has_tokenizer = any((export_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(export_dir if has_tokenizer or not tokenizer_from else tokenizer_from), sim
