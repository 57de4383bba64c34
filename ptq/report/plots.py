"""Plots (matplotlib, PNG bytes)."""

from __future__ import annotations

import io
import math
import re
from typing import Dict, List, Tuple

import pandas as pd

from ptq.report.common import BF16, FIDELITY_METRIC, Z_95

# At most this many benchmark rows in the delta plot (the CSV has them all).
MAX_DELTA_ROWS = 40
# Above this many variants a scatter plot names only the points on its Pareto front (the tables name them all).
MAX_LABELS = 12


def _figure(height: float = 4.4):
    # The Agg canvas directly, so importing this module never changes the caller's pyplot backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.8, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _ratio_bars(points: pd.DataFrame) -> list:
    """yerr for the perplexity ratio: distances to its 95% interval (0 where a record has none)."""
    low = (points["perplexity_ratio"] - points["perplexity_ratio_lo"]).fillna(0).clip(lower=0)
    high = (points["perplexity_ratio_hi"] - points["perplexity_ratio"]).fillna(0).clip(lower=0)
    return [low, high]


def _ratio_png(figure, axes, xlabel: str, title: str) -> bytes:
    """Finish a plot of the perplexity ratio to BF16: the line at 1, labels, legend, grid; its PNG."""
    axes.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("perplexity ratio to BF16 (held-out text)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(True, alpha=0.3)
    return _png(figure)


def pareto_front(points: List[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point beats on both counts (lower x and lower y, one strictly), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_perplexity_vs_bits(summary: pd.DataFrame, model: str):
    """PNG: perplexity ratio to BF16 (95% interval as error bars) against bits per weight, with the Pareto front
    (fewer bits and a lower ratio); None when no finished variant has both."""
    points = summary[(summary["model"] == model) & (summary["variant"] != BF16) & (summary["status"] == "finished")]
    points = points[points["perplexity_ratio"].notna() & points["bits_per_weight"].notna()].reset_index(drop=True)
    if points.empty:
        return None
    figure, axes = _figure()
    axes.errorbar(points["bits_per_weight"], points["perplexity_ratio"], yerr=_ratio_bars(points), fmt="o", color="tab:blue",
                  ecolor="tab:blue", capsize=3, zorder=3, label="variant (95% interval)")
    front = pareto_front(list(zip(points["bits_per_weight"], points["perplexity_ratio"])))
    axes.step(points["bits_per_weight"].iloc[front], points["perplexity_ratio"].iloc[front], where="post",
              color="tab:orange", linewidth=1.2, label="Pareto front")
    _label(axes, points, "perplexity_ratio", front)
    return _ratio_png(figure, axes, "bits per weight (checkpoint size vs BF16)", f"{model}: perplexity ratio vs bits per weight")


def _label(axes, points: pd.DataFrame, column: str, front: List[int], scale: float = 1.0) -> None:
    """Name each point, or only the Pareto front's when there are more than MAX_LABELS (said in a corner note)."""
    named = range(len(points)) if len(points) <= MAX_LABELS else front
    for i in named:
        row = points.iloc[i]
        axes.annotate(row["variant"], (row["bits_per_weight"], scale * row[column]), textcoords="offset points",
                      xytext=(4, 4), fontsize=7)
    if len(points) > MAX_LABELS:
        axes.text(0.99, 0.01, f"{len(points)} variants; named: the Pareto front", transform=axes.transAxes,
                  ha="right", va="bottom", fontsize=7, color="grey")


def plot_deltas(scores: pd.DataFrame, model: str):
    """PNG: each variant's difference from BF16 on each benchmark, in % of BF16 (benchmarks of different scales side
    by side), with its 95% interval (paired where per-item scores exist, else sqrt(2) x the variant's standard
    error): grey where the interval holds 0, black where no error is known. None without such rows."""
    rows = scores[(scores["model"] == model) & (scores["variant"] != BF16) & (scores["metric"] != FIDELITY_METRIC)
                  & (scores["subject"] == "") & scores["delta"].notna() & scores["bf16"].notna() & (scores["bf16"] != 0)]
    rows = rows.head(MAX_DELTA_ROWS).reset_index(drop=True)
    if rows.empty:
        return None
    figure, axes = _figure(height=max(2.5, 0.28 * len(rows) + 1.2))
    labels = [f"{v}  {b}/{m}" for v, b, m in zip(rows["variant"], rows["benchmark"], rows["metric"])]
    for y, (delta, bf16, error) in enumerate(zip(rows["delta"], rows["bf16"], rows["delta_error"])):
        relative = 100 * delta / abs(bf16)
        if pd.isna(error):
            axes.plot([relative], [y], "o", color="black")
            continue
        half = 100 * Z_95 * error / abs(bf16)
        colour = "grey" if abs(relative) <= half else "tab:blue"
        axes.errorbar([relative], [y], xerr=[[half], [half]], fmt="o", color=colour, ecolor=colour, capsize=3)
    axes.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("difference from BF16, % of BF16\n(95% interval; grey: not significant; black: no error known)",
                    fontsize=8)
    axes.set_title(f"{model}: benchmark differences from BF16", fontsize=10)
    axes.grid(True, axis="x", alpha=0.3)
    return _png(figure)


def plot_vs_calib_size(summary: pd.DataFrame, model: str):
    """PNG: the perplexity ratio (95% interval) against calibration size, one line per recipe (with its algorithm
    and KV cache) that a sweep ran at two sizes or more; None when none did."""
    points = summary[(summary["model"] == model) & (summary["variant"] != BF16) & (summary["status"] == "finished")
                     & summary["calib_size"].notna() & summary["perplexity_ratio"].notna()]
    lines: Dict[str, pd.DataFrame] = {}
    for name, group in points.assign(line=points["variant"].str.replace(r"@[^ ]+", "", regex=True)).groupby("line"):
        if group["calib_size"].nunique() >= 2:
            lines[name] = group.sort_values("calib_size")
    if not lines:
        return None
    figure, axes = _figure()
    for name, group in lines.items():
        axes.errorbar(group["calib_size"], group["perplexity_ratio"], yerr=_ratio_bars(group), marker="o", capsize=3,
                      label=name)
    axes.set_xscale("log", base=2)
    return _ratio_png(figure, axes, "calibration samples", f"{model}: perplexity ratio vs calibration size")


def model_plots(summary: pd.DataFrame, scores: pd.DataFrame, model: str) -> Dict[str, bytes]:
    """Every plot of one model that has something to show: {file name: PNG}."""
    made = {plot_file_name(model): plot_recovery_vs_bits(summary, model),
            plot_file_name(model, "perplexity_vs_bits"): plot_perplexity_vs_bits(summary, model),
            plot_file_name(model, "deltas"): plot_deltas(scores, model),
            plot_file_name(model, "vs_calib_size"): plot_vs_calib_size(summary, model)}
    return {name: png for name, png in made.items() if png is not None}


def plot_recovery_vs_bits(summary: pd.DataFrame, model: str):
    """PNG: median benchmark recovery (%) against bits per weight of the finished variants, BF16 at 16 bits /
    100%; None when no variant has a benchmark recovery (evaluation off)."""
    points = summary[(summary["model"] == model) & (summary["variant"] != BF16) & (summary["status"] == "finished")]
    points = points[points["median_recovery"].notna() & points["bits_per_weight"].notna()].reset_index(drop=True)
    if points.empty:
        return None
    figure, axes = _figure()
    axes.scatter(points["bits_per_weight"], 100 * points["median_recovery"], color="tab:blue", zorder=3)
    # Fewer bits and a higher recovery: the front of (bits, -recovery).
    _label(axes, points, "median_recovery", pareto_front(list(zip(points["bits_per_weight"], -points["median_recovery"]))),
           scale=100)
    axes.scatter([16], [100], marker="*", s=160, color="tab:red", zorder=3, label="bf16")
    axes.annotate(BF16, (16, 100), textcoords="offset points", xytext=(4, -12), fontsize=8)
    axes.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    axes.margins(x=0.12, y=0.12)  # room for the point labels
    axes.set_xlabel("bits per weight (checkpoint size vs BF16)")
    axes.set_ylabel("median recovery vs BF16 (%)")
    axes.set_title(f"{model}: median recovery vs bits per weight (finished runs)", fontsize=10)
    axes.grid(True, alpha=0.3)
    return _png(figure)


def plot_file_name(model: str, kind: str = "recovery_vs_bits") -> str:
    return f"{kind}_" + re.sub(r"[^A-Za-z0-9._-]", "_", model) + ".png"
