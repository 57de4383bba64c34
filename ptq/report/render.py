"""Rendering the tables as Markdown and self-contained HTML, and writing the report's files."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from ptq.layerkinds import KINDS
from ptq.report.common import (
    BASELINE_STATUS,
    BF16,
    FROM_BF16_RUN,
    FROM_EMBEDDED_BASELINE,
    SUPERSEDED_COLUMNS,
    within_noise,
)
from ptq.report.plots import model_plots
from ptq.report.tables import Report, measured_names, row_sort_key


def _fmt(x: float, spec: str) -> str:
    return "" if pd.isna(x) else format(x, spec)


def decimals_for(error: float, default: int = 3) -> int:
    """Decimals that show `error` with two significant digits where `default` would round it to zero (a mean KL of
    0.0265 with a standard error of 0.00012 reads `0.02651 ± 0.00012`, not `0.027 ± 0.000`); at most 8."""
    if pd.isna(error) or error <= 0 or error >= 0.5 * 10**-default:
        return default
    return min(8, 1 - math.floor(math.log10(error)))


def with_error(value: float, error: float, default: int = 3) -> str:
    """`value ± error` at the decimals the error needs (`decimals_for`); the value alone where the error is
    missing or 0."""
    if pd.isna(error) or error <= 0:
        return format(value, f".{default}f")
    places = decimals_for(error, default)
    return f"{value:.{places}f} ± {error:.{places}f}"


def with_interval(value: float, lo: float, hi: float, default: int = 3) -> str:
    """`value [lo, hi]` at the decimals the interval needs: an interval narrower than `default` decimals can show
    (a perplexity ratio of 1.0003 [1.0001, 1.0005], not 1.000 [1.000, 1.000]) gets the digits of its width."""
    if pd.isna(value):
        return ""
    if pd.isna(lo) or pd.isna(hi):
        return format(value, f".{default}f")
    places = decimals_for((hi - lo) / 3.92, default)  # a 95% interval spans about 3.92 standard errors
    return f"{value:.{places}f} [{lo:.{places}f}, {hi:.{places}f}]"


def format_cell(
    value: float, delta: float, recovery: float, stderr: float = math.nan, delta_error: float = math.nan
) -> str:
    """`0.330 ± 0.015 (-0.022 n.s., 93.8%)`: the value with its standard error, the difference from BF16 (n.s.
    within 1.96 x `delta_error`, the difference's own error) and the recovery; undefined parts are left out."""
    if pd.isna(value):
        return ""
    details = []
    if not pd.isna(delta):
        places = decimals_for(delta_error if not pd.isna(delta_error) else stderr)
        shown = format(delta, f"+.{places}f")
        details.append(
            (shown.replace("-", "+") if float(shown) == 0 else shown)
            + (" n.s." if within_noise(delta, delta_error) else "")
        )
    if not pd.isna(recovery):
        details.append(format(100 * recovery, ".1f") + "%")
    return with_error(value, stderr) + (f" ({', '.join(details)})" if details else "")


def wide_table(scores: pd.DataFrame, model: str) -> pd.DataFrame:
    """Model-card table of one model: rows benchmark/metric, columns BF16 then the variants, text cells. A benchmark
    measured in several ways (other items, other held-out tokens: other fingerprints) is a row per way, named with
    its setting, so a variant's cell stands beside the BF16 value it was compared with, or beside none."""
    rows = scores[scores["model"] == model]
    variants = list(dict.fromkeys(rows["variant"]))  # already in display order, BF16 first
    if BF16 not in variants:
        variants.insert(0, BF16)
    # Per-subject rows (MMLU) stay in the CSV; the table shows each benchmark's whole and macro figures.
    rows = rows[(rows["benchmark"] != "") & (rows["subject"] == "")]
    names = measured_names(rows)
    keys = list(zip(rows["benchmark"].tolist(), rows["metric"].tolist(), rows["fingerprint"].tolist()))
    label = dict(zip(keys, names))
    row_order = sorted(set(keys), key=lambda r: (row_sort_key(*r[:2]), label[r], r))
    row_position = {row: i for i, row in enumerate(row_order)}
    column_position = {variant: j for j, variant in enumerate(variants)}
    # Filled cell by cell into a grid: pivoting thousands of variant columns in pandas is far slower.
    grid = np.full((len(row_order), len(variants)), "", dtype=object)
    # Plain lists: iterating pandas' Arrow-backed string columns element by element is slow.
    for key, variant, value, delta, recovery, stderr, error in zip(
        keys, *(rows[c].tolist() for c in ("variant", "value", "delta", "recovery", "stderr", "delta_error"))
    ):
        # The BF16 column is the reference: its delta and recovery say nothing.
        cell = (
            format_cell(value, math.nan, math.nan, stderr)
            if variant == BF16
            else format_cell(value, delta, recovery, stderr, error)
        )
        position = row_position[key], column_position[variant]
        if variant == BF16 and grid[position]:
            continue  # one BF16 value per way of measuring (tables._bf16_values keeps the newest run's)
        grid[position] = cell
    labels = np.array([(label[row], row[1]) for row in row_order], dtype=object).reshape(len(row_order), 2)
    return pd.DataFrame(np.hstack([labels, grid]), columns=["benchmark", "metric", *variants], dtype=object)


def format_worst(
    benchmark: str, metric: str, delta: float, error: float, relative: float, losses: int, judged: int
) -> str:
    """`arc_easy/acc_norm -0.046 ± 0.010 (-14.6% of BF16); 1 of 3 significant`, `none of 3 significant`, or "" when
    no difference had an error to judge it by."""
    if not judged:
        return ""
    if not benchmark:
        return f"none of {judged} significant"
    places = decimals_for(error)
    return (
        f"{benchmark}/{metric} {delta:+.{places}f} ± {error:.{places}f} ({100 * relative:+.1f}% of BF16); "
        f"{losses} of {judged} significant"
    )


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Summary rows of one model as display text."""

    def interval(r, lo, hi) -> str:
        if pd.isna(r):
            return ""
        bounds = "" if pd.isna(lo) or pd.isna(hi) else f" [{100 * lo:.1f}, {100 * hi:.1f}]"
        return f"{100 * r:.1f}%{bounds}"

    return pd.DataFrame(
        {
            "variant": summary["variant"],
            "status": summary["status"],
            "median recovery": [
                interval(r, lo, hi) if v != BF16 else _fmt(100 * r, ".1f") + ("%" if not pd.isna(r) else "")
                for r, lo, hi, v in zip(
                    summary["median_recovery"],
                    summary["median_recovery_lo"],
                    summary["median_recovery_hi"],
                    summary["recipe"],
                )
            ],
            "worst significant loss": [
                format_worst(*w)
                for w in zip(
                    *(
                        summary[c].tolist()
                        for c in (
                            "worst_benchmark",
                            "worst_metric",
                            "worst_delta",
                            "worst_delta_error",
                            "worst_relative",
                            "significant_losses",
                            "judged",
                        )
                    )
                )
            ],
            "perplexity ratio": [
                with_interval(r, lo, hi)
                for r, lo, hi in zip(
                    summary["perplexity_ratio"], summary["perplexity_ratio_lo"], summary["perplexity_ratio_hi"]
                )
            ],
            "mean KL": [
                "" if pd.isna(k) else with_error(k, e) for k, e in zip(summary["mean_kl"], summary["mean_kl_stderr"])
            ],
            "fidelity on": summary["fidelity_setting"].fillna(""),
            "size (MB)": [_fmt(x, ".1f") for x in summary["checkpoint_mb"]],
            "compression": [_fmt(x, ".2f") + "x" if not pd.isna(x) else "" for x in summary["compression"]],
            "bits/weight": [_fmt(x, ".2f") for x in summary["bits_per_weight"]],
            "calib size": [_fmt(x, ".0f") for x in summary["calib_size"]],
            "calib seq len": [_fmt(x, ".0f") for x in summary["calib_seq_len"]],
            "calibrate (s)": [_fmt(x, ".1f") for x in summary["calibrate_s"]],
            "peak GPU (GB)": [
                _fmt(gb, ".1f") + (f" ({x:.2f}x BF16)" if not pd.isna(x) else "") if not pd.isna(gb) else ""
                for gb, x in zip(summary["peak_gpu_gb"], summary["peak_gpu_x_bf16"])
            ],
            "served by": summary["served_by"],
            "recipe file": [f"[{Path(f).name}]({f})" if f else "" for f in summary["recipe_file"].fillna("")],
            "note": summary["note"],
        }
    )


def _variant_headers(summary: pd.DataFrame, columns: Sequence[str]) -> List[str]:
    """Column titles; variants that did not finish say so in their title."""
    status = dict(zip(summary["variant"].tolist(), summary["status"].tolist()))
    titles = []
    for column in columns:
        state = status.get(column)
        marked = column not in ("benchmark", "metric") and state not in (None, "finished", BASELINE_STATUS)
        titles.append(f"{column} ({state})" if marked else column)
    return titles


def markdown_table(table: pd.DataFrame, headers: Optional[Sequence[str]] = None) -> str:
    def clean(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    headers = list(headers if headers is not None else table.columns)
    lines = ["| " + " | ".join(clean(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in table.to_numpy(dtype=object).tolist()]
    return "\n".join(lines)


def _bf16_origin(scores: pd.DataFrame, model: str) -> str:
    rows = scores[(scores["model"] == model) & (scores["variant"] == BF16)]
    origins = set(rows["bf16_source"])
    if not origins:
        return "BF16: no scores (no bf16 run and no embedded baseline)."
    runs = list(dict.fromkeys(rows.loc[rows["bf16_source"] == FROM_BF16_RUN, "source"]))
    named = ", ".join(f"`{run}`" for run in runs)
    which = f"run {named}" if len(runs) == 1 else f"runs {named} (each row from the run that measured it that way)"
    if origins == {FROM_BF16_RUN}:
        return f"BF16: from {which}."
    if origins == {FROM_EMBEDDED_BASELINE}:
        return "BF16: from the baselines embedded in the quantized records (no finished bf16 run)."
    return f"BF16: from {which}, rows they lack from the baselines embedded in the quantized records."


LEGEND = (
    "Cells: value ± standard error (delta vs BF16, recovery). Recovery = value / BF16 where higher is better, "
    "BF16 / value where lower is better (perplexity, KL); blank where BF16 is 0 or missing. Each cell is compared "
    "only with the BF16 value in its own row: a benchmark measured in several ways (items, held-out tokens) has "
    "a row per way, named with it (`perplexity [256 tok x 32]`). Median recovery is over the benchmark rows "
    "where recovery is defined, with the median of their 95% bounds in brackets; beside it the worst "
    "significant loss (delta ± standard error, as % of BF16), which a median can hide. "
    '"n.s.": the difference from BF16 is within 1.96 standard errors '
    "(fidelity rows: errors across the held-out sequences, paired with BF16 on the same tokens; benchmark rows: "
    "the error of the per-item differences on the items both scored, or, for results kept without per-item "
    "scores, sqrt(2) x the variant's own error), so it is not a finding."
)


def layer_kind_table(layer_kinds: pd.DataFrame, model: str) -> pd.DataFrame:
    """Rows: layer kinds; columns: variants; cells: `FORMAT layers (share of parameters)` per stored format."""
    rows = layer_kinds[layer_kinds["model"] == model]
    if rows.empty:
        return pd.DataFrame()
    variants = list(dict.fromkeys(rows["variant"]))
    kinds = [k for k in KINDS if k in set(rows["kind"])]
    cells = {(kind, variant): [] for kind in kinds for variant in variants}
    for kind, variant, fmt, layers, share in zip(
        *(rows[c].tolist() for c in ("kind", "variant", "format", "layers", "share"))
    ):
        cells[(kind, variant)].append(f"{fmt} {int(layers)} ({100 * share:.1f}%)")
    table = pd.DataFrame({"layer kind": kinds, **{v: ["; ".join(cells[(k, v)]) for k in kinds] for v in variants}})
    return table


LAYER_KIND_NOTE = (
    "Layers of each kind stored in each format in the written checkpoint, with their share of the "
    "model's parameters (ptq/layerkinds.py; routed experts count one layer per expert and projection)."
)


TRAINING_NOTE = (
    "Training after PTQ against the PTQ checkpoint it started from: the share of the PTQ gap to BF16 "
    "that the training closed (1 = back to BF16, 0 = unchanged, below 0 = worse), with its 95% interval; "
    "benchmarks: the median share over the rows where PTQ lost beyond noise (ptq/report/training.py). "
    "The held-out fidelity text is kept apart from the training text."
)


CALIB_KIND_NOTE = (
    "Calibration with image-text pairs against calibration with text, on the same held-out inputs: the difference "
    "in mean KL to BF16 (images minus text; below 0: the image-calibrated checkpoint is closer to BF16), paired over "
    "the held-out sequences, with its 95% interval (ptq/report/calib_kinds.py)."
)


def calib_kind_rows(calib_kinds: pd.DataFrame, model: str) -> pd.DataFrame:
    """The image-text against text calibration table of one model as display text (empty when there is none)."""
    rows = calib_kinds[calib_kinds["model"] == model]
    return pd.DataFrame(
        {
            "text": rows["text_variant"],
            "images": rows["images_variant"],
            "fidelity": rows["fidelity"],
            "sequences": [_fmt(x, ".0f") for x in rows["sequences"]],
            "mean KL (text)": [_fmt(x, ".4g") for x in rows["text_mean_kl"]],
            "mean KL (images)": [_fmt(x, ".4g") for x in rows["images_mean_kl"]],
            "difference [95% CI]": [
                f"{d:+.3g}" + ("" if pd.isna(lo) else f" [{lo:+.3g}, {hi:+.3g}]")
                for d, lo, hi in zip(rows["kl_difference"], rows["kl_difference_lo"], rows["kl_difference_hi"])
            ],
            "finding": rows["finding"],
        }
    )


def training_rows(training: pd.DataFrame, model: str) -> pd.DataFrame:
    """The training table of one model as display text (empty when nothing was trained)."""
    rows = training[training["model"] == model]

    def share(x, lo, hi) -> str:
        if pd.isna(x):
            return ""
        return (
            f"{100 * x:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
            if not (pd.isna(lo) or pd.isna(hi))
            else f"{100 * x:.0f}%"
        )

    return pd.DataFrame(
        {
            "variant": rows["variant"],
            "from PTQ": rows["ptq_variant"],
            "method": rows["method"],
            "steps": [_fmt(x, ".0f") for x in rows["steps"]],
            "lr": [_fmt(x, "g") for x in rows["lr"]],
            "mean KL (PTQ → trained)": [
                _fmt(a, ".3f") + ("" if pd.isna(b) else " → " + with_error(b, e))
                for a, b, e in zip(rows["ptq_mean_kl"], rows["mean_kl"], rows["mean_kl_stderr"])
            ],
            "KL gap closed": [
                share(*x) for x in zip(rows["kl_gap_closed"], rows["kl_gap_closed_lo"], rows["kl_gap_closed_hi"])
            ],
            "perplexity ratio (PTQ → trained)": [
                f"{_fmt(a, '.3f')} → {_fmt(b, '.3f')}"
                for a, b in zip(rows["ptq_perplexity_ratio"], rows["perplexity_ratio"])
            ],
            "ppl gap closed": [
                share(*x) for x in zip(rows["ppl_gap_closed"], rows["ppl_gap_closed_lo"], rows["ppl_gap_closed_hi"])
            ],
            "benchmarks gap closed": [
                f"{100 * x:.0f}% (median of {n})" if not pd.isna(x) else ""
                for x, n in zip(rows["benchmark_gap_closed"], rows["benchmarks_closed"])
            ],
            "note": [("WORSE: " if w else "") + n for w, n in zip(rows["worse_than_ptq"], rows["note"])],
        }
    )


def render_markdown(report: Report) -> str:
    parts = ["# Quantization results", "", LEGEND]
    for model in report.models:
        summary = report.summary[report.summary["model"] == model]
        wide = wide_table(report.scores, model)
        parts += [
            "",
            f"## {model}",
            "",
            _bf16_origin(report.scores, model),
            "",
            markdown_table(wide, _variant_headers(summary, wide.columns)),
            "",
            f"### {model}: summary",
            "",
            markdown_table(format_summary(summary)),
        ]
        kinds = layer_kind_table(report.layer_kinds, model)
        if not kinds.empty:
            parts += ["", f"### {model}: layer kinds", "", LAYER_KIND_NOTE, "", markdown_table(kinds)]
        trained = training_rows(report.training, model)
        if not trained.empty:
            parts += ["", f"### {model}: training after PTQ", "", TRAINING_NOTE, "", markdown_table(trained)]
        kinds_of_calib = calib_kind_rows(report.calib_kinds, model)
        if not kinds_of_calib.empty:
            parts += ["", f"### {model}: image-text against text calibration", "", CALIB_KIND_NOTE, ""]
            parts.append(markdown_table(kinds_of_calib))
        superseded = report.superseded[report.superseded["model"] == model]
        if not superseded.empty:
            parts += ["", f"### {model}: superseded records", ""]
            parts += [f"- `{r.source}` ({r.variant}): {r.reason}; kept `{r.kept}`" for r in superseded.itertuples()]
    if not report.skipped.empty:
        parts += ["", "## Skipped files", ""]
        parts += [f"- `{r.source}`: {r.reason}" for r in report.skipped.itertuples()]
    return "\n".join(parts) + "\n"


def render_html(report: Report, plots: dict) -> str:
    """Self-contained page: the tables of results.md plus the plots inlined as base64 PNG (`plots`: model ->
    {file name: PNG})."""

    def table(frame: pd.DataFrame, headers: Optional[Sequence[str]] = None) -> str:
        frame = frame.copy()
        if headers is not None:
            frame.columns = list(headers)
        return frame.to_html(index=False, escape=True, border=0, na_rep="")

    body = ["<h1>Quantization results</h1>", f"<p>{html.escape(LEGEND)}</p>"]
    for model in report.models:
        summary = report.summary[report.summary["model"] == model]
        wide = wide_table(report.scores, model)
        body += [
            f"<h2>{html.escape(model)}</h2>",
            f"<p>{html.escape(_bf16_origin(report.scores, model))}</p>",
            table(wide, _variant_headers(summary, wide.columns)),
            f"<h3>{html.escape(model)}: summary</h3>",
            table(format_summary(summary)),
        ]
        kinds = layer_kind_table(report.layer_kinds, model)
        if not kinds.empty:
            body += [
                f"<h3>{html.escape(model)}: layer kinds</h3>",
                f"<p>{html.escape(LAYER_KIND_NOTE)}</p>",
                table(kinds),
            ]
        trained = training_rows(report.training, model)
        if not trained.empty:
            body += [
                f"<h3>{html.escape(model)}: training after PTQ</h3>",
                f"<p>{html.escape(TRAINING_NOTE)}</p>",
                table(trained),
            ]
        kinds_of_calib = calib_kind_rows(report.calib_kinds, model)
        if not kinds_of_calib.empty:
            body += [
                f"<h3>{html.escape(model)}: image-text against text calibration</h3>",
                f"<p>{html.escape(CALIB_KIND_NOTE)}</p>",
                table(kinds_of_calib),
            ]
        for name, png in plots.get(model, {}).items():
            encoded = base64.b64encode(png).decode("ascii")
            what = name.rsplit(".", 1)[0].replace("_", " ")
            body.append(f'<p><img alt="{html.escape(what)}" src="data:image/png;base64,{encoded}"></p>')
        superseded = report.superseded[report.superseded["model"] == model]
        if not superseded.empty:
            body += [f"<h3>{html.escape(model)}: superseded records</h3>", table(superseded[SUPERSEDED_COLUMNS])]
    if not report.skipped.empty:
        body += ["<h2>Skipped files</h2>", table(report.skipped)]
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f2f2f2}"
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Quantization results</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(report: Report, out_dir: Path, extra: Sequence[str] = ()) -> Tuple[str, List[Path]]:
    """Write results.md/.csv/.html and the plots into `out_dir`; returns (Markdown, written paths). `extra`:
    Markdown lines added at the end of both pages (the recommendation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(report) + ("\n".join(extra) + "\n" if extra else "")
    plots = {model: model_plots(report.summary, report.scores, model, report.training) for model in report.models}
    written = []
    for made in plots.values():
        for name, png in made.items():
            (out_dir / name).write_bytes(png)
            written.append(out_dir / name)
    page = render_html(report, plots)
    if extra:
        page = page.replace("</body>", "<pre>" + html.escape("\n".join(extra)) + "</pre>\n</body>")
    for name, text in (("results.md", markdown), ("results.html", page)):
        (out_dir / name).write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    report.scores.to_csv(out_dir / "results.csv", index=False)
    written.append(out_dir / "results.csv")
    report.summary.to_csv(out_dir / "summary.csv", index=False)
    written.append(out_dir / "summary.csv")
    if not report.layer_kinds.empty:
        report.layer_kinds.to_csv(out_dir / "layer_kinds.csv", index=False)
        written.append(out_dir / "layer_kinds.csv")
    if not report.training.empty:
        report.training.to_csv(out_dir / "training.csv", index=False)
        written.append(out_dir / "training.csv")
    if not report.calib_kinds.empty:
        report.calib_kinds.to_csv(out_dir / "calib_kinds.csv", index=False)
        written.append(out_dir / "calib_kinds.csv")
    return markdown, written
