"""Plots (matplotlib, PNG bytes). Each `plot_*` has a `*_figure` twin that returns the figure, for tests."""

from __future__ import annotations

import io
import math
import re
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from ptq.report.common import BF16, FIDELITY_METRIC, Z_95
from ptq.report.tables import measured_names

# At most this many benchmark rows in the delta plot (the CSV has them all).
MAX_DELTA_ROWS = 40
# Above this many variants a scatter plot names only the points on its Pareto front (the tables name them all).
MAX_LABELS = 12
# Points closer than this (pixels) share one label, their names stacked.
SAME_PLACE_PX = 3.0
# Where a label may go, in points from its point: the nearest free place wins (a leader line beyond the first ring).
LABEL_RINGS = (4, 14, 26, 40, 56, 74)
LABEL_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0))


def _canvas(width: float = 6.8, height: float = 4.4):
    # The Agg canvas directly, so importing this module never changes the caller's pyplot backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _figure(height: float = 4.4):
    figure = _canvas(height=height)
    return figure, figure.add_subplot()


def _png(figure, layout: bool = True) -> bytes:
    """The figure as PNG; `layout=False` for a figure laid out already (its labels placed for that layout)."""
    if figure is None:
        return None
    if layout:
        figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _ratio_bars(points: pd.DataFrame) -> list:
    """yerr for the perplexity ratio: distances to its 95% interval (0 where a record has none)."""
    low = (points["perplexity_ratio"] - points["perplexity_ratio_lo"]).fillna(0).clip(lower=0)
    high = (points["perplexity_ratio_hi"] - points["perplexity_ratio"]).fillna(0).clip(lower=0)
    return [low, high]


def _finish_ratio_axes(axes, xlabel: str, title: str, legend_below: bool = False) -> None:
    """A plot of the perplexity ratio to BF16: the line at 1, labels, legend, grid."""
    axes.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("perplexity ratio to BF16 (held-out text)")
    axes.set_title(title, fontsize=10)
    _legend(axes, legend_below)
    axes.grid(True, alpha=0.3)


def _legend(axes, below: bool) -> None:
    # Below the axes where point labels are placed: a legend inside could cover them.
    if below:
        axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    else:
        axes.legend(fontsize=8)


