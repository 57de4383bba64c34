"""Megatron-Bridge's quantization scripts as processes: quantize -> (recover=qat or qad: training) -> generate check
-> export.

Each step runs under torchrun with the `parallelism` group's layout, or directly when the ranks
were already started by the scheduler (srun sets WORLD_SIZE and RANK for every task). Every step
starts through `megatron_entry.py` (one compatibility setting, see there). The commands are built
by pure functions (megatron_steps.py) so they can be checked without GPUs; `run` executes them, keeps each
step's output in `<output_dir>/logs/`, and records the generation check's answers.

Calibration text is the launcher's own `calib.dataset`: a .txt file is handed to the scripts as a
one-line JSONL (`<output_dir>/calib.jsonl`), which ModelOpt's Megatron loader packs into rows exactly
as the in-process backend does (text + EOS, cut into calib.seq_len tokens), so both backends
calibrate on the same tokens.

With recover=qat or qad, the launcher tokenizes recover.text with the model's tokenizer into recover.samples rows
of recover.seq_len tokens (`<output_dir>/train-rows.npy`, the same rows the in-process backend would train on),
and megatron_qat.py turns them into a Megatron indexed dataset. QAT trains the PTQ checkpoint on them with
megatron_qat.py (Megatron-Bridge's pretrain loop, scales frozen); QAD distils it from the BF16 model with
ModelOpt's distill.py. The generate check and the export then load the trained checkpoint, and the loss curve
is read from the training step's log into the record's "recovery" section.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from ptq.backend_spec import recover_batch, recover_rows
from ptq.backends.base import BackendResult, use_extension_cache
from ptq.backends.megatron_entry import FUSION_OFF_NOTE, MAMBA_ENV
from ptq.backends.megatron_steps import (
    LOG_DIR,
    MEGATRON_CHECKPOINT,
    STEP_ENV,
    TRAIN_ROWS,
    Step,
    build_steps,
    calib_dataset,
    check_scripts,
    model_id,
    recovered_checkpoint,
    training_output,
    write_calib_jsonl,
)
from ptq.calib_data import token_batches
from ptq.cluster import process_rank
from ptq.files import atomic_path
from ptq.layout import PARTIAL_NAME
from ptq.measure import measure_export
from ptq.models import resolve_checkpoint
from ptq.plan import Plan
from ptq.record_parts import StageTimer
from ptq.recover import text_source
from ptq.state import ProcessState
from ptq.validate import read_tensor_index

log = logging.getLogger(__name__)


def _run_logged(argv: List[str], env: Mapping[str, str], log_path: Path) -> int:
    """Run `argv`, passing its output through to ours and into `log_path`; its exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8", buffering=1) as out:  # line-buffered: other tasks read it
        proc = subprocess.Popen(
            argv,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        for line in proc.stdout:
            out.write(line)
            sys.stdout.write(line)
        return proc.wait()


def run_steps(steps: List[Step], env: Mapping[str, str], timer: StageTimer, log_dir: Path) -> Dict[str, Path]:
    """Run the steps this process takes part in; {step: its log file}."""
    rank = process_rank(env)
    logs = {}
    for step in steps:
        if rank >= step.ranks:
            log.info("Megatron-Bridge %s: not on rank %d", step.name, rank)
            continue
        log.info("Megatron-Bridge %s: %s", step.name, shlex.join(step.argv))
        logs[step.name] = log_dir / (f"{step.name}.log" if rank == 0 else f"{step.name}-task{rank}.log")
        with timer.stage(step.name):
            status = _run_logged(step.argv, {**env, **dict(STEP_ENV), **dict(step.env)}, logs[step.name])
        if status:
            raise RuntimeError(
                f"Megatron-Bridge {step.name} step exited with status {status}; the end of its output "
                f"({logs[step.name]}):\n{_last_lines(logs[step.name])}\ncommand: {shlex.join(step.argv)}"
            )
    return logs


def _last_lines(path: Path, count: int = 12) -> str:
    """The last lines of a step's output that are not warnings: usually the error that stopped it."""
    lines = [
        line for line in path.read_text(errors="replace").splitlines() if line.strip() and "warn" not in line.lower()
    ]
    return "\n".join(lines[-count:])


_GENERATED = re.compile(r"^Generated: (\[.*\])\s*$")
_PROMPT = re.compile(r"^Prompt (\d+): (.*)$")


def parse_generations(text: str) -> List[dict]:
    """The prompt/answer pairs the scripts print ("Prompt N: ..." then "Generated: ['...']")."""
    pairs, prompt = [], None
    for line in text.splitlines():
        line = line.strip()
        m = _PROMPT.match(line)
        if m:
            prompt = m.group(2)
            continue
        m = _GENERATED.match(line)
        if m:
            try:
                answer = ast.literal_eval(m.group(1))
            except (ValueError, SyntaxError):
                answer = [m.group(1)]
            pairs.append({"prompt": prompt, "generated": answer[0] if len(answer) == 1 else answer})
            prompt = None
    return pairs


def generation_check(plan: Plan, log_dir: Path, strict: bool) -> dict:
    """The answers of the quantized model: in memory after the quantize step, and reloaded from the Megatron
    checkpoint by the generate step. Global rank 0 prints them; under torchrun on several nodes the
    rendezvous may put that rank on any node, so every task's log is read. `strict`: fail when the generate
    step answered fewer prompts than given (only where rank 0 is known to be this task's)."""
    prompts = plan.cfg.backend.prompts.split("|")
    found = {}
    for name in ("quantize", "generate"):
        pairs = []
        for path in sorted(log_dir.glob(f"{name}*.log")):
            pairs += parse_generations(path.read_text(errors="replace"))
        found[name] = pairs
    if strict and plan.cfg.backend.generate_check and len(found["generate"]) < len(prompts):
        raise RuntimeError(
            f"Megatron-Bridge generate step printed {len(found['generate'])} answers for "
            f"{len(prompts)} prompts (output: {log_dir / 'generate.log'})"
        )
    return found


def _prepare_inputs(plan: Plan, timer: StageTimer) -> None:
    """What the scripts read besides the model: a GGUF model converted to a Hugging Face folder (once, in
    the cache), the calibration JSONL and, for QAT, the training rows. Every task of a multi-node job does this;
    the writes are atomic."""
    if plan.source.kind == "gguf":
        with timer.stage("convert_model"):
            resolve_checkpoint(plan.source)
    write_calib_jsonl(plan)
    if plan.cfg.recover.method in ("qat", "qad"):
        with timer.stage("recover_text"):
            write_train_rows(plan)
        # A checkpoint left by an earlier attempt at this output folder would be resumed (distill.py loads
        # its own save folder), not retrained: the training starts from the PTQ checkpoint every time.
        shutil.rmtree(training_output(plan), ignore_errors=True)


def write_train_rows(plan: Plan) -> Path:
    """recover.text as [rows, recover.seq_len] token ids of the model's tokenizer, in `<output_dir>/train-rows.npy`
    (the launcher's own reader: chat-formatted JSONL through the chat template, as the in-process backend)."""
    import numpy
    from transformers import AutoTokenizer

    rec = plan.cfg.recover
    source = model_id(plan)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=plan.cfg.model.trust_remote_code)
    tokens = token_batches(
        rec.text,
        model=None,
        tokenizer=tokenizer,
        model_id=source,
        samples=recover_rows(plan.cfg),
        seq_len=rec.seq_len,
        seed=rec.seed,
        cache_dir=plan.cfg.cache_dir,
        sample_batch_size=1,
    )
    target = plan.output_dir / TRAIN_ROWS
    with atomic_path(target) as partial, open(partial, "wb") as out:
        numpy.save(out, tokens.numpy().astype(numpy.int64))
    return target


