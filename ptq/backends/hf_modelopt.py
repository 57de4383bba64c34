"""ModelOpt on a Hugging Face model, in this process (one node; CPU works for fp8/int8/int4)."""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from pathlib import Path
from typing import List

import torch
from tqdm.auto import tqdm

from ptq import evaluation, exported, fidelity
from ptq.backends.base import BackendResult
from ptq.calib_data import token_batches
from ptq.models import last_load, load_model
from ptq.plan import ConfigError, Plan
from ptq.recipes import build_quant_config, disabled_patterns, is_excluded
from ptq.record import StageTimer

log = logging.getLogger(__name__)

CPU_BATCH_SIZE = 8
# Sampling text is one token per step for the whole batch: wide batches amortize the per-step cost.
SAMPLE_BATCH_SIZE = 64
FIDELITY_MAX_BATCH = 8


def _enabled(quantizer) -> bool:
    if isinstance(quantizer, torch.nn.Sequential):  # SequentialQuantizer (e.g. W4A8: int4 then fp8)
        return any(_enabled(q) for q in quantizer)
    return bool(getattr(quantizer, "is_enabled", False))


def classify_layers(model, patterns):
    """Split the model's linear layers into quantized, excluded on purpose, and left in BF16 unexpectedly."""
    quantized, excluded, unexpected = [], [], []
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if isinstance(module, torch.nn.Embedding) or (quantizer is None and not isinstance(module, torch.nn.Linear)):
            continue  # embeddings stay in BF16 in every recipe; only linear-like layers are judged
        if quantizer is not None and _enabled(quantizer):
            quantized.append(name)
        elif is_excluded(name, patterns):
            excluded.append(name)
        else:
            unexpected.append(name)
    return quantized, excluded, unexpected


def check_awq_widths(model, block: int, patterns) -> None:
    """The plan checked the widths it knew; this checks the real layers before calibration starts."""
    bad = [(n, m.in_features) for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and not is_excluded(n, patterns) and m.in_features % block]
    if bad:
        name, width = bad[0]
        raise ConfigError(
            f"AWQ block size {block} does not divide the input width {width} of {name} ({len(bad)} layers affected); "
            "set recipe.awq_block_size to a divisor of every width (0 picks one automatically)."
        )


def import_modelopt() -> None:
    """Import ModelOpt on a thread of its own, once per process.

    PuLP (ModelOpt's LP solver) keeps the ImportError of every optional solver it lacks in a module global;
    their tracebacks hold the frames of the stack that first imported it. Imported inside a run, that pins the
    run's frame and with it that run's quantized model for the rest of the process: a sweep of many points in
    one process would carry the first point's model along. A fresh thread's stack holds nothing of ours.
    """
    if "modelopt.torch.quantization" in sys.modules:
        return
    failed = []

    def target():
        try:
            importlib.import_module("modelopt.torch.quantization")
        except BaseException as exc:  # re-raised below, on the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=target, name="import-modelopt")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def auto_batch_size(model, plan: Plan, seq_len: int, samples: int, requested: int) -> int:
    if requested:
        return requested
    if plan.cfg.hardware.device == "cpu":
        return CPU_BATCH_SIZE
    from modelopt.torch.utils.dataset_utils import get_max_batch_size

    # Calibration is host-bound at small batches (bench/results: fp8 on SmolLM2 takes 6.0x a BF16
    # forward at batch 32 and 3.0x at 512), so take the largest batch that fits, up to all samples.
    probe = {}
    recipe = plan.cfg.recipe
    if recipe.candidates:
        # AutoQuantize's scoring holds, per layer, one output difference for each candidate besides the
        # activations (kept for the backward pass of gradient scores): size the batch for that.
        probe = {"sample_memory_usage_ratio": 1.0 + len(recipe.candidates), "enable_grad": recipe.score_method == "gradient"}
    return max(1, min(get_max_batch_size(model, max_sample_length=seq_len, **probe), samples))


