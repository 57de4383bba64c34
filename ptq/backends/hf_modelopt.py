"""ModelOpt on a Hugging Face model, in this process (one node; CPU works for fp8/int8/int4)."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from ptq import recipe_files, recover
from ptq.auto_quantize import CHOSEN_NOTE, AutoQuantizeSearch
from ptq.backends.base import BackendResult, limit_cpu_threads, use_extension_cache
from ptq.calib_data import image_text_inputs, token_batches
from ptq.errors import ConfigError
from ptq.measure import SAMPLE_BATCH_SIZE, bf16_baseline, check_written, compare
from ptq.models import load_model, load_processor, mamba_path
from ptq.moe import EXPERTS_RATIO, ExpertCounter, coverage, experts_ratio_problem
from ptq.moe import warning as coverage_warning
from ptq.plan import Plan, read_model_config
from ptq.recipes import build_quant_config, check_awq_widths, classify_layers, disabled_patterns
from ptq.record_parts import StageTimer
from ptq.state import ProcessState
from ptq.validate import repair_exclude_modules
from ptq.vlm import PROCESSOR_FILES

log = logging.getLogger(__name__)

CPU_BATCH_SIZE = 8


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


def auto_batch_size(model, plan: Plan, seq_len: int, samples: int, requested: int, probed: dict) -> int:
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
        probe = {
            "sample_memory_usage_ratio": 1.0 + len(recipe.candidates),
            "enable_grad": recipe.score_method == "gradient",
        }
    # The probe runs forward passes of growing batches (seconds on a large model); the points of a sweep in one
    # process share the model and the device, so it is done once for each (`probed`: a ProcessState's batch_sizes).
    cfg = plan.cfg
    key = (
        plan.source.location,
        cfg.hardware.device,
        cfg.hardware.dtype,
        cfg.backend.max_gpu_memory_gb,
        seq_len,
        tuple(sorted(probe.items())),
    )
    if key not in probed:
        probed[key] = get_max_batch_size(model, max_sample_length=seq_len, **probe)
    return max(1, min(probed[key], samples))


@dataclass
class Quantized:
    """What quantizing the model in memory produced."""

    layers: List[str] = field(default_factory=list)
    excluded: List[str] = field(default_factory=list)
    unexpected_bf16: List[str] = field(default_factory=list)
    auto_quantize: Optional[dict] = None
    # Calibration tokens per routed expert (ptq/moe.py), for MoE models.
    expert_coverage: Optional[dict] = None
    # What calibrated: {"kind": "text" | "image_text", samples or pairs, tokens}.
    calibration: Optional[dict] = None


def prepare_quantization(plan: Plan, model):
    """(ModelOpt config, None) for a one-format recipe, (None, AutoQuantizeSearch) for a mixed-precision one,
    (None, None) for BF16; checks the real layers against the AWQ block size before any calibration."""
    cfg = plan.cfg
    if not plan.quantize:
        return None, None
    if cfg.recipe.candidates:
        search = AutoQuantizeSearch(model, plan)
        if plan.awq_block_size:
            check_awq_widths(model, plan.awq_block_size, search.excluded_patterns)
        return None, search
    quant_cfg = build_quant_config(cfg.recipe, plan.exclude_patterns, plan.awq_block_size)
    if plan.awq_block_size:
        check_awq_widths(model, plan.awq_block_size, disabled_patterns(quant_cfg))
    return quant_cfg, None


def quantize(
    plan: Plan,
    model,
    tokenizer,
    checkpoint: str,
    quant_cfg,
    search,
    batch_size: int,
    timer: StageTimer,
    state: ProcessState,
) -> Quantized:
    """Calibrate and quantize `model` in place (ModelOpt fake quantization)."""
    import modelopt.torch.quantization as mtq

    cfg = plan.cfg
    if EXPERTS_RATIO in (cfg.recipe.algorithm_args or {}):
        problem = experts_ratio_problem(model)
        if problem:
            raise ConfigError(
                f"recipe.algorithm_args.{EXPERTS_RATIO}={cfg.recipe.algorithm_args[EXPERTS_RATIO]}: "
                f"{cfg.model.name} {problem}. Remove it; calib.size sets how many tokens reach each expert "
                "(details.expert_coverage in the record names experts that got too few)."
            )
    with timer.stage("calib_data"):
        if plan.calib_kind == "image_text":
            pairs = image_text_inputs(
                cfg.calib.dataset, load_processor(checkpoint, cfg.model.trust_remote_code), cfg.calib.size
            )
            batches = [lambda m, p=p: m(**{k: v.to(device) for k, v in p.items()}) for p in pairs]
            tokens = sum(int(p["input_ids"].numel()) for p in pairs)
            # One pair a forward pass: pairs differ in length and image size (details.calib_batch_size is then the
            # BF16 reference's batch only).
            calib_stats = {"kind": "image_text", "pairs": len(pairs), "tokens": tokens, "batch_size": 1}
        else:
            calib = token_batches(
                cfg.calib.dataset,
                model=model,
                tokenizer=tokenizer,
                model_id=checkpoint,
                samples=cfg.calib.size,
                seq_len=cfg.calib.seq_len,
                seed=cfg.calib.seed,
                cache_dir=cfg.cache_dir,
                sample_batch_size=SAMPLE_BATCH_SIZE,
                memo=state.tokens,
            )
            batches = [lambda m, b=b: m(b.to(device)) for b in calib.split(batch_size)]
            tokens = int(calib.numel())
            samples = int(calib.shape[0])
            calib_stats = {"kind": "text", "samples": samples, "tokens": tokens, "batch_size": min(batch_size, samples)}
    device = next(model.parameters()).device
    counter = ExpertCounter(model)

    def forward_loop(m):
        with counter:  # experts' tokens, counted on the first pass only
            for run_batch in tqdm(batches, desc=f"calibrating {cfg.recipe.name}", unit="batch"):
                run_batch(m)

    out = Quantized(calibration=calib_stats)
    with timer.stage("calibrate"), torch.no_grad():
        if search is not None:  # calibrates every candidate, scores layers, applies the choice
            out.layers, out.excluded, out.unexpected_bf16, out.auto_quantize = search.run(model, calib, batch_size)
        else:
            mtq.quantize(model, quant_cfg, forward_loop)
            out.layers, out.excluded, out.unexpected_bf16 = classify_layers(
                model, disabled_patterns(quant_cfg), quant_cfg["quant_cfg"]
            )
    with timer.stage("align_with_export"), torch.no_grad():
        align_with_export(model)
    if counter and counter.passes:
        out.expert_coverage = coverage(
            {name: c.tolist() for name, c in counter.counts.items()},
            counter.top_k,
            tokens=tokens,
            samples=len(batches) if plan.calib_kind == "image_text" else int(calib.shape[0]),
            min_tokens=cfg.calib.expert_min_tokens,
        )
        message = coverage_warning(out.expert_coverage, cfg.calib.size)
        if message:
            log.warning(message)
        else:
            log.info(
                "Every routed expert of %d MoE layers received at least %d calibration tokens (fewest %d)",
                out.expert_coverage["moe_layers"],
                cfg.calib.expert_min_tokens,
                out.expert_coverage["tokens_per_expert"]["min"],
            )
    log.info(
        "Quantized %d linear layers, %d excluded, %d unexpectedly left in BF16",
        len(out.layers),
        len(out.excluded),
        len(out.unexpected_bf16),
    )
    return out


def align_with_export(model) -> None:
    """Do now what ModelOpt's export does to the layers that read the same input (q/k/v, gate/up) before it writes
    them (requantize_resmooth_fused_llm_layers): one AWQ pre-quantization scale per group, folded into the norm
    before it, with the weights rescaled and their ranges taken again; one input range and one NVFP4/W4A8 weight
    range per group. Serving engines run each group as one fused layer, so the checkpoint must. Done right after
    calibration, the model measured in memory, and trained after PTQ (recover=qat|qad), is the model the export
    writes; the export then finds nothing left to change. (Before, AWQ checkpoints read back worse than the model
    in memory: per-projection scales were averaged only at export, after the measurement and after training.)"""
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    requantize_resmooth_fused_llm_layers(model)


def export(plan: Plan, model, tokenizer, export_dir: Path, timer: StageTimer) -> List[str]:
    """Write the model as a Hugging Face checkpoint: ModelOpt's unified format when quantized. Returns the
    exclude_modules entries repaired after ModelOpt's export (ptq/validate.py repair_exclude_modules)."""
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
        fixed: List[str] = []
        if plan.quantize:
            from modelopt.torch.export import export_hf_checkpoint

            export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(export_dir))
            fixed = repair_exclude_modules(export_dir)
            if fixed:
                log.warning(
                    "Repaired %d exclude_modules entries that ModelOpt's export wrote with its internal name "
                    "marker still attached (e.g. %r); without the repair no serving engine would match them",
                    len(fixed),
                    fixed[0].encode("unicode_escape").decode(),
                )
        else:
            model.save_pretrained(export_dir)
        tokenizer.save_pretrained(export_dir)
        if plan.vision_language:
            save_processor_files(plan, export_dir)
    return fixed


