"""What the Slurm launcher costs: composing, checking and submitting a 100-point sweep, and the time
it adds to each job over running the same point directly.

    python bench/sweep_launch.py --tiny-model DIR --out bench/results/sweep-launch-local-slurm.json

Needs the local Slurm (`scripts/local-slurm.sh up`). Measures:
  1. dry run of 100 points (compose + plan each point, print the batch scripts; submits nothing);
  2. detached submission of the same 100 points (compose + plan + sbatch of one job array); the
     array is cancelled right away, so nothing runs;
  3. per-job overhead: N points run one after another as direct `python launch.py` processes,
     against the same N points as a Slurm sweep of 2-CPU jobs (one job at a time on a 2-core node),
     both from scratch; overhead per job = (sweep wall - direct wall) / N.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["fp8", "int8_sq", "int4_awq", "w4a8_awq"]


def run(args, **kw):
    start = time.perf_counter()
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, **kw)
    if out.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - start, out


def point_args(model: Path, root: Path, text: str):
    return [
        f"model.path={model}",
        "model.name=tiny",
        "model.gguf_package=null",
        "model.layer_widths=[]",
        f"calib.dataset={text}",
        "calib.seq_len=64",
        f"fidelity.text={text}",
        "fidelity.samples=2",
        "fidelity.seq_len=64",
        f"output_root={root}",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny-model", required=True, type=Path, help="a small Hugging Face Llama folder")
    parser.add_argument("--text", default=str(REPO.parent / "shared/evaldata/wikitext2_raw/wiki.test.raw"))
    parser.add_argument("--jobs", type=int, default=4, help="points for the per-job overhead measurement")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    py = sys.executable
    sizes = ",".join(str(n) for n in range(1, 26))  # 4 recipes x 25 sizes = 100 points
    sweep = [py, "launch.py", "-m", "cluster=slurm", f"recipe={','.join(RECIPES)}", f"calib.size={sizes}"]

    dry_s, dry = run(sweep + point_args(args.tiny_model, work / "dry", args.text) + ["dry_run=true"])
    assert "Dry run: nothing was submitted (100 point(s) would be)" in dry.stdout, dry.stdout[-500:]
    checked = float(re.search(r"checked in ([0-9.]+) s", dry.stderr + dry.stdout).group(1))

    submit_s, sub = run(sweep + point_args(args.tiny_model, work / "sub", args.text) + ["detach=true"])
    job_ids = re.search(r"Slurm job\(s\) ([0-9, ]+);", sub.stdout).group(1).split(", ")
    subprocess.run(["scancel", *job_ids], check=True)

    recipes = (RECIPES * args.jobs)[: args.jobs]
    direct_s = 0.0
    for i, recipe in enumerate(recipes):
        seconds, _ = run(
            [py, "launch.py", f"recipe={recipe}", f"calib.size={i + 1}"]
            + point_args(args.tiny_model, work / "direct", args.text)
        )
        direct_s += seconds
    sweep_points = [f"recipe={','.join(dict.fromkeys(recipes))}"] if len(set(recipes)) == len(recipes) else None
    assert sweep_points, "use --jobs <= 4 so each point is one recipe"
    slurm_s, _ = run(
        [
            py,
            "launch.py",
            "-m",
            "cluster=slurm",
            *sweep_points,
            "calib.size=1",
            "hydra.launcher.cpus_per_task=2",
            "hydra.launcher.mem_gb=4",
            "hydra.launcher.poll_s=1",
        ]
        + point_args(args.tiny_model, work / "slurm", args.text)
    )
    result = {
        "device": f"{platform.processor() or platform.machine()}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, one-node Slurm from scripts/local-slurm.sh",
        "versions": {
            "python": platform.python_version(),
            **{
                n: metadata.version(n)
                for n in ("hydra-core", "hydra-submitit-launcher", "submitit", "torch", "nvidia-modelopt")
            },
            "slurm": subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip(),
        },
        "dry_run_100_points_s": round(dry_s, 2),
        "dry_run_compose_and_plan_s": checked,
        "detached_submit_100_points_s": round(submit_s, 2),
        "per_job": {
            "points": args.jobs,
            "direct_sequential_s": round(direct_s, 2),
            "slurm_sweep_s": round(slurm_s, 2),
            "overhead_per_job_s": round((slurm_s - direct_s) / args.jobs, 2),
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
