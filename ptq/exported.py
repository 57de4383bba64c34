"""Read an exported (unified Hugging Face) checkpoint back into a model that computes what it stores.

Serving engines run these checkpoints with low-precision kernels; transformers cannot load them. To score
the file that was actually written (and to score checkpoints this process did not quantize, such as the
Megatron-Bridge backend's), every quantized linear layer gets its weight dequantized from the stored
integers/FP8/FP4 codes and scales, and a hook that applies the stored pre-quantization scale and quantizes
its input with the stored activation scale. Computation then runs in ordinary precision, so the numbers
match the quantized model up to rounding of the compute dtype. FP8 and INT8 weights are a code times its
scale; NVFP4 weights and activations are unpacked and rounded here with the arithmetic of ModelOpt's
NVFP4QTensor (tested bit for bit against it); the INT4 export packs two output rows per byte, which no
ModelOpt class reads back, so that unpacking is done here (and tested against ModelOpt's packer). The model
is built on its device directly and every layer is dequantized there (on a GPU: seconds for an 8B model).

`check_stored_weights` is a much cheaper check of the same file: each quantized layer's stored weight against
the source checkpoint's, on a few rows; it catches a wrong weight scale but does not measure the model.

Not simulated (reported in the summary): KV-cache scales (they apply inside attention after the rotary
embedding, which a hook on the projections cannot reproduce).
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch

from ptq.errors import ConfigError
from ptq.formats import EXPORT_FORMATS, MIXED_PRECISION, STATIC_INPUT_SCALES, STORED_WEIGHTS_CHECK, export_algos
from ptq.layerkinds import match_names
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
# Formats that store a calibrated activation scale (`input_scale`) for each quantized layer.
STATIC_INPUT = {a for a, f in EXPORT_FORMATS.items() if f.activation in STATIC_INPUT_SCALES}
# What a quantized linear layer stores in place of its weight (other tensors of it, such as a bias, are plain).
QUANT_LEAVES = {"weight", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale"}


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
        return {
            "layers": len(self.layers),
            "formats": counts,
            "kv_cache_quant_algo": self.kv_cache_quant_algo,
            "not_simulated": self.not_simulated,
        }


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
        return {
            name: {"quant_algo": (cfg.get("quant_algo") or "").upper(), "group_size": cfg.get("group_size")}
            for name, cfg in quant.get("quantized_layers", {}).items()
        }
    return {name: {"quant_algo": algo, "group_size": quant.get("group_size")} for name in module_names}


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


def tensor_files(export_dir: Path) -> Dict[str, Path]:
    """{tensor name: safetensors file holding it} for a checkpoint (headers only; no tensor is read)."""
    from safetensors import safe_open

    where = {}
    for file in sorted(Path(export_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                where[name] = file
    return where


def read_tensors(export_dir: Path, names: Optional[Iterable[str]] = None, device="cpu") -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint's safetensors files by name (all of them, or `names`), read onto `device`."""
    from safetensors import safe_open

    where = tensor_files(export_dir)
    wanted = list(where) if names is None else list(names)
    tensors = {}
    for file in sorted({where[name] for name in wanted}):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in wanted:
                if where[name] == file:
                    tensors[name] = f.get_tensor(name)
    return tensors


def _by_module(names: Iterable[str]) -> Dict[str, Dict[str, str]]:
    """{module: {leaf: tensor name}} of a checkpoint's tensor names."""
    modules: Dict[str, Dict[str, str]] = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        modules.setdefault(module, {})[leaf] = name
    return modules


def _read_ahead(keys: List[str], read: Callable, workers: int):
    """(key, read(key)) in the order of `keys`, while `workers` threads read the next few keys (at most
    2 x workers read ahead, so memory holds a handful of layers, not the checkpoint)."""
    if workers <= 1:
        for key in keys:
            yield key, read(key)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read-back") as pool:
        pending = [pool.submit(read, key) for key in keys[: 2 * workers]]
        for i, key in enumerate(keys):
            result = pending[i].result()
            pending[i] = None
            if i + 2 * workers < len(keys):
                pending.append(pool.submit(read, keys[i + 2 * workers]))
            yield key, result


def unreadable_formats(export_dir: Path) -> List[str]:
    """quant_algo values of the export's quantized layers that the read-back cannot compute with."""
    quant = read_quant_config(Path(export_dir))
    by_module = _by_module(tensor_files(Path(export_dir)))
    quantized = [m for m, t in by_module.items() if "weight_scale" in t]
    return sorted(
        {
            f["quant_algo"]
            for m, f in layer_formats(quant, quantized).items()
            if m in by_module and f["quant_algo"] not in SUPPORTED
        }
    )


