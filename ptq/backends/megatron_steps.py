"""Megatron-Bridge's quantization steps as command lines, from the plan alone: quantize -> (recover=qat or qad:
training data -> QAT or QAD) -> generate check -> export, each under torchrun with the `parallelism` group's layout (or directly when the scheduler started the
ranks). Pure: nothing here imports torch or runs a process, so dry runs, sweep checks and tests build and check
the commands without GPUs; ptq/backends/megatron_bridge.py runs them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from ptq.backend_spec import recover_batch
from ptq.errors import ConfigError
from ptq.files import write_text_atomic
from ptq.layout import LOG_DIR_NAME, PARTIAL_NAME
from ptq.plan import Plan, calib_text_path
from ptq.textfiles import read_texts

SCRIPTS = {"quantize": "quantize.py", "generate": "ptq_generate.py", "export": "export.py"}
MEGATRON_CHECKPOINT = "megatron"
ENTRY = Path(__file__).with_name("megatron_entry.py")
# recover=qat or qad: the training text is token rows the launcher writes (TRAIN_ROWS), turned into a Megatron
# indexed dataset (TRAIN_DATA.bin/.idx) by the train_data step of the launcher's own script (QAT_SCRIPT).
# recover=qat: that script's train step (Megatron-Bridge's pretrain loop on the PTQ checkpoint) writes
# QAT_CHECKPOINT, which generate and export load instead of the PTQ checkpoint.
QAT_SCRIPT = Path(__file__).with_name("megatron_qat.py")
QAT_CHECKPOINT = "megatron-qat"
TRAIN_ROWS = "train-rows.npy"
TRAIN_DATA = "train-data/text"
# recover=qad: ModelOpt's examples/megatron_bridge/distill.py (backend.distill_script) on the same data, the PTQ
# checkpoint as student (its quantizers restored) and the BF16 model as teacher; it writes its checkpoints to
# QAD_OUTPUT/checkpoints/iter_N and its dataset indices to QAD_OUTPUT/data-cache.
QAD_OUTPUT = "megatron-qad"
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


def train_data_args(plan: Plan) -> List[str]:
    """megatron_qat.py's data step: the launcher's token rows -> a Megatron indexed dataset (QAT and QAD)."""
    out = plan.output_dir
    return ["data", "--rows", str(out / TRAIN_ROWS), "--out", str(out / TRAIN_DATA)]


def qat_args(plan: Plan, megatron_dir: Path) -> List[str]:
    """megatron_qat.py's training step."""
    cfg, rec, par = plan.cfg, plan.cfg.recover, plan.cfg.parallelism
    out = plan.output_dir
    schedule = {"constant_with_warmup": "constant"}.get(str(rec.schedule), str(rec.schedule))
    train = [
        "train",
        "--hf-path",
        model_id(plan),
        "--load",
        str(megatron_dir),
        "--save",
        str(out / QAT_CHECKPOINT),
        "--data",
        str(out / TRAIN_DATA),
        "--steps",
        str(rec.steps),
        "--global-batch-size",
        str(recover_batch(plan.cfg)),
        "--micro-batch-size",
        "1",
        "--seq-length",
        str(rec.seq_len),
        "--lr",
        repr(float(rec.lr)),
        "--schedule",
        schedule,
        "--warmup-iters",
        str(round(rec.warmup_ratio * rec.steps)),
        "--seed",
        str(rec.seed),
        *_layout_flags(par.tp, par.pp, par.ep, par.etp),
        *(["--trust-remote-code"] if cfg.model.trust_remote_code else []),
    ]
    return train


