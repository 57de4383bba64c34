"""`python -m ptq.report`: the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ptq.files import write_json_atomic
from ptq.report.common import RUN_RECORD_NAME
from ptq.report.read import find_run_records, load_records, pending_points
from ptq.report.recommend import parse_budget, recommend, render_recommendation
from ptq.report.render import write_report
from ptq.report.tables import build_report
from ptq.tracking import log_files


def default_out_dir(paths: Sequence[Path]) -> Path:
    first = Path(paths[0])
    return (first if first.is_dir() else first.parent) / "report"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptq.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="folders to search for run.json, or run.json files")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: report/ under the first given folder)"
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="recommend, per model and serving engine, the smallest checkpoint whose loss against BF16 "
        "is within this budget at 95%% confidence (e.g. 1%%); writes recommendation.json too",
    )
    parser.add_argument(
        "--mlflow-uri",
        default=None,
        help="also log the report's files as the artifacts of one MLflow run in this store, e.g. "
        "sqlite:///runs/mlflow/mlflow.db (the store of tracking=mlflow)",
    )
    parser.add_argument("--mlflow-experiment", default="ptq-launcher", help="its experiment (default: ptq-launcher)")
    args = parser.parse_args(argv)
    try:
        budget = parse_budget(args.budget) if args.budget is not None else None
    except ValueError as exc:
        parser.error(str(exc))
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
    sources += [str(p.sections.get("manifest", "")) for p in pending]
    report = build_report(records, sources, skipped)
    out_dir = args.out or default_out_dir(args.paths)
    extra = []
    if budget is not None:
        recommendation = recommend(report, budget)
        extra = render_recommendation(recommendation)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "recommendation.json", recommendation)
    markdown, written = write_report(report, out_dir, extra)
    if budget is not None:
        written.append(out_dir / "recommendation.json")
    sys.stdout.write(markdown)
    print(
        f"{len(records)} records read, {len(skipped)} skipped; wrote {len(written)} files to {out_dir}", file=sys.stderr
    )
    if args.mlflow_uri:
        try:
            logged = log_files(
                args.mlflow_uri,
                args.mlflow_experiment,
                written,
                run_name=f"report {out_dir.name}",
                tags={"records": str(len(records)), "report_dir": str(out_dir.resolve())},
            )
        except Exception as exc:  # noqa: BLE001 - the report is written; only its copy in MLflow is missing
            print(
                f"MLflow: could not log the report to {args.mlflow_uri}: {type(exc).__name__}: {exc}", file=sys.stderr
            )
            return 1
        print(
            f"MLflow: logged {len(logged['artifacts'])} files as run {logged['run_id']} of experiment "
            f"{args.mlflow_experiment} at {logged['uri']}",
            file=sys.stderr,
        )
    return 0
