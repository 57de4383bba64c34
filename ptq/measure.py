"""Measure a model against BF16: the one path both backends use.

    baseline = bf16_baseline(plan, model, tokenizer, checkpoint, timer, ...)   # while the BF16 model is loaded
    ... quantize in memory, or drop the model and read an export back ...
    fidelity, evaluation = compare(plan, model, tokenizer, baseline, timer)

`bf16_baseline` takes from the BF16 model what every comparison needs: the held-out text (fidelity.text),
the BF16 next-token distributions on it (ptq/fidelity.py) and the BF16 benchmark scores (ptq/evaluation/,
cached per model and settings). `compare` scores another model (the fake-quantized one in memory, or a
checkpoint read back from disk by ptq/exported/) on the same tokens and benchmarks.
`measure_written` reads an exported checkpoint back and compares it; `measure_export` does the whole
measurement for a checkpoint this process did not quantize (the Megatron-Bridge backend's).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ptq import evaluation, exported, fidelity
from ptq.calib_data import SELF, image_text_inputs, self_sampled, token_batches
from ptq.formats import NO_CHECK
from ptq.layout import EVAL_WORK_NAME
from ptq.models import load_model, load_processor
from ptq.plan import Plan
from ptq.record_parts import StageTimer
from ptq.state import ProcessState
from ptq.vlm import image_token_ids

log = logging.getLogger(__name__)

# Sampling text is one token per step for the whole batch: wide batches amortize the per-step cost.
SAMPLE_BATCH_SIZE = 64
# Fidelity holds full-vocabulary log-probs per batch (batch x seq_len x vocab floats): keep batches small.
FIDELITY_MAX_BATCH = 8
EXPORTED = "exported checkpoint"


@dataclass
class Baseline:
    """What the BF16 model gave, kept for the comparisons after it is quantized or dropped."""

    # Fidelity: the held-out tokens (or image-text samples), the BF16 reference on them, and the batch size both
    # passes use.
    tokens: Optional[fidelity.Held] = None
    reference: Optional[fidelity.Reference] = None
    batch_size: int = FIDELITY_MAX_BATCH
    # Evaluation: the BF16 benchmark rows.
    scores: Optional[List[dict]] = None


def free_memory() -> None:
    """Return the memory of models the caller has just dropped (`del model` first: a helper cannot drop the
    caller's reference)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def eval_work_dir(plan: Plan) -> Path:
    """Where the benchmark files, normalised for lm-eval, are written."""
    return plan.output_dir / EVAL_WORK_NAME


def bf16_baseline(
    plan: Plan,
    model,
    tokenizer,
    checkpoint: str,
    timer: StageTimer,
    *,
    batch_size: int,
    state: Optional[ProcessState] = None,
    reuse_reference: bool = False,
) -> Baseline:
    """The held-out tokens, the BF16 reference and the BF16 benchmark scores of the loaded BF16 `model`.

    `state`: what this process keeps for its runs (tokenized text, the latest reference). `reuse_reference`: the
    model is the one `state` keeps, so a reference it holds of the same tokens and batching is this model's: take
    it instead of computing it again.
    """
    cfg = plan.cfg
    memo = state.tokens if state is not None else None
    references = state.references if state is not None and reuse_reference else None
    if state is not None and not reuse_reference:
        state.references.clear()  # another model (or a fresh load): what is kept is not its reference
    base = Baseline(batch_size=cfg.fidelity.batch_size or min(batch_size, FIDELITY_MAX_BATCH))
    if cfg.fidelity.enabled and cfg.fidelity.text == SELF and plan.quantize and cfg.calib.dataset == SELF:
        # Both texts sampled from the model: one sampling pass writes both (cached for the later lookups).
        with timer.stage("fidelity_text"):
            self_sampled(
                model,
                tokenizer,
                model_id=checkpoint,
                cache_dir=cfg.cache_dir,
                batch_size=SAMPLE_BATCH_SIZE,
                requests={
                    "fidelity": (cfg.fidelity.seed, cfg.fidelity.samples, cfg.fidelity.seq_len),
                    "calibration": (cfg.calib.seed, cfg.calib.size, cfg.calib.seq_len),
                },
            )
    if cfg.fidelity.enabled and plan.fidelity_kind == "image_text":
        with timer.stage("fidelity_text"):
            processor = load_processor(checkpoint, cfg.model.trust_remote_code)
            inputs = image_text_inputs(cfg.fidelity.text, processor, cfg.fidelity.samples)
            base.tokens = fidelity.image_samples(inputs, image_token_ids(model.config))
    elif cfg.fidelity.enabled:
        with timer.stage("fidelity_text"):
            base.tokens = token_batches(
                cfg.fidelity.text,
                model=model,
                tokenizer=tokenizer,
                model_id=checkpoint,
                samples=cfg.fidelity.samples,
                seq_len=cfg.fidelity.seq_len,
                seed=cfg.fidelity.seed,
                cache_dir=cfg.cache_dir,
                sample_batch_size=SAMPLE_BATCH_SIZE,
                memo=memo,
            )
    if cfg.fidelity.enabled:
        with timer.stage("fidelity_reference"):
            base.reference = fidelity.cached_reference(
                model,
                base.tokens,
                base.batch_size,
                cache=references,
                model_key=(checkpoint, cfg.hardware.device, cfg.hardware.dtype),
            )
    if cfg.eval.enabled:
        with timer.stage("eval_baseline"):
            base.scores = evaluation.cached_baseline(
                model,
                tokenizer,
                cfg.eval,
                model_id=checkpoint,
                model_name=cfg.model.name,
                cache_dir=cfg.cache_dir,
                work_dir=eval_work_dir(plan),
            )
    return base


def compare(
    plan: Plan,
    model,
    tokenizer,
    baseline: Baseline,
    timer: StageTimer,
    *,
    quantized: bool = True,
    measured_on: Optional[str] = None,
) -> Tuple[Optional[dict], Optional[dict]]:
    """(fidelity, evaluation) of `model` against the BF16 `baseline`; a BF16 run (`quantized=False`) is its own
    reference and its own scores. `measured_on` labels what was measured (e.g. the exported checkpoint)."""
    cfg = plan.cfg
    fid = scores = None
    label = {"measured_on": measured_on} if measured_on else {}
    if baseline.reference is not None:
        with timer.stage("fidelity"):
            if quantized:
                desc = f"fidelity: {measured_on or 'quantized'} vs BF16"
                fid = {
                    **fidelity.compare(model, baseline.tokens, baseline.batch_size, baseline.reference, desc=desc),
                    **label,
                }
            else:
                fid = fidelity.reference_only(baseline.reference)
        log.info(
            "Fidelity%s: %s",
            f" ({measured_on})" if measured_on else "",
            {k: round(v, 4) for k, v in fid.items() if isinstance(v, float)},
        )
    if baseline.scores is not None:
        if quantized:
            with timer.stage("eval"):
                results = evaluation.run_benchmarks(model, tokenizer, cfg.eval, eval_work_dir(plan), cfg.recipe.name)
        else:
            results = baseline.scores
        # The items each benchmark was limited to (its own limit, else eval.limit; None: all), stated, not implied.
        limits = {b.name: b.limit or cfg.eval.limit for b in cfg.eval.benchmarks}
        scores = {"suite": cfg.eval.suite, "limits": limits, "results": results, "baseline": baseline.scores, **label}
    return fid, scores


def _dtype(name) -> torch.dtype:
    return getattr(torch, name) if isinstance(name, str) else name


def read_back(plan: Plan, export_dir: Path, timer: StageTimer, tokenizer_from: str):
    """(model, tokenizer, Simulation) computing what the checkpoint in `export_dir` stores."""
    cfg = plan.cfg
    with timer.stage("load_exported"):
        return exported.load_exported(export_dir, cfg.hardware.device, _dtype(cfg.hardware.dtype), tokenizer_from)


def check_written(
    plan: Plan, export_dir: Path, baseline: Baseline, timer: StageTimer, source: str, trained: Optional[dict] = None
) -> dict:
    """The check of the checkpoint as written that fidelity.exported_check asks for; the record says which ran.

    "weights": each quantized layer's stored weight against the source checkpoint's (`source`, the BF16 folder
    the model was loaded from). Where that cannot judge the export (AWQ and SmoothQuant fold factors into
    other tensors; a source that is not a local folder), the full read-back runs and the record says why.
    `trained`: the weights as trained after PTQ (by tensor name, taken before the export), which the source no
    longer holds: the stored weights are compared with them instead."""
    cfg = plan.cfg
    fallback = None
    if cfg.fidelity.exported_check == "weights":
        if trained is not None or Path(source).is_dir():
            with timer.stage("check_exported"):
                result = exported.check_stored_weights(
                    export_dir, None if trained is not None else Path(source), cfg.hardware.device, reference=trained
                )
            if result.get("applicable"):
                return result
            fallback = result.get("reason", "the stored-weight check does not apply")
        else:
            fallback = f"the source {source} is not a local folder to compare the stored weights with"
    unreadable = exported.unreadable_formats(export_dir)
    if unreadable:
        # Neither check can judge these layers here: the record says so, and the in-memory figures stand alone.
        return {
            "check": NO_CHECK,
            "reason": f"quant_algo {', '.join(unreadable)} can be neither read back nor checked "
            f"layer by layer here ({fallback or 'fidelity.exported_check=full'}); the "
            "fidelity figures are the model's in memory",
        }
    written = measure_written(plan, export_dir, baseline, timer, tokenizer_from=source)
    return {"check": "full read-back", **written, **({"fallback_reason": fallback} if fallback else {})}


def measure_written(plan: Plan, export_dir: Path, baseline: Baseline, timer: StageTimer, tokenizer_from: str) -> dict:
    """Fidelity of the checkpoint as written (read back from disk) against the BF16 reference."""
    model, tokenizer, sim = read_back(plan, export_dir, timer, tokenizer_from)
    written = Baseline(tokens=baseline.tokens, reference=baseline.reference, batch_size=baseline.batch_size)
    with timer.stage("fidelity_exported"):
        fid, _ = compare(plan, model, tokenizer, written, StageTimer(), measured_on=EXPORTED)
    del model
    free_memory()
    return {**fid, "simulated": sim.summary()}


def measure_export(plan: Plan, export_dir: Path, timer: StageTimer, batch_size: int = FIDELITY_MAX_BATCH):
    """(fidelity, evaluation) of an exported checkpoint this process did not quantize (Megatron-Bridge's).

    The BF16 source model gives the baseline first, then leaves memory; the export is read back and compared
    the same way as the in-process backend compares its model.
    """
    cfg = plan.cfg
    if not (cfg.fidelity.enabled or cfg.eval.enabled):
        return None, None
    # Import ModelOpt before any CUDA work: where Megatron-Core is installed, ModelOpt's Megatron plugin pulls
    # in Transformer Engine, whose core library must load its cuDNN before torch has loaded another copy
    # (else: "libcudnn_cnn.so.9: undefined symbol ..." when the NVFP4 read-back first imports ModelOpt).
    import modelopt.torch.quantization  # noqa: F401

    with timer.stage("load_bf16"):
        loaded = load_model(
            plan.source,
            ProcessState(),
            device=cfg.hardware.device,
            dtype=cfg.hardware.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            reuse=False,
        )
    model, tokenizer, checkpoint = loaded.model, loaded.tokenizer, loaded.checkpoint
    del loaded  # the model's one reference is `model`: dropping it frees the memory
    baseline = bf16_baseline(plan, model, tokenizer, checkpoint, timer, batch_size=batch_size)
    del model
    free_memory()
    model, tokenizer, sim = read_back(plan, export_dir, timer, tokenizer_from=checkpoint)
    fid, scores = compare(plan, model, tokenizer, baseline, timer, measured_on=EXPORTED)
    if fid is not None:
        fid["simulated"] = sim.summary()
    del model
    free_memory()
    return fid, scores
