"""The stored-weight check: each quantized layer's stored weight, dequantized, against the source checkpoint's on a
few rows, read from both files directly (no model, no forward pass)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ptq.exported.dequantize import FP8_BLOCK, dequantize_weight
from ptq.exported.reading import index_export, read_ahead, tensor_files
from ptq.formats import EXPORT_FORMATS, STATIC_INPUT_SCALES, STORED_WEIGHTS_CHECK, export_algos

# Formats that store a calibrated activation scale (`input_scale`) for each quantized layer.
STATIC_INPUT = {a for a, f in EXPORT_FORMATS.items() if f.activation in STATIC_INPUT_SCALES}
# The stored-weight check (`check_stored_weights`): what it can judge, and how closely. A layer's dequantized
# weight must match the source model's weight up to the rounding of its format (ptq/formats.py's
# weight_error_bound, on the relative error in Frobenius norm over the rows read).
WEIGHT_ERROR_BOUNDS = {algo: f.weight_error_bound for algo, f in EXPORT_FORMATS.items() if f.weight_error_bound}
# ... and the best scalar fit of stored to source (gain = <stored, source> / <source, source>) within 1 +- this:
# a scale written wrong by a factor c gives a gain of c, whatever the rounding noise of the format.
WEIGHT_GAIN_TOLERANCE = 0.05
# Smoothed exports (AWQ, SmoothQuant) cannot be judged layer by layer: the full read-back measures them.
SMOOTHED = set(export_algos(smoothed=True))
# Non-quantized tensors are stored in the export's dtype (BF16): their relative error is BF16 rounding at most.
PLAIN_ERROR_BOUND = 0.01


def _row_chunks(rows: int, wanted: int, chunks: int = 4) -> List[tuple]:
    """[(start, stop)] of `chunks` runs of rows spread over a weight of `rows` rows, `wanted` rows in all.

    Runs start on multiples of 128 (the FP8 block tile) so that block scales line up with the rows read."""
    if wanted >= rows:
        return [(0, rows)]
    size = max(1, wanted // chunks)
    starts = sorted({min(rows - size, i * rows // chunks) // FP8_BLOCK * FP8_BLOCK for i in range(chunks)})
    return [(start, min(rows, start + size)) for start in starts]


def _scale_rows(algo: str, name: str, scale, shape, start: int, stop: int, block: Optional[int]) -> torch.Tensor:
    """The part of a stored scale (a safetensors slice) that belongs to the rows [start, stop) of its weight."""
    dims = scale.get_shape()
    if algo == "FP8_PB_WO" and name == "weight_scale":
        tile = block or FP8_BLOCK
        tiles = (-(-shape[0] // tile), -(-shape[1] // tile))
        whole = scale[...]
        if whole.numel() != tiles[0] * tiles[1]:
            return whole  # dequantize_weight says what is wrong with it
        return whole.reshape(tiles)[start // tile : -(-stop // tile)]
    if name == "weight_scale" and len(dims) >= 1 and dims[0] == shape[0] and shape[0] > 1:
        return scale[start:stop]
    return scale[...]


class _InMemory:
    """safetensors' slice interface (get_slice -> get_shape, [rows]) over tensors held in memory."""

    def __init__(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def get_slice(self, name: str) -> "_InMemory._Slice":
        return _InMemory._Slice(self.tensors[name])

    class _Slice:
        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor

        def get_shape(self) -> List[int]:
            return list(self.tensor.shape)

        def __getitem__(self, index):
            return self.tensor[index]


IN_MEMORY = Path("<in memory>")


def check_stored_weights(
    export_dir: Path,
    source_dir: Optional[Path],
    device: str = "cpu",
    rows: int = 128,
    workers: int = 4,
    reference: Optional[Dict[str, torch.Tensor]] = None,
) -> dict:
    """Compare every quantized layer of an export, dequantized from its stored codes and scales, with the same
    weight of the source checkpoint, on `rows` rows of each (read from both files directly onto `device`).

    Much cheaper than reading the whole checkpoint back and measuring it (a few MB per layer, no model, no
    forward pass), and it still catches a weight scale written wrong (any factor beyond 5 % in a per-tensor
    scale shows in the gain; a wrong block scale in the rows read shows in the relative error), codes that do not
    belong to the layer, and a non-quantized tensor that differs from the source. It does not measure the
    activation scales (only that each is stored, finite and positive) nor KV-cache scales: the full read-back
    (`load_exported` and a fidelity comparison) does.

    `reference`: the weights to compare with, by tensor name, instead of the source folder's (a model trained after
    PTQ, whose weights the source no longer holds).

    Returns {"check": "stored weights", "applicable": bool, "reason": str (when not applicable; then use the
    full read-back), "layers": n, "rows_per_layer": rows, "formats": {quant_algo: layers},
    "max_relative_error": {quant_algo: worst}, "gain": [lowest, highest], "worst_layers": [{"layer",
    "quant_algo", "relative_error", "gain"}, ...3], "plain_tensors": n, "input_scales": n, "problems": [str]}.
    """
    index = index_export(export_dir)
    where, by_module, quantized, formats = index.where, index.by_module, index.quantized, index.formats
    result = {
        "check": STORED_WEIGHTS_CHECK,
        "applicable": True,
        "layers": len(quantized),
        "rows_per_layer": rows,
        "formats": {},
        "max_relative_error": {},
        "gain": None,
        "worst_layers": [],
        "plain_tensors": 0,
        "input_scales": 0,
        "problems": [],
    }
    reason = _not_checkable(quantized, formats, by_module)
    if reason:
        return {**result, "applicable": False, "reason": reason}
    source = tensor_files(Path(source_dir)) if reference is None else {name: IN_MEMORY for name in reference}
    if reference is not None:
        result["reference"] = "the weights in memory"
    stats: List[dict] = []
    with ExitStack() as stack:
        rows_of = _Rows(stack, where, source, by_module, formats, reference, device, rows)
        plain = [n for n in where if n.rpartition(".")[0] not in quantized]
        for name, (kind, parts) in read_ahead(quantized + plain, rows_of.read, workers):
            if kind == "plain":
                _check_plain(name, parts, result)
            else:
                _check_layer(name, formats[name], parts, result, stats)
    if stats:
        result["gain"] = [min(s["gain"] for s in stats), max(s["gain"] for s in stats)]
        result["worst_layers"] = sorted(stats, key=lambda s: -abs(s["gain"] - 1) - s["relative_error"])[:3]
    return result


def _not_checkable(quantized: List[str], formats: Dict[str, dict], by_module: Dict[str, Dict[str, str]]) -> str:
    """Why the stored-weight check cannot judge this export ("" when it can): smoothed layers, a format with no
    error bound here, or pre-quantization scales."""
    algos = {formats.get(m, {}).get("quant_algo") for m in quantized}
    smoothed = sorted(a for a in algos if a in SMOOTHED)
    unknown = sorted(str(a) for a in algos if a not in WEIGHT_ERROR_BOUNDS and a not in SMOOTHED)
    if smoothed:
        return f"{', '.join(smoothed)} layers are smoothed with factors folded into other tensors"
    if unknown:
        return f"quant_algo {', '.join(unknown)} has no bound here"
    if any("pre_quant_scale" in by_module[m] for m in quantized):
        return "layers store pre-quantization scales"
    return ""


class _Rows:
    """Reads the rows checked of one tensor (or quantized layer) from the export and from the source (its files, or
    the weights in memory), onto `device`."""

    def __init__(self, stack, where, source, by_module, formats, reference, device, rows) -> None:
        from safetensors import safe_open

        self.where, self.source, self.by_module, self.formats = where, source, by_module, formats
        self.device, self.rows = device, rows
        self.handles = {
            file: stack.enter_context(safe_open(str(file), framework="pt"))
            for file in sorted(set(where.values()) | set(source.values()))
            if file != IN_MEMORY
        }
        if reference is not None:
            self.handles[IN_MEMORY] = _InMemory(reference)

    def read(self, name: str):
        """("layer", [(stored tensors, source rows or None), ...]) for a quantized layer; ("plain", [(stored, source),
        ...]) for another tensor, or ("plain", None) where the source has no tensor of that shape."""
        if name in self.by_module and "weight_scale" in self.by_module[name]:
            return "layer", self._layer(name)
        handles, device = self.handles, self.device
        ref = handles[self.source[name]].get_slice(name) if name in self.source else None
        stored = handles[self.where[name]].get_slice(name)
        if ref is None or stored.get_shape() != ref.get_shape():
            return "plain", None
        if not stored.get_shape():
            return "plain", [(stored[...].to(device), ref[...].to(device))]
        chunks = _row_chunks(stored.get_shape()[0], self.rows)
        return "plain", [(stored[a:b].to(device), ref[a:b].to(device)) for a, b in chunks]

    def _layer(self, name: str) -> list:
        handles, where, device = self.handles, self.where, self.device
        algo, group = self.formats[name]["quant_algo"], self.formats[name]["group_size"]
        tensors = self.by_module[name]
        weight = handles[where[tensors["weight"]]].get_slice(tensors["weight"])
        codes_shape = weight.get_shape()
        shape = (codes_shape[0], codes_shape[1] * (2 if algo in ("NVFP4", "W4A16_NVFP4") else 1))
        parts = []
        for start, stop in _row_chunks(shape[0], self.rows):
            stored = {"weight": weight[start:stop].to(device)}
            for leaf, tensor in tensors.items():
                if leaf != "weight":
                    stored[leaf] = _scale_rows(
                        algo, leaf, handles[where[tensor]].get_slice(tensor), shape, start, stop, group
                    ).to(device)
            ref = None
            if tensors["weight"] in self.source:
                ref = handles[self.source[tensors["weight"]]].get_slice(tensors["weight"])[start:stop].to(device)
            parts.append((stored, ref))
        return parts


def _check_plain(name: str, parts, result: dict) -> None:
    """A tensor stored unquantized must equal the source's up to BF16 rounding."""
    if parts is None:
        return
    err = sum(float((s.float() - r.float()).square().sum()) for s, r in parts)
    norm = sum(float(r.float().square().sum()) for _, r in parts)
    result["plain_tensors"] += 1
    if err > (PLAIN_ERROR_BOUND**2) * norm:
        result["problems"].append(
            f"{name} is stored unquantized but differs from the source (relative error "
            f"{(err / max(norm, 1e-30)) ** 0.5:.3f})"
        )


def _check_layer(name: str, fmt: dict, parts, result: dict, stats: List[dict]) -> None:
    """A quantized layer's dequantized rows against the source's: relative error within its format's bound, best
    scalar fit (gain) within 1 +- WEIGHT_GAIN_TOLERANCE, and a finite positive input scale where it quantizes its
    input statically."""
    algo, group = fmt["quant_algo"], fmt["group_size"]
    problems = result["problems"]
    result["formats"][algo] = result["formats"].get(algo, 0) + 1
    if parts[0][1] is None:
        problems.append(f"{name} is stored quantized but the source has no {name}.weight")
        return
    err = dot = norm = 0.0
    for stored, ref in parts:
        weight = dequantize_weight(algo, stored, group, torch.float32)
        ref = ref.float()
        if weight.shape != ref.shape:
            problems.append(f"{name} dequantizes to rows of {tuple(weight.shape)}, the source has {tuple(ref.shape)}")
            break
        err += float((weight - ref).square().sum())
        dot += float((weight * ref).sum())
        norm += float(ref.square().sum())
    else:
        rel, gain = (err / norm) ** 0.5 if norm else 0.0, dot / norm if norm else 1.0
        stats.append({"layer": name, "quant_algo": algo, "relative_error": rel, "gain": gain})
        result["max_relative_error"][algo] = max(result["max_relative_error"].get(algo, 0.0), rel)
        if abs(gain - 1) > WEIGHT_GAIN_TOLERANCE or rel > WEIGHT_ERROR_BOUNDS[algo]:
            problems.append(
                f"{name} ({algo}): the stored weight is {gain:.3f} x the source weight with "
                f"relative error {rel:.3f} (allowed: 1 +- {WEIGHT_GAIN_TOLERANCE} and "
                f"{WEIGHT_ERROR_BOUNDS[algo]}): its stored scales do not fit its codes"
            )
    if algo in STATIC_INPUT:
        scale = parts[0][0].get("input_scale")
        if scale is None or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            problems.append(f"{name} ({algo}) quantizes its input but stores no finite positive input_scale")
        else:
            result["input_scales"] += 1