def simulate(model, export_dir: Path, workers: int = 4) -> Simulation:
    """Give every quantized linear layer of `model` (loaded from the export without its scales) the stored numbers.

    Each layer's codes and scales are read onto the device of its weight and dequantized there; `workers`
    threads read the next layers from the files while the current one is dequantized.
    """
    from safetensors import safe_open

    export_dir = Path(export_dir)
    quant = read_quant_config(export_dir)
    where = tensor_files(export_dir)
    by_module = _by_module(where)
    quantized = [m for m, t in by_module.items() if "weight_scale" in t]
    formats = layer_formats(quant, quantized)
    # The export's layer names as the model in memory names them (transformers renames wrappers on save).
    named = dict(model.named_modules())
    modules = {name: named[found] for name, found in match_names(quantized, named).items()}
    sim = Simulation()
    sim.kv_cache_quant_algo = quant.get("kv_cache_quant_algo")
    if sim.kv_cache_quant_algo:
        sim.not_simulated.append(f"KV cache ({sim.kv_cache_quant_algo})")
    unsupported = sorted(
        {f["quant_algo"] for m, f in formats.items() if m in by_module and f["quant_algo"] not in SUPPORTED}
    )
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
    with ExitStack() as stack:
        handles = {
            file: stack.enter_context(safe_open(str(file), framework="pt"))
            for file in sorted({where[t] for m in quantized for t in by_module[m].values()})
        }

        def read(name: str) -> Dict[str, torch.Tensor]:  # one layer's tensors, onto its weight's device
            device = modules[name].weight.device
            return {
                leaf: handles[where[tensor]].get_tensor(tensor).to(device)
                for leaf, tensor in by_module[name].items()
                if leaf in QUANT_LEAVES
            }

        for name, stored in _read_ahead(quantized, read, workers):
            module = modules[name]
            algo, group = formats[name]["quant_algo"], formats[name]["group_size"]
            weight = dequantize_weight(algo, stored, group, module.weight.dtype)
            if weight.shape != module.weight.shape:
                raise ConfigError(
                    f"{export_dir}: {name} dequantizes to {tuple(weight.shape)}, the model expects "
                    f"{tuple(module.weight.shape)}."
                )
            with torch.no_grad():
                module.weight.copy_(weight)
            del weight
            transform = input_transform(algo, {k: v for k, v in stored.items() if k != "weight"}, group)
            if transform is not None:
                module.register_forward_pre_hook(lambda _m, args, fn=transform: (fn(args[0]), *args[1:]))
            sim.layers[name] = algo
    return sim