def pareto_front(points: List[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point beats on both counts (lower x and lower y, one strictly), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _variants(summary: pd.DataFrame, model: str, *columns: str) -> pd.DataFrame:
    """A model's finished quantized points that have every one of `columns`."""
    points = summary[(summary["model"] == model) & (summary["recipe"] != BF16) & (summary["status"] == "finished")]
    for column in columns:
        points = points[points[column].notna()]
    return points.reset_index(drop=True)


def perplexity_vs_bits_figure(summary: pd.DataFrame, model: str):
    """The perplexity ratio to BF16 (95% interval as error bars) against bits per weight, the Pareto front (fewer
    bits and a lower ratio, by point estimate) drawn over it in a colour and marker of its own; None when no
    finished variant has both."""
    points = _variants(summary, model, "perplexity_ratio", "bits_per_weight")
    if points.empty:
        return None
    figure, axes = _figure()
    axes.errorbar(
        points["bits_per_weight"],
        points["perplexity_ratio"],
        yerr=_ratio_bars(points),
        fmt="o",
        color="tab:blue",
        ecolor="tab:blue",
        capsize=3,
        zorder=3,
        label="variant (95% interval)",
    )
    front = pareto_front(list(zip(points["bits_per_weight"], points["perplexity_ratio"])))
    axes.plot(
        points["bits_per_weight"].iloc[front],
        points["perplexity_ratio"].iloc[front],
        drawstyle="steps-post",
        color="tab:orange",
        linewidth=1.6,
        marker="D",
        markersize=9,
        markerfacecolor="none",
        markeredgewidth=1.6,
        zorder=4,
        label="Pareto front (fewer bits, lower ratio; point estimates)",
    )
    axes.margins(x=0.15, y=0.15)
    _finish_ratio_axes(
        axes,
        "bits per weight (checkpoint size vs BF16)",
        f"{model}: perplexity ratio vs bits per weight",
        legend_below=True,
    )
    _label(axes, points, "perplexity_ratio", front)
    return figure


def plot_perplexity_vs_bits(summary: pd.DataFrame, model: str):
    """PNG of perplexity_vs_bits_figure, or None."""
    return _png(perplexity_vs_bits_figure(summary, model), layout=False)


def _label(
    axes,
    points: pd.DataFrame,
    column: str,
    front: List[int],
    scale: float = 1.0,
    extra: Tuple[Tuple[float, float, str], ...] = (),
) -> None:
    """Name each point, or only the Pareto front's when there are more than MAX_LABELS (said in a corner note), with
    no two names on top of each other (place_labels). `extra`: more (x, y, text) to name the same way."""
    named = range(len(points)) if len(points) <= MAX_LABELS else front
    anchors = [
        (points["bits_per_weight"].iat[i], scale * points[column].iat[i], points["variant"].iat[i]) for i in named
    ]
    if len(points) > MAX_LABELS:
        axes.text(
            0.99,
            0.01,
            f"{len(points)} variants; named: the Pareto front",
            transform=axes.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="grey",
        )
    place_labels(axes, [*anchors, *extra])


def _overlap(a, b) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def place_labels(axes, anchors, fontsize: float = 7) -> list:
    """Annotate (x, y, text) points so that no label covers another label or a point: points at one place share a
    label (names stacked); each label takes the nearest free place around its point (LABEL_RINGS x
    LABEL_DIRECTIONS, a leader line beyond the first ring), inside the axes if it can. The figure is laid out first
    (tight_layout), so draw it without laying it out again (`_png(figure, layout=False)`). Returns the labels."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    figure = axes.figure
    figure.tight_layout()
    renderer = figure.canvas.get_renderer()
    clusters: List[list] = []
    for x, y, text in anchors:
        px, py = axes.transData.transform((x, y))
        for cluster in clusters:
            if abs(cluster[0] - px) <= SAME_PLACE_PX and abs(cluster[1] - py) <= SAME_PLACE_PX:
                cluster[4].append(str(text))
                break
        else:
            clusters.append([px, py, x, y, [str(text)]])
    markers = [Bbox.from_extents(px - 5, py - 5, px + 5, py + 5) for px, py, *_ in clusters]
    inside, whole = axes.bbox, figure.bbox
    placed, labels = [], []
    for number, (px, py, x, y, names) in enumerate(clusters):
        best = None
        for ring, radius in enumerate(LABEL_RINGS):
            for dx, dy in LABEL_DIRECTIONS:
                label = axes.annotate(
                    "\n".join(names),
                    (x, y),
                    xytext=(dx * radius, dy * radius),
                    textcoords="offset points",
                    ha={1: "left", -1: "right", 0: "center"}[dx],
                    va={1: "bottom", -1: "top", 0: "center"}[dy],
                    fontsize=fontsize,
                    zorder=5,
                    arrowprops=dict(arrowstyle="-", color="grey", linewidth=0.5, shrinkA=0, shrinkB=4)
                    if ring
                    else None,
                )
                label.update_positions(renderer)  # else the text's extent is taken before its offset applies
                box = Text.get_window_extent(label, renderer).padded(1.5)
                others = [m for i, m in enumerate(markers) if i != number]
                covered = sum(_overlap(box, other) for other in placed + others)
                fits = (
                    0
                    if inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
                    else (1 if whole.contains(box.x0, box.y0) and whole.contains(box.x1, box.y1) else 2)
                )
                score = (covered > 0, fits, covered, ring)
                if best is None or score < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (score, label, box)
                else:
                    label.remove()
                if score[:2] == (False, 0):
                    break
            if best[0][:2] == (False, 0):
                break
        placed.append(best[2])
        labels.append(best[1])
    return labels


def deltas_figure(scores: pd.DataFrame, model: str):
    """Each variant's difference from BF16 on each benchmark, in % of BF16 (benchmarks of different scales side by
    side), with its 95% interval (paired where per-item scores exist, else sqrt(2) x the variant's standard error):
    grey where the interval holds 0, black where no error is known. None without such rows."""
    mine = scores[scores["model"] == model].assign(_name=lambda df: measured_names(df) if len(df) else [])
    rows = mine[
        (mine["variant"] != BF16)
        & (mine["metric"] != FIDELITY_METRIC)
        & (mine["subject"] == "")
        & mine["delta"].notna()
        & mine["bf16"].notna()
        & (mine["bf16"] != 0)
    ]
    rows = rows.head(MAX_DELTA_ROWS).reset_index(drop=True)
    if rows.empty:
        return None
    figure, axes = _figure(height=max(2.5, 0.28 * len(rows) + 1.2))
    labels = [f"{v}  {b}/{m}" for v, b, m in zip(rows["variant"], rows["_name"], rows["metric"])]
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
    axes.set_xlabel(
        "difference from BF16, % of BF16\n(95% interval; grey: not significant; black: no error known)", fontsize=8
    )
    axes.set_title(f"{model}: benchmark differences from BF16", fontsize=10)
    axes.grid(True, axis="x", alpha=0.3)
    return figure


def plot_deltas(scores: pd.DataFrame, model: str):
    """PNG of deltas_figure, or None."""
    return _png(deltas_figure(scores, model))


def calib_size_lines(summary: pd.DataFrame, model: str) -> Dict[str, pd.DataFrame]:
    """{legend name: points by calibration size}: one line per recipe (with its algorithm, KV cache and whatever else
    its label names), calibration sequence length and fidelity setting that ran at two sizes or more. Points of
    one line differ in calibration size only, their ratios measured on the same held-out tokens."""
    points = _variants(summary, model, "calib_size", "perplexity_ratio")
    if points.empty:
        return {}
    points = points.assign(
        _base=points["variant"].str.replace(r"@[^ ]+", "", regex=True),
        _seq=[("" if pd.isna(s) else format(s, "g")) for s in points["calib_seq_len"]],
        _fid=points["fidelity_setting"].fillna(""),
    )
    groups = [
        (key, group)
        for key, group in points.groupby(["_base", "_seq", "_fid"], sort=True)
        if group["calib_size"].nunique() >= 2
    ]
    # Named by what tells the lines apart: the sequence length where it differs, the fidelity setting where it differs
    # beyond that (it follows calib.seq_len by default).
    seqs = {key[1] for key, _ in groups}
    fids: dict = {}
    for (base, seq, fid), _ in groups:
        fids.setdefault((base, seq), set()).add(fid)
    lines = {}
    for (base, seq, fid), group in groups:
        parts = ([f"calib seq {seq or '?'}"] if len(seqs) > 1 else []) + (
            [f"fidelity {fid or '?'}"] if len(fids[(base, seq)]) > 1 else []
        )
        lines[base + (f" ({', '.join(parts)})" if parts else "")] = group.sort_values("calib_size")
    return lines


def vs_calib_size_figure(summary: pd.DataFrame, model: str):
    """The perplexity ratio (95% interval) against calibration size, a line per calib_size_lines; None if none."""
    lines = calib_size_lines(summary, model)
    if not lines:
        return None
    figure, axes = _figure()
    for name, group in lines.items():
        axes.errorbar(
            group["calib_size"], group["perplexity_ratio"], yerr=_ratio_bars(group), marker="o", capsize=3, label=name
        )
    axes.set_xscale("log", base=2)
    _finish_ratio_axes(axes, "calibration samples", f"{model}: perplexity ratio vs calibration size")
    return figure


def plot_vs_calib_size(summary: pd.DataFrame, model: str):
    """PNG of vs_calib_size_figure, or None."""
    return _png(vs_calib_size_figure(summary, model))


def training_figure(training: pd.DataFrame, model: str):
    """Mean KL and perplexity ratio against training steps (0: the PTQ point), a line per PTQ variant, method and
    learning rate, with 95% error bars; None when nothing of `model` was trained."""
    rows = training[(training["model"] == model) & (training["ptq_variant"] != "")]
    rows = rows[rows["mean_kl"].notna() | rows["perplexity_ratio"].notna()]
    if rows.empty:
        return None
    figure = _canvas(width=11)
    kl_axes, ppl_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for (ptq, method, lr), group in rows.groupby(["ptq_variant", "method", "lr"], sort=True, dropna=False):
        group = group.sort_values("steps")
        first = group.iloc[0]
        steps = [0, *group["steps"].tolist()]
        label = f"{ptq} {method} lr {lr:g}"
        kl = [first["ptq_mean_kl"], *group["mean_kl"].tolist()]
        kl_error = [np.nan, *(Z_95 * group["mean_kl_stderr"]).tolist()]
        kl_axes.errorbar(steps, kl, yerr=np.nan_to_num(kl_error), fmt="o-", capsize=3, label=label)
        ppl = [first["ptq_perplexity_ratio"], *group["perplexity_ratio"].tolist()]
        ppl_axes.plot(steps, ppl, "o-", label=label)
    kl_axes.axhline(0, color="grey", linewidth=0.8, linestyle="--")
    ppl_axes.axhline(1, color="grey", linewidth=0.8, linestyle="--")
    for axes, what in ((kl_axes, "mean KL vs BF16 (95% error bars)"), (ppl_axes, "perplexity ratio to BF16")):
        axes.set_xlabel("training steps after PTQ (0: PTQ)")
        axes.set_ylabel(what)
        axes.grid(True, alpha=0.3)
    kl_axes.set_title(f"{model}: held-out fidelity during training after PTQ", fontsize=10)
    ppl_axes.legend(fontsize=7)
    return figure


def plot_training(training: Optional[pd.DataFrame], model: str):
    """PNG of training_figure, or None."""
    return None if training is None else _png(training_figure(training, model))


def model_plots(
    summary: pd.DataFrame, scores: pd.DataFrame, model: str, training: Optional[pd.DataFrame] = None
) -> Dict[str, bytes]:
    """Every plot of one model that has something to show: {file name: PNG}."""
    made = {
        plot_file_name(model): plot_recovery_vs_bits(summary, model),
        plot_file_name(model, "perplexity_vs_bits"): plot_perplexity_vs_bits(summary, model),
        plot_file_name(model, "deltas"): plot_deltas(scores, model),
        plot_file_name(model, "vs_calib_size"): plot_vs_calib_size(summary, model),
        plot_file_name(model, "training"): plot_training(training, model),
    }
    return {name: png for name, png in made.items() if png is not None}


WORST_LABEL = "worst significant loss (95% interval; benchmark named)"


def recovery_vs_bits_figure(summary: pd.DataFrame, model: str):
    """Median benchmark recovery (%, with the median of the rows' 95% bounds as error bars) against bits per weight
    of the finished variants, BF16 at 16 bits / 100%, and each variant's worst significant loss as a marker of its
    own joined to its median, so a median near 100% does not hide one benchmark that fell; None when no variant has
    a benchmark recovery (evaluation off)."""
    points = _variants(summary, model, "median_recovery", "bits_per_weight")
    if points.empty:
        return None
    figure, axes = _figure()
    low = (points["median_recovery"] - points["median_recovery_lo"]).fillna(0).clip(lower=0)
    high = (points["median_recovery_hi"] - points["median_recovery"]).fillna(0).clip(lower=0)
    axes.errorbar(
        points["bits_per_weight"],
        100 * points["median_recovery"],
        yerr=[100 * low, 100 * high],
        fmt="o",
        color="tab:blue",
        ecolor="tab:blue",
        capsize=3,
        zorder=3,
        label="median recovery (95% bounds)",
    )
    worst = points[points["worst_recovery"].notna()]
    extra = []
    if not worst.empty:
        for bits, median, recovery in zip(worst["bits_per_weight"], worst["median_recovery"], worst["worst_recovery"]):
            axes.plot([bits, bits], [100 * median, 100 * recovery], color="tab:red", linewidth=0.8, linestyle=":")
        below = (worst["worst_recovery"] - worst["worst_recovery_lo"]).fillna(0).clip(lower=0)
        above = (worst["worst_recovery_hi"] - worst["worst_recovery"]).fillna(0).clip(lower=0)
        axes.errorbar(
            worst["bits_per_weight"],
            100 * worst["worst_recovery"],
            yerr=[100 * below, 100 * above],
            fmt="v",
            color="tab:red",
            ecolor="tab:red",
            markersize=8,
            capsize=3,
            zorder=4,
            label=WORST_LABEL,
        )
        extra = [
            (b, 100 * r, f"{n}/{m} {100 * rel:+.1f}%")
            for b, r, n, m, rel in zip(
                *(
                    worst[c].tolist()
                    for c in ("bits_per_weight", "worst_recovery", "worst_benchmark", "worst_metric", "worst_relative")
                )
            )
        ]
    axes.scatter([16], [100], marker="*", s=160, color="tab:red", zorder=3, label="bf16")
    axes.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    axes.margins(x=0.12, y=0.12)  # room for the point labels
    axes.set_xlabel("bits per weight (checkpoint size vs BF16)")
    axes.set_ylabel("recovery vs BF16 (%)")
    axes.set_title(f"{model}: median recovery vs bits per weight (finished runs)", fontsize=10)
    axes.grid(True, alpha=0.3)
    _legend(axes, below=True)
    # Fewer bits and a higher recovery: the front of (bits, -recovery).
    _label(
        axes,
        points,
        "median_recovery",
        pareto_front(list(zip(points["bits_per_weight"], -points["median_recovery"]))),
        scale=100,
        extra=((16, 100, BF16), *extra),
    )
    return figure


def plot_recovery_vs_bits(summary: pd.DataFrame, model: str):
    """PNG of recovery_vs_bits_figure, or None."""
    return _png(recovery_vs_bits_figure(summary, model), layout=False)


def plot_file_name(model: str, kind: str = "recovery_vs_bits") -> str:
    return f"{kind}_" + re.sub(r"[^A-Za-z0-9._-]", "_", model) + ".png"
