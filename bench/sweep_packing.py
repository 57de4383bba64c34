"""Wall time of a recipe sweep run in one process (the BF16 model loaded once, each point quantizing a
copy) against the same points run one by one as separate `python launch.py` processes.

    python bench/sweep_packing.py --out bench/results/sweep-packing-cpu.json

Both modes run the real launcher on the same sizes; each mode and repeat writes into its own output_root
so no point is skipped as already finished. A warm-up run first fills the caches both modes share
(the GGUF conversion and the text sampled from the model for calibration and fidelity). Repeats
alternate the order of the modes (packed, separate, separate, packed, ...) to spread drift over both.
The machine may be shared: each mode starts once other processes leave the CPUs idle, and a mode during
which they took more than --max-other-cpu-s CPU seconds is run again (twice at most; the record says).
Writes the JSON and a short Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ptq.record_parts import hardware_info, package_versions  # noqa: E402


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_times():
    """(busy, stolen) CPU seconds of the whole machine since boot (/proc/stat), or (None, None). Stolen time
    is time the hypervisor gave our virtual CPUs to someone else: it slows us without showing as a process."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None, None
    tick = os.sysconf("SC_CLK_TCK")
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]  # user nice system irq softirq
    return busy / tick, (fields[7] if len(fields) > 7 else 0) / tick


def busy_cpu_seconds():
    return cpu_times()[0]


def wait_for_quiet(window_s: float = 10.0, limit_s: float = 1800.0) -> float:
    """Wait until other processes leave the CPUs alone (under 5% of one core over `window_s`); returns the wait."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        before = busy_cpu_seconds()
        if before is None:
            return 0.0
        time.sleep(window_s)
        if busy_cpu_seconds() - before < 0.05 * window_s:
            break
    return round(time.perf_counter() - start, 1)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def launch(args, log_path: Path) -> float:
    """Run `python launch.py ARGS`, return its wall time; the output goes to `log_path`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, "launch.py", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"launch.py {' '.join(args)} failed (exit {proc.returncode}); see {log_path}")
    return wall


