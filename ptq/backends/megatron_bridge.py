"""Megatron-Bridge's quantization scripts as processes: quantize -> generate check -> export.

Each step runs under torchrun with the `parallelism` group's layout, or directly when the ranks
were already started by the scheduler (srun sets WORLD_SIZE and RANK for every task). Every step
starts through `megatron_entry.py` (one compatibility setting, see there). The commands are built
by pure functions so they can be checked without GPUs; `run` executes them, keeps each step's
output in `<output_dir>/logs/`, and records the generation check's answers.

Calibration text is the launcher's own `calib.dataset`: a .txt file is handed to the scripts as a
one-line JSONL (`<output_dir>/calib.jsonl`), which ModelOpt's Megatron loader packs into rows exactly
as the in-process backend does (text + EOS, cut into calib.seq_len tokens), so both backends
calibrate on the same tokens.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from ptq.backends.base import BackendResult, use_extension_cache
from ptq.backends.megatron_entry import FUSION_OFF_NOTE
from ptq.textfiles import read_texts
from ptq.cluster import process_rank
from ptq.errors import ConfigError
from ptq.files import write_text_atomic
from ptq.layout import LOG_DIR_NAME, PARTIAL_NAME
from ptq.measure import measure_export
from ptq.models import resolve_checkpoint
from ptq.plan import Plan, calib_text_path
from ptq.record import StageTimer
from ptq.validate import read_tensor_index

log = logging.getLogger(__name__)

SCRIPTS = {"quantize": "quantize.py", "generate": "ptq_generate.py", "export": "export.py"}
MEGATRON_CHECKPOINT = "megatron"
ENTRY = Path(__file__).with_name("megatron_entry.py")
CALIB_JSONL = "calib.jsonl"
LOG_DIR = LOG_DIR_NAME
# Rich (the scripts' console) wraps at 80 columns when not on a terminal; wide lines keep each
# generated answer on one line of the log.
STEP_ENV = (("COLUMNS", "4000"),)
# Calibration batch when calib.batch_size is 0 (automatic): the scripts' default is 1.
DEFAULT_CALIB_BATCH = 16


@dataclass(frozen=True)
class Step:
    name: str
    argv: List[str]
    # Only processes of rank below this run the step (the export is smaller than the quantize job).
    ranks: int = 1 << 30
    # Environment changes for the step (ranks started by the scheduler: the export's own world size).
    env: Tuple[Tuple[str, str], ...] = ()


def _layout_flags(tp: int, pp: int, ep: int, etp: int) -> List[str]:
    return ["--tp", str(tp), "--pp", str(pp), "--ep", str(ep), "--etp", str(etp)]


def model_id(plan: Plan) -> str:
    """What --hf-model-id gets: a Hub id, a local folder, or the folder a GGUF file is converted into."""
    return plan.source.converted_dir or plan.source.location


def calib_dataset(plan: Plan) -> str:
    """What --calib-dataset gets: the JSONL the launcher writes for a text file, a JSONL as given,
    or a dataset name ModelOpt resolves itself."""
    text = calib_text_path(plan.cfg.calib.dataset)
    if text is None:
        return plan.cfg.calib.dataset
    return str(text) if text.suffix == ".jsonl" else str(plan.output_dir / CALIB_JSONL)


def write_calib_jsonl(plan: Plan) -> Optional[Path]:
    """Hand a .txt calibration file to the scripts as JSONL, read by the in-process backend's own reader
    (same text, same tokens)."""
    text = calib_text_path(plan.cfg.calib.dataset)
    if text is None or text.suffix == ".jsonl":
        return None
    target = plan.output_dir / CALIB_JSONL
    write_text_atomic(target, "".join(json.dumps({"text": t}) + "\n" for t in read_texts(text)))
    return target


def script_args(plan: Plan, megatron_dir: Path, export_dir: Path) -> Dict[str, List[str]]:
    """The upstream scripts' arguments for each step (without the launcher)."""
    cfg, backend, par = plan.cfg, plan.cfg.backend, plan.cfg.parallelism
    trust = ["--trust-remote-code"] if cfg.model.trust_remote_code else []
    quantize = ["--hf-model-id", model_id(plan), "--export-quant-cfg", cfg.recipe.megatron_cfg,
                "--megatron-save-path", str(megatron_dir), *_layout_flags(par.tp, par.pp, par.ep, par.etp),
                "--calib-size", str(cfg.calib.size), "--calib-seq-length", str(cfg.calib.seq_len),
                "--calib-batch-size", str(cfg.calib.batch_size or min(cfg.calib.size, DEFAULT_CALIB_BATCH)),
                "--calib-dataset", calib_dataset(plan), "--prompts", backend.prompts, *trust]
    if cfg.recipe.kv_cache != "none":
        quantize.append("--export-kv-cache-quant")
    if cfg.recipe.weight_only and not cfg.recipe.awq:
        # --weight-only also skips calibration: right for weights-only scales, wrong for AWQ, whose search
        # needs activations (its ModelOpt configs already leave the inputs unquantized).
        quantize.append("--weight-only")
    if backend.compress:
        quantize.append("--compress")
    quantize += list(backend.extra_args)
    generate = ["--hf-model-id", model_id(plan), "--megatron-load-path", str(megatron_dir),
                *_layout_flags(par.tp, par.pp, par.ep, par.etp), "--prompts", backend.prompts, *trust]
    export_pp = backend.export_pp or par.pp
    export = ["--hf-model-id", model_id(plan), "--megatron-load-path", str(megatron_dir), "--export-dir", str(export_dir),
              *_layout_flags(backend.export_tp, export_pp, backend.export_ep, 1), "--dtype", backend.export_dtype, *trust]
    return {"quantize": quantize, "generate": generate, "export": export}


