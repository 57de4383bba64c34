"""Hydra launcher for `cluster=slurm`: hydra-submitit-launcher's Slurm launcher, with a launch step
that checks every point before submitting it.

Glue only: Hydra composes each point here, ptq/sweep.py decides what happens to it (refused, skipped
as finished, or submitted, grouped into job arrays or packed jobs), submitit submits and waits. The job
side (running one point inside a Slurm job) is the plugin's own.
- `dry_run=true` prints each point's config, request and the batch script, and submits nothing;
- `detach=true` submits, writes the sweep manifest and returns at once;
- otherwise it waits for every job; a job that ends without a result (killed, timed out, out of
  memory) marks its point failed and the sweep goes on.
Points' states are in `<sweep dir>/sweep.json`; `python -m ptq.status <sweep dir>` reads it.
"""

# No `from __future__ import annotations`: Hydra loads plugin modules without registering them in
# sys.modules, and dataclasses with string annotations need that entry.
import json
import logging
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from hydra_plugins.ptq_slurm_launcher.composing import composer_for
from ptq.backends import describe_steps
from ptq.layout import MANIFEST_NAME
from ptq.record_parts import read_record
from ptq.run import record_failure
from ptq.sweep import (
    REFUSED,
    SKIPPED,
    SUBMITTED,
    Point,
    check_point,
    group,
    group_params,
    record_refusals,
    refuse_shared_folders,
    varying_overrides,
    write_manifest,
)

log = logging.getLogger(__name__)

# How long a job Slurm reports COMPLETED may take to show its result file on the submitting host.
RESULT_LAG_S = 120.0


@dataclass
class PtqSlurmLauncherConf(SlurmQueueConf):
    """hydra-submitit-launcher's Slurm settings (partition, account, qos, mem_gb, timeout_min, gres, setup, ...),
    with what this launcher adds. Set them as `hydra.launcher.<key>=...`."""

    _target_: str = "hydra_plugins.ptq_slurm_launcher.ptq_slurm_launcher.PtqSlurmLauncher"
    # Unset: derived per point from hardware, parallelism and model (ptq/cluster.py).
    nodes: Optional[int] = None
    tasks_per_node: Optional[int] = None
    timeout_min: Optional[int] = None
    array_parallelism: int = 64
    # Shell lines run in the batch script before srun (module load, environment).
    setup: List[str] = field(default_factory=list)
    # Added here:
    srun_args: List[str] = field(default_factory=list)
    # Interpreter on the compute nodes (None: the one that submits; "python" inside a container).
    python: Optional[str] = None
    # Pyxis/enroot: run every task inside this container image.
    container_image: Optional[str] = None
    container_mounts: List[str] = field(default_factory=list)
    container_workdir: Optional[str] = None
    # Points that share a model and a request run in one job, one after another, loading the model once.
    pack: bool = False
    # How often a waiting sweep looks at its jobs (seconds).
    poll_s: float = 5.0


ConfigStore.instance().store(
    group="hydra/launcher", name="ptq_slurm", node=PtqSlurmLauncherConf, provider="ptq-launcher"
)


