"""Small statistics shared by the run's tracking and the report (no dependencies)."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple


def item_scores_by_id(items) -> Optional[Dict[int, float]]:
    """A result's per-item scores as a record keeps them ({"doc_ids": [...], "scores": [...]}) read as {item: score},
    or None when there are none (or they do not read)."""
    if not isinstance(items, dict):
        return None
    ids, scores = items.get("doc_ids"), items.get("scores")
    if not isinstance(ids, list) or not isinstance(scores, list) or len(ids) != len(scores) or not ids:
        return None
    try:
        return {int(i): float(v) for i, v in zip(ids, scores)}
    except (TypeError, ValueError):
        return None


def paired_delta_stderr(items: Optional[Dict[int, float]], bf16_items: Optional[Dict[int, float]]) -> Tuple[float, int]:
    """(standard error of the mean per-item difference, items paired) over the items both scored ({item: score});
    (NaN, 0) when either side has no per-item scores, (NaN, n) when fewer than two items are shared."""
    if not items or not bf16_items:
        return math.nan, 0
    shared = sorted(items.keys() & bf16_items.keys())
    if len(shared) < 2:
        return math.nan, len(shared)
    diffs = [items[i] - bf16_items[i] for i in shared]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return math.sqrt(var / len(diffs)), len(shared)