_ITERATION = re.compile(r"\biteration\s+(\d+)/\s*(\d+)\s*\|(.*)$")


# The loss each method trains on, as Megatron-Bridge's training log names it: QAT the causal-LM loss; QAD the
# logit KL (Megatron-Bridge's distillation loss function; its "lm loss" field reads 0 while training, as
# distill.py skips the LM loss).
LOG_LOSS = {"qat": "lm loss", "qad": "logits distillation loss"}


def parse_training_log(text: str, loss: str = LOG_LOSS["qat"]) -> List[dict]:
    """The loss curve of a Megatron-Bridge training log: one entry per logged iteration (its lines read
    `iteration N/ M | ... | learning rate: X | ... | lm loss: X | ... | grad norm: X |`), `loss` the logged loss
    of that name."""
    curve = []
    for line in text.splitlines():
        match = _ITERATION.search(line)
        if not match:
            continue
        fields = {}
        for part in match.group(3).split("|"):
            key, sep, value = part.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        try:
            entry = {"step": int(match.group(1)), "loss": float(fields[loss])}
        except (KeyError, ValueError):
            continue  # an iteration logged without a loss (e.g. skipped)
        for name, key in (("lr", "learning rate"), ("grad_norm", "grad norm")):
            try:
                entry[name] = float(fields[key])
            except (KeyError, ValueError):
                pass
        curve.append(entry)
    return curve


