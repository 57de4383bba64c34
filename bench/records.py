"""Gather the run records of a bench's runs into one file that is committed with its results.

    python -m bench.records RUNS OUT

Writes OUT/run-records.json: every RUNS/<model>/<point>/run.json, whole, by its folder below RUNS; prints one line
per point (status, stage timings, the start of an error).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def gather(runs: Path, out: Path) -> dict:
    records = {str(p.parent.relative_to(runs)): json.loads(p.read_text()) for p in sorted(runs.glob("*/*/run.json"))}
    out.mkdir(parents=True, exist_ok=True)
    (out / "run-records.json").write_text(json.dumps(records, indent=1) + "\n")
    return records


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for name, r in gather(Path(sys.argv[1]), Path(sys.argv[2])).items():
        print(name, r["status"], (r.get("error") or "")[:200], r.get("timings_s"))


if __name__ == "__main__":
    main()
