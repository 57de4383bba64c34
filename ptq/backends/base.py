"""The interface every backend implements."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, MutableMapping, Optional, Protocol

from ptq.plan import Plan
from ptq.record_parts import StageTimer
from ptq.state import ProcessState


@dataclass
class BackendResult:
    # Parameter bytes of the BF16 model (2 bytes per parameter).
    bf16_bytes: int
    # Module names whose weights the recipe quantized (each must carry scales in the export).
    quantized_layers: List[str] = field(default_factory=list)
    # Modules left unquantized on purpose (an exclude pattern names them).
    excluded_layers: List[str] = field(default_factory=list)
    # Modules left unquantized that no exclude pattern names: the failure to report.
    unexpected_bf16: List[str] = field(default_factory=list)
    fidelity: Optional[dict] = None
    # {"suite", "results": [...], "baseline": [...]}: benchmark scores of this model and of BF16.
    evaluation: Optional[dict] = None
    details: dict = field(default_factory=dict)
    # Training after PTQ (recover=qat|qad, ptq/recover.py): what it did, and the PTQ fidelity before it.
    recovery: Optional[dict] = None


class Backend(Protocol):
    name: str

    def run(self, plan: Plan, export_dir: Path, timer: StageTimer, state: ProcessState) -> BackendResult:
        """Load, calibrate, quantize and export into `export_dir` (a fresh folder the caller renames when valid).
        `state`: what the runs of this process keep for each other (ptq/state.py)."""
        ...

    # What `run` would do is described from the plan alone, without the backend's stack: ptq/backends/describe.py.
    # A backend that runs on several processes (megatron_bridge) also has `run_worker(plan) -> dict`: what a
    # task of rank > 0 does (take part in the distributed steps, write nothing). ptq.run refuses other
    # backends on such tasks.


EXTENSIONS_VAR = "TORCH_EXTENSIONS_DIR"


def use_extension_cache(cache_dir: str, env: MutableMapping[str, str] = os.environ) -> str:
    """Point PyTorch's build cache of C++/CUDA extensions (ModelOpt builds its quantization kernels on first
    use: about 80 s on a fresh GPU machine) at cache_dir, keyed by what a build depends on, unless
    TORCH_EXTENSIONS_DIR is already set. With cache_dir on a shared file system every job of a sweep, on any
    node of the same kind, reuses the first build. Returns the folder."""
    if env.get(EXTENSIONS_VAR):
        return env[EXTENSIONS_VAR]
    import torch

    arch = "".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else "none"
    # The architectures nvcc compiles for come from TORCH_CUDA_ARCH_LIST, which ModelOpt sets to the GPU's own
    # ("9.0") only when it is unset; where a process (or its parent) had it set differently, or torch's own
    # default ("9.0+PTX") applied, the same build folder saw two compile commands and ninja rebuilt the
    # extensions each time the command changed (3 of 13 processes on an H100). One value per GPU kind, set
    # here, and any other value in the folder's name, keep every build key stable.
    if arch != "none" and not env.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    arch_list = re.sub(r"[^0-9A-Za-z.+]+", "_", env.get("TORCH_CUDA_ARCH_LIST", "")) or "default"
    key = (
        f"torch{torch.__version__.split('+')[0]}-cuda{torch.version.cuda or 'none'}-sm{arch}"
        f"-arch{arch_list}-py{sys.version_info.major}{sys.version_info.minor}"
    )
    env[EXTENSIONS_VAR] = str(Path(os.path.expanduser(cache_dir)) / "torch_extensions" / key)
    return env[EXTENSIONS_VAR]


def cpu_threads(env: MutableMapping[str, str] = os.environ, affinity: Optional[int] = None) -> Optional[int]:
    """How many threads PyTorch should use on the CPU: the CPUs this process may run on (its affinity mask, as
    taskset and cgroup-aware schedulers set it), no more than Slurm's cpus-per-task; None when OMP_NUM_THREADS
    already says (the user's choice stands). PyTorch's own default counts the machine's cores, so two runs
    sharing a node each take all of them and slow each other down many times over."""
    if env.get("OMP_NUM_THREADS"):
        return None
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    return max(1, min(affinity, int(slurm))) if slurm.isdigit() and int(slurm) > 0 else max(1, affinity)


def limit_cpu_threads() -> Optional[int]:
    """Set PyTorch's thread count to cpu_threads(); returns what it set (None: left alone)."""
    threads = cpu_threads()
    if threads is not None:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return threads
