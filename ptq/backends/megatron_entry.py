"""Entry point that runs one of Megatron-Bridge's quantization scripts (or the launcher's QAT script, or ModelOpt's
distill.py for QAD) under torchrun.

    torchrun ... ptq/backends/megatron_entry.py SCRIPT.py [script arguments]

It runs SCRIPT.py as `__main__` with the script's folder first on sys.path (the scripts import their
helpers, `quantize_utils` or `_distillation_provider`, from there), after one compatibility setting:

Megatron-Bridge 0.6 turns `gradient_accumulation_fusion` on whenever Transformer Engine imports, but
Megatron-Core's plain `ColumnParallelLinear` (the output layer) then needs APEX's
`fused_weight_gradient_mlp_cuda` extension and refuses to build the model without it. The NeMo
container has APEX; a pip installation does not. The fusion only speeds up weight-gradient
accumulation in training, which quantization never runs and which a ModelOpt-quantized model cannot use
(the QAT and QAD scripts turn it off themselves), so when APEX's extension is missing the setting is forced
off for every model config this process builds. With APEX present nothing changes.

This file imports only the standard library at module level: it must start under any interpreter
that can run the scripts themselves.
"""

from __future__ import annotations

import os
import runpy
import sys

# Printed once by rank 0 so the launcher can record what was changed.
FUSION_OFF_NOTE = (
    "ptq: gradient_accumulation_fusion forced off (APEX's fused_weight_gradient_mlp_cuda is not installed)"
)
# What Megatron-Bridge's quantization scripts import (checked before they start, so a missing part is named).
REQUIRED_MODULES = {
    "megatron.bridge": "megatron-bridge",
    "megatron.core": "megatron-core",
    "transformer_engine": "transformer-engine",
    "modelopt": "nvidia-modelopt",
}
# What Megatron-Core's Mamba layers import besides (Nemotron-H, Nemotron 3): CUDA packages built from source
# (scripts/mamba-wheels.sh). The launcher sets MAMBA_ENV=1 for models with Mamba layers.
MAMBA_MODULES = {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}
MAMBA_ENV = "PTQ_MAMBA_MODEL"
MISSING_EXIT = 3
# A helper module beside the scripts that marks their folder as one whose imports are checked first.
SCRIPT_HELPERS = ("quantize_utils.py", "_distillation_provider.py")


def missing_modules(mamba: bool = False) -> list:
    """Distributions (pip names) of the modules the scripts need that this interpreter cannot find."""
    import importlib.util

    missing = []
    for module, dist in {**REQUIRED_MODULES, **(MAMBA_MODULES if mamba else {})}.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(dist)
    return missing


def apex_wgrad_available() -> bool:
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def force_wgrad_fusion_off() -> bool:
    """Patch Megatron-Core's config post-init so gradient_accumulation_fusion is always False.

    Returns whether the patch was applied (False when Megatron-Core is not importable: the script
    will then fail with its own import error)."""
    try:
        from megatron.core.model_parallel_config import ModelParallelConfig
    except ImportError:
        return False
    original = ModelParallelConfig.__post_init__
    if getattr(original, "_ptq_wgrad_off", False):
        return True

    def post_init(self):
        # Every Megatron config (TransformerConfig, the bridge's providers) reaches this through super().
        self.gradient_accumulation_fusion = False
        original(self)

    post_init._ptq_wgrad_off = True
    ModelParallelConfig.__post_init__ = post_init
    return True


def main(argv) -> None:
    if not argv:
        sys.exit("usage: megatron_entry.py SCRIPT.py [arguments]")
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        sys.exit(f"megatron_entry: {script} does not exist")
    # Megatron-Bridge's quantization folder, or ModelOpt's examples/megatron_bridge (distill.py, recover=qad).
    if any(os.path.isfile(os.path.join(os.path.dirname(script), h)) for h in SCRIPT_HELPERS):
        missing = missing_modules(mamba=os.environ.get(MAMBA_ENV) == "1")
        if missing:
            mamba = [d for d in missing if d in MAMBA_MODULES.values()]
            print(
                f"ptq: {sys.executable} lacks {', '.join(missing)}, which the Megatron scripts need"
                f"{' for this model (Mamba layers)' if mamba else ''}. Install them on a CUDA machine with Python "
                "3.12: pip install -e '.[megatron]' in the launcher's checkout, or bash scripts/install-offline.sh "
                "WHEELHOUSE --megatron without internet (docs/megatron.md)"
                + (
                    "; mamba-ssm and causal-conv1d compile against the installed torch: build their wheels on the "
                    "GPU host with scripts/mamba-wheels.sh"
                    if mamba
                    else ""
                )
                + "; inside the NeMo container they are already there.",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(MISSING_EXIT)
    if not apex_wgrad_available() and force_wgrad_fusion_off() and os.environ.get("RANK", "0") == "0":
        print(FUSION_OFF_NOTE, flush=True)
    sys.argv = [script, *argv[1:]]
    # As if the script had been started itself: its folder, not this one, comes first on sys.path.
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        sys.path[0] = os.path.dirname(script)
    else:
        sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
