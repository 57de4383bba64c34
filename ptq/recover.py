"""The `recover` group: train the fake-quantized model after PTQ, in this process, with ModelOpt's own trainers.

    prepared = prepare(plan, model, tokenizer, checkpoint, timer, ...)   # while the model is still BF16
    ... quantize (calibrate) ...
    recovery = train(plan, model, prepared, timer)                      # before the comparison and the export

`recover=qat` trains with ModelOpt's `QATTrainer` on the causal-LM loss of the training text; `recover=qad` with
its `QADTrainer`, distilling the BF16 model's next-token distributions (logit KL, ModelOpt's
`LogitsDistillationLoss`) into the quantized one. Both are transformers Trainers: AdamW, the schedule and warmup of
the config, one fresh batch of `recover.batch_size` sequences per step.

Scales: the calibrated ranges (each quantizer's `_amax`) are buffers, not parameters: the optimizer never sees
them and the quantizers are not calibrating while training, so they stay as calibrated; the fake quantization
passes the gradient straight through its rounding (straight-through estimator, zero outside the clipping range)
to the BF16 weights, which move on the fixed grid. Dynamically scaled quantizers (block scales computed per
forward pass, e.g. NVFP4's) follow the weights as they move. The record checks that the static ranges did not move.

The teacher of QAD is the BF16 model the run already has: the pristine copy ptq/models.py keeps for a sweep, used
without copying it (and left as found), or else a second copy made before quantizing when two fit in memory;
when neither is possible, QAD is refused and the message says what to do.
"""

from __future__ import annotations

import copy
import gc
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ptq.backend_spec import recover_batch, recover_rows
from ptq.calib_data import SELF, token_batches
from ptq.errors import ConfigError
from ptq.models import kept_model, room_for_a_copy
from ptq.plan import Plan
from ptq.record_parts import StageTimer
from ptq.state import ProcessState

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What training needs from the BF16 model, taken before it is quantized."""

    tokens: torch.Tensor
    text_source: str
    teacher: Optional[torch.nn.Module] = None
    teacher_source: Optional[str] = None


class _Rows(torch.utils.data.Dataset):
    """Rows of token ids as causal-LM examples (labels = inputs; transformers shifts them)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ids = self.tokens[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def text_source(plan: Plan) -> str:
    rec = plan.cfg.recover
    if rec.text == SELF:
        return f"self: sampled from the BF16 model with seed {rec.seed}"
    return str(Path(rec.text).expanduser().resolve())


def _teacher(plan: Plan, model, state: ProcessState):
    """(teacher, how it was obtained) for QAD: the pristine BF16 model this process keeps (`state`), or a second
    copy."""
    cfg = plan.cfg
    if cfg.backend.reuse_loaded_model:
        kept = kept_model(
            state,
            plan.source,
            device=cfg.hardware.device,
            dtype=cfg.hardware.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            max_gpu_memory_gb=cfg.backend.max_gpu_memory_gb,
            vision_language=plan.vision_language is not None,
            mamba_kernels=cfg.model.mamba_kernels,
        )
        if kept is not None and kept is not model:
            return kept, "the pristine BF16 model this process keeps (no second copy)"
    fits, why = room_for_a_copy(model)
    if not fits:
        raise ConfigError(
            f"recover=qad distils from the BF16 model, which must stay in memory beside the model being trained, and "
            f"no second copy fits ({why}). Use recover=qat (no teacher), or a machine with more memory."
        )
    log.info("QAD teacher: a second copy of the BF16 model (%s)", why)
    return copy.deepcopy(model), f"a second copy of the BF16 model, made for QAD ({why})"


def prepare(
    plan: Plan, model, tokenizer, checkpoint: str, timer: StageTimer, *, state: ProcessState, sample_batch_size: int
) -> Prepared:
    """The training text (sampled from `model` while it is still BF16, for recover.text=self) and, for QAD, the
    teacher. Call before quantizing."""
    rec = plan.cfg.recover
    rows = recover_rows(plan.cfg)
    with timer.stage("recover_text"):
        tokens = token_batches(
            rec.text,
            model=model,
            tokenizer=tokenizer,
            model_id=checkpoint,
            samples=rows,
            seq_len=rec.seq_len,
            seed=rec.seed,
            cache_dir=plan.cfg.cache_dir,
            sample_batch_size=sample_batch_size,
            memo=state.tokens,
        )
    prepared = Prepared(tokens=tokens, text_source=text_source(plan))
    if rec.method == "qad":
        prepared.teacher, prepared.teacher_source = _teacher(plan, model, state)
    return prepared


def _ranges(model) -> Dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in model.named_buffers() if name.endswith("._amax")}


@contextmanager
def _hf_checkpointing_as_found():
    """ModelOpt's trainers turn on its Hugging Face checkpointing for the whole process (patching
    PreTrainedModel.from_pretrained and save_pretrained): a later read-back of the export would look for ModelOpt
    state, and save_pretrained would write some into a checkpoint. Put back what the trainer patched."""
    from modelopt.torch.opt.plugins import huggingface as hf_plugin

    saved = {}
    for classes, methods in hf_plugin._LIBRARY_CLASSES_FOR_PATCHING.values():
        for cls, patches in zip(classes, methods):
            if cls not in hf_plugin._PATCHED_CLASSES:
                saved[cls] = {name: cls.__dict__.get(name) for name, _ in patches}
    try:
        yield
    finally:
        for cls, originals in saved.items():
            if cls not in hf_plugin._PATCHED_CLASSES:
                continue
            for name, original in originals.items():
                if original is not None:
                    setattr(cls, name, original)
                elif name in cls.__dict__:
                    delattr(cls, name)
            if "_modelopt_cache" in cls.__dict__:
                delattr(cls, "_modelopt_cache")
            hf_plugin._PATCHED_CLASSES.discard(cls)