def point_records(root: Path, recipes) -> dict:
    """Per point: time inside the run (started_at -> finished_at), stage timings and how the model was had."""
    out = {}
    for recipe in recipes:
        paths = list(root.glob(f"*/{recipe}-kv_none-*/run.json"))
        if len(paths) != 1:
            raise SystemExit(f"expected one run record for {recipe} under {root}, found {len(paths)}")
        record = json.loads(paths[0].read_text())
        if record.get("status") != "finished":
            raise SystemExit(f"{paths[0]} did not finish: {record.get('error')}")
        fmt = "%Y-%m-%dT%H:%M:%S%z"
        run_s = (
            datetime.strptime(record["finished_at"], fmt) - datetime.strptime(record["started_at"], fmt)
        ).total_seconds()
        timings = record.get("timings_s", {})
        out[recipe] = {
            "run_s": run_s,  # whole seconds (the record's timestamps)
            "stages_s": timings,
            "stages_total_s": round(sum(timings.values()), 2),
            "model_load": record.get("details", {}).get("model_load"),
            "fidelity": {k: record["fidelity"][k] for k in ("perplexity_ratio", "mean_kl")}
            if record.get("fidelity")
            else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="fp8,int8_sq,int4_awq")
    parser.add_argument("--calib-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--fidelity-samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-other-cpu-s",
        type=float,
        default=10.0,
        help="run a mode again when other processes took more CPU time than this meanwhile",
    )
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every launch (e.g. model=...)")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sweep-packing-cpu.json"))
    args = parser.parse_args()

    recipes = args.recipes.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="sweep-packing-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [
        f"calib.size={args.calib_size}",
        f"calib.seq_len={args.seq_len}",
        f"fidelity.samples={args.fidelity_samples}",
        *args.extra,
    ]

    print(f"warm-up (fills the shared caches) in {work}", flush=True)
    warm = launch([f"recipe={recipes[0]}", *sizes, f"output_root={work / 'warmup'}"], work / "warmup.log")
    print(f"  {warm:.1f} s", flush=True)

    runs = []
    order = []
    for r in range(args.repeats):
        order += [("packed", r), ("separate", r)] if r % 2 == 0 else [("separate", r), ("packed", r)]
    attempts = {}
    queue = list(order)
    while queue:
        mode, r = queue.pop(0)
        attempt = attempts[(mode, r)] = attempts.get((mode, r), 0) + 1
        root = work / f"{mode}-{r}-try{attempt}"
        waited = wait_for_quiet()
        load_before = load_average()
        (busy_before, steal_before), ours_before = cpu_times(), children_cpu_seconds()
        if mode == "packed":
            cmd = [
                "-m",
                f"recipe={','.join(recipes)}",
                *sizes,
                f"output_root={root}",
                f"hydra.sweep.dir={root / 'sweep'}",
            ]
            wall = launch(cmd, work / f"{root.name}.log")
            process_s = None
            commands = [cmd]
        else:
            process_s, commands = {}, []
            for recipe in recipes:
                cmd = [f"recipe={recipe}", *sizes, f"output_root={root}"]
                process_s[recipe] = round(launch(cmd, work / f"{root.name}-{recipe}.log"), 2)
                commands.append(cmd)
            wall = sum(process_s.values())
        points = point_records(root, recipes)
        (busy, steal), ours = cpu_times(), children_cpu_seconds() - ours_before
        # CPU time other processes (or, as stolen time, other machines) took meanwhile: on 2 cores any of it slows us.
        others = round(busy - busy_before - ours, 1) if busy is not None and busy_before is not None else None
        stolen = round(steal - steal_before, 1) if steal is not None and steal_before is not None else None
        clean = (others or 0) <= args.max_other_cpu_s and (stolen or 0) <= args.max_other_cpu_s
        if not clean and attempt < 3:
            print(
                f"{mode} #{r}: other processes took {others} CPU s and the hypervisor {stolen} s meanwhile; "
                "running it again",
                flush=True,
            )
            queue.insert(0, (mode, r))
            continue
        runs.append(
            {
                "mode": mode,
                "repeat": r,
                "attempt": attempt,
                "clean": clean,
                "waited_for_quiet_s": waited,
                "wall_s": round(wall, 2),
                "process_s": process_s,
                "points": points,
                "cpu_s": round(ours, 1),
                "other_processes_cpu_s": others,
                "stolen_cpu_s": stolen,
                "load_average_before": load_before,
                "load_average_after": load_average(),
                "commands": [" ".join(["python launch.py", *c]) for c in commands],
            }
        )
        print(
            f"{mode} #{r}: {wall:.1f} s (CPU {ours:.0f} s; other processes {others} s, stolen {stolen} s)", flush=True
        )

    packed = [x["wall_s"] for x in runs if x["mode"] == "packed"]
    separate = [x["wall_s"] for x in runs if x["mode"] == "separate"]
    summary = {
        "packed_wall_s": packed,
        "separate_wall_s": separate,
        "packed_median_s": statistics.median(packed),
        "separate_median_s": statistics.median(separate),
        "separate_over_packed": round(statistics.median(separate) / statistics.median(packed), 3),
        "saved_s": round(statistics.median(separate) - statistics.median(packed), 1),
    }
    result = {
        "benchmark": "sweep packing: K recipe points in one process vs K processes",
        "recipes": recipes,
        "overrides": sizes,
        "warmup_s": round(warm, 1),
        "max_other_cpu_s": args.max_other_cpu_s,
        "device": {"cpu": cpu_name(), **hardware_info()},
        "versions": package_versions(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": summary,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(summary, indent=2))


def markdown(result: dict) -> str:
    s, dev, ver = result["summary"], result["device"], result["versions"]
    recipes = result["recipes"]
    lines = [
        "# Sweep packing: one process vs one process per point",
        "",
        f"{len(recipes)} points (`recipe={','.join(recipes)}`, `{' '.join(result['overrides'])}`), SmolLM2-135M-Instruct "
        f"unless overridden, on {dev['cpu']} ({dev['cpu_count']} cores, CUDA: {dev['cuda']}); python {ver.get('python')}, "
        f"torch {ver.get('torch')}, transformers {ver.get('transformers')}, nvidia-modelopt {ver.get('nvidia-modelopt')}. "
        f"Measured {result['when']} by `bench/sweep_packing.py`.",
        "",
        "| mode | wall time per sweep (each repeat) | median |",
        "|---|---|---|",
        f"| packed: `python launch.py -m recipe={','.join(recipes)} ...` | {', '.join(f'{x:.1f} s' for x in s['packed_wall_s'])} | {s['packed_median_s']:.1f} s |",
        f"| separate: one `python launch.py recipe=X ...` per point | {', '.join(f'{x:.1f} s' for x in s['separate_wall_s'])} | {s['separate_median_s']:.1f} s |",
        "",
        f"Separate / packed: **{s['separate_over_packed']:.2f}x** ({s['saved_s']:.1f} s saved per sweep).",
        "",
        "Per point (first repeat of each mode): process = the whole `launch.py` process (separate mode only);",
        "run = the run record's start to finish (whole seconds); load = the `load` stage (reading the model, or",
        "copying the one kept in memory); fidelity_reference = the BF16 reference pass (cached in process).",
        "",
        "| recipe | mode | process s | run s | load s | fidelity_reference s | calibrate s | model from |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("packed", "separate"):
        run = next(x for x in result["runs"] if x["mode"] == mode)
        for recipe in recipes:
            p = run["points"][recipe]
            st = p["stages_s"]
            proc = f"{run['process_s'][recipe]:.1f}" if run["process_s"] else "–"
            frm = (p["model_load"] or {}).get("from", "?")
            lines.append(
                f"| {recipe} | {mode} | {proc} | {p['run_s']:.0f} | {st.get('load', 0):.2f} | "
                f"{st.get('fidelity_reference', 0):.2f} | {st.get('calibrate', 0):.1f} | {frm} |"
            )
    others = ", ".join(f"{x['mode']} {x.get('other_processes_cpu_s')}/{x.get('stolen_cpu_s')}" for x in result["runs"])
    lines += [
        "",
        f"CPU seconds other processes / the hypervisor (stolen) took while each mode ran, in run order: "
        f"{others} (near 0: the timings are clean; the machine is shared, and a mode above "
        f"{result['max_other_cpu_s']} s was run again).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