class PtqSlurmLauncher(SlurmLauncher):
    # Composes and checks every point itself (a point that does not compose is refused, the others go on): the
    # sweeper need not compose them first (ptq_sweeper.py).
    checks_each_point = True

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        launcher = self.params
        dry_run, detach = bool(self.config.dry_run), bool(self.config.detach)
        started = time.perf_counter()
        points = [self._check_point(initial_job_idx + i, list(o), dry_run) for i, o in enumerate(job_overrides)]
        refuse_shared_folders(points)
        groups = group(points)
        log.info(
            "Sweep of %d points: %d to submit in %d job group(s), %d skipped, %d refused (checked in %.1f s)",
            len(points),
            sum(p.state == SUBMITTED for p in points),
            len(groups),
            sum(p.state == SKIPPED for p in points),
            sum(p.state == REFUSED for p in points),
            time.perf_counter() - started,
        )
        if dry_run:
            self._print_dry_run(points, groups, launcher)
            return [_job_return(p, f"dry run: {p.state}") for p in points]

        for point in points:
            if point.state == REFUSED:
                log.warning("#%d refused: %s", point.index, point.reason)
        record_refusals(points)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = self._submit(groups, launcher)
        write_manifest(
            sweep_dir / MANIFEST_NAME, sweep_dir, points, _labels(points), pack=launcher["pack"], finished=False
        )
        if detach:
            ids = sorted({p.job_id.split("_")[0] for p in points if p.job_id})
            print(
                f"Submitted {sum(p.job_id is not None for p in points)} point(s) as Slurm job(s) {', '.join(ids) or '-'}; "
                f"sweep folder {sweep_dir}\nFollow it with: python -m ptq.status {sweep_dir}"
            )
            return [_job_return(p, f"submitted as Slurm job {p.job_id}" if p.job_id else p.state) for p in points]
        returns = self._wait(points, jobs, launcher["poll_s"])
        write_manifest(
            sweep_dir / MANIFEST_NAME, sweep_dir, points, _labels(points), pack=launcher["pack"], finished=True
        )
        return returns

    # -- before submission -------------------------------------------------------------------
    def _check_point(self, index: int, overrides: List[str], dry_run: bool) -> Point:
        """Compose the point (composing.py), then check it as its job would (ptq/sweep.py)."""
        point = Point(index=index, overrides=overrides)
        try:
            task = composer_for(self.hydra_context.config_loader, self.config).compose(overrides)
            point.config = OmegaConf.to_container(task, resolve=True)
            point.cfg = OmegaConf.to_object(task)
        except Exception as exc:  # a value of the wrong type, an unknown option...
            return point.refuse(f"the config does not compose: {exc}")
        return check_point(point, dry_run, self.params)

    def _executor(self, launcher: Dict[str, Any], params: Dict[str, Any]):
        import submitit

        executor = submitit.SlurmExecutor(
            folder=self.params["submitit_folder"],
            python=launcher.get("python"),
            max_num_timeout=self.params.get("max_num_timeout", 0),
        )
        executor.update_parameters(**params)
        return executor

    def _print_dry_run(self, points: List[Point], groups: List[List[Point]], launcher: Dict[str, Any]) -> None:
        for point in points:
            print(
                f"\n#{point.index} {' '.join(filter_overrides(point.overrides)) or '(defaults)'}: {point.state}"
                + (f" - {point.reason}" if point.reason else "")
            )
            if point.config is not None:
                print(OmegaConf.to_yaml(point.config).rstrip())
            if point.state == SUBMITTED:
                print(f"request: {json.dumps(point.request.as_dict())}")
                for line in describe_steps(point.plan):
                    print(f"runs: {line}")
        for number, members in enumerate(groups):
            executor = self._executor(launcher, group_params(members, launcher["pack"]))
            if not launcher["pack"]:
                executor.parameters["map_count"] = len(members)  # what map_array sets: the --array line
            kind = "one job running" if launcher["pack"] else "a job array of"
            print(
                f"\n# job group {number}: {kind} {len(members)} point(s): #{', #'.join(str(p.index) for p in members)}"
            )
            # submitit writes this text to a file and runs `sbatch` on it; here it is only shown.
            print(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"))
        print(f"\nDry run: nothing was submitted ({sum(len(g) for g in groups)} point(s) would be).")

    # -- submission and waiting --------------------------------------------------------------
    def _submit(self, groups: List[List[Point]], launcher: Dict[str, Any]) -> Dict[int, Any]:
        """Submit each group; returns point index -> submitit job (a packed job serves several points)."""
        jobs: Dict[int, Any] = {}
        state = Singleton.get_state()
        labels = dict(
            zip(
                [p.index for g in groups for p in g],
                varying_overrides([filter_overrides(p.overrides) for g in groups for p in g]),
            )
        )
        for members in groups:
            executor = self._executor(launcher, group_params(members, launcher["pack"]))
            try:
                if launcher["pack"]:
                    job = executor.submit(self.run_points, [(p.overrides, p.index) for p in members], state)
                    for position, point in enumerate(members):
                        point.pack_position = position
                    group_jobs = [job] * len(members)
                else:
                    args = [(p.overrides, "hydra.sweep.dir", p.index, f"job_id_for_{p.index}", state) for p in members]
                    group_jobs = executor.map_array(self, *zip(*args))
            except Exception as exc:  # sbatch refused the request (partition, limits...)
                for point in members:
                    point.refuse(f"sbatch refused the job: {exc}")
                    record_failure(point.config, f"refused by Slurm at submission: {exc}")
                log.error("Submission failed for points %s: %s", [p.index for p in members], exc)
                continue
            for point, job in zip(members, group_jobs):
                point.job_id = job.job_id
                jobs[point.index] = job
                log.info("#%d %s -> Slurm job %s", point.index, labels[point.index], job.job_id)
        return jobs

    def run_points(self, points: List, singleton_state) -> List[JobReturn]:
        """Inside one Slurm job: run several points one after another in this process (launcher["pack"]).

        Once Slurm signals that the job's end is near (submitit's signal ahead of the time limit, or a
        preemption), no further point starts: submitit's handler still runs (it ends the point in progress,
        which records itself as failed, or requeues the job), and every point not started gets a failed record
        saying so, which the results table and `python -m ptq.status` show."""
        stopping: List[int] = []
        signum = _end_signal()
        previous = signal.getsignal(signum)

        def on_end(number, frame):
            stopping.append(number)
            if callable(previous):
                previous(number, frame)

        signal.signal(signum, on_end)
        returns = []
        try:
            for overrides, index in points:
                if stopping:
                    returns.append(self._not_started(list(overrides), signal.Signals(stopping[0]).name))
                    continue
                try:
                    result = self(list(overrides), "hydra.sweep.dir", index, f"job_id_for_{index}", singleton_state)
                except Exception:
                    if not stopping:
                        raise
                    result = None  # the signal's exception came while Hydra was still setting the point up
                if stopping and (result is None or not self._recorded(list(overrides))):
                    # The signal ended the point before its run wrote a record (while Hydra, or the run's checks
                    # ahead of its first write, set it up): the point did not get to run.
                    result = self._not_started(list(overrides), signal.Signals(stopping[0]).name, interrupted=True)
                returns.append(result)
        finally:
            signal.signal(signum, previous)
        return returns

    def _point_config(self, overrides: List[str]) -> dict:
        task = composer_for(self.hydra_context.config_loader, self.config).compose(overrides)
        return OmegaConf.to_container(task, resolve=True)

    def _recorded(self, overrides: List[str]) -> bool:
        """Whether the point's output folder holds a run record (True when that cannot be told)."""
        try:
            return read_record(self._point_config(overrides).get("output_dir")) is not None
        except Exception as exc:
            log.warning("Could not read the record of %s: %s", overrides, exc)
            return True

    def _not_started(self, overrides: List[str], signal_name: str, interrupted: bool = False) -> JobReturn:
        when = "while this point was being set up" if interrupted else "before this point's turn"
        reason = (
            f"not started: the packed Slurm job received {signal_name} (its time limit was near or it was "
            f"preempted) {when}; run the sweep again to run it"
        )
        try:
            record_failure(self._point_config(overrides), reason)
        except Exception as exc:  # the point's record is a courtesy; the job's answer below says it all
            log.warning("Could not record a point that was not started (%s): %s", overrides, exc)
        log.warning("%s: %s", " ".join(filter_overrides(overrides)), reason)
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value="not started")

    def _wait(self, points: List[Point], jobs: Dict[int, Any], poll_s: float) -> List[JobReturn]:
        """Wait for every job. Slurm's queue is read once per poll (squeue): a job that has left it is over, so a
        job killed without a result is recorded at the next poll or the one after (submitit alone would notice
        only at its next accounting check, minutes later)."""
        from tqdm.auto import tqdm

        returns: Dict[int, JobReturn] = {p.index: _job_return(p, p.state) for p in points if p.index not in jobs}
        waiting = {p.index: p for p in points if p.index in jobs}
        missing: Dict[int, int] = {}  # polls in a row a job was not in the queue
        gone_since: Dict[int, float] = {}
        with tqdm(total=len(waiting), desc="sweep", unit="point") as bar:
            while waiting:
                queued = queued_jobs()
                for index, point in list(waiting.items()):
                    job = jobs[index]
                    if job.paths.result_pickle.exists():
                        over = True
                    elif queued is None:  # squeue cannot be asked: submitit's own view
                        over = job.done()
                    else:
                        missing[index] = 0 if job.job_id in queued else missing.get(index, 0) + 1
                        if missing[index] == 1:
                            gone_since[index] = time.time()
                        # Twice in a row; and a job Slurm says COMPLETED gets RESULT_LAG_S for its result file
                        # to show on a shared file system (attribute caches can hide a new file for a minute).
                        over = missing[index] >= 2 and (
                            time.time() - gone_since[index] > RESULT_LAG_S
                            or not (final_state(job.job_id) or "").startswith("COMPLETED")
                        )
                    if over:
                        returns[index] = self._collect(point, job)
                        del waiting[index]
                        bar.update(1)
                if waiting:
                    time.sleep(poll_s)
        return [returns[p.index] for p in points]

    def _collect(self, point: Point, job) -> JobReturn:
        """The point's JobReturn; a job that left no result gets a failed run record with Slurm's reason."""
        if not job.paths.result_pickle.exists():
            state = final_state(job.job_id) or "UNKNOWN"
            reason = f"Slurm job {job.job_id} ended {state} without a result"
            if state.startswith("TIMEOUT"):
                minutes = point.request.timeout_min if point.request else "?"
                reason += (
                    f": it reached its time limit of {minutes} min; raise hydra.launcher.timeout_min "
                    "(the launcher derives it from the model size unless it is set)"
                )
            log.error("#%d failed: %s", point.index, reason)
            record_failure(point.config, reason, ended_job=job.job_id, slurm_job=job.job_id, slurm_state=state)
            point.reason = reason
            return _job_return(point, f"failed: {reason}")
        try:
            result = job.results()[0]
        except Exception as exc:  # FailedJobError: the job raised outside the run (its record says why if it ran)
            detail = str(exc).strip().splitlines()
            reason = f"Slurm job {job.job_id} failed: {detail[-1][:300] if detail else type(exc).__name__}"
            record_failure(
                point.config,
                reason,
                ended_job=job.job_id,
                slurm_job=job.job_id,
                slurm_log="\n".join(detail[-5:])[:2000],
            )
            point.reason = reason
            return _job_return(point, f"failed: {reason}")
        if isinstance(result, list):  # a packed job returns one JobReturn per point, in submission order
            result = result[point.pack_position]
        return result