def save_processor_files(plan: Plan, export_dir: Path) -> None:
    """A vision-language checkpoint's processor files (image processor, chat template) beside the weights, so the
    family's loader reads it back with its processor: copied from a local source folder, else saved by the
    processor (a checkpoint loaded by hub id)."""
    source = Path(plan.source.location)
    if plan.source.kind == "local" and source.is_dir():
        for name in PROCESSOR_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, export_dir / name)
        return
    load_processor(plan.source.location, plan.cfg.model.trust_remote_code).save_pretrained(export_dir)


def modelopt_version() -> str:
    import modelopt

    return str(getattr(modelopt, "__version__", "unknown"))


def train_after_ptq(plan: Plan, model, tokenizer, baseline, training, timer: StageTimer) -> dict:
    """recover=qat|qad on the quantized `model`: its fidelity before training (on the held-out tokens, no
    benchmarks: they are scored once, after), then the training (ptq/recover.py)."""
    ptq_fid = None
    if baseline.reference is not None:
        with timer.stage("fidelity_before_recovery"):
            ptq_fid, _ = compare(
                plan,
                model,
                tokenizer,
                dataclasses.replace(baseline, scores=None),
                StageTimer(),
                measured_on="PTQ, before recovery",
            )
    recovery = recover.train(plan, model, training, timer)
    recovery["ptq_fidelity"] = ptq_fid
    return recovery


