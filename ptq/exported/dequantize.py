"""The arithmetic of the export's formats: unpacking INT4 and FP4 codes, FP8/INT8/NVFP4 quantization and back (NVFP4
with the numbers of ModelOpt's NVFP4QTensor), a quantized layer's weight from its stored codes and scales, and the
transform its input goes through (the stored pre-quantization scale, then the stored activation quantization)."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ptq.errors import ConfigError
from ptq.formats import export_algos

FP8_MAX = 448.0
# ModelOpt's 2-D blockwise FP8 (fp8_blockwise recipe) uses 128 x 128 tiles.
FP8_BLOCK = 128
# The exported quant_algo names this loader can simulate, per layer.
WEIGHT_ONLY = set(export_algos(readback=True, activation=None))
FP8_INPUT = set(export_algos(readback=True, activation="fp8"))
INT8_INPUT = set(export_algos(readback=True, activation="int8"))
NVFP4_INPUT = set(export_algos(readback=True, activation="nvfp4"))
SUPPORTED = set(export_algos(readback=True))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Signed INT4 codes [out, in] from the export's bytes [out / 2, in] (two output rows per byte, low nibble first)."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    rows, cols = packed.shape
    return torch.stack([low, high], dim=1).reshape(rows * 2, cols)


# FP4 (E2M1) values by 4-bit code: bit 3 is the sign, and code 8 reads as +0 (as ModelOpt's own table has it,
# so that dequantized zeros carry the same sign bit).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Magnitudes at which rounding moves to the next FP4 value (a tie at 0.75, 1.75 or 3.5 goes up, to the even code).
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_MAX = 6.0
_tables: Dict[tuple, torch.Tensor] = {}


def _table(name: str, device) -> torch.Tensor:
    """A small constant table on `device`, made once per device."""
    key = (name, str(device))
    if key not in _tables:
        if name == "e2m1":
            _tables[key] = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
        elif name == "bounds":
            _tables[key] = torch.tensor(E2M1_BOUNDS, dtype=torch.float32, device=device)
        else:  # "byte": both FP4 values of every byte, low nibble first, so one lookup unpacks a packed tensor
            codes = torch.arange(256, device=device)
            values = _table("e2m1", device)
            _tables[key] = torch.stack([values[codes & 0x0F], values[codes >> 4]], dim=-1)
    return _tables[key]


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """FP4 values (float32) [..., 2n] from the export's bytes [..., n] (two values per byte, low nibble first)."""
    return _table("byte", packed.device)[packed.long()].reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    scale = scale.to(x.dtype)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def int8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    scale = scale.to(x.dtype)
    return (x / scale).round().clamp(-127, 127) * scale


def nvfp4_fake_quant(x: torch.Tensor, global_scale: torch.Tensor, block: int) -> torch.Tensor:
    """NVFP4 quantization and back, with the numbers ModelOpt's NVFP4QTensor gives (tested against it).

    Per block of `block` values: scale = amax / (6 x global scale), rounded to FP8 E4M3 (clamped to
    [2^-9, 448]; an all-zero block gets 1); values divided by scale x global scale and rounded to FP4 (E2M1,
    ties to the even code); the result is the FP4 value times the same product, in the input's dtype.
    """
    shape, dtype = x.shape, x.dtype
    width = shape[-1]
    xf = x.float()
    if width % block:
        xf = torch.nn.functional.pad(xf, (0, block - width % block))
    blocks = xf.reshape(*shape[:-1], -1, block)
    g = global_scale.float().to(x.device)
    scale = blocks.abs().amax(-1, keepdim=True) / (E2M1_MAX * g)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = scale.clamp(min=2**-9, max=FP8_MAX).to(torch.float8_e4m3fn).float() * g
    scaled = blocks / scale
    magnitude = scaled.abs()
    bounds = _table("bounds", x.device)
    code = torch.searchsorted(bounds, magnitude, out_int32=True)
    code += (magnitude == E2M1_BOUNDS[1]) | (magnitude == E2M1_BOUNDS[3]) | (magnitude == E2M1_BOUNDS[5])
    code += (scaled < 0) * 8
    out = (_table("e2m1", x.device)[code] * scale).reshape(*shape[:-1], -1)
    return (out[..., :width] if width % block else out).to(dtype)


def dequantize_weight(algo: str, t: Dict[str, torch.Tensor], group_size: Optional[int], dtype) -> torch.Tensor:
    """The weight a quantized layer computes with, from its stored codes and scales (on their device)."""
    weight, scale = t["weight"], t["weight_scale"].float()
    if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO"):
        codes = weight.view(torch.float8_e4m3fn).float()
        out, inp = codes.shape
        if algo == "FP8_PB_WO":  # one scale per block x block tile; the last tiles may hang over the edge
            block = group_size or FP8_BLOCK
            tiles = (-(-out // block), -(-inp // block))
            if scale.numel() != tiles[0] * tiles[1]:
                raise ConfigError(
                    f"FP8 block scales of {tuple(scale.shape)} do not tile a {out}x{inp} weight in "
                    f"{block}x{block} blocks"
                )
            scale = scale.reshape(tiles).repeat_interleave(block, 0).repeat_interleave(block, 1)[:out, :inp]
        elif scale.numel() > 1:  # one scale per output channel
            scale = scale.reshape(-1, 1)
        return (codes * scale).to(dtype)
    if algo in ("W8A8_SQ_PER_CHANNEL", "W8A16", "INT8_WO"):
        return (weight.float() * scale.reshape(-1, 1)).to(dtype)
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        codes = unpack_int4(weight).float()
        out, inp = codes.shape
        group = group_size or inp // scale.shape[1]
        deq = (codes.reshape(out, -1, group) * scale.reshape(out, -1, 1)).reshape(out, inp)
        if algo == "W4A8_AWQ":  # the kernel holds the INT4 weight as FP8 with one more scale
            deq = fp8_fake_quant(deq, t["weight_scale_2"].float())
        return deq.to(dtype)
    if algo in ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4"):
        # FP4 value x (block scale x global scale), in float32, as ModelOpt's NVFP4QTensor.dequantize computes it
        block = group_size or 16
        values = unpack_fp4(weight)
        out, inp = values.shape
        per_block = scale * t["weight_scale_2"].float()
        return (values.reshape(out, -1, block) * per_block.reshape(out, -1, 1)).reshape(out, inp).to(dtype)
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
    cast: Dict[tuple, torch.Tensor] = {}  # the pre-quantization scale in each device and dtype it met

    def transform(x: torch.Tensor) -> torch.Tensor:
        if pre is not None:
            key = (x.device, x.dtype)
            if key not in cast:
                cast[key] = pre.to(x.device, x.dtype)
            x = x * cast[key]
        return quant(x) if quant is not None else x

    return transform