def launcher(plan: Plan, nproc_per_node: int, nnodes: int, env: Mapping[str, str]) -> List[str]:
    """torchrun for this node, or the plain interpreter when the scheduler already started every rank."""
    backend = plan.cfg.backend
    if "WORLD_SIZE" in env and "RANK" in env:
        return [backend.python]
    cmd = shlex.split(backend.torchrun) + [f"--nproc_per_node={nproc_per_node}"]
    if nnodes == 1:
        # A rendezvous on a free local port: several runs on one machine do not collide.
        cmd.append("--standalone")
    else:
        master = env.get("MASTER_ADDR", "localhost")
        job = env.get("SLURM_JOB_ID", "ptq")
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={master}:{backend.rdzv_port}",
                f"--rdzv_id={job}"]
    return cmd


def build_steps(plan: Plan, megatron_dir: Path, export_dir: Path, env: Mapping[str, str]) -> List[Step]:
    """Every command the backend runs, in order. Pure: same plan and env, same commands."""
    par, backend = plan.cfg.parallelism, plan.cfg.backend
    args = script_args(plan, megatron_dir, export_dir)
    scripts = Path(backend.scripts_dir)
    export_world = backend.export_tp * (backend.export_pp or par.pp)
    layouts = {"quantize": (par.gpus_per_node, par.nodes), "generate": (par.gpus_per_node, par.nodes),
               # The export is one node's job: TP 1 and PP ranks only.
               "export": (export_world, 1)}
    direct = "WORLD_SIZE" in env and "RANK" in env
    steps = []
    for name in ("quantize", "generate", "export"):
        if name == "generate" and not backend.generate_check:
            continue
        nproc, nnodes = layouts[name]
        argv = launcher(plan, nproc, nnodes, env) + [str(ENTRY), str(scripts / SCRIPTS[name])] + args[name]
        if name != "export":
            steps.append(Step(name, argv))
        elif direct:  # the first export_world ranks (all on the first node) form the export's own group
            steps.append(Step(name, argv, ranks=export_world, env=(("WORLD_SIZE", str(export_world)),)))
        else:  # torchrun on the first node only
            steps.append(Step(name, argv, ranks=1))
    return steps


def unsupported_flags(argv: List[str], script_text: str) -> List[str]:
    """Flags in `argv` that the installed script (and its helpers) never mention."""
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    return [f for f in flags if not re.search(rf"[\"']{re.escape(f)}[\"']", script_text)]


def check_scripts(plan: Plan, steps: List[Step]) -> None:
    """The scripts exist and accept every flag we pass; checked before any process starts."""
    scripts = Path(plan.cfg.backend.scripts_dir)
    if not scripts.is_dir():
        raise ConfigError(
            f"backend.scripts_dir={scripts} does not exist; point it at Megatron-Bridge's examples/quantization folder "
            "(in the NeMo container: /opt/Megatron-Bridge/examples/quantization)."
        )
    helpers = "".join(p.read_text(errors="replace") for p in scripts.glob("*utils*.py"))
    for step in steps:
        script = scripts / SCRIPTS[step.name]
        if not script.is_file():
            raise ConfigError(f"{script} is missing: this Megatron-Bridge checkout has no {SCRIPTS[step.name]}.")
        script_pos = step.argv.index(str(script))
        missing = unsupported_flags(step.argv[script_pos + 1:], script.read_text(errors="replace") + helpers)
        if missing:
            raise ConfigError(
                f"{script} does not accept {', '.join(missing)} (the flags differ between Megatron-Bridge releases); "
                "remove them from backend.extra_args or use a release that has them."
            )