def trained_weights(plan: Plan, model) -> Optional[dict]:
    """After training the weights moved: the stored-weight check compares the export with them (a BF16 copy on the
    host, taken before the export replaces them by their codes), not with the source checkpoint. None where that
    check does not run."""
    fid = plan.cfg.fidelity
    if not (fid.enabled and fid.exported and fid.exported_check == "weights"):
        return None
    return {name: p.detach().to("cpu", torch.bfloat16, copy=True) for name, p in model.named_parameters()}


def write_applied_recipe(plan: Plan, quant_cfg: dict, export_dir: Path, trained: bool, note: str = "") -> dict:
    """What ModelOpt applied, as a recipe file beside the weights (and in the record): loading it runs it again.
    After training the file makes the PTQ checkpoint, and says so; `note` says what else it is (AutoQuantize)."""
    cfg = plan.cfg
    untrained = f", before {cfg.recover.method.upper()} training (the file makes the PTQ checkpoint)" if trained else ""
    applied = recipe_files.applied_recipe(
        quant_cfg,
        f"{cfg.recipe.name} as applied to {cfg.model.name} by "
        f"ptq-launcher (nvidia-modelopt {modelopt_version()}){untrained}" + (f"; {note}" if note else ""),
    )
    recipe_files.write_applied(export_dir, applied)
    return applied


def log_written(written: dict, fid: dict) -> None:
    if "mean_kl" in written:
        log.info(
            "Fidelity of the checkpoint as written: mean KL %.4f (in memory %.4f)", written["mean_kl"], fid["mean_kl"]
        )
    else:
        log.info(
            "Stored weights of the checkpoint as written: %d layers, largest relative error per format %s, %d problems",
            written.get("layers", 0),
            written.get("max_relative_error"),
            len(written.get("problems", [])),
        )


