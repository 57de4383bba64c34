"""What each backend is, for the modules that plan, place and check a run without running it (ptq/plan.py,
ptq/cluster.py, ptq/inputs.py, ptq/run.py, the report): torch-free, nothing here imports a backend's stack. The
backends themselves (ptq/backends/) are imported only to run. Adding a backend means a spec here and a runner
there; no other module compares a backend's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from ptq.errors import ConfigError
from ptq.formats import export_algos
from ptq.schema import RunConfig

# The backend a variant label does not name (the report; ptq/report/read.py variant_label).
DEFAULT = "hf_modelopt"


# The quant_algo values ModelOpt's Megatron-Core export (export_mcore_gpt_to_hf, which Megatron-Bridge's
# export.py calls) writes (ptq/formats.py). tests/test_megatron.py reads the installed ModelOpt's source to
# notice when this changes.
MEGATRON_EXPORT_ALGOS = export_algos(megatron_export=True)


def check_megatron_layout(cfg: RunConfig) -> None:
    """Refuse recipes and parallel layouts Megatron-Bridge cannot run or export, before anything is submitted."""
    par, model, recipe = cfg.parallelism, cfg.model, cfg.recipe
    if recipe.algorithm is not None or recipe.algorithm_args:
        raise ConfigError(
            f"recipe.algorithm / recipe.algorithm_args apply to backend=hf_modelopt: backend=megatron_bridge calibrates "
            f"with the config its --export-quant-cfg {recipe.megatron_cfg} names. Remove them, or use backend=hf_modelopt."
        )
    if recipe.megatron_cfg is None:
        raise ConfigError(
            f"recipe={recipe.name} has no Megatron-Bridge --export-quant-cfg name, so backend=megatron_bridge cannot run it; "
            "use backend=hf_modelopt or a recipe such as fp8, nvfp4, fp8_blockwise or mamba_moe_nvfp4_conservative."
        )
    algo = recipe.export_quant_algo
    if algo is not None and algo.upper() not in MEGATRON_EXPORT_ALGOS:
        raise ConfigError(
            f"recipe={recipe.name} exports as {algo}, which ModelOpt's Megatron-Core export cannot write (it writes "
            f"{', '.join(MEGATRON_EXPORT_ALGOS)}; SmoothQuant and AWQ scales are refused or dropped). Quantize this "
            "recipe with backend=hf_modelopt, or use recipe=fp8, nvfp4 or fp8_blockwise with backend=megatron_bridge."
        )
    if cfg.hardware.device != "cuda":
        raise ConfigError(
            f"backend=megatron_bridge runs on CUDA GPUs under torchrun; hardware={cfg.hardware.name} has none "
            "(choose e.g. hardware=h100)."
        )
    sizes = {
        "tp": par.tp,
        "pp": par.pp,
        "ep": par.ep,
        "etp": par.etp,
        "nodes": par.nodes,
        "gpus_per_node": par.gpus_per_node,
    }
    bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
    if bad:
        raise ConfigError(f"parallelism.{', '.join(bad)}: every size must be at least 1.")
    world = par.nodes * par.gpus_per_node
    if world % (par.tp * par.pp):
        raise ConfigError(
            f"parallelism={par.name}: tp x pp = {par.tp * par.pp} does not divide the world size "
            f"{par.nodes} nodes x {par.gpus_per_node} GPUs = {world}; change tp/pp or the GPU count."
        )
    if world % (par.pp * par.ep * par.etp):
        raise ConfigError(
            f"parallelism={par.name}: pp x ep x etp = {par.pp * par.ep * par.etp} does not divide the world size {world}; "
            "Megatron places each expert-parallel group inside one pipeline stage."
        )
    if model.num_experts and model.num_experts % par.ep:
        raise ConfigError(f"parallelism.ep={par.ep} does not divide the {model.num_experts} experts of {model.name}.")
    if par.ep > 1 and (model.arch == "dense" or model.num_experts == 0):
        raise ConfigError(
            f"parallelism.ep={par.ep} needs a mixture-of-experts model; {model.name} has no routed experts (use ep=1)."
        )
    if model.mamba_ngroups and model.mamba_ngroups % par.tp:
        raise ConfigError(
            f"parallelism.tp={par.tp} does not divide the {model.mamba_ngroups} Mamba groups of {model.name}."
        )


def check_megatron_calib(cfg: RunConfig) -> None:
    """Megatron-Bridge's quantize.py calibrates on text it reads itself: a file or a dataset name (a file is
    checked with every other input, ptq/inputs.py)."""
    spec = cfg.calib.dataset
    if spec == "self":
        raise ConfigError(
            "calib.dataset=self samples calibration text from the BF16 model in this process, which "
            "backend=megatron_bridge does not load: give a local .txt or .jsonl file (e.g. "
            "calib.dataset=/data/wikitext-2/valid.txt) or a dataset name ModelOpt knows (e.g. cnn_dailymail, "
            "which needs the Hugging Face Hub)."
        )


# Share of one GPU the BF16 model may take when a Megatron-Bridge export is measured (the rest: activations,
# the fidelity reference's log-probabilities, lm-eval's batches).
MEASURE_GPU_SHARE = 0.8


def export_measurement(cfg: RunConfig) -> str:
    """For the Megatron-Bridge backend: "measure", "off" (fidelity and eval disabled), or "skip: <why>"."""
    if cfg.backend.name != "megatron_bridge" or not (cfg.fidelity.enabled or cfg.eval.enabled):
        return "off"
    need_gb = cfg.model.params_b * 2
    room_gb = cfg.hardware.gpu_memory_gb * MEASURE_GPU_SHARE
    if cfg.hardware.device == "cuda" and room_gb and need_gb > room_gb:
        return (
            f"skip: fidelity and eval of the exported checkpoint are skipped: reading it back needs the BF16 "
            f"model ({need_gb:.0f} GB) on one GPU, and {cfg.hardware.name} offers {room_gb:.0f} GB of its "
            f"{cfg.hardware.gpu_memory_gb:.0f} GB; set fidelity=none eval=none to silence this."
        )
    return "measure"


def _hf_check(cfg: RunConfig, warnings: List[str]) -> None:
    if (cfg.parallelism.tp, cfg.parallelism.pp, cfg.parallelism.ep) != (1, 1, 1):
        warnings.append(
            f"parallelism={cfg.parallelism.name} is ignored by the hf_modelopt backend, which runs one process "
            "and spreads a large model over the visible GPUs with device_map=auto."
        )


# Sequences per recovery step when recover.batch_size is 0 (Megatron-Bridge: micro-batches of one, gradients
# accumulated up to it).
RECOVER_BATCH_CPU = 8
RECOVER_BATCH_GPU = 16


def recover_batch(cfg: RunConfig) -> int:
    """Sequences per recovery (QAT/QAD) step."""
    return cfg.recover.batch_size or (RECOVER_BATCH_CPU if cfg.hardware.device == "cpu" else RECOVER_BATCH_GPU)


def recover_rows(cfg: RunConfig) -> int:
    """Rows of recover.seq_len tokens of training text: recover.samples, or one fresh row per sequence trained."""
    return cfg.recover.samples or cfg.recover.steps * recover_batch(cfg)


# distill.py splits its data 99/1/0 into training and validation: fewer rows leave the validation split empty.
QAD_MIN_ROWS = 100


def check_megatron_recover(cfg: RunConfig) -> None:
    """QAT's and QAD's global batch is split into micro-batches of one sequence over the data-parallel ranks;
    QAD is ModelOpt's distill.py, whose loss and schedule are fixed."""
    rec = cfg.recover
    if rec.method == "none":
        return
    if rec.method == "qad":
        fixed = {
            "recover.schedule": (str(rec.schedule), "cosine"),
            "recover.temperature": (rec.temperature, 1.0),
        }
        for key, (given, only) in fixed.items():
            if given != only:
                raise ConfigError(
                    f"{key}={given}: recover=qad with backend=megatron_bridge runs ModelOpt's distill.py, whose "
                    f"logit KL and learning-rate schedule are fixed ({key}={only}); set {key}={only}, or use "
                    "backend=hf_modelopt."
                )
        if cfg.parallelism.etp != 1:
            raise ConfigError(
                f"parallelism.etp={cfg.parallelism.etp}: ModelOpt's distill.py (recover=qad with "
                "backend=megatron_bridge) always runs the experts at tensor parallelism 1; set parallelism.etp=1."
            )
        rows = recover_rows(cfg)
        if rows < QAD_MIN_ROWS:
            raise ConfigError(
                f"recover=qad with backend=megatron_bridge trains on {rows} rows (recover.steps x batch), and "
                f"ModelOpt's distill.py sets 1% of them aside as a validation split, which must not be empty: give "
                f"at least {QAD_MIN_ROWS} rows (e.g. recover.samples={QAD_MIN_ROWS})."
            )
    par = cfg.parallelism
    data_parallel = par.nodes * par.gpus_per_node // (par.tp * par.pp)
    batch = recover_batch(cfg)
    if data_parallel and batch % data_parallel:
        raise ConfigError(
            f"recover.batch_size={batch} sequences per step cannot be split over the {data_parallel} data-parallel "
            f"ranks of parallelism={par.name}; give a multiple of {data_parallel} (e.g. "
            f"recover.batch_size={data_parallel * max(1, batch // data_parallel)})."
        )