def qad_args(plan: Plan, megatron_dir: Path) -> List[str]:
    """distill.py's arguments: the PTQ checkpoint distilled from the BF16 model it came from, on the training rows.
    Its learning rate anneals to 0 on a cosine after the warmup (the in-process QADTrainer's schedule); nothing
    is evaluated (eval_iters 0; distill.py still sets 1% of the rows aside as its validation split) and one
    checkpoint, the last, is kept."""
    cfg, rec, par = plan.cfg, plan.cfg.recover, plan.cfg.parallelism
    out = plan.output_dir
    source = model_id(plan)
    return [
        "--student_hf_path",
        source,
        "--teacher_hf_path",
        source,
        "--student_megatron_path",
        str(megatron_dir),
        "--data_paths",
        "1.0",
        str(out / TRAIN_DATA),
        "--data_path_to_cache",
        str(out / QAD_OUTPUT / "data-cache"),
        "--output_dir",
        str(out / QAD_OUTPUT),
        "--seq_length",
        str(rec.seq_len),
        "--mbs",
        "1",
        "--gbs",
        str(recover_batch(cfg)),
        "--train_iters",
        str(rec.steps),
        "--lr",
        repr(float(rec.lr)),
        "--min_lr",
        "0.0",
        "--lr_warmup_iters",
        str(round(rec.warmup_ratio * rec.steps)),
        "--eval_interval",
        str(rec.steps),
        "--eval_iters",
        "0",
        "--log_interval",
        "1",
        "--checkpoint_keep_last",
        "1",
        "--seed",
        str(rec.seed),
        "--tp_size",
        str(par.tp),
        "--pp_size",
        str(par.pp),
        "--ep_size",
        str(par.ep),
        *(["--trust_remote_code"] if cfg.model.trust_remote_code else []),
    ]


def training_output(plan: Plan) -> Optional[Path]:
    """The folder the recovery step writes (None without recovery)."""
    name = {"qat": QAT_CHECKPOINT, "qad": QAD_OUTPUT}.get(str(plan.cfg.recover.method))
    return None if name is None else plan.output_dir / name


def recovered_checkpoint(plan: Plan, megatron_dir: Path) -> Path:
    """What the generate check and the export load: the checkpoint recovery trained (distill.py saves in its
    output folder's checkpoints/), else the PTQ one."""
    trained = training_output(plan)
    if trained is None:
        return megatron_dir
    return trained / "checkpoints" if plan.cfg.recover.method == "qad" else trained


def script_args(plan: Plan, megatron_dir: Path, export_dir: Path) -> Dict[str, List[str]]:
    """The upstream scripts' arguments for each step (without the launcher)."""
    cfg, backend, par = plan.cfg, plan.cfg.backend, plan.cfg.parallelism
    loaded = recovered_checkpoint(plan, megatron_dir)
    trust = ["--trust-remote-code"] if cfg.model.trust_remote_code else []
    quantize = [
        "--hf-model-id",
        model_id(plan),
        "--export-quant-cfg",
        cfg.recipe.megatron_cfg,
        "--megatron-save-path",
        str(megatron_dir),
        *_layout_flags(par.tp, par.pp, par.ep, par.etp),
        "--calib-size",
        str(cfg.calib.size),
        "--calib-seq-length",
        str(cfg.calib.seq_len),
        "--calib-batch-size",
        str(cfg.calib.batch_size or min(cfg.calib.size, DEFAULT_CALIB_BATCH)),
        "--calib-dataset",
        calib_dataset(plan),
        "--prompts",
        backend.prompts,
        *trust,
    ]
    if cfg.recipe.kv_cache != "none":
        quantize.append("--export-kv-cache-quant")
    if cfg.recipe.weight_only and not cfg.recipe.awq:
        # --weight-only also skips calibration: right for weights-only scales, wrong for AWQ, whose search
        # needs activations (its ModelOpt configs already leave the inputs unquantized).
        quantize.append("--weight-only")
    if backend.compress:
        quantize.append("--compress")
    quantize += list(backend.extra_args)
    generate = [
        "--hf-model-id",
        model_id(plan),
        "--megatron-load-path",
        str(loaded),
        *_layout_flags(par.tp, par.pp, par.ep, par.etp),
        "--prompts",
        backend.prompts,
        *trust,
    ]
    export_pp = backend.export_pp or par.pp
    export = [
        "--hf-model-id",
        model_id(plan),
        "--megatron-load-path",
        str(loaded),
        "--export-dir",
        str(export_dir),
        *_layout_flags(backend.export_tp, export_pp, backend.export_ep, 1),
        "--dtype",
        backend.export_dtype,
        *trust,
    ]
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
        cmd += [
            f"--nnodes={nnodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={master}:{backend.rdzv_port}",
            f"--rdzv_id={job}",
        ]
    return cmd


