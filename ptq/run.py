"""One run: plan -> backend -> validate -> atomically published checkpoint and run record."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import traceback
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import List, Optional, Sequence

from ptq import recipe_files
from ptq.backend_spec import spec_of
from ptq.backends import check_before_run, describe_steps, get_backend, resolved_recipe
from ptq.cluster import process_rank
from ptq.errors import ConfigError
from ptq.files import publish_folder, write_json_atomic, write_text_atomic
from ptq.formats import SERVING_SOURCE, algorithm_tag, serving_engines
from ptq.inputs import check_inputs
from ptq.layout import CONFIG_DIR_NAME, LOG_NAME, PARTIAL_NAME, RECORD_NAME
from ptq.lock import OutputLock, holder_text, live_holder
from ptq.plan import Facts, Plan, gather_facts, inside, make_plan, readable_record, skip_or_refuse_finished
from ptq.record_parts import StageTimer, config_hash, hardware_info, now, package_versions, read_record
from ptq.run_record import RunRecord
from ptq.schema import RunConfig, eval_tag
from ptq.state import ProcessState
from ptq.tracking import check_tracking, track
from ptq.validate import checkpoint_bytes, export_fidelity_problems, validate_checkpoint

log = logging.getLogger(__name__)


class ValidationFailed(RuntimeError):
    pass


class Terminated(BaseException):
    """SIGTERM (Slurm's scancel, a node shutting down) turned into an exception, so the record says so."""


def vision_source(plan: Plan) -> Optional[Path]:
    """The local BF16 folder a vision-language model's export is checked against (None: a text model, or a
    checkpoint loaded by hub id, whose vision tower is then checked only for its format)."""
    if plan.vision_language and plan.source.kind == "local":
        return Path(plan.source.location)
    return None


def prepare(cfg: RunConfig, facts: Optional[Facts] = None, space: bool = True) -> Plan:
    """The checked plan of `cfg`: the pure plan, then the files it reads and the folders it writes
    (ptq/inputs.py). Nothing is loaded or written. `space=False`: a sweep point that runs later, elsewhere: the
    room for its checkpoint and its cache_dir are not judged from this machine."""
    facts = facts or gather_facts(cfg)
    if not space:
        facts = replace(facts, output_free_bytes=None)
    plan = make_plan(cfg, facts)
    check_inputs(cfg, plan, here=space)
    check_tracking(cfg)
    return plan


def error_text(exc: BaseException) -> str:
    """What the record says a run died of; never empty."""
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt: the run was interrupted (Ctrl-C or SIGINT)"
    if isinstance(exc, Terminated):
        return "Terminated: the run received SIGTERM (cancelled, or the machine shut down)"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__} (no message)"


@contextmanager
def sigterm_raises():
    """In the main thread, and only where nothing else handles SIGTERM, raise Terminated on it."""
    previous = signal.getsignal(signal.SIGTERM)
    # Inside a Slurm job, submitit installs a SIGTERM handler that only logs ("bypass"): scancel would then
    # end the run with SIGKILL after KillWait, leaving nothing recorded. Take SIGTERM over from it too.
    submitit_bypass = getattr(previous, "__name__", "") == "bypass" and "submitit" in getattr(
        previous, "__module__", ""
    )
    if threading.current_thread() is not threading.main_thread() or not (previous == signal.SIG_DFL or submitit_bypass):
        yield
        return

    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            # A forked worker (lm-eval's bootstrap pool, a DataLoader) inherited this handler: it must die of
            # SIGTERM as its parent expects; raising here left one blocked and the run waiting on it.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Loggers whose lines go to run.log only, not to the console: Python warnings (ModelOpt's and transformers'
# UserWarnings, through logging.captureWarnings) and DeepSpeed's, which ModelOpt imports and which announces on
# every CPU run that it found no GPU.
LOG_ONLY = ("py.warnings", "DeepSpeed")