def _loss_curve(history: List[dict]) -> List[dict]:
    return [
        {
            "step": int(h["step"]),
            "loss": float(h["loss"]),
            **({"lr": float(h["learning_rate"])} if "learning_rate" in h else {}),
            **({"grad_norm": float(h["grad_norm"])} if "grad_norm" in h else {}),
        }
        for h in history
        if "loss" in h and "step" in h
    ]


def train(plan: Plan, model, prepared: Prepared, timer: StageTimer) -> dict:
    """Train the fake-quantized `model` in place (QAT or QAD); returns what the run record keeps under "recovery"."""
    from modelopt.torch.quantization.plugins.transformers_trainer import QADTrainer, QATTrainer
    from transformers import TrainingArguments, default_data_collator

    cfg = plan.cfg
    rec = cfg.recover
    bs = recover_batch(plan.cfg)
    before = _ranges(model)
    # Train FP32 master weights: a BF16 weight cannot take steps of lr 1e-5 (they round away). The run's dtype
    # comes back afterwards; the ranges keep the dtype they were calibrated in.
    run_dtype = next(model.parameters()).dtype
    buffer_dtypes = {name: buf.dtype for name, buf in model.named_buffers()}
    teacher = prepared.teacher
    grad_flags = [p.requires_grad for p in teacher.parameters()] if teacher is not None else []
    work = Path(tempfile.mkdtemp(prefix="recover-", dir=plan.output_dir))
    args = TrainingArguments(
        output_dir=str(work),
        max_steps=rec.steps,
        per_device_train_batch_size=bs,
        learning_rate=rec.lr,
        lr_scheduler_type=str(rec.schedule),
        warmup_steps=rec.warmup_ratio,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=cfg.hardware.device == "cpu",
        seed=rec.seed,
        data_seed=rec.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        optim="adamw_torch",
        disable_tqdm=False,
        include_num_input_tokens_seen="all",
    )
    common = {
        "model": model,
        "args": args,
        "train_dataset": _Rows(prepared.tokens),
        "data_collator": default_data_collator,
    }
    start = time.perf_counter()
    try:
        with timer.stage("recover"), _hf_checkpointing_as_found():
            if run_dtype != torch.float32:
                model.float()
            if rec.method == "qad":
                trainer = QADTrainer(
                    **common,
                    distill_args={"teacher_model": teacher, "criterion": "logits_loss", "temperature": rec.temperature},
                )
            else:
                trainer = QATTrainer(**common)
            output = trainer.train()
            history = list(trainer.state.log_history)
            tokens_seen = int(trainer.state.num_input_tokens_seen)
            del trainer
            model.eval()
            with torch.no_grad():
                # The export writes BF16 weights: the trained ones are rounded to BF16 here, so that the model
                # measured in memory is the one written (on the CPU the run computes in FP32 on those values).
                for p in model.parameters():
                    p.data = p.data.to(torch.bfloat16).to(run_dtype)
            for name, buf in model.named_buffers():
                if buf.dtype != buffer_dtypes.get(name, buf.dtype):
                    buf.data = buf.data.to(buffer_dtypes[name])
    finally:
        if teacher is not None:  # the kept pristine model is handed to later runs as it was
            for p, flag in zip(teacher.parameters(), grad_flags):
                p.requires_grad_(flag)
        shutil.rmtree(work, ignore_errors=True)
        gc.collect()
    seconds = time.perf_counter() - start
    after = _ranges(model)
    moved = sorted(n for n, v in before.items() if n not in after or not torch.equal(v.to(after[n].dtype), after[n]))
    curve = _loss_curve(history)
    record = {
        "method": str(rec.method),
        "trainer": f"modelopt.torch.quantization.plugins.transformers_trainer.{'QADTrainer' if rec.method == 'qad' else 'QATTrainer'}",
        "loss": "logit KL to the BF16 model (ModelOpt LogitsDistillationLoss)"
        if rec.method == "qad"
        else "causal-LM cross-entropy",
        "steps": int(output.global_step),
        "batch_size": bs,
        "seq_len": rec.seq_len,
        "tokens_seen": tokens_seen,
        "text_samples": int(prepared.tokens.shape[0]),
        "text_source": prepared.text_source,
        "lr": rec.lr,
        "schedule": str(rec.schedule),
        "warmup_ratio": rec.warmup_ratio,
        "seed": rec.seed,
        "seconds": round(seconds, 3),
        "train_dtype": "float32",
        "weights_rounded_to": "bfloat16",
        "loss_curve": curve,
        "scales": {
            "amax_buffers": len(before),
            "moved": len(moved),
            "moved_examples": moved[:3],
            "note": "calibrated ranges are buffers, kept as calibrated; gradients pass the rounding straight "
            "through to the weights",
        },
    }
    if rec.method == "qad":
        record.update(temperature=rec.temperature, teacher=prepared.teacher_source)
    if torch.cuda.is_available() and cfg.hardware.device == "cuda":
        record["peak_gpu_memory_bytes"] = timer.peak_gpu_bytes.get("recover")
    if curve:
        log.info(
            "Recovery (%s): %d steps, %d tokens, loss %.4f -> %.4f in %.0f s",
            rec.method,
            record["steps"],
            record["tokens_seen"],
            curve[0]["loss"],
            curve[-1]["loss"],
            seconds,
        )
    return record
