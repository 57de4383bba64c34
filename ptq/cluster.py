"""The `cluster` group: what a point of a sweep asks Slurm for, and which process of a job this is.

`cluster=slurm` selects the Slurm launcher (hydra_plugins/ptq_slurm_launcher), whose settings are
hydra-submitit-launcher's own schema under `hydra.launcher` (partition, account, mem_gb, timeout_min ...),
extended with what this launcher adds (containers, packing). Resources left unset are derived per point
from hardware, parallelism and model (`derived_request`).

Pure: config in, sbatch parameters out, so it is tested without Slurm or a model. The sweep itself
(points, their checks, grouping, the manifest) is ptq/sweep.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

from ptq.backend_spec import spec_of
from ptq.schema import RunConfig

# Host memory beyond the weights: Python, CUDA context, tokenizer, calibration data.
BASE_HOST_MEM_GB = 16
CPU_BASE_MEM_GB = 4
CPUS_PER_GPU = 8
# A CPU run computes in FP32 (4 bytes a parameter) and holds the model, its quantized copy and
# activations: about 3 copies.
CPU_MEM_COPIES = 3
# Share of a GPU's memory the BF16 weights may take in process (device_map=auto over one node's GPUs): the rest
# holds calibration activations. Measured: the Nemotron 3 Nano shape, 63.2 GB of weights, calibrated at batch 2 on
# one 80 GB H100 with a 68.9 GB peak. Planning refuses a run below this count and a sweep point asks Slurm for it,
# so the two answers to "how many GPUs" are one.
WEIGHTS_GPU_SHARE = 0.9
BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "float16": 2}
# hardware.gpu_memory_gb left at 0 (unknown card): assume an 80 GB one.
DEFAULT_GPU_MEMORY_GB = 80
# hardware.gpu_memory_gb is the card's size as sold; CUDA reports a little less (an 80 GB H100: 79.2 GiB, a
# 141 GB H200: 139.8 GiB), and that is what a run's probe sees.
USABLE_OF_SOLD = 0.99
# In process one job spreads the model over one node's GPUs.
MAX_GPUS_PER_NODE = 8


def gpus_for_weights(weights_gib: float, per_gpu_gib: float) -> int:
    """The fewest GPUs of `per_gpu_gib` each whose WEIGHTS_GPU_SHARE holds `weights_gib` of weights."""
    return max(1, math.ceil(weights_gib / (per_gpu_gib * WEIGHTS_GPU_SHARE)))


def planned_gpu_gib(cfg: RunConfig) -> float:
    """The memory a run will see on each GPU of hardware (GiB), before it can probe them: the card's usable memory
    (an 80 GB card when hardware.gpu_memory_gb is 0), or backend.max_gpu_memory_gb where that cap is lower."""
    card = (cfg.hardware.gpu_memory_gb or DEFAULT_GPU_MEMORY_GB) * USABLE_OF_SOLD
    cap = cfg.backend.max_gpu_memory_gb
    return min(card, cap) if cap else card


def in_process_gpus(cfg: RunConfig) -> int:
    """GPUs an in-process run of cfg needs on hardware: the count below which planning refuses it."""
    return gpus_for_weights(weights_gib(cfg), planned_gpu_gib(cfg))


def weights_gib(cfg: RunConfig, params: Optional[float] = None) -> float:
    """The model's weights in hardware.dtype, in GiB: `params` (counted from local files) or model.params_b."""
    return (params or cfg.model.params_b * 1e9) * BYTES_PER_WEIGHT[cfg.hardware.dtype] / 2**30


@dataclass(frozen=True)
class Request:
    """One Slurm allocation: what every job of a point asks for."""

    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: int
    mem_gb: int
    timeout_min: int

    def as_dict(self) -> Dict[str, int]:
        return dict(self.__dict__)


def derived_request(cfg: RunConfig) -> Request:
    """Resources a point needs, from hardware, parallelism, model and backend (before overrides)."""
    model, hw = cfg.model, cfg.hardware
    bf16_gb = model.params_b * 2  # 2 bytes a parameter
    if hw.device == "cpu":
        return Request(
            nodes=1,
            gpus_per_node=0,
            tasks_per_node=1,
            cpus_per_task=2,
            mem_gb=math.ceil(model.params_b * 4 * CPU_MEM_COPIES + CPU_BASE_MEM_GB),
            timeout_min=60 + math.ceil(model.params_b * 60),
        )
    layout = spec_of(cfg).slurm_layout(cfg)
    if layout is not None:  # the backend's parallel layout fixes the GPUs
        nodes, gpus = layout
    else:
        # One process spreads the model over the node's GPUs (device_map=auto): as many as planning requires (more
        # than a node has is refused by check_request).
        nodes = 1
        gpus = min(MAX_GPUS_PER_NODE, in_process_gpus(cfg))
    return Request(
        nodes=nodes,
        gpus_per_node=gpus,
        tasks_per_node=1,
        cpus_per_task=CPUS_PER_GPU * gpus,
        mem_gb=math.ceil(bf16_gb * 1.5 / nodes) + BASE_HOST_MEM_GB,
        timeout_min=60 + math.ceil(model.params_b * 2),
    )


