"""The read-back: a model built from the export's plain tensors, whose quantized linear layers get their weights
dequantized from the stored codes and scales and a hook that quantizes their input as the export says."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ptq.errors import ConfigError
from ptq.exported.dequantize import SUPPORTED, dequantize_weight, input_transform
from ptq.exported.reading import index_export, read_ahead, tensor_files, tensors_by_module
from ptq.layerkinds import match_names

log = logging.getLogger(__name__)

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


def simulate(model, export_dir: Path, workers: int = 4) -> Simulation:
    """Give every quantized linear layer of `model` (loaded from the export without its scales) the stored numbers.

    Each layer's codes and scales are read onto the device of its weight and dequantized there; `workers`
    threads read the next layers from the files while the current one is dequantized.
    """
    from safetensors import safe_open

    export_dir = Path(export_dir)
    index = index_export(export_dir)
    quant, where, by_module, quantized, formats = (
        index.quant,
        index.where,
        index.by_module,
        index.quantized,
        index.formats,
    )
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

        for name, stored in read_ahead(quantized, read, workers):
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
    quantized = {m for m, t in tensors_by_module(where).items() if "weight_scale" in t}
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
