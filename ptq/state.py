"""What the runs of one process keep for the runs after them.

A Hydra sweep (the basic launcher) and a packed Slurm job run several points in one process. What one point
computed that the next can use stays in one ProcessState, made by the entry point (launch.py) and passed down to
the code that fills it: nothing is kept in module globals. A run given no state keeps nothing for another run.

Not here, because it is not state of the process: files under cache_dir (converted GGUF models, tokenized text,
ModelOpt's CUDA extension builds, the BF16 benchmark baselines), which every process on the machine shares, and
memos of pure functions over constants or file versions (ptq/textfiles.py's checks, the FP4 code table).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict


@dataclass
class ProcessState:
    # The pristine BF16 model of the latest load with reuse on, by load settings: (model, tokenizer, checkpoint);
    # one entry at most (ptq/models.py). Runs quantize copies of it; QAD uses it as its teacher.
    models: Dict[tuple, tuple] = field(default_factory=dict)
    # How often this process read a model from disk, and how often a run got a copy of a kept one instead.
    loads: Dict[str, int] = field(default_factory=lambda: {"disk": 0, "copy": 0})
    # Token ids of text files, by file version, tokenizer and shape (ptq/calib_data.py); four entries at most.
    tokens: Dict[str, Any] = field(default_factory=dict)
    # The latest BF16 fidelity reference, by model, inputs and batch size (ptq/fidelity.py); one entry at most.
    references: Dict[tuple, Any] = field(default_factory=dict)
    # The largest calibration batch the memory probe found, by model, device and batch shape (in-process backend).
    batch_sizes: Dict[tuple, int] = field(default_factory=dict)
    # Whether a load keeps the pristine BF16 model for later runs (backend.reuse_loaded_model). Only worth its
    # memory when more runs follow: launch.py turns it off for a single run, whose calibration then gets the room
    # a second copy would take (measured: a 13-layer Nemotron 3 Nano shape on an H100 kept a 13.9 GiB copy).
    keep_models: bool = True

    def clear(self) -> None:
        """Forget everything (the caller frees the memory: ptq/models.py clear_model_cache)."""
        self.models.clear()
        self.tokens.clear()
        self.references.clear()
        self.batch_sizes.clear()

    def summary(self) -> dict:
        """What is kept, by count (for logs and tests)."""
        return {
            "models": len(self.models),
            "loads": dict(self.loads),
            "tokens": len(self.tokens),
            "references": len(self.references),
            "batch_sizes": len(self.batch_sizes),
        }