# The resource keys of hydra.launcher (hydra-submitit-launcher's Slurm schema) that, left unset, are derived
# per point; and the sbatch options passed through as set.
REQUEST_KEYS = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min")
PASSED_THROUGH = (
    "partition",
    "account",
    "qos",
    "constraint",
    "exclude",
    "comment",
    "gres",
    "cpus_per_gpu",
    "gpus_per_task",
    "mem_per_gpu",
    "mem_per_cpu",
)


def request_for(cfg: RunConfig, launcher: Mapping) -> Request:
    """The derived request with the values set in `launcher` (hydra.launcher) on top."""
    derived = derived_request(cfg)
    return Request(
        **{key: getattr(derived, key) if launcher.get(key) is None else launcher[key] for key in REQUEST_KEYS}
    )


def check_request(cfg: RunConfig, request: Request) -> Optional[str]:
    """Why `request` cannot run this point (None if it can). Catches settings that undercut the layout."""
    par = cfg.parallelism
    if cfg.hardware.device == "cuda" and request.gpus_per_node < 1:
        return (
            f"hardware={cfg.hardware.name} needs GPUs but hydra.launcher.gpus_per_node={request.gpus_per_node}; "
            "remove that setting or set it to at least 1."
        )
    if cfg.hardware.device == "cuda" and spec_of(cfg).slurm_layout(cfg) is None:
        need = in_process_gpus(cfg)
        if need > MAX_GPUS_PER_NODE:
            return (
                f"in process, {cfg.model.name}'s {weights_gib(cfg):.0f} GiB of {cfg.hardware.dtype} weights need {need} "
                f"GPUs of hardware={cfg.hardware.name}, more than the {MAX_GPUS_PER_NODE} of one node; use "
                "backend=megatron_bridge with a parallelism that spreads it over nodes."
            )
        if request.gpus_per_node < need:
            return (
                f"in process, {cfg.model.name}'s {weights_gib(cfg):.0f} GiB of {cfg.hardware.dtype} weights need at "
                f"least {need} GPUs of hardware={cfg.hardware.name} ({planned_gpu_gib(cfg):.0f} GiB each, "
                f"{WEIGHTS_GPU_SHARE:.0%} of it for weights), but hydra.launcher.gpus_per_node={request.gpus_per_node}; "
                "remove that setting or raise it."
            )
    if not spec_of(cfg).one_process:
        world = par.nodes * par.gpus_per_node
        got = request.nodes * request.gpus_per_node
        if got != world:
            return (
                f"parallelism={par.name} runs on {par.nodes} node(s) x {par.gpus_per_node} GPUs = {world}, but the Slurm "
                f"request is {request.nodes} x {request.gpus_per_node} = {got}; drop the hydra.launcher.nodes/"
                "gpus_per_node settings or change the parallelism."
            )
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min"):
        if getattr(request, key) < 1:
            return f"hydra.launcher.{key}={getattr(request, key)} must be at least 1."
    return None


def sbatch_parameters(launcher: Mapping, request: Request, job_name: str) -> Dict:
    """Parameters for submitit's SlurmExecutor.update_parameters (sbatch options by their submitit names)."""
    params: Dict = {
        "job_name": job_name,
        "nodes": request.nodes,
        "ntasks_per_node": request.tasks_per_node,
        "cpus_per_task": request.cpus_per_task,
        "mem": f"{request.mem_gb}GB",
        "time": request.timeout_min,
        "array_parallelism": launcher.get("array_parallelism", 64),
        "signal_delay_s": launcher.get("signal_delay_s", 120),
    }
    if request.gpus_per_node:
        params["gpus_per_node"] = request.gpus_per_node
    for key in PASSED_THROUGH:
        if launcher.get(key) is not None:
            params[key] = launcher[key]
    if launcher.get("stderr_to_stdout"):
        params["stderr_to_stdout"] = True
    if launcher.get("additional_parameters"):
        params["additional_parameters"] = dict(launcher["additional_parameters"])
    setup = list(launcher.get("setup") or [])
    if request.nodes > 1:
        # torchrun's rendezvous on the first node of the allocation (Slurm sets no MASTER_ADDR).
        setup.append('export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"')
    if setup:
        params["setup"] = setup
    srun_args = list(launcher.get("srun_args") or [])
    if launcher.get("container_image"):
        # Pyxis/enroot: srun starts every task inside the container.
        srun_args.append(f"--container-image={launcher['container_image']}")
        if launcher.get("container_mounts"):
            srun_args.append(f"--container-mounts={','.join(launcher['container_mounts'])}")
        srun_args.append("--container-workdir=" + (launcher.get("container_workdir") or "/workspace"))
    if srun_args:
        params["srun_args"] = srun_args
    return params


def job_name(cfg: RunConfig) -> str:
    return f"ptq-{cfg.model.name}-{cfg.recipe.name}"


def process_rank(env: Mapping[str, str]) -> int:
    """This process's rank among the job's launcher processes: the global rank when the scheduler started
    every rank (WORLD_SIZE and RANK set), else the Slurm task (one per node), else 0."""
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"])
    return int(env.get("SLURM_PROCID", "0"))
