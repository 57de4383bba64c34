"""Sweeps on a real one-node Slurm (scripts/local-slurm.sh), quantizing a tiny Llama for real.

They need the local Slurm that `bash scripts/test-services.sh up` starts (the README's test command and .ci/run
do); without it they skip naming that step, and under CI=true they fail instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TEST_CACHE, text_source

pytestmark = pytest.mark.slow  # real quantization, installs or Slurm jobs: minutes in all


SCRIPT = REPO / "scripts" / "local-slurm.sh"


@pytest.fixture(scope="session")
def local_slurm():
    """A running local Slurm, started beforehand by `bash scripts/test-services.sh up` (the README's test command
    and .ci/run do); the tests never install or start it themselves."""
    if subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0:
        return
    reason = "no local Slurm is running: start it with `bash scripts/test-services.sh up` (needs root and apt-get)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the Slurm tests, but {reason}")
    pytest.skip(reason)


def squeue_ids() -> list:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()


def wait_for_empty_queue(timeout=600):
    deadline = time.time() + timeout
    while squeue_ids():
        assert time.time() < deadline, f"jobs still queued: {squeue_ids()}"
        time.sleep(2)


def sweep_args(tmp_path, tiny, *extra):
    text = text_source()
    return [
        sys.executable,
        "launch.py",
        "-m",
        "cluster=slurm",
        f"model.path={tiny}",
        "model.name=tiny",
        "model.gguf_package=null",
        "model.layer_widths=[]",
        f"calib.dataset={text}",
        "calib.seq_len=64",
        f"fidelity.text={text}",
        "fidelity.samples=2",
        "fidelity.seq_len=64",
        f"output_root={tmp_path / 'runs'}",
        f"cache_dir={TEST_CACHE}",
        # Two 1-CPU jobs at a time on a 2-core machine.
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=3",
        "hydra.launcher.poll_s=1",
        *extra,
    ]


def launch(args, timeout=900):
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def records(root: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in root.rglob("run.json")}


def manifest(root: Path) -> dict:
    (path,) = sorted((root / "sweeps").glob("*/sweep.json"))[-1:]
    return json.loads(path.read_text())


def test_sweep_runs_refuses_and_resumes(local_slurm, tiny_llama_dir, tmp_path):
    """2 recipes x 2 calibration sizes run as Slurm jobs; nvfp4 on a CPU is refused without a job;
    the same sweep again submits nothing."""
    args = sweep_args(tmp_path, tiny_llama_dir, "recipe=fp8,int8_sq,nvfp4", "calib.size=4,8")
    launch(args)
    runs = records(tmp_path / "runs")
    finished = sorted(name for name, r in runs.items() if r["status"] == "finished")
    assert finished == [
        "fp8-kv_none-calib4x64",
        "fp8-kv_none-calib8x64",
        "int8_sq-kv_none-calib4x64",
        "int8_sq-kv_none-calib8x64",
    ]
    refused = [r for r in runs.values() if r["recipe"] == "nvfp4"]
    assert len(refused) == 2 and all(
        r["status"] == "failed" and "refused before submission" in r["error"] and "CUDA" in r["error"] for r in refused
    )
    first = manifest(tmp_path / "runs")
    assert sum(p["job_id"] is not None for p in first["points"]) == 4
    assert {p["state"] for p in first["points"] if p["job_id"] is None} == {"refused"}

    # The same sweep again, into a sweep folder of its own ("again" sorts after the first one's timestamp).
    launch(args + [f"hydra.sweep.dir={tmp_path / 'runs' / 'sweeps' / 'again'}"])
    again = manifest(tmp_path / "runs")
    assert again["sweep_dir"] != first["sweep_dir"]
    assert sorted(p["state"] for p in again["points"]) == ["refused"] * 2 + ["skipped"] * 4
    assert all(p["job_id"] is None for p in again["points"])
    assert (
        records(tmp_path / "runs")["fp8-kv_none-calib4x64"]["finished_at"]
        == runs["fp8-kv_none-calib4x64"]["finished_at"]
    )


def test_dry_run_submits_nothing(local_slurm, tiny_llama_dir, tmp_path):
    wait_for_empty_queue()
    out = launch(sweep_args(tmp_path, tiny_llama_dir, "recipe=fp8,int8_sq", "calib.size=4", "dry_run=true"))
    assert "#SBATCH --array=0-1%" in out.stdout and "#SBATCH --mem=3GB" in out.stdout
    assert 'request: {"nodes": 1, "gpus_per_node": 0' in out.stdout
    assert "Dry run: nothing was submitted (2 point(s) would be)" in out.stdout
    assert squeue_ids() == []
    assert not list((tmp_path / "runs").rglob("run.json")) and not list((tmp_path / "runs").rglob("sweep.json"))


def test_a_point_that_does_not_compose_is_refused_alone(local_slurm, tiny_llama_dir, tmp_path):
    """The launcher composes each point itself (one Hydra composition per group choice, composing.py): a value
    of the wrong type refuses its own point, the others are still planned."""
    out = launch(sweep_args(tmp_path, tiny_llama_dir, "recipe=fp8,int8_sq", "calib.size=4,many", "dry_run=true"))
    assert "2 to submit in 1 job group(s), 0 skipped, 2 refused" in out.stdout + out.stderr
    refused = [
        line
        for line in out.stdout.splitlines()
        if line.endswith(": refused - the config does not compose: Error merging override calib.size=many")
    ]
    assert len(refused) == 2 and all("calib.size=many " in line for line in refused), out.stdout[-3000:]
    assert "Dry run: nothing was submitted (2 point(s) would be)" in out.stdout
    assert squeue_ids() == []


def test_killed_job_fails_its_point_and_the_sweep_ends(local_slurm, tiny_llama_dir, tmp_path):
    """scancel one job mid-sweep: the sweep still ends, that point failed with Slurm's state, the other finished."""
    wait_for_empty_queue()
    proc = subprocess.Popen(
        sweep_args(tmp_path, tiny_llama_dir, "recipe=fp8,int8_sq", "calib.size=4"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline, victim = time.time() + 300, None
    while victim is None and time.time() < deadline:
        running = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], capture_output=True, text=True).stdout.split()
        victim = next((j for j in running if j.endswith("_0")), None)
        time.sleep(0.5)
    assert victim, "the first job never started"
    subprocess.run(["scancel", victim], check=True)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    runs = records(tmp_path / "runs")
    killed, other = runs["fp8-kv_none-calib4x64"], runs["int8_sq-kv_none-calib4x64"]
    assert killed["status"] == "failed" and "CANCELLED" in killed["error"] and victim in killed["error"]
    assert not (tmp_path / "runs" / "tiny" / "fp8-kv_none-calib4x64" / "checkpoint").exists()
    assert other["status"] == "finished"
    status = subprocess.run(
        [sys.executable, "-m", "ptq.status", manifest(tmp_path / "runs")["sweep_dir"], "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    states = {row["point"]: row["state"] for row in json.loads(status.stdout)}
    assert states == {"recipe=fp8": "failed", "recipe=int8_sq": "finished"}


def test_detached_sweep_returns_at_once_and_status_follows_it(local_slurm, tiny_llama_dir, tmp_path):
    wait_for_empty_queue()
    start = time.time()
    out = launch(sweep_args(tmp_path, tiny_llama_dir, "recipe=fp8,int8_sq,int4_awq", "calib.size=4", "detach=true"))
    submitted_in = time.time() - start
    assert "Submitted 3 point(s) as Slurm job(s)" in out.stdout and "python -m ptq.status" in out.stdout
    sweep_dir = manifest(tmp_path / "runs")["sweep_dir"]
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "ptq.status", sweep_dir, "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert len(status) == 3
    # Three jobs of about 15 s each on two CPUs cannot all be done when the launcher returns.
    assert any(row["state"] in ("pending", "running") for row in status), (submitted_in, status)
    # The collector works on the sweep while it runs.
    report = subprocess.run(
        [sys.executable, "-m", "ptq.report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "pending (submitted, not started)" in report.stdout or "running (unfinished)" in report.stdout
    wait_for_empty_queue()
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "ptq.status", sweep_dir, "--json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert [row["state"] for row in status] == ["finished"] * 3


def test_packed_points_share_one_job(local_slurm, tiny_llama_dir, tmp_path):
    """hydra.launcher.pack=true: the points of a group run one after another in one Slurm job."""
    wait_for_empty_queue()
    launch(sweep_args(tmp_path, tiny_llama_dir, "recipe=fp8,int8_sq", "calib.size=4", "hydra.launcher.pack=true"))
    points = manifest(tmp_path / "runs")["points"]
    assert len({p["job_id"] for p in points}) == 1 and points[0]["job_id"] is not None
    runs = records(tmp_path / "runs")
    assert [runs[n]["status"] for n in ("fp8-kv_none-calib4x64", "int8_sq-kv_none-calib4x64")] == ["finished"] * 2


def test_a_packed_job_starts_no_point_after_its_end_signal(local_slurm, tiny_llama_dir, tmp_path):
    """Slurm's warning ahead of the time limit (submitit's USR2, sent here with scancel once the first point has
    finished) ends the point in progress, and the points after it are recorded as not started instead of
    starting. With a limit under 10 minutes (3 per point, 9 for the packed job) submitit counts any USR2 as the
    time-out (no requeue)."""
    wait_for_empty_queue()
    launch(
        sweep_args(
            tmp_path,
            tiny_llama_dir,
            "recipe=fp8,int4_awq,int8_sq",
            "calib.size=8",
            "hydra.launcher.pack=true",
            "hydra.launcher.timeout_min=3",
            "hydra.launcher.signal_delay_s=30",
            "detach=true",
        )
    )
    [job] = {p["job_id"] for p in manifest(tmp_path / "runs")["points"]}
    first = tmp_path / "runs" / "tiny" / "fp8-kv_none-calib8x64" / "run.json"
    deadline = time.time() + 600
    while not (first.exists() and json.loads(first.read_text()).get("status") == "finished"):
        assert time.time() < deadline and job in squeue_ids(), "the first point did not finish"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for_empty_queue()
    runs = records(tmp_path / "runs")
    assert runs["fp8-kv_none-calib8x64"]["status"] == "finished"
    last = runs["int8_sq-kv_none-calib8x64"]
    assert last["status"] == "failed" and last["error"].startswith("not started: the packed Slurm job received SIGUSR2")
    # Ended by the signal: inside its run (the run records the failure), or before its run wrote a record (not started).
    assert runs["int4_awq-kv_none-calib8x64"]["status"] == "failed"
