"""Small statistics shared by the run's tracking and the report (no dependencies)."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple


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
