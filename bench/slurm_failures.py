"""How long a waiting Slurm sweep takes to record a job that died: scancel, and kill -9 of the run's process.

    python bench/slurm_failures.py --tiny-model DIR --text FILE --out bench/results/slurm-failures-local.json

Needs the local Slurm (`scripts/local-slurm.sh up`). For each fault, a one-point sweep is launched and waited
for; once its run record says running, the fault is injected and the time until the record says failed is
measured (the record is polled every 0.2 s). hydra.launcher.poll_s is left at its default (5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def record(root: Path) -> dict:
    found = list(root.rglob("run.json"))
    return json.loads(found[0].read_text()) if found else {}


def wait_for(predicate, timeout: float, step: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


def one(fault: str, model: str, text: str, work: Path) -> dict:
    root = work / fault
    args = [
        sys.executable,
        "launch.py",
        "-m",
        "cluster=slurm",
        f"model.path={model}",
        "model.name=tiny",
        "model.gguf_package=null",
        "model.layer_widths=[]",
        f"calib.dataset={text}",
        "calib.seq_len=64",
        "calib.size=64",
        f"fidelity.text={text}",
        "fidelity.samples=32",
        "fidelity.seq_len=256",
        f"output_root={root}",
        f"cache_dir={work / 'cache'}",
        "recipe=int8_sq",
        "hydra.launcher.cpus_per_task=2",
        "hydra.launcher.mem_gb=4",
    ]
    sweep = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    running = wait_for(lambda: record(root).get("status") == "running" and record(root), timeout=600)
    if not running:
        sweep.kill()
        return {"fault": fault, "error": "the point never started running"}
    holder = running.get("holder") or {}
    start = time.time()
    if fault == "scancel":
        subprocess.run(["scancel", str(holder.get("slurm_job"))], check=True)
    else:  # the run's own process, killed without a chance to write anything
        os.kill(int(holder["pid"]), signal.SIGKILL)
    failed = wait_for(lambda: record(root).get("status") == "failed" and record(root), timeout=900)
    seconds = round(time.time() - start, 1) if failed else None
    output, _ = sweep.communicate(timeout=900)
    return {
        "fault": fault,
        "slurm_job": holder.get("slurm_job"),
        "recorded_after_s": seconds,
        "error": (failed or {}).get("error"),
        "sweep_exit": sweep.returncode,
        "sweep_tail": output[-600:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [one(fault, args.tiny_model, args.text, Path(tmp)) for fault in ("scancel", "kill9")]
    slurm = subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip()
    out = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
        "slurm": slurm,
        "python": platform.python_version(),
        "poll_s": 5.0,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for r in results:
        print(r["fault"], r.get("recorded_after_s"), r.get("error"))


if __name__ == "__main__":
    main()