def _megatron_check(cfg: RunConfig, warnings: List[str]) -> None:
    check_megatron_layout(cfg)
    check_megatron_calib(cfg)
    check_megatron_recover(cfg)


def _off(cfg: RunConfig) -> str:
    return "off"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    # One process spreads the model over the node's GPUs (device_map=auto); otherwise one process per GPU of
    # the parallel layout (torchrun), whose other ranks take part through the runner's run_worker.
    one_process: bool
    # Fidelity is measured on the model in this process (so its held-out text is read here).
    measures_in_memory: bool
    # Runs ModelOpt recipe files (recipe.modelopt_recipe); a per-GPU weight cap.
    recipe_files: bool
    gpu_memory_cap: bool
    # The training after PTQ it runs (recover.method values besides none), and whether its training text may be
    # "self" (sampled from the BF16 model in this process).
    recovery: Tuple[str, ...]
    self_text: bool
    # Quantizes the language model of a vision-language model (model.vision_language, ptq/vlm.py).
    vision_language: bool
    # The AWQ block size the backend always uses (None: the launcher picks one that divides every width).
    awq_block: Optional[int]
    # Quantizes routed experts as transformers 5 keeps them, fused in 3-D weights (ptq/formats.py
    # fused_expert_problem applies); Megatron-Bridge builds its own expert layers.
    fused_experts: bool
    # Its own refusals and warnings when planning.
    check: Callable[[RunConfig, List[str]], None]
    # "measure", "off" or "skip: <why>": whether the written checkpoint is read back and measured apart from
    # the model in memory (export_measurement).
    export_measurement: Callable[[RunConfig], str]

    def slurm_layout(self, cfg: RunConfig) -> Optional[Tuple[int, int]]:
        """(nodes, GPUs per node) the backend's layout fixes for a Slurm request; None: derived from the model."""
        return None if self.one_process else (cfg.parallelism.nodes, cfg.parallelism.gpus_per_node)


SPECS: Dict[str, BackendSpec] = {
    "hf_modelopt": BackendSpec(
        name="hf_modelopt",
        one_process=True,
        measures_in_memory=True,
        recipe_files=True,
        recovery=("qat", "qad"),
        self_text=True,
        gpu_memory_cap=True,
        vision_language=True,
        awq_block=None,
        fused_experts=True,
        check=_hf_check,
        export_measurement=_off,
    ),
    "megatron_bridge": BackendSpec(
        name="megatron_bridge",
        one_process=False,
        measures_in_memory=False,
        recipe_files=False,
        recovery=("qat", "qad"),
        self_text=False,
        gpu_memory_cap=False,
        vision_language=False,
        awq_block=128,
        fused_experts=False,
        check=_megatron_check,
        export_measurement=export_measurement,
    ),
}


def spec_of(cfg: RunConfig) -> BackendSpec:
    name = cfg.backend.name
    if name not in SPECS:
        raise ConfigError(f"backend={name} is unknown; choose one of: {', '.join(SPECS)}.")
    return SPECS[name]
