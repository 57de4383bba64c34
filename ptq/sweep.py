"""A sweep: its points, their checks before submission, their grouping into jobs, and its manifest.

The Slurm launcher (hydra_plugins/ptq_slurm_launcher) composes each point with Hydra and submits and
waits with submitit; everything else a sweep decides is here, without Hydra, Slurm or a model:
- `check_point`: plan the composed point as its job would (refused, skipped as finished, or to submit) and
  derive its Slurm request (ptq/cluster.py);
- `refuse_shared_folders`: two points writing one output folder;
- `group`: points of one model and one request share a job array, or one packed job (cluster.pack);
- the manifest (`<sweep dir>/sweep.json`) and each point's state, which `python -m ptq.status` shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ptq.cluster import Request, check_request, job_name, request_for, sbatch_parameters
from ptq.errors import ConfigError
from ptq.files import write_json_atomic
from ptq.lock import holder_text, live_holder
from ptq.plan import Plan, gather_facts
from ptq.record_parts import now
from ptq.run import prepare, record_failure
from ptq.run_record import RunRecord
from ptq.schema import RunConfig

SUBMITTED, SKIPPED, REFUSED, RUNNING = "submitted", "skipped", "refused", "running"
# A point of a sweep this process runs itself, one after another (Hydra's basic launcher).
LOCAL = "local"


@dataclass
class Point:
    index: int
    # The point's Hydra overrides (the sweep's and its own).
    overrides: List[str]
    config: Optional[dict] = None  # resolved, without the hydra node
    cfg: Optional[RunConfig] = None
    state: str = SUBMITTED  # submitted | skipped | refused | running (another run holds its folder)
    reason: str = ""
    request: Optional[Request] = None
    # submitit's SlurmExecutor parameters.
    params: Dict[str, Any] = field(default_factory=dict)
    job_id: Optional[str] = None
    plan: Optional[Plan] = None
    # Position in its packed job's list of points (cluster.pack).
    pack_position: int = 0
    # A refusal gets a failed run record in the point's folder, unless that folder is another point's.
    record_refusal: bool = True

    def refuse(self, reason: str) -> "Point":
        self.state, self.reason = REFUSED, reason
        return self


def check_point(point: Point, dry_run: bool, launcher: Mapping) -> Point:
    """Plan a composed point (point.cfg set) as its job would, on the submitting host, and derive its request
    (`launcher`: the hydra.launcher settings, hydra-submitit-launcher's Slurm schema)."""
    try:
        # The job runs on a GPU node when its hardware asks for one; this host's GPUs do not matter.
        facts = gather_facts(point.cfg, probe_gpus=False)
        facts.cuda_available = point.cfg.hardware.device == "cuda"
        plan = prepare(point.cfg, facts, space=False)
    except ConfigError as exc:
        return point.refuse(str(exc))
    point.plan = plan
    holder = live_holder(plan.output_dir)
    if holder is not None:  # an earlier sweep's job (or another launcher) is writing this point now
        point.state, point.reason = RUNNING, f"being run by {holder_text(holder)}; not submitted again"
        return point
    if plan.action == "skip":
        point.state, point.reason = SKIPPED, plan.skip_reason
        return point
    point.request = request_for(point.cfg, launcher)
    problem = check_request(point.cfg, point.request) or check_time_limit(point.request, launcher)
    if problem:
        return point.refuse(problem)
    point.params = sbatch_parameters(launcher, point.request, job_name(point.cfg))
    return point


# Beyond Slurm's warning signal, a job needs this long to start before its time can be of use.
MIN_RUN_S = 60


def check_time_limit(request: Request, launcher: Mapping) -> Optional[str]:
    """submitit asks Slurm for a warning signal_delay_s before the time limit; a limit at or below that margin
    would be signalled at once and the point declared timed out before it ran."""
    margin = int(launcher.get("signal_delay_s", 120))
    if request.timeout_min * 60 <= margin + MIN_RUN_S:
        least = (margin + MIN_RUN_S) // 60 + 1
        return (
            f"hydra.launcher.timeout_min={request.timeout_min} leaves no time to run: Slurm warns the job "
            f"hydra.launcher.signal_delay_s={margin} s before its limit; set timeout_min to at least {least} "
            "(or leave it unset: it is derived from the model size)."
        )
    return None


def refuse_shared_folders(points: List[Point]) -> None:
    """Two points that would write into the same output folder: the later one is refused."""
    seen: Dict[str, int] = {}
    for point in points:
        if point.state != SUBMITTED:
            continue
        folder = str(Path(point.config["output_dir"]).expanduser().resolve())
        if folder in seen:
            point.refuse(
                f"writes into the same output_dir as point #{seen[folder]} ({folder}); "
                "add the swept key to output_dir or give each point its own output_root."
            )
            point.record_refusal = False  # that folder is the other point's
        else:
            seen[folder] = point.index


def record_refusals(points: List[Point]) -> None:
    """A failed run record for every refused point that composed, so the report lists it with its reason."""
    for point in points:
        if point.state == REFUSED and point.config and point.record_refusal:
            record_failure(point.config, f"refused before submission: {point.reason}")


def group(points: List[Point]) -> List[List[Point]]:
    """Points with the same model and the same Slurm request share a job array (or a packed job)."""
    groups: Dict[str, List[Point]] = {}
    for point in points:
        if point.state != SUBMITTED:
            continue
        params = {k: v for k, v in point.params.items() if k != "job_name"}
        key = json.dumps([point.cfg.model.name, params], sort_keys=True, default=str)
        groups.setdefault(key, []).append(point)
    return list(groups.values())


def group_params(points: List[Point], pack: bool) -> Dict[str, Any]:
    """The executor parameters of one group: a packed job runs its points one after another."""
    params = dict(points[0].params)
    if pack:
        params["time"] = params["time"] * len(points)
        params["job_name"] = f"ptq-{points[0].cfg.model.name}-pack{len(points)}"
    elif len(points) > 1:
        params["job_name"] = f"ptq-{points[0].cfg.model.name}-sweep"
    return params


def _identity(config: Optional[dict]) -> Dict[str, Any]:
    """What the results table needs to list a point that has no run record yet."""
    if not config:
        return {}
    return {
        "model": config["model"]["name"],
        "recipe": config["recipe"]["name"],
        "kv_cache": config["recipe"]["kv_cache"],
        "calib_size": config["calib"]["size"],
        "calib_seq_len": config["calib"]["seq_len"],
    }


def write_manifest(
    path: Path, sweep_dir: Path, points: List[Point], labels: List[List[str]], pack: bool, finished: bool
) -> None:
    """`labels`: each point's overrides as the user wrote them (Hydra's own removed)."""
    write_json_atomic(
        path,
        {
            "sweep_dir": str(sweep_dir),
            "written_at": now(),
            "waited_to_end": finished,
            "pack": pack,
            "points": [
                {
                    "index": p.index,
                    "overrides": label,
                    "state": p.state,
                    "reason": p.reason,
                    "job_id": p.job_id,
                    "output_dir": (p.config or {}).get("output_dir"),
                    "request": p.request.as_dict() if p.request else None,
                    **_identity(p.config),
                }
                for p, label in zip(points, labels)
            ],
        },
    )


# What `python -m ptq.status` shows for a point, from the manifest, the run record and Slurm.
SLURM_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def point_state(
    submitted: str,
    reason: str,
    record: Optional[RunRecord],
    slurm_state: Optional[str],
    job_id: Optional[str],
    alive: Optional[bool] = None,
) -> (str, str):
    """(state, detail) of one point. `submitted` is the manifest's word: submitted | skipped | refused | running.
    `alive`: whether the process holding the point's folder still runs (ptq/lock.py), None when unknown."""
    if submitted == "refused":
        return "refused", reason
    if submitted == "skipped":
        return "finished", reason or "finished in an earlier run"
    status = record.status if record else None
    if status == "finished":
        return "finished", record.checkpoint or ""
    if status == "failed":
        return "failed", record.error or ""
    slurm = (slurm_state or "").split()[0] if slurm_state else ""
    if slurm == "PENDING":
        return "pending", f"Slurm job {job_id} is waiting for resources"
    if slurm in SLURM_ACTIVE:
        return "running", f"Slurm job {job_id} {slurm.lower()}" + (" (run record written)" if status else "")
    if slurm:
        return "failed", f"Slurm job {job_id} ended {slurm} without a finished run record"
    if status == "running":
        if alive is False:
            holder = record.section("holder")
            return "dead", (
                f"run record says running, but its process is gone (host {holder.get('host', '?')}, "
                f"PID {holder.get('pid', '?')}); the next run of this point starts it again"
            )
        if submitted == LOCAL:
            return "running", "run record says running (local sweep)"
        return "running", f"run record says running; Slurm has no state for job {job_id}"
    if submitted == RUNNING:
        return "running", reason
    if submitted == LOCAL:
        return "pending", "waits for its turn in this local sweep (no run record yet)"
    return "unknown", f"Slurm has no state for job {job_id} and there is no run record yet"


def summarize(states: List[str]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return counts


def varying_overrides(points: List[List[str]]) -> List[str]:
    """Per point, only the overrides that tell it from the others (the swept keys), joined by spaces."""
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in overrides) for overrides in points]
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1] or keys
    return [" ".join(f"{k}={p[k]}" for k in varying if k in p) for p in parsed]
