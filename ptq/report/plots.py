"""Plots (matplotlib, PNG bytes)."""

from __future__ import annotations

import io
import re

import pandas as pd

from ptq.report.common import BF16


def plot_recovery_vs_bits(summary: pd.DataFrame, model: str) -> bytes:
    """PNG: median recovery (%) against bits per weight of the finished variants, BF16 at 16 bits / 100%."""
    # The Agg canvas directly, so importing this module never changes the caller's pyplot backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = summary[(summary["model"] == model) & (summary["variant"] != BF16) & (summary["status"] == "finished")]
    points = points[points["median_recovery"].notna() & points["bits_per_weight"].notna()]
    figure = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter(points["bits_per_weight"], 100 * points["median_recovery"], color="tab:blue", zorder=3)
    for row in points.itertuples():
        axes.annotate(row.variant, (row.bits_per_weight, 100 * row.median_recovery), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)
    axes.scatter([16], [100], marker="*", s=160, color="tab:red", zorder=3, label="bf16")
    axes.annotate(BF16, (16, 100), textcoords="offset points", xytext=(4, -12), fontsize=8)
    axes.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    axes.margins(x=0.12, y=0.12)  # room for the point labels
    axes.set_xlabel("bits per weight (checkpoint size vs BF16)")
    axes.set_ylabel("median recovery vs BF16 (%)")
    axes.set_title(f"{model}: median recovery vs bits per weight (finished runs)", fontsize=10)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_file_name(model: str) -> str:
    return "recovery_vs_bits_" + re.sub(r"[^A-Za-z0-9._-]", "_", model) + ".png"