class _LogOnly(logging.Filter):
    """Hands a record to the open run.log's handler and keeps it from the logger's own (console) handlers;
    records from before run.log opens (DeepSpeed announces itself when planning imports ModelOpt) wait for it.
    A filter on the logger, not a handler: DeepSpeed creates its logger and console handler while it is being
    imported, after this is in place."""

    def __init__(self) -> None:
        super().__init__()
        self.handler: Optional[logging.Handler] = None
        self.held: List[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.handler is None:
            self.held = self.held[-49:] + [record]
        elif record.levelno >= self.handler.level:
            self.handler.handle(record)
        return False

    def open(self, handler: logging.Handler) -> None:
        self.handler = handler
        for record in self.held:
            handler.handle(record)
        self.held = []


_log_only = _LogOnly()
for _name in LOG_ONLY:
    logging.getLogger(_name).addFilter(_log_only)


@contextmanager
def run_log(output_dir: Path):
    """The run's log lines also go to <output_dir>/run.log; Python warnings and DeepSpeed's lines go there
    only (LOG_ONLY)."""
    handler = logging.FileHandler(output_dir / LOG_NAME, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    _log_only.open(handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        _log_only.handler = None
        root.removeHandler(handler)
        handler.close()


def write_run_files(plan: Plan, config: dict, overrides: Sequence[str]) -> None:
    """The composed config and the command-line overrides, as Hydra would keep them, in the run's folder."""
    from omegaconf import OmegaConf

    folder = plan.output_dir / CONFIG_DIR_NAME
    write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    write_text_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def _base_record(config: dict, **fields) -> RunRecord:
    """A record's fields that the composed config alone gives (the resolved dict, as Hydra hands it over), plus
    `fields`: the one place both a starting run and a point that never ran name them."""
    model, recipe, calib = config.get("model") or {}, config.get("recipe") or {}, config.get("calib") or {}
    return RunRecord(
        model=model.get("name"),
        recipe=recipe.get("name"),
        kv_cache=recipe.get("kv_cache") or "none",
        algorithm=algorithm_tag(recipe.get("algorithm"), recipe.get("algorithm_args"), recipe.get("awq_block_size"))
        or None,
        calib_size=calib.get("size"),
        calib_seq_len=calib.get("seq_len"),
        hardware_profile=(config.get("hardware") or {}).get("name"),
        backend=(config.get("backend") or {}).get("name"),
        config=config,
        **fields,
    )


def _summary(plan: Plan, config: dict) -> dict:
    """The record a run starts with (status running); execute adds what the run measures."""
    cfg = plan.cfg
    record = _base_record(
        config,
        status="running",
        calib_kind=plan.calib_kind,
        fidelity_kind=plan.fidelity_kind,
        # The evaluation settings' tag ('' with evaluation off), as the output folder's name ends with it.
        eval_tag=eval_tag(config.get("eval") or {}).lstrip("-"),
        output_dir=str(plan.output_dir),
        config_hash=config_hash(asdict(cfg)),
        started_at=now(),
        sections={
            "plan": {
                "source": plan.source.__dict__,
                "awq_block_size": plan.awq_block_size,
                "exclude_patterns": plan.exclude_patterns,
                "vision_language": plan.vision_language,
            },
            "warnings": plan.warnings,
            "versions": package_versions(),
            "hardware": hardware_info(),
        },
    )
    return record.to_dict()


def execute(plan: Plan, config: dict, holder: Optional[dict] = None, state: Optional[ProcessState] = None) -> dict:
    """Run a checked plan. Always leaves a run record; a failure re-raises after recording it.
    `holder`: who runs it (ptq/lock.py), kept in the record so status and report can tell a dead run. `state`: what
    the runs of this process keep for each other (ptq/state.py; None: nothing is kept for another run)."""
    state = ProcessState() if state is None else state
    record = _summary(plan, config)
    record["holder"] = holder
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan.record_path, record)
    partial = plan.output_dir / PARTIAL_NAME
    shutil.rmtree(partial, ignore_errors=True)  # left by a run that was killed
    timer = StageTimer()
    try:
        result = get_backend(plan.cfg.backend.name).run(plan, partial, timer, state)
        kv_cache = plan.cfg.recipe.kv_cache
        applied = (result.details or {}).get("applied_recipe")
        if plan.cfg.recipe.modelopt_recipe and applied:
            # A recipe file sets the KV cache itself (recipe.kv_cache must stay none): what it applied is expected.
            kv_cache = record["kv_cache"] = recipe_files.kv_cache_of(applied["quantize"])
        with timer.stage("validate"):
            validation = validate_checkpoint(
                partial,
                expect_quantized=result.quantized_layers,
                expect_quant_algo=plan.export_quant_algo,
                expect_kv_cache=kv_cache,
                unexpected_bf16=result.unexpected_bf16,
                layer_kind_promises=dict(plan.cfg.recipe.layer_kinds),
                vision_source=vision_source(plan),
            )
            validation["problems"] += export_fidelity_problems(result.fidelity, plan.cfg.fidelity.export_kl_tolerance)
            validation["passed"] = not validation["problems"]
        record["validation"] = validation
        # Which serving engines load this checkpoint's formats (ptq/formats.py, facts with their source and date).
        record["serving"] = {
            "engines": serving_engines(validation.get("quant_algo"), validation.get("kv_cache_quant_algo")),
            "quant_algo": validation.get("quant_algo"),
            "kv_cache_quant_algo": validation.get("kv_cache_quant_algo"),
            "source": SERVING_SOURCE,
        }
        record["fidelity"] = result.fidelity
        record["evaluation"] = result.evaluation
        size = checkpoint_bytes(partial)
        record["size"] = {
            "bf16_bytes": result.bf16_bytes,
            "checkpoint_bytes": size,
            "compression": round(result.bf16_bytes / size, 4) if size else None,
            "bits_per_weight": round(16 * size / result.bf16_bytes, 3) if result.bf16_bytes else None,
        }
        record["layers"] = {
            "quantized": len(result.quantized_layers),
            "excluded": result.excluded_layers,
            "unexpected_bf16": result.unexpected_bf16,
        }
        record["details"] = result.details
        if result.recovery is not None:
            record["recovery"] = result.recovery
        if not validation["passed"]:
            raise ValidationFailed("checkpoint validation failed: " + "; ".join(validation["problems"]))
        publish_folder(partial, plan.checkpoint_dir)
        record["checkpoint"] = str(plan.checkpoint_dir)
        record["status"] = "finished"
    except BaseException as exc:
        record["status"] = "failed"
        record["error"] = error_text(exc)
        record["traceback"] = traceback.format_exc(limit=8)
        if isinstance(exc, ValidationFailed):
            record["checkpoint_for_inspection"] = str(partial)
        else:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        record["timings_s"] = timer.seconds
        if timer.peak_gpu_bytes:
            record["peak_gpu_memory_bytes"] = timer.peak_gpu_bytes
        record["finished_at"] = now()
        write_json_atomic(plan.record_path, record)
        # The record is final: log it to the experiment tracker (tracking=mlflow). A failure there is a warning
        # and a note in the record (record["tracking"]["error"]), never a failed run.
        track(record, plan.cfg.tracking, plan.record_path)
    return record


def record_failure(config: dict, reason: str, ended_job: Optional[str] = None, **extra) -> Optional[dict]:
    """Leave a failed run record for a point that never ran to the end (refused, or its job was killed).

    A finished record is never replaced; without a resolvable output_dir nothing is written; a folder another
    live run holds is left alone. `ended_job`: the Slurm job that was running the point and is over: a lock
    it holds is dead whatever its heartbeat says (seen from another host, the heartbeat stays fresh a while).
    """
    output_dir = config.get("output_dir")
    if not output_dir or not _inside_root(config):
        return None
    holder = live_holder(Path(os.path.expanduser(output_dir)))
    if holder is not None and not (ended_job and holder.get("slurm_job") == ended_job):
        return None  # another run owns that folder; its record is its own
    path = Path(os.path.expanduser(output_dir)) / RECORD_NAME
    record = read_record(output_dir)
    if record and record.get("status") == "finished":
        return None
    if not record:
        record = _base_record(config, output_dir=output_dir).to_dict()
    record.update(status="failed", error=reason, finished_at=now(), **extra)
    write_json_atomic(path, record)
    return record


def _inside_root(config: dict) -> bool:
    """A failed record goes only into an output_dir inside output_root (a refused path stays untouched)."""
    try:
        return inside(
            Path(os.path.expanduser(str(config["output_dir"]))).resolve(),
            Path(os.path.expanduser(str(config["output_root"]))).resolve(),
        )
    except (KeyError, TypeError, OSError):
        return False


def dry_run(plan: Plan) -> dict:
    """What the run would do, printed; nothing is loaded, launched or written."""
    holder = live_holder(plan.output_dir)
    if holder is not None:
        action, commands = (
            "running",
            [f"running: {plan.output_dir} is being written by {holder_text(holder)}; a real run would be refused"],
        )
    elif plan.action == "skip":
        action, commands = "skip", [f"skip: {plan.skip_reason}"]
    else:
        action, commands = "run", describe_steps(plan)
    summary = {
        "status": "dry_run",
        "output_dir": str(plan.output_dir),
        "action": action,
        "skip_reason": plan.skip_reason,
        "warnings": plan.warnings,
        "commands": commands,
    }
    for line in commands:
        print(line)
    if action == "run":
        resolved = resolved_recipe(plan)
        if resolved is not None:
            summary["recipe"] = resolved
            print(f"ModelOpt configuration it applies (the {recipe_files.WRITTEN_NAME} it writes):")
            print(recipe_files.recipe_text(resolved).rstrip())
    return summary


def inherited_limit_warning(cfg: RunConfig, overrides: Sequence[str]) -> Optional[str]:
    """Benchmarks given on the command line still get the suite's eval.limit: said, with the fix, before the run."""
    given = any(o.lstrip("+~").startswith("eval.benchmarks") for o in overrides)
    if not (cfg.eval.enabled and given and cfg.eval.limit):
        return None
    cut = [b.name for b in cfg.eval.benchmarks if b.limit is None]
    if not cut:
        return None
    return (
        f"eval.benchmarks comes from the command line, but eval.limit={cfg.eval.limit} of eval={cfg.eval.suite} "
        f"still applies: {', '.join(cut)} will be cut to {cfg.eval.limit} items each. Pass eval.limit=null for "
        "every item, or give each benchmark its own limit."
    )


def run(cfg: RunConfig, config: dict, overrides: Sequence[str] = (), state: Optional[ProcessState] = None) -> dict:
    """Check `cfg` (raising ConfigError before anything is loaded or written), then run or skip it, holding
    the output folder's lock from before its first write to the end. `state`: what the runs of this process keep
    for each other (the BF16 model, tokenized text, the fidelity reference: ptq/state.py); the entry point makes
    one for the process, and a run given none keeps nothing for another."""
    plan = prepare(cfg)
    inherited = inherited_limit_warning(cfg, overrides)
    if inherited:
        plan.warnings.append(inherited)
    for warning in plan.warnings:
        log.warning(warning)
    if cfg.dry_run:
        return dry_run(plan)
    if plan.action == "skip":
        log.info(plan.skip_reason)
        return read_record(plan.output_dir)
    rank = process_rank(os.environ)
    if rank:
        # Every task of a multi-node job runs this; only the first keeps the record and the checkpoint.
        if spec_of(cfg).one_process:
            raise ConfigError(
                f"backend={cfg.backend.name} runs in one process, but this is rank {rank} of a job with "
                "several tasks; give it one task (hydra.launcher.tasks_per_node=1 hydra.launcher.nodes=1)."
            )
        log.info("Rank %d: taking part in the distributed steps of %s", rank, plan.output_dir)
        return get_backend(cfg.backend.name).run_worker(plan)
    check_before_run(plan)  # the backend's own checks: a refusal here leaves no folder behind
    with OutputLock(plan.output_dir) as lock:
        if lock.taken_over is not None:
            log.warning("Took over %s from a run that is gone (%s)", plan.output_dir, holder_text(lock.taken_over))
        # Planned before the lock: a run that held it may have finished this point since (of the same config:
        # skipped; of another: refused, as the plan refuses it).
        done = readable_record(plan.output_dir)
        skip_or_refuse_finished(plan, done)
        if plan.action == "skip":
            log.info("%s was finished by another run meanwhile; skipping it", plan.output_dir)
            return done.to_dict()
        write_run_files(plan, config, overrides)
        with run_log(plan.output_dir), sigterm_raises():
            log.info("Run %s / %s -> %s", cfg.model.name, cfg.recipe.name, plan.output_dir)
            record = execute(plan, config, holder=lock.holder, state=state)
    log.info(
        "Finished: checkpoint %s (%.2fx smaller than BF16), record %s",
        record["checkpoint"],
        record["size"]["compression"] or 0,
        plan.record_path,
    )
    return record
