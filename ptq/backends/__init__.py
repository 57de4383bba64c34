"""Backends: where the quantization runs. Each one is a small class (ptq/backends/base.py's `Backend`).

The registry names each backend's class instead of importing it: a backend pulls in its whole stack
(torch and ModelOpt, or the Megatron tooling), which planning, dry runs and sweep submission never need.
This is the one place the project imports its own code by name at run time. What a backend would run is
described without it (describe.py), so a dry run imports no torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional

from ptq import recipe_files
from ptq.backends.base import Backend, BackendResult, use_extension_cache
from ptq.backends.describe import DESCRIBERS, describe_steps
from ptq.errors import ConfigError

log = logging.getLogger(__name__)

REGISTRY = {
    "hf_modelopt": "ptq.backends.hf_modelopt:HFModelOptBackend",
    "megatron_bridge": "ptq.backends.megatron_bridge:MegatronBridgeBackend",
}


def get_backend(name: str) -> Backend:
    if name not in REGISTRY:
        raise ConfigError(f"backend={name} is unknown; choose one of: {', '.join(REGISTRY)}.")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def applies_one_config(plan) -> bool:
    """The run hands ModelOpt one quantization config in this process (the in-process backend, a quantized
    one-format recipe): what check_before_run checks and a dry run prints."""
    cfg = plan.cfg
    return cfg.backend.name == "hf_modelopt" and plan.quantize and not cfg.recipe.candidates


def check_before_run(plan) -> None:
    """What a backend checks with its own stack before the run takes its output folder, so that a refusal leaves
    nothing behind: the in-process backend builds its ModelOpt config, whose config classes check the values of
    recipe.algorithm_args (`alpha=banana`), recipe.modelopt_cfg, a rotation's package, and on MoE models the
    calibration algorithm the config brings. Imports torch and
    ModelOpt (on a thread of their own, as the backend does), so real runs do it, not dry runs."""
    cfg = plan.cfg
    if not applies_one_config(plan):
        return
    backend = importlib.import_module(REGISTRY["hf_modelopt"].partition(":")[0])
    use_extension_cache(cfg.cache_dir)
    backend.import_modelopt()
    recipes = importlib.import_module("ptq.recipes")
    quant_cfg = recipes.build_quant_config(cfg.recipe, plan.exclude_patterns, plan.awq_block_size)
    recipes.check_fused_experts(cfg.recipe, cfg.model, quant_cfg)
    if cfg.recipe.modelopt_recipe:  # a recipe file's formats are known only now, from its loaded entries
        formats = recipes.formats_of(quant_cfg)
        unknown = [f for f in formats if f not in recipes.CHECKED_FORMATS]
        if unknown:
            raise ConfigError(
                f"recipe.modelopt_recipe={cfg.recipe.modelopt_recipe} computes in {', '.join(unknown)}, which this launcher "
                f"does not calibrate and validate (it handles {', '.join(recipes.CHECKED_FORMATS)}; ModelOpt 0.47 exports "
                "MXFP4 as quant_algo mxfp4, which no serving engine's ModelOpt loader reads); pick another recipe file."
            )
        cannot = [f for f in formats if f not in cfg.hardware.calibrate]
        if cannot:
            raise ConfigError(
                f"recipe.modelopt_recipe={cfg.recipe.modelopt_recipe} computes in {', '.join(cannot)}, which "
                f"ModelOpt cannot calibrate on hardware={cfg.hardware.name} (it calibrates "
                f"{', '.join(cfg.hardware.calibrate)}); run it on a GPU hardware option, or pick another recipe."
            )


def resolved_recipe(plan) -> Optional[dict]:
    """The configuration a one-format in-process run hands ModelOpt (the recipe file it writes beside the checkpoint),
    for dry runs; None where there is none to show: BF16, a per-layer search (its choice is made on the model),
    Megatron-Bridge (it takes the recipe by name), or no ModelOpt installed here (a login node that only submits).
    Imports ModelOpt (and torch), so dry runs pay that once, after planning."""
    cfg = plan.cfg
    if not applies_one_config(plan):
        return None
    try:
        recipes = importlib.import_module("ptq.recipes")
        quant_cfg = recipes.build_quant_config(cfg.recipe, plan.exclude_patterns, plan.awq_block_size)
    except ImportError as exc:
        log.info("ModelOpt cannot be imported here (%s): the resolved configuration is not shown", exc)
        return None
    return recipe_files.applied_recipe(quant_cfg, f"{cfg.recipe.name} as it would be applied to {cfg.model.name}")


__all__ = [
    "Backend",
    "BackendResult",
    "DESCRIBERS",
    "REGISTRY",
    "check_before_run",
    "describe_steps",
    "get_backend",
    "resolved_recipe",
]