def load_exported(export_dir: Path, device: str, dtype: torch.dtype, tokenizer_from: Optional[str] = None):
    """(model, tokenizer, Simulation) computing what the exported checkpoint in `export_dir` stores.

    The model is built on `device` directly: transformers reads the plain tensors (embeddings, norms, biases,
    layers left unquantized) onto it and initialises the quantized layers' weights there, and `simulate` fills
    those in from the stored codes and scales. The tokenizer comes from the export when it has one, else from
    `tokenizer_from` (the source model).
    """
    import warnings

    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    export_dir = Path(export_dir)
    config = AutoConfig.from_pretrained(export_dir)
    # The quantization_config names ModelOpt, which transformers cannot load: read the plain
    # tensors through transformers, then put the quantized layers together here.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    where = tensor_files(export_dir)
    quantized = {m for m, t in _by_module(where).items() if "weight_scale" in t}
    # The codes and scales of quantized layers are left to `simulate`: through transformers they would be read
    # once more, converted on the CPU (FP8 to BF16) or found mismatched, only to be overwritten.
    plain = [
        name for name in where if not (name.rpartition(".")[0] in quantized and name.rpartition(".")[2] in QUANT_LEAVES)
    ]
    with warnings.catch_warnings(), ExitStack() as stack:
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        handles = {file: stack.enter_context(safe_open(str(file), framework="pt")) for file in set(where.values())}
        state_dict = {name: handles[where[name]].get_tensor(name) for name in plain}
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # every quantized layer's weight is reported missing, expectedly
        try:
            # device_map puts every tensor on `device` as it is read (no copy of the model in CPU memory), and
            # the weights not in state_dict are initialised there, not on the CPU.
            model = _causal_lm_class(config).from_pretrained(
                None, config=config, dtype=dtype, state_dict=state_dict, device_map={"": _device(device)}
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        del state_dict
    # What from_pretrained takes from a checkpoint folder besides the weights: its name and generation settings.
    model.name_or_path = model.config.name_or_path = str(export_dir)
    if model.can_generate() and (export_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(export_dir)
    model.eval()
    sim = simulate(model, export_dir)
    log.info("Exported checkpoint %s read back: %s", export_dir, sim.summary())
    has_tokenizer = any((export_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return (
        model,
        AutoTokenizer.from_pretrained(export_dir if has_tokenizer or not tokenizer_from else tokenizer_from),
        sim,
    )


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
    from safetensors import safe_open

    export_dir = Path(export_dir)
    quant = read_quant_config(export_dir)
    where = tensor_files(export_dir)
    by_module = _by_module(where)
    quantized = [m for m, t in by_module.items() if "weight_scale" in t]
    formats = layer_formats(quant, quantized)
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
    algos = {formats.get(m, {}).get("quant_algo") for m in quantized}
    smoothed = sorted(a for a in algos if a in SMOOTHED)
    unknown = sorted(str(a) for a in algos if a not in WEIGHT_ERROR_BOUNDS and a not in SMOOTHED)
    if smoothed or unknown or any("pre_quant_scale" in by_module[m] for m in quantized):
        result["applicable"] = False
        result["reason"] = (
            f"{', '.join(smoothed)} layers are smoothed with factors folded into other tensors"
            if smoothed
            else f"quant_algo {', '.join(unknown)} has no bound here"
            if unknown
            else "layers store pre-quantization scales"
        )
        return result
    source = tensor_files(Path(source_dir)) if reference is None else {name: IN_MEMORY for name in reference}
    if reference is not None:
        result["reference"] = "the weights in memory"
    problems = result["problems"]
    stats = []
    with ExitStack() as stack:
        handles = {
            file: stack.enter_context(safe_open(str(file), framework="pt"))
            for file in sorted(set(where.values()) | set(source.values()))
            if file != IN_MEMORY
        }
        if reference is not None:
            handles[IN_MEMORY] = _InMemory(reference)

        def read(name: str):  # the rows checked of one tensor (or layer), from the export and the source
            if name in by_module and "weight_scale" in by_module[name]:
                algo, group = formats[name]["quant_algo"], formats[name]["group_size"]
                tensors = by_module[name]
                weight = handles[where[tensors["weight"]]].get_slice(tensors["weight"])
                codes_shape = weight.get_shape()
                shape = (codes_shape[0], codes_shape[1] * (2 if algo in ("NVFP4", "W4A16_NVFP4") else 1))
                parts = []
                for start, stop in _row_chunks(shape[0], rows):
                    stored = {"weight": weight[start:stop].to(device)}
                    for leaf, tensor in tensors.items():
                        if leaf != "weight":
                            stored[leaf] = _scale_rows(
                                algo, leaf, handles[where[tensor]].get_slice(tensor), shape, start, stop, group
                            ).to(device)
                    ref = None
                    if tensors["weight"] in source:
                        ref = handles[source[tensors["weight"]]].get_slice(tensors["weight"])[start:stop].to(device)
                    parts.append((stored, ref))
                return "layer", parts
            ref = handles[source[name]].get_slice(name) if name in source else None
            stored = handles[where[name]].get_slice(name)
            if ref is None or stored.get_shape() != ref.get_shape():
                return "plain", None
            if not stored.get_shape():
                return "plain", [(stored[...].to(device), ref[...].to(device))]
            return "plain", [
                (stored[a:b].to(device), ref[a:b].to(device)) for a, b in _row_chunks(stored.get_shape()[0], rows)
            ]

        plain = [n for n in where if n.rpartition(".")[0] not in quantized]
        for name, (kind, parts) in _read_ahead(quantized + plain, read, workers):
            if kind == "plain":
                if parts is None:
                    continue
                err = sum(float((s.float() - r.float()).square().sum()) for s, r in parts)
                norm = sum(float(r.float().square().sum()) for _, r in parts)
                result["plain_tensors"] += 1
                if err > (PLAIN_ERROR_BOUND**2) * norm:
                    problems.append(
                        f"{name} is stored unquantized but differs from the source (relative error "
                        f"{(err / max(norm, 1e-30)) ** 0.5:.3f})"
                    )
                continue
            algo, group = formats[name]["quant_algo"], formats[name]["group_size"]
            result["formats"][algo] = result["formats"].get(algo, 0) + 1
            if parts[0][1] is None:
                problems.append(f"{name} is stored quantized but the source has no {name}.weight")
                continue
            err = dot = norm = 0.0
            for stored, ref in parts:
                weight = dequantize_weight(algo, stored, group, torch.float32)
                ref = ref.float()
                if weight.shape != ref.shape:
                    problems.append(
                        f"{name} dequantizes to rows of {tuple(weight.shape)}, the source has {tuple(ref.shape)}"
                    )
                    break
                err += float((weight - ref).square().sum())
                dot += float((weight * ref).sum())
                norm += float(ref.square().sum())
            else:
                rel, gain = (err / norm) ** 0.5 if norm else 0.0, dot / norm if norm else 1.0
                stats.append({"layer": name, "quant_algo": algo, "relative_error": rel, "gain": gain})
                worst = result["max_relative_error"].get(algo, 0.0)
                result["max_relative_error"][algo] = max(worst, rel)
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
    if stats:
        result["gain"] = [min(s["gain"] for s in stats), max(s["gain"] for s in stats)]
        result["worst_layers"] = sorted(stats, key=lambda s: -abs(s["gain"] - 1) - s["relative_error"])[:3]
    return result


def _causal_lm_class(config):
    """The transformers class AutoModelForCausalLM would build for `config` (a model given its weights as a
    state_dict is built through its own class: the Auto class wants a checkpoint name then)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    if getattr(config, "vision_config", None) is not None:  # a vision-language model, vision tower included
        classes = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    else:
        classes = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if isinstance(classes, (list, tuple)):
        named = [c for c in classes if c.__name__ in (getattr(config, "architectures", None) or [])]
        classes = (named or classes)[0]
    return classes


def _device(name) -> torch.device:
    """A torch device with its index ("cuda" is the current GPU), as device_map wants it."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