class HFModelOptBackend:
    name = "hf_modelopt"

    def run(self, plan: Plan, export_dir: Path, timer: StageTimer, state: ProcessState) -> BackendResult:
        """load -> BF16 baseline -> quantize (or search) -> recover (recover=qat|qad) -> compare in memory -> export ->
        compare the written file."""
        cfg = plan.cfg
        extensions = use_extension_cache(cfg.cache_dir)
        threads = limit_cpu_threads()
        import_modelopt()
        if plan.quantize and not cfg.recipe.candidates:
            # The ModelOpt config, algorithm settings included, is checked before the model is loaded.
            build_quant_config(cfg.recipe, plan.exclude_patterns, plan.awq_block_size)
        with timer.stage("load"):
            loaded = load_model(
                plan.source,
                state,
                device=cfg.hardware.device,
                dtype=cfg.hardware.dtype,
                trust_remote_code=cfg.model.trust_remote_code,
                reuse=cfg.backend.reuse_loaded_model and state.keep_models,
                max_gpu_memory_gb=cfg.backend.max_gpu_memory_gb,
                vision_language=plan.vision_language is not None,
                mamba_kernels=cfg.model.mamba_kernels,
            )
        model, tokenizer, checkpoint, model_load = loaded.model, loaded.tokenizer, loaded.checkpoint, loaded.how
        del loaded  # `model` is the one reference: the export and read-back drop it to free its memory
        bf16_bytes = sum(p.numel() for p in model.parameters()) * 2
        quant_cfg, search = prepare_quantization(plan, model)
        calib_bs = auto_batch_size(
            model, plan, cfg.calib.seq_len, cfg.calib.size, cfg.calib.batch_size, state.batch_sizes
        )
        details = {
            "checkpoint_source": checkpoint,
            "calib_batch_size": calib_bs,
            "awq_block_size": plan.awq_block_size,
            "model_load": model_load,
            "extensions_dir": extensions,
            "cpu_threads": threads,
        }
        mamba = mamba_path(model)
        if mamba is not None:
            details["mamba"] = mamba
            if cfg.model.mamba_kernels and mamba["path"] != "CUDA kernels":
                raise ConfigError(
                    f"model.mamba_kernels=true, and the Mamba layers of {cfg.model.name} run transformers' PyTorch path "
                    f"({mamba['how']}; mamba-ssm {mamba['mamba-ssm']}, causal-conv1d {mamba['causal-conv1d']}): a "
                    "kernel that is installed but does not import with this torch, or layers off the GPU. Rebuild "
                    "the wheels against this torch (scripts/mamba-wheels.sh), or set model.mamba_kernels=false."
                )
        # Same model, tokens and batching as an earlier run of this process: same reference.
        kept = cfg.backend.reuse_loaded_model and bool(details["model_load"].get("kept"))
        baseline = bf16_baseline(
            plan, model, tokenizer, checkpoint, timer, batch_size=calib_bs, state=state, reuse_reference=kept
        )

        # Training after PTQ: its text (sampled from the BF16 model for recover.text=self) and QAD's teacher are
        # taken while the model is still BF16.
        training = None
        if cfg.recover.method != "none":
            training = recover.prepare(
                plan, model, tokenizer, checkpoint, timer, state=state, sample_batch_size=SAMPLE_BATCH_SIZE
            )
        done = Quantized()
        if plan.quantize:
            done = quantize(plan, model, tokenizer, checkpoint, quant_cfg, search, calib_bs, timer, state)
            if done.auto_quantize is not None:
                details["auto_quantize"] = done.auto_quantize
            if done.expert_coverage is not None:
                details["expert_coverage"] = done.expert_coverage
            details["calibration"] = done.calibration
        if plan.vision_language:
            details["vision_language"] = plan.vision_language
        recovery = None
        if training is not None:
            recovery = train_after_ptq(plan, model, tokenizer, baseline, training, timer)
            training = None  # drops a second copy of the teacher, if one was made
        trained = trained_weights(plan, model) if recovery is not None else None
        fid, scores = compare(plan, model, tokenizer, baseline, timer, quantized=plan.quantize)
        if cfg.model.mamba_kernels is not None:  # the run's choice, not the checkpoint's: its config says what it said
            source = (read_model_config(Path(checkpoint))[0] or {}).get("use_mamba_kernels")
            model.config.use_mamba_kernels = True if source is None else source  # (transformers' default)
        repaired = export(plan, model, tokenizer, export_dir, timer)
        if quant_cfg is not None:
            details["applied_recipe"] = write_applied_recipe(plan, quant_cfg, export_dir, trained=recovery is not None)
        elif search is not None and search.applied_config is not None:
            details["applied_recipe"] = write_applied_recipe(
                plan, search.applied_config, export_dir, trained=recovery is not None, note=CHOSEN_NOTE
            )
        if repaired:
            details["exclude_modules_repaired"] = [e.encode("unicode_escape").decode() for e in repaired]
        if fid is not None and plan.quantize and cfg.fidelity.exported:
            # The export replaced the model's weights by their stored codes: it is spent (the AutoQuantize
            # search holds it too), and the read-back needs its memory.
            del model
            search = None
            written = fid["exported_checkpoint"] = check_written(
                plan, export_dir, baseline, timer, source=checkpoint, trained=trained
            )
            trained = None
            log_written(written, fid)
        return BackendResult(
            bf16_bytes=bf16_bytes,
            quantized_layers=done.layers,
            excluded_layers=done.excluded,
            unexpected_bf16=done.unexpected_bf16,
            fidelity=fid,
            evaluation=scores,
            details=details,
            recovery=recovery,
        )
