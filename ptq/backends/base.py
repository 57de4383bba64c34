"""The interface every backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Protocol

from ptq.plan import Plan
from ptq.record import StageTimer


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


class Backend(Protocol):
    name: str

    def run(self, plan: Plan, export_dir: Path, timer: StageTimer) -> BackendResult:
        """Load, calibrate, quantize and export into `export_dir` (a fresh folder the caller renames when valid)."""
        ...

    # A backend that runs on several processes (megatron_bridge) also has `run_worker(plan) -> dict`: what a
    # task of rank > 0 does (take part in the distributed steps, write nothing). ptq.run refuses other
    # backends on such tasks.

    def describe(self, plan: Plan) -> List[str]:
        """What `run` would do, one line per step, for dry runs: loads, launches and writes nothing."""
        ...
