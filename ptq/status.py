"""State of every point of a sweep, from its manifest, the run records and (for Slurm sweeps) Slurm.

    python -m ptq.status <sweep folder> [--json]

The sweep folder holds sweep.json: the one a `cluster=slurm` sweep prints, or `<output_root>/sweeps/<date>_<time>`
of a sweep run on this machine (`python launch.py -m ...`). Works while the sweep runs, after a detached
launch, and after the launching shell is gone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from ptq import run_record
from ptq.files import read_json
from ptq.layout import MANIFEST_NAME
from ptq.lock import live_holder
from ptq.run_record import RecordProblem
from ptq.sweep import point_state, summarize, varying_overrides


def slurm_states(job_ids: List[str]) -> Dict[str, str]:
    """Job id (array task ids included) -> Slurm state, from sacct; {} when Slurm cannot be asked."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-o", "JobID,State", "--parsable2"]
    for job in sorted({j.split("_")[0] for j in job_ids}):
        cmd += ["-j", job]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.stdout.splitlines()[1:]:
        parts = line.split("|")
        if len(parts) >= 2 and "." not in parts[0]:
            states[parts[0]] = parts[1]
    # Pending array tasks are reported as ranges ("12_[3-5]"): give each task its state.
    for job_id in job_ids:
        if job_id not in states and "_" in job_id:
            array, task = job_id.split("_", 1)
            for key, state in list(states.items()):
                if key.startswith(f"{array}_[") and _in_range(int(task), key[len(array) + 2 : -1]):
                    states[job_id] = state
    return states


def _in_range(task: int, spec: str) -> bool:
    for part in spec.split("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and int(low) <= task <= int(high or low):
            return True
    return False


def sweep_status(sweep_dir: Path) -> List[dict]:
    manifest_path = sweep_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise SystemExit(
            f"error: {manifest_path} not found; pass a sweep's folder "
            "(<output_root>/sweeps/<date>_<time>; a cluster=slurm sweep prints it)."
        )
    manifest = read_json(manifest_path)
    if manifest is None or not isinstance(manifest.get("points"), list):
        raise SystemExit(
            f"error: {manifest_path} is not a sweep manifest (not JSON, or no list of points); it is "
            "rewritten when the sweep is launched again with the same overrides."
        )
    points = manifest["points"]
    slurm = slurm_states([p["job_id"] for p in points if p.get("job_id")])
    labels = varying_overrides([p["overrides"] for p in points])
    rows = []
    for p, label in zip(points, labels):
        try:
            record, unreadable = run_record.load(p.get("output_dir")), None
        except RecordProblem as problem:
            record, unreadable = None, str(problem)
        alive = None
        if record and record.status == "running":
            alive = live_holder(Path(p["output_dir"]).expanduser()) is not None
        state, detail = point_state(
            p["state"], p.get("reason", ""), record, slurm.get(p.get("job_id") or ""), p.get("job_id"), alive
        )
        if unreadable:
            state, detail = "unreadable", unreadable
        rows.append(
            {
                "index": p["index"],
                "point": label,
                "job": p.get("job_id") or "-",
                "state": state,
                "detail": detail,
                "output_dir": p.get("output_dir"),
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="State of each point of a sweep (local or Slurm).")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = sweep_status(args.sweep_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        import pandas as pd

        table = pd.DataFrame(rows)[["index", "job", "state", "point", "detail"]]
        with pd.option_context("display.max_colwidth", 100, "display.width", 250):
            print(table.to_string(index=False))
        counts = summarize([r["state"] for r in rows])
        print("\n" + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