def _end_signal() -> int:
    """The signal submitit has Slurm send ahead of a job's end (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says)."""
    try:
        from submitit.core.job_environment import JobEnvironment

        return JobEnvironment._usr_sig()
    except (ImportError, AttributeError, RuntimeError):
        return signal.SIGUSR2


def _job_return(point: Point, value: str) -> JobReturn:
    return JobReturn(overrides=point.overrides, status=JobStatus.COMPLETED, _return_value=value)


def queued_jobs() -> Optional[set]:
    """Ids of every job (array tasks as <array>_<task>) Slurm still has queued or running; None if squeue fails."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(out.stdout.split()) if out.returncode == 0 else None


def final_state(job_id: str) -> Optional[str]:
    """How a job that left the queue ended: sacct when accounting is on, else scontrol (which remembers a job
    for a few minutes after it ends)."""
    for cmd, pick in (
        (["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], lambda out: out.split()[0]),
        (["scontrol", "show", "job", job_id], lambda out: out.split("JobState=", 1)[1].split()[0]),
    ):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip():
                return pick(out.stdout)
        except (OSError, subprocess.TimeoutExpired, IndexError):
            continue
    return None


def _labels(points: List[Point]) -> List[List[str]]:
    return [filter_overrides(p.overrides) for p in points]