class HFModelOptBackend:
    name = "hf_modelopt"

    def describe(self, plan: Plan) -> List[str]:
        cfg = plan.cfg
        block = f", AWQ block {plan.awq_block_size}" if plan.awq_block_size else ""
        how = cfg.recipe.modelopt_cfg or "nothing (BF16)"
        if cfg.recipe.candidates:
            how = (f"a per-layer choice of {', '.join(cfg.recipe.candidates)} or BF16 (mtq.auto_quantize, "
                   f"{cfg.recipe.effective_bits} effective bits, {cfg.recipe.score_method} scores)")
        return [f"in process on {cfg.hardware.device}: load {plan.source.location}, calibrate on "
                f"{cfg.calib.size} x {cfg.calib.seq_len} tokens of {cfg.calib.dataset}, quantize with "
                f"{how}{block}, export to {plan.checkpoint_dir}"]

    def run(self, plan: Plan, export_dir: Path, timer: StageTimer) -> BackendResult:
        cfg = plan.cfg
        import_modelopt()
        with timer.stage("load"):
            model, tokenizer, checkpoint = load_model(
                plan.source, device=cfg.hardware.device, dtype=cfg.hardware.dtype,
                trust_remote_code=cfg.model.trust_remote_code, reuse=cfg.backend.reuse_loaded_model,
                max_gpu_memory_gb=cfg.backend.max_gpu_memory_gb,
            )
        bf16_bytes = sum(p.numel() for p in model.parameters()) * 2
        quant_cfg = search = None
        if plan.quantize and cfg.recipe.candidates:
            from ptq.auto_quantize import AutoQuantizeSearch

            search = AutoQuantizeSearch(model, plan)
            if plan.awq_block_size:
                check_awq_widths(model, plan.awq_block_size, search.excluded_patterns)
        elif plan.quantize:
            quant_cfg = build_quant_config(cfg.recipe, plan.exclude_patterns, plan.awq_block_size)
            if plan.awq_block_size:
                check_awq_widths(model, plan.awq_block_size, disabled_patterns(quant_cfg))

        calib_bs = auto_batch_size(model, plan, cfg.calib.seq_len, cfg.calib.size, cfg.calib.batch_size)
        details = {"checkpoint_source": checkpoint, "calib_batch_size": calib_bs, "awq_block_size": plan.awq_block_size,
                   "model_load": last_load()}

        ref = fid_tokens = None
        # Fidelity holds full-vocabulary log-probs per batch (batch x seq_len x vocab floats): keep batches small.
        fid_bs = cfg.fidelity.batch_size or min(calib_bs, FIDELITY_MAX_BATCH)
        if cfg.fidelity.enabled:
            with timer.stage("fidelity_text"):
                fid_tokens = token_batches(
                    cfg.fidelity.text, model=model, tokenizer=tokenizer, model_id=checkpoint,
                    samples=cfg.fidelity.samples, seq_len=cfg.fidelity.seq_len, seed=cfg.fidelity.seed,
                    cache_dir=cfg.cache_dir, sample_batch_size=SAMPLE_BATCH_SIZE,
                )
            with timer.stage("fidelity_reference"):
                # Same model, tokens and batching as an earlier run of this process: same reference.
                kept = cfg.backend.reuse_loaded_model and bool(details["model_load"].get("kept"))
                ref = fidelity.cached_reference(model, fid_tokens, fid_bs, enabled=kept,
                                                model_key=(checkpoint, cfg.hardware.device, cfg.hardware.dtype))

        baseline = None
        eval_dir = plan.output_dir / "eval_data"  # the normalised task files fed to lm-eval
        if cfg.eval.enabled:
            with timer.stage("eval_baseline"):
                baseline = evaluation.cached_baseline(
                    model, tokenizer, cfg.eval, model_id=checkpoint, model_name=cfg.model.name,
                    cache_dir=cfg.cache_dir, work_dir=eval_dir,
                )

        quantized = excluded = unexpected = []
        if plan.quantize:
            import modelopt.torch.quantization as mtq

            with timer.stage("calib_data"):
                calib = token_batches(
                    cfg.calib.dataset, model=model, tokenizer=tokenizer, model_id=checkpoint,
                    samples=cfg.calib.size, seq_len=cfg.calib.seq_len, seed=cfg.calib.seed,
                    cache_dir=cfg.cache_dir, sample_batch_size=SAMPLE_BATCH_SIZE,
                )
            device = next(model.parameters()).device

            def forward_loop(m):
                batches = list(calib.split(calib_bs))
                for batch in tqdm(batches, desc=f"calibrating {cfg.recipe.name}", unit="batch"):
                    m(batch.to(device))

            with timer.stage("calibrate"), torch.no_grad():
                if search is not None:  # calibrates every candidate, scores layers, applies the choice
                    quantized, excluded, unexpected, details["auto_quantize"] = search.run(model, calib, calib_bs)
                else:
                    mtq.quantize(model, quant_cfg, forward_loop)
            if search is None:
                quantized, excluded, unexpected = classify_layers(model, disabled_patterns(quant_cfg))
            log.info("Quantized %d linear layers, %d excluded, %d unexpectedly left in BF16",
                     len(quantized), len(excluded), len(unexpected))

        fid = None
        if ref is not None:
            with timer.stage("fidelity"):
                fid = fidelity.compare(model, fid_tokens, fid_bs, ref) if plan.quantize else fidelity.reference_only(ref)
            log.info("Fidelity: %s", {k: round(v, 4) for k, v in fid.items()})

        scores = None
        if baseline is not None:
            if plan.quantize:
                with timer.stage("eval"):
                    results = evaluation.run_benchmarks(model, tokenizer, cfg.eval, eval_dir, cfg.recipe.name)
            else:
                results = baseline
            scores = {"suite": cfg.eval.suite, "results": results, "baseline": baseline}

        with timer.stage("export"):
            export_dir.mkdir(parents=True, exist_ok=True)
            # The export writes unquantized tensors in the model's dtype: a model upcast to FP32 for
            # CPU compute goes back to BF16 (exact for weights loaded from BF16) before it is written.
            # The calibrated ranges keep FP32: the export stores them as scales, and rounded to BF16 they
            # would shift every activation's grid by up to 0.4% from the one the model was measured with.
            ranges = {name: buf.detach().clone() for name, buf in model.named_buffers() if name.endswith("._amax")}
            model.to(torch.bfloat16)
            for name, buf in model.named_buffers():
                if name in ranges:
                    buf.data = ranges[name]
            if plan.quantize:
                from modelopt.torch.export import export_hf_checkpoint

                export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(export_dir))
            else:
                model.save_pretrained(export_dir)
            tokenizer.save_pretrained(export_dir)
        if fid is not None and plan.quantize and cfg.fidelity.exported:
            # The export replaced the model's weights by their stored codes: it is spent (the AutoQuantize
            # search holds it too), and the read-back needs its memory.
            del model
            search = None
            with timer.stage("fidelity_exported"):
                fid["exported_checkpoint"] = exported.exported_fidelity(export_dir, plan, fid_tokens, fid_bs, ref,
                                                                        tokenizer_from=checkpoint)
            log.info("Fidelity of the checkpoint as written: mean KL %.4f (in memory %.4f)",
                     fid["exported_checkpoint"]["mean_kl"], fid["mean_kl"])
        return BackendResult(bf16_bytes=bf16_bytes, quantized_layers=quantized, excluded_layers=excluded,
                             unexpected_bf16=unexpected, fidelity=fid, evaluation=scores, details=details)