def describe(plan: Plan, env: Mapping[str, str] = os.environ) -> List[str]:
    out = plan.output_dir
    return [shlex.join(s.argv) for s in build_steps(plan, out / MEGATRON_CHECKPOINT, out / PARTIAL_NAME, env)]


def _run_logged(argv: List[str], env: Mapping[str, str], log_path: Path) -> int:
    """Run `argv`, passing its output through to ours and into `log_path`; its exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8", buffering=1) as out:  # line-buffered: other tasks read it
        proc = subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
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
            raise RuntimeError(f"Megatron-Bridge {step.name} step exited with status {status}; the end of its output "
                               f"({logs[step.name]}):\n{_last_lines(logs[step.name])}\ncommand: {shlex.join(step.argv)}")
    return logs


def _last_lines(path: Path, count: int = 12) -> str:
    """The last lines of a step's output that are not warnings: usually the error that stopped it."""
    lines = [line for line in path.read_text(errors="replace").splitlines()
             if line.strip() and "warn" not in line.lower()]
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
        raise RuntimeError(f"Megatron-Bridge generate step printed {len(found['generate'])} answers for "
                           f"{len(prompts)} prompts (output: {log_dir / 'generate.log'})")
    return found


def _prepare_inputs(plan: Plan, timer: StageTimer) -> None:
    """What the scripts read besides the model: a GGUF model converted to a Hugging Face folder (once, in
    the cache) and the calibration JSONL. Every task of a multi-node job does this; both writes are atomic."""
    if plan.source.kind == "gguf":
        with timer.stage("convert_model"):
            resolve_checkpoint(plan.source)
    write_calib_jsonl(plan)


def _quantized_modules(export_dir: Path) -> List[str]:
    return sorted(name[: -len(".weight_scale")] for name in read_tensor_index(export_dir) if name.endswith(".weight_scale"))


class MegatronBridgeBackend:
    name = "megatron_bridge"

    def describe(self, plan: Plan) -> List[str]:
        return describe(plan)

    def run(self, plan: Plan, export_dir: Path, timer: StageTimer, env: Optional[Mapping[str, str]] = None) -> BackendResult:
        env = dict(os.environ if env is None else env)
        use_extension_cache(plan.cfg.cache_dir, env)  # the steps' ModelOpt builds its kernels there too
        megatron_dir = plan.output_dir / MEGATRON_CHECKPOINT
        steps = build_steps(plan, megatron_dir, export_dir, env)
        check_scripts(plan, steps)
        _prepare_inputs(plan, timer)
        logs = run_steps(steps, env, timer, plan.output_dir / LOG_DIR)
        quantized = _quantized_modules(export_dir)
        notes = [FUSION_OFF_NOTE] if any(FUSION_OFF_NOTE in p.read_text(errors="replace") for p in logs.values()) else []
        details = {"commands": {s.name: s.argv for s in steps}, "megatron_checkpoint": str(megatron_dir),
                   "extensions_dir": env.get("TORCH_EXTENSIONS_DIR"),
                   "source": model_id(plan), "calib_dataset": calib_dataset(plan),
                   "logs": {name: str(path) for name, path in logs.items()},
                   "generation": generation_check(plan, plan.output_dir / LOG_DIR,
                                                  strict=plan.cfg.parallelism.nodes == 1 or "RANK" in env),
                   "notes": notes}
        # Fidelity and benchmarks of the exported checkpoint, read back the same way for both backends.
        fid, scores = measure_export(plan, export_dir, timer) if plan.measure_export else (None, None)
        return BackendResult(bf16_bytes=int(plan.cfg.model.params_b * 1e9 * 2), quantized_layers=quantized,
                             fidelity=fid, evaluation=scores, details=details)

    def run_worker(self, plan: Plan, env: Optional[Mapping[str, str]] = None) -> dict:
        """A process of rank > 0 in a multi-node job: take part in the distributed steps, write nothing else."""
        env = dict(os.environ if env is None else env)
        use_extension_cache(plan.cfg.cache_dir, env)
        out = plan.output_dir
        steps = build_steps(plan, out / MEGATRON_CHECKPOINT, out / PARTIAL_NAME, env)
        check_scripts(plan, steps)
        timer = StageTimer()
        _prepare_inputs(plan, timer)
        run_steps(steps, env, timer, out / LOG_DIR)
        return {"status": "worker", "rank": process_rank(env), "output_dir": str(out), "timings_s": timer.seconds}
