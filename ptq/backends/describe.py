"""What a backend would run, from the plan alone, for dry runs and sweep dry runs: one line per step. Nothing
here imports torch, ModelOpt or Megatron, or loads, launches or writes anything."""

from __future__ import annotations

from typing import Callable, Dict, List

from ptq import vlm
from ptq.backends import megatron_steps
from ptq.plan import Plan


def in_process(plan: Plan) -> List[str]:
    cfg = plan.cfg
    block = f", AWQ block {plan.awq_block_size}" if plan.awq_block_size else ""
    how = cfg.recipe.modelopt_cfg or (
        f"ModelOpt recipe {cfg.recipe.modelopt_recipe}" if cfg.recipe.modelopt_recipe else "nothing (BF16)"
    )
    if cfg.recipe.candidates:
        how = (
            f"a per-layer choice of {', '.join(cfg.recipe.candidates)} or BF16 (mtq.auto_quantize, "
            f"{cfg.recipe.effective_bits} effective bits, {cfg.recipe.score_method} scores)"
        )
    rec = cfg.recover
    train = ""
    if rec.method != "none":
        batch = rec.batch_size or "auto"
        train = (
            f", then {rec.method.upper()} for {rec.steps} steps of {batch} x {rec.seq_len} tokens of {rec.text} "
            f"(lr {rec.lr:g}, {rec.schedule})"
        )
    calib = f"{cfg.calib.size} x {cfg.calib.seq_len} tokens of {cfg.calib.dataset}"
    model = plan.source.location
    if plan.vision_language:
        calib = (
            f"{cfg.calib.size} image-text pairs of {cfg.calib.dataset}" if plan.calib_kind == "image_text" else calib
        )
        model += (
            f" (a vision-language model: its language model is quantized, {', '.join(vision_patterns(plan))} stay BF16)"
        )
    return [
        f"in process on {cfg.hardware.device}: load {model}, calibrate on {calib}, quantize with "
        f"{how}{block}{train}, export to {plan.checkpoint_dir}"
    ]


def vision_patterns(plan: Plan) -> List[str]:
    return list(vlm.family(plan.vision_language).vision_modules) if plan.vision_language else []


DESCRIBERS: Dict[str, Callable[[Plan], List[str]]] = {
    "hf_modelopt": in_process,
    "megatron_bridge": megatron_steps.describe_steps,
}


def describe_steps(plan: Plan) -> List[str]:
    return DESCRIBERS[plan.cfg.backend.name](plan)
