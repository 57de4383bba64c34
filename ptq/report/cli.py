"""`python -m ptq.report`: the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ptq.report.common import RUN_RECORD_NAME
from ptq.report.read import find_run_records, load_records, pending_points
from ptq.report.tables import build_report
from ptq.report.render import write_report


def default_out_dir(paths: Sequence[Path]) -> Path:
    first = Path(paths[0])
    return (first if first.is_dir() else first.parent) / "report"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptq.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="folders to search for run.json, or run.json files")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: report/ under the first given folder)")
    args = parser.parse_args(argv)
    try:
        files = find_run_records(args.paths)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    pending = pending_points(args.paths)
    if not files and not pending:
        print(f"no {RUN_RECORD_NAME} found under: {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 1
    records, sources, skipped = load_records(files)
    records += pending
    sources += [p["manifest"] for p in pending]
    report = build_report(records, sources, skipped)
    out_dir = args.out or default_out_dir(args.paths)
    markdown, written = write_report(report, out_dir)
    sys.stdout.write(markdown)
    print(f"{len(records)} records read, {len(skipped)} skipped; wrote {len(written)} files to {out_dir}",
          file=sys.stderr)
    return 0