def recovery_record(plan: Plan, log_path: Path, seconds: Optional[float]) -> dict:
    """What the run record keeps under "recovery" for a Megatron-Bridge QAT or QAD step."""
    rec = plan.cfg.recover
    method = str(rec.method)
    curve = parse_training_log(log_path.read_text(errors="replace"), LOG_LOSS[method]) if log_path.is_file() else []
    steps = curve[-1]["step"] if curve else 0
    batch = recover_batch(plan.cfg)
    if method == "qad":
        trainer = f"ModelOpt's examples/megatron_bridge/distill.py ({plan.cfg.backend.distill_script})"
        loss = "logit KL to the BF16 teacher (temperature 1)"
    else:
        trainer = "megatron.bridge.training.pretrain.pretrain (ptq/backends/megatron_qat.py)"
        loss = "causal-LM cross-entropy"
    return {
        "method": method,
        "trainer": trainer,
        "loss": loss,
        **({"teacher": f"the BF16 model ({model_id(plan)})"} if method == "qad" else {}),
        "steps": steps,
        "batch_size": batch,
        "seq_len": rec.seq_len,
        "tokens_seen": steps * batch * rec.seq_len,
        "text_samples": recover_rows(plan.cfg),
        "text_source": text_source(plan),
        "lr": rec.lr,
        "schedule": str(rec.schedule),
        "warmup_ratio": rec.warmup_ratio,
        "seed": rec.seed,
        "seconds": None if seconds is None else round(seconds, 3),
        "loss_curve": curve,
        "checkpoint": str(recovered_checkpoint(plan, plan.output_dir / MEGATRON_CHECKPOINT)),
        "scales": {
            "note": "ModelOpt state restored from the PTQ checkpoint; quantizers not calibrating while training"
        },
    }


def _quantized_modules(export_dir: Path) -> List[str]:
    return sorted(
        name[: -len(".weight_scale")] for name in read_tensor_index(export_dir) if name.endswith(".weight_scale")
    )


class MegatronBridgeBackend:
    name = "megatron_bridge"

    def run(
        self,
        plan: Plan,
        export_dir: Path,
        timer: StageTimer,
        state: Optional[ProcessState] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> BackendResult:
        """The steps run as their own processes (torchrun): nothing of `state` applies to them."""
        env = dict(os.environ if env is None else env)
        use_extension_cache(plan.cfg.cache_dir, env)  # the steps' ModelOpt builds its kernels there too
        if plan.cfg.model.arch == "mamba_hybrid":
            env[MAMBA_ENV] = "1"  # the entry checks mamba-ssm and causal-conv1d before the scripts start
        megatron_dir = plan.output_dir / MEGATRON_CHECKPOINT
        steps = build_steps(plan, megatron_dir, export_dir, env)
        check_scripts(plan, steps)
        _prepare_inputs(plan, timer)
        logs = run_steps(steps, env, timer, plan.output_dir / LOG_DIR)
        quantized = _quantized_modules(export_dir)
        notes = (
            [FUSION_OFF_NOTE] if any(FUSION_OFF_NOTE in p.read_text(errors="replace") for p in logs.values()) else []
        )
        details = {
            "commands": {s.name: s.argv for s in steps},
            "megatron_checkpoint": str(megatron_dir),
            "extensions_dir": env.get("TORCH_EXTENSIONS_DIR"),
            "source": model_id(plan),
            "calib_dataset": calib_dataset(plan),
            "logs": {name: str(path) for name, path in logs.items()},
            "generation": generation_check(
                plan, plan.output_dir / LOG_DIR, strict=plan.cfg.parallelism.nodes == 1 or "RANK" in env
            ),
            "notes": notes,
        }
        recovery = None
        method = str(plan.cfg.recover.method)
        if method in ("qat", "qad"):
            recovery = recovery_record(plan, logs[method], timer.seconds.get(method))
            if recovery["steps"] != plan.cfg.recover.steps:
                raise RuntimeError(
                    f"the {method.upper()} step logged {recovery['steps']} of {plan.cfg.recover.steps} iterations "
                    f"with a loss; see {logs[method]}"
                )
        # Fidelity and benchmarks of the exported checkpoint, read back the same way for both backends.
        fid, scores = measure_export(plan, export_dir, timer) if plan.measure_export else (None, None)
        return BackendResult(
            bf16_bytes=int(plan.cfg.model.params_b * 1e9 * 2),
            quantized_layers=quantized,
            fidelity=fid,
            evaluation=scores,
            details=details,
            recovery=recovery,
        )

    def run_worker(self, plan: Plan, env: Optional[Mapping[str, str]] = None) -> dict:
        """A process of rank > 0 in a multi-node job: take part in the distributed steps, write nothing else."""
        env = dict(os.environ if env is None else env)
        use_extension_cache(plan.cfg.cache_dir, env)
        if plan.cfg.model.arch == "mamba_hybrid":
            env[MAMBA_ENV] = "1"
        out = plan.output_dir
        steps = build_steps(plan, out / MEGATRON_CHECKPOINT, out / PARTIAL_NAME, env)
        check_scripts(plan, steps)
        timer = StageTimer()
        _prepare_inputs(plan, timer)
        run_steps(steps, env, timer, out / LOG_DIR)
        return {"status": "worker", "rank": process_rank(env), "output_dir": str(out), "timings_s": timer.seconds}
