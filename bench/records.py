"""Gather the run records of a bench's runs into one file that is committed with its results, and back.

    python -m bench.records RUNS OUT
    python -m bench.records --unpack OUT/run-records.json RUNS

The first writes OUT/run-records.json: every RUNS/<model>/<point>/run.json, whole, by its folder below RUNS, and
prints one line per point (status, stage timings, the start of an error). The second writes each record back to
RUNS/<model>/<point>/run.json (RUNS must not exist yet), so that a committed result's report can be made again by
the current code: `python -m ptq.report RUNS --out REPORT` (its links to each checkpoint's recipe file point at
folders of the machine that ran it).
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


def unpack(records_file: Path, runs: Path) -> int:
    records = json.loads(records_file.read_text())
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        sys.exit(f"{records_file} is not a run-records.json file (an object of <model>/<point>: run record).")
    if runs.exists():
        sys.exit(f"{runs} exists: give a folder that does not exist yet (nothing is overwritten).")
    # Every name is checked before anything is written.
    for name in records:
        if Path(name).is_absolute() or ".." in Path(name).parts or len(Path(name).parts) != 2:
            sys.exit(f"{records_file}: {name!r} is not a <model>/<point> folder name.")
    for name, record in records.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    return len(records)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--unpack":
        print(unpack(Path(sys.argv[2]), Path(sys.argv[3])), "records written under", sys.argv[3])
        return
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for name, r in gather(Path(sys.argv[1]), Path(sys.argv[2])).items():
        print(name, r["status"], (r.get("error") or "")[:200], r.get("timings_s"))


if __name__ == "__main__":
    main()
