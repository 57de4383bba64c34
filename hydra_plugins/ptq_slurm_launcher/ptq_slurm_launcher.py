"""Hydra launcher for `cluster=slurm`: hydra-submitit-launcher's Slurm launcher, with a launch step
that checks every point before submitting it.

The job side (running one point inside a Slurm job) is the plugin's own. What this class adds to
the submitting side:
- every point is composed and planned first; points the plan refuses get a failed run record and
  no job, points whose run record says finished (same config) are skipped: nothing is submitted
  for them;
- the Slurm request is derived per point (ptq/cluster.py) and points are grouped by request, one
  job array per group; with `cluster.pack=true` each group is one job that runs its points in one
  process, loading the model once;
- `dry_run=true` prints each point's config, request and the batch script, and submits nothing;
- `detach=true` submits, writes the sweep manifest and returns at once;
- otherwise it waits for every job; a job that ends without a result (killed, timed out, out of
  memory) marks its point failed and the sweep goes on.
Points' states are in `<sweep dir>/sweep.json`; `python -m ptq.status <sweep dir>` reads it.
"""

# No `from __future__ import annotations`: Hydra loads plugin modules without registering them in
# sys.modules, and dataclasses with string annotations need that entry.
import copy
import json
import logging
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class PtqSlurmLauncherConf:
    _target_: str = "hydra_plugins.ptq_slurm_launcher.ptq_slurm_launcher.PtqSlurmLauncher"
    # Where submitit keeps each job's pickles and logs (%j: the Slurm job id).
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    # Resubmissions after a time-out (0: a timed-out point is failed).
    max_num_timeout: int = 0


ConfigStore.instance().store(group="hydra/launcher", name="ptq_slurm", node=PtqSlurmLauncherConf, provider="ptq-launcher")


@dataclass
class Point:
    index: int
    overrides: List[str]
    config: Optional[dict] = None  # resolved, without the hydra node
    cfg: Any = None  # RunConfig
    state: str = "submitted"  # submitted | skipped | refused
    reason: str = ""
    request: Any = None  # ptq.cluster.Request
    params: Dict[str, Any] = field(default_factory=dict)
    job_id: Optional[str] = None
    plan: Any = None  # ptq.plan.Plan
    # Position in its packed job's list of points (cluster.pack).
    pack_position: int = 0


class PtqSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ptq.cluster import MANIFEST_NAME

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        cluster = OmegaConf.to_object(self.config.cluster)
        dry_run, detach = bool(self.config.dry_run), bool(self.config.detach)
        started = time.perf_counter()
        points = [self._check_point(initial_job_idx + i, list(o), dry_run) for i, o in enumerate(job_overrides)]
        _refuse_shared_folders(points)
        groups = _group(points)
        log.info("Sweep of %d points: %d to submit in %d job group(s), %d skipped, %d refused (checked in %.1f s)",
                 len(points), sum(p.state == "submitted" for p in points), len(groups),
                 sum(p.state == "skipped" for p in points), sum(p.state == "refused" for p in points),
                 time.perf_counter() - started)
        if dry_run:
            self._print_dry_run(points, groups, cluster)
            return [_job_return(p, f"dry run: {p.state}") for p in points]

        for point in points:
            if point.state == "refused":
                from ptq.run import record_failure

                log.warning("#%d refused: %s", point.index, point.reason)
                if point.config:
                    record_failure(point.config, f"refused before submission: {point.reason}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = self._submit(groups, cluster)
        _write_manifest(sweep_dir / MANIFEST_NAME, sweep_dir, points, pack=cluster.pack, finished=False)
        if detach:
            ids = sorted({p.job_id.split("_")[0] for p in points if p.job_id})
            print(f"Submitted {sum(p.job_id is not None for p in points)} point(s) as Slurm job(s) {', '.join(ids) or '-'}; "
                  f"sweep folder {sweep_dir}\nFollow it with: python -m ptq.status {sweep_dir}")
            return [_job_return(p, f"submitted as Slurm job {p.job_id}" if p.job_id else p.state) for p in points]
        returns = self._wait(points, jobs, cluster.poll_s)
        _write_manifest(sweep_dir / MANIFEST_NAME, sweep_dir, points, pack=cluster.pack, finished=True)
        return returns

    # -- before submission -------------------------------------------------------------------
    def _check_point(self, index: int, overrides: List[str], dry_run: bool) -> Point:
        """Compose the point and plan it as the job would, on the submitting host."""
        from ptq.cluster import check_request, request_for, sbatch_parameters, job_name
        from ptq.evaluation import check_eval_config
        from ptq.plan import ConfigError, gather_facts, make_plan

        point = Point(index=index, overrides=overrides)
        try:
            composed = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            task = copy.deepcopy(composed)
            with open_dict(task):
                del task["hydra"]
            point.config = OmegaConf.to_container(task, resolve=True)
            point.cfg = OmegaConf.to_object(task)
        except Exception as exc:  # a value of the wrong type, an unknown option...
            point.state, point.reason = "refused", f"the config does not compose: {exc}"
            return point
        try:
            facts = gather_facts(point.cfg)
            # The job runs on a GPU node when its hardware asks for one; this host may have none.
            facts.cuda_available = facts.cuda_available or point.cfg.hardware.device == "cuda"
            plan = make_plan(point.cfg, facts)
            check_eval_config(point.cfg.eval)
        except ConfigError as exc:
            point.state, point.reason = "refused", str(exc)
            return point
        point.plan = plan
        if plan.action == "skip" and not dry_run:
            point.state, point.reason = "skipped", plan.skip_reason
            return point
        point.request = request_for(point.cfg)
        problem = check_request(point.cfg, point.request)
        if problem:
            point.state, point.reason = "refused", problem
            return point
        point.params = sbatch_parameters(point.cfg.cluster, point.request, job_name(point.cfg))
        return point

    def _executor(self, cluster, params: Dict[str, Any]):
        import submitit

        executor = submitit.SlurmExecutor(folder=self.params["submitit_folder"], python=cluster.python,
                                          max_num_timeout=self.params.get("max_num_timeout", 0))
        executor.update_parameters(**params)
        return executor

    def _print_dry_run(self, points: List[Point], groups: List[List[Point]], cluster) -> None:
        from ptq.backends import get_backend

        for point in points:
            print(f"\n#{point.index} {' '.join(filter_overrides(point.overrides)) or '(defaults)'}: {point.state}"
                  + (f" - {point.reason}" if point.reason else ""))
            if point.config is not None:
                print(OmegaConf.to_yaml(point.config).rstrip())
            if point.state == "submitted":
                print(f"request: {json.dumps(point.request.as_dict())}")
                for line in get_backend(point.cfg.backend.name).describe(point.plan):
                    print(f"runs: {line}")
        for number, group in enumerate(groups):
            executor = self._executor(cluster, _group_params(group, cluster.pack))
            if not cluster.pack:
                executor.parameters["map_count"] = len(group)  # what map_array sets: the --array line
            kind = "one job running" if cluster.pack else "a job array of"
            print(f"\n# job group {number}: {kind} {len(group)} point(s): #{', #'.join(str(p.index) for p in group)}")
            # submitit writes this text to a file and runs `sbatch` on it; here it is only shown.
            print(executor._make_submission_file_text(executor._submitit_command_str, "dry-run"))
        print(f"\nDry run: nothing was submitted ({sum(len(g) for g in groups)} point(s) would be).")

    # -- submission and waiting --------------------------------------------------------------
    def _submit(self, groups: List[List[Point]], cluster) -> Dict[int, Any]:
        """Submit each group; returns point index -> submitit job (a packed job serves several points)."""
        jobs: Dict[int, Any] = {}
        state = Singleton.get_state()
        from ptq.cluster import varying_overrides

        labels = dict(zip([p.index for g in groups for p in g],
                          varying_overrides([filter_overrides(p.overrides) for g in groups for p in g])))
        for group in groups:
            executor = self._executor(cluster, _group_params(group, cluster.pack))
            try:
                if cluster.pack:
                    job = executor.submit(self.run_points, [(p.overrides, p.index) for p in group], state)
                    for position, point in enumerate(group):
                        point.pack_position = position
                    group_jobs = [job] * len(group)
                else:
                    args = [(p.overrides, "hydra.sweep.dir", p.index, f"job_id_for_{p.index}", state) for p in group]
                    group_jobs = executor.map_array(self, *zip(*args))
            except Exception as exc:  # sbatch refused the request (partition, limits...)
                for point in group:
                    point.state, point.reason = "refused", f"sbatch refused the job: {exc}"
                    from ptq.run import record_failure

                    record_failure(point.config, f"refused by Slurm at submission: {exc}")
                log.error("Submission failed for points %s: %s", [p.index for p in group], exc)
                continue
            for point, job in zip(group, group_jobs):
                point.job_id = job.job_id
                jobs[point.index] = job
                log.info("#%d %s -> Slurm job %s", point.index, labels[point.index], job.job_id)
        return jobs

    def run_points(self, points: List, singleton_state) -> List[JobReturn]:
        """Inside one Slurm job: run several points one after another in this process (cluster.pack)."""
        return [self(list(overrides), "hydra.sweep.dir", index, f"job_id_for_{index}", singleton_state)
                for overrides, index in points]

    def _wait(self, points: List[Point], jobs: Dict[int, Any], poll_s: float) -> List[JobReturn]:
        from tqdm.auto import tqdm

        returns: Dict[int, JobReturn] = {p.index: _job_return(p, p.state) for p in points if p.index not in jobs}
        waiting = {p.index: p for p in points if p.index in jobs}
        with tqdm(total=len(waiting), desc="sweep", unit="point") as bar:
            while waiting:
                for index, point in list(waiting.items()):
                    job = jobs[index]
                    if not (job.done() or _vanished(job)):
                        continue
                    returns[index] = self._collect(point, job, points)
                    del waiting[index]
                    bar.update(1)
                if waiting:
                    time.sleep(poll_s)
        return [returns[p.index] for p in points]

    def _collect(self, point: Point, job, points: List[Point]) -> JobReturn:
        """The point's JobReturn; a job that left no result gets a failed run record."""
        from ptq.run import record_failure

        try:
            result = job.results()[0]
        except Exception as exc:  # UncompletedJobError (killed, out of memory, time-out) or FailedJobError
            state = job.state
            reason = f"Slurm job {job.job_id} ended {state} without a result"
            detail = str(exc).strip().splitlines()
            log.error("#%d failed: %s", point.index, reason)
            record_failure(point.config, reason, slurm_job=job.job_id, slurm_state=state,
                           slurm_log=detail[-1][:500] if detail else "")
            point.reason = reason
            return _job_return(point, f"failed: {reason}")
        if isinstance(result, list):  # a packed job returns one JobReturn per point, in submission order
            result = result[point.pack_position]
        return result


def _job_return(point: Point, value: str) -> JobReturn:
    return JobReturn(overrides=point.overrides, status=JobStatus.COMPLETED, _return_value=value)


def _vanished(job) -> bool:
    """Slurm forgot the job and it left no result: treat it as ended (its accounting may be off)."""
    if job.state != "UNKNOWN" or job.paths.result_pickle.exists():
        return False
    out = subprocess.run(["squeue", "-h", "-j", job.job_id.split("_")[0]], capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip()


def _refuse_shared_folders(points: List[Point]) -> None:
    """Two points that would write into the same output folder: the later one is refused."""
    seen: Dict[str, int] = {}
    for point in points:
        if point.state != "submitted":
            continue
        folder = str(Path(point.config["output_dir"]).expanduser().resolve())
        if folder in seen:
            point.state = "refused"
            point.reason = (f"writes into the same output_dir as point #{seen[folder]} ({folder}); "
                            "add the swept key to output_dir or give each point its own output_root.")
        else:
            seen[folder] = point.index


def _group(points: List[Point]) -> List[List[Point]]:
    """Points with the same model and the same Slurm request share a job array (or a packed job)."""
    groups: Dict[str, List[Point]] = {}
    for point in points:
        if point.state != "submitted":
            continue
        params = {k: v for k, v in point.params.items() if k != "job_name"}
        key = json.dumps([point.cfg.model.name, params], sort_keys=True, default=str)
        groups.setdefault(key, []).append(point)
    return list(groups.values())


def _group_params(group: List[Point], pack: bool) -> Dict[str, Any]:
    params = dict(group[0].params)
    if pack:
        params["time"] = params["time"] * len(group)  # the points run one after another
        params["job_name"] = f"ptq-{group[0].cfg.model.name}-pack{len(group)}"
    elif len(group) > 1:
        params["job_name"] = f"ptq-{group[0].cfg.model.name}-sweep"
    return params


def _write_manifest(path: Path, sweep_dir: Path, points: List[Point], pack: bool, finished: bool) -> None:
    from ptq.record import now, write_json_atomic

    write_json_atomic(path, {
        "sweep_dir": str(sweep_dir),
        "written_at": now(),
        "waited_to_end": finished,
        "pack": pack,
        "points": [{"index": p.index, "overrides": filter_overrides(p.overrides), "state": p.state, "reason": p.reason,
                    "job_id": p.job_id, "output_dir": (p.config or {}).get("output_dir"),
                    "request": p.request.as_dict() if p.request else None, **_identity(p.config)} for p in points],
    })


def _identity(config: Optional[dict]) -> Dict[str, Any]:
    """What the results table needs to list a point that has no run record yet."""
    if not config:
        return {}
    return {"model": config["model"]["name"], "recipe": config["recipe"]["name"], "kv_cache": config["recipe"]["kv_cache"],
            "calib_size": config["calib"]["size"], "calib_seq_len": config["calib"]["seq_len"]}
