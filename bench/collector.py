"""Results collector time for many run records (default 10,000), in-process and through the CLI.

python bench/collector.py --records 10000 --out bench/results/collector.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ptq.report import build_report, find_run_records, load_records, render_markdown  # noqa: E402

RECIPES = ["fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4", "nvfp4_awq", "fp8_blockwise"]
BENCHMARKS = [("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("hellaswag", "acc_norm"), ("mmlu", "acc")]


def synthetic_record(i: int, rng: random.Random) -> dict:
    model = f"model-{i % 50}"
    recipe = "bf16" if i % 50 == i % 400 else RECIPES[i % len(RECIPES)]
    calib = [128, 256, 512, 1024][(i // 7) % 4]
    status = "failed" if i % 97 == 0 else "finished"
    scores = [
        {"benchmark": b, "metric": m, "value": rng.uniform(0.2, 0.8), "stderr": 0.01, "higher_is_better": True}
        for b, m in BENCHMARKS
    ]
    record = {
        "status": status,
        "model": model,
        "recipe": recipe,
        "kv_cache": "none",
        "calib_size": calib,
        "calib_seq_len": 512,
        "finished_at": f"2026-11-{1 + i % 28:02d}T10:00:00+0000",
        "size": {
            "bf16_bytes": 2_000_000_000,
            "checkpoint_bytes": rng.randint(500_000_000, 1_100_000_000),
            "compression": 2.0,
            "bits_per_weight": rng.uniform(4, 9),
        },
        "timings_s": {"calibrate": rng.uniform(1, 100)},
        "fidelity": {
            "bf16_perplexity": 10.0,
            "quantized_perplexity": rng.uniform(10, 12),
            "mean_kl": 0.05,
            "top1_agreement": 0.9,
        },
        "evaluation": {"results": scores, "baseline": scores},
    }
    if status == "failed":
        record["error"] = "RuntimeError: out of memory"
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sweep"
        for i in range(args.records):
            folder = root / f"point-{i:05d}"
            folder.mkdir(parents=True)
            (folder / "run.json").write_text(json.dumps(synthetic_record(i, rng)))
        start = time.perf_counter()
        files = find_run_records([root])
        records, sources, skipped = load_records(files)
        loaded = time.perf_counter()
        report = build_report(records, sources, skipped)
        render_markdown(report)
        built = time.perf_counter()
        cli_start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "ptq.report", str(root), "--out", str(Path(tmp) / "report")],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
        )
        cli = time.perf_counter() - cli_start
        assert proc.returncode == 0, proc.stderr[-2000:]
    result = {
        "records": args.records,
        "models": 50,
        "find_and_parse_s": round(loaded - start, 3),
        "build_and_render_s": round(built - loaded, 3),
        "cli_total_s": round(cli, 3),
        "score_rows": int(len(report.scores)),
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
