"""Megatron-Bridge's quantization scripts as processes: quantize -> generate check -> export.

Each step runs under torchrun with the `parallelism` group's layout, or directly when the ranks
were already started by the scheduler (srun sets WORLD_SIZE and RANK for every task). The
commands are built by pure functions so they can be checked without GPUs; `run` executes them.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from ptq.backends.base import BackendResult
from ptq.cluster import process_rank
from ptq.exported import measure_export
from ptq.plan import PARTIAL_NAME, ConfigError, Plan
from ptq.record import StageTimer
from ptq.validate import read_tensor_index

log = logging.getLogger(__name__)

SCRIPTS = {"quantize": "quantize.py", "generate": "ptq_generate.py", "export": "export.py"}
MEGATRON_CHECKPOINT = "megatron"


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
    return plan.source.location


def script_args(plan: Plan, megatron_dir: Path, export_dir: Path) -> Dict[str, List[str]]:
    """The upstream scripts' arguments for each step (without the launcher)."""
    cfg, backend, par = plan.cfg, plan.cfg.backend, plan.cfg.parallelism
    trust = ["--trust-remote-code"] if cfg.model.trust_remote_code else []
    quantize = ["--hf-model-id", model_id(plan), "--export-quant-cfg", cfg.recipe.megatron_cfg,
                "--megatron-save-path", str(megatron_dir), *_layout_flags(par.tp, par.pp, par.ep, par.etp),
                "--calib-size", str(cfg.calib.size), *trust]
    if cfg.recipe.kv_cache != "none":
        quantize.append("--export-kv-cache-quant")
    if cfg.recipe.weight_only:
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
    if nnodes > 1:
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
        argv = launcher(plan, nproc, nnodes, env) + [str(scripts / SCRIPTS[name])] + args[name]
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


def run_steps(steps: List[Step], env: Mapping[str, str], timer: StageTimer) -> None:
    rank = process_rank(env)
    for step in steps:
        if rank >= step.ranks:
            log.info("Megatron-Bridge %s: not on rank %d", step.name, rank)
            continue
        log.info("Megatron-Bridge %s: %s", step.name, shlex.join(step.argv))
        with timer.stage(step.name):
            done = subprocess.run(step.argv, env={**env, **dict(step.env)})
        if done.returncode:
            raise RuntimeError(f"Megatron-Bridge {step.name} step exited with status {done.returncode}: {shlex.join(step.argv)}")


def _quantized_modules(export_dir: Path) -> List[str]:
    return sorted(name[: -len(".weight_scale")] for name in read_tensor_index(export_dir) if name.endswith(".weight_scale"))


class MegatronBridgeBackend:
    name = "megatron_bridge"

    def describe(self, plan: Plan) -> List[str]:
        return describe(plan)

    def run(self, plan: Plan, export_dir: Path, timer: StageTimer, env: Optional[Mapping[str, str]] = None) -> BackendResult:
        env = dict(os.environ if env is None else env)
        megatron_dir = plan.output_dir / MEGATRON_CHECKPOINT
        steps = build_steps(plan, megatron_dir, export_dir, env)
        check_scripts(plan, steps)
        run_steps(steps, env, timer)
        quantized = _quantized_modules(export_dir)
        details = {"commands": {s.name: s.argv for s in steps}, "megatron_checkpoint": str(megatron_dir),
                   "source": model_id(plan)}
        # Fidelity and benchmarks of the exported checkpoint, read back the same way for both backends.
        fid, scores = measure_export(plan, export_dir, timer) if plan.measure_export else (None, None)
        return BackendResult(bf16_bytes=int(plan.cfg.model.params_b * 1e9 * 2), quantized_layers=quantized,
                             fidelity=fid, evaluation=scores, details=details)

    def run_worker(self, plan: Plan, env: Optional[Mapping[str, str]] = None) -> dict:
        """A process of rank > 0 in a multi-node job: take part in the distributed steps, write nothing else."""
        env = dict(os.environ if env is None else env)
        out = plan.output_dir
        steps = build_steps(plan, out / MEGATRON_CHECKPOINT, out / PARTIAL_NAME, env)
        check_scripts(plan, steps)
        timer = StageTimer()
        run_steps(steps, env, timer)
        return {"status": "worker", "rank": process_rank(env), "output_dir": str(out), "timings_s": timer.seconds}