def build_steps(plan: Plan, megatron_dir: Path, export_dir: Path, env: Mapping[str, str]) -> List[Step]:
    """Every command the backend runs, in order. Pure: same plan and env, same commands."""
    par, backend = plan.cfg.parallelism, plan.cfg.backend
    args = script_args(plan, megatron_dir, export_dir)
    scripts = Path(backend.scripts_dir)
    export_world = backend.export_tp * (backend.export_pp or par.pp)
    layouts = {
        "quantize": (par.gpus_per_node, par.nodes),
        "generate": (par.gpus_per_node, par.nodes),
        # The export is one node's job: TP 1 and PP ranks only.
        "export": (export_world, 1),
    }
    direct = "WORLD_SIZE" in env and "RANK" in env
    method = str(plan.cfg.recover.method)
    # The training job has the quantize job's layout.
    training = {
        "qat": lambda: [str(ENTRY), str(QAT_SCRIPT), *qat_args(plan, megatron_dir)],
        "qad": lambda: [str(ENTRY), backend.distill_script, *qad_args(plan, megatron_dir)],
    }
    steps = []
    for name in ("quantize", "train_data", "qat", "qad", "generate", "export"):
        if name == "generate" and not backend.generate_check:
            continue
        if name == "train_data":
            if method in training:  # one process on every node (each writes the same files, atomically)
                steps.append(Step(name, [backend.python, str(QAT_SCRIPT), *train_data_args(plan)]))
            continue
        if name in training:
            if name == method:
                nproc, nnodes = layouts["quantize"]
                steps.append(Step(name, launcher(plan, nproc, nnodes, env) + training[name]()))
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
        if step.name == "qad":
            _check_distill_script(plan, step)
        if step.name not in SCRIPTS:  # the launcher's own (megatron_qat.py), or ModelOpt's distill.py
            continue
        script = scripts / SCRIPTS[step.name]
        if not script.is_file():
            raise ConfigError(f"{script} is missing: this Megatron-Bridge checkout has no {SCRIPTS[step.name]}.")
        script_pos = step.argv.index(str(script))
        missing = unsupported_flags(step.argv[script_pos + 1 :], script.read_text(errors="replace") + helpers)
        if missing:
            raise ConfigError(
                f"{script} does not accept {', '.join(missing)} (the flags differ between Megatron-Bridge releases); "
                "remove them from backend.extra_args or use a release that has them."
            )


def _check_distill_script(plan: Plan, step: Step) -> None:
    script = Path(plan.cfg.backend.distill_script)
    if not script.is_file():
        raise ConfigError(
            f"backend.distill_script={script} does not exist; recover=qad with backend=megatron_bridge runs ModelOpt's "
            "examples/megatron_bridge/distill.py (not part of the nvidia-modelopt wheel): point it at that file in a "
            "Model-Optimizer checkout of the installed ModelOpt's release."
        )
    after = step.argv.index(str(ENTRY)) + 2  # the launcher's entry, distill.py, then its arguments
    missing = unsupported_flags(step.argv[after:], script.read_text(errors="replace"))
    if missing:
        raise ConfigError(
            f"{script} does not accept {', '.join(missing)}; use the distill.py of a Model-Optimizer release that "
            "has --student_megatron_path (0.47 or later)."
        )


def describe_steps(plan: Plan, env: Mapping[str, str] = os.environ) -> List[str]:
    out = plan.output_dir
    return [shlex.join(s.argv) for s in build_steps(plan, out / MEGATRON_CHECKPOINT, out / PARTIAL_NAME, env)]
