"""Scores from lm-eval's logged samples: per-item scores for paired comparisons, standard errors of ratio metrics,
and rows per subject of a folder benchmark with their macro average."""

from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Tuple


def item_scores(samples: List[dict], metric: str, filt: str, value: float) -> Optional[dict]:
    """{"doc_ids", "scores"}: one metric's per-item scores from lm-eval's logged samples, when the aggregate is
    their mean (accuracy, exact match: checked against `value`); None otherwise (perplexities aggregate
    differently, and a per-item difference would not add up to the table's)."""
    pairs = [
        (s["doc_id"], float(s[metric]))
        for s in samples
        if s.get("filter") == filt and isinstance(s.get(metric), (int, float, bool))
    ]
    if not pairs or abs(sum(v for _, v in pairs) / len(pairs) - value) > 1e-6:
        return None
    pairs.sort()
    return {"doc_ids": [d for d, _ in pairs], "scores": [round(v, 6) for _, v in pairs]}


# Metrics lm-eval aggregates as a ratio of sums over documents, (log-likelihood, count) per document, for which it
# gives no standard error: value from the mean log-likelihood per unit.
RATIO_METRICS = {
    "word_perplexity": lambda x: math.exp(-x),
    "byte_perplexity": lambda x: math.exp(-x),
    "bits_per_byte": lambda x: -x / math.log(2),
}


def ratio_stderr(samples: List[dict], metric: str, filt: str) -> Optional[float]:
    """Jackknife standard error over documents of a ratio metric (word/byte perplexity, bits per byte) from lm-eval's
    logged (log-likelihood, count) pairs; None with fewer than two documents or another metric."""
    to_value = RATIO_METRICS.get(metric)
    pairs = [
        s[metric]
        for s in samples
        if s.get("filter") == filt and isinstance(s.get(metric), (list, tuple)) and len(s[metric]) == 2
    ]
    if to_value is None or len(pairs) < 2:
        return None
    total_ll, total_n = sum(float(p[0]) for p in pairs), sum(float(p[1]) for p in pairs)
    leave_one_out = [
        to_value((total_ll - float(ll)) / (total_n - float(n))) for ll, n in pairs if total_n - float(n) > 0
    ]
    k = len(leave_one_out)
    if k < 2:
        return None
    mean = sum(leave_one_out) / k
    return math.sqrt((k - 1) / k * sum((v - mean) ** 2 for v in leave_one_out))


MACRO = "_macro"
# A data split's suffix on a subject file's stem (MMLU's `anatomy_test.csv`): not part of the subject's name.
SPLIT_SUFFIX = re.compile(r"_(test|dev|val|validation|train)$")


def subject_name(stem: str) -> str:
    """The subject a file of a folder benchmark holds: its stem without the split (`anatomy_test` -> `anatomy`)."""
    return SPLIT_SUFFIX.sub("", stem) or stem


def subject_rows(row: dict, subjects: List[str]) -> List[dict]:
    """One row per subject (benchmark `<name>:<subject>`, field `subject`, named by subject_name), with that
    subject's items, from a row's per-item scores ({"doc_ids", "scores"}) and each item's subject."""
    groups: Dict[str, Tuple[List[int], List[float]]] = {}
    for doc_id, score in zip(row["items"]["doc_ids"], row["items"]["scores"]):
        ids, scores = groups.setdefault(subject_name(subjects[doc_id]), ([], []))
        ids.append(doc_id)
        scores.append(score)
    out = []
    for subject, (ids, scores) in sorted(groups.items()):
        n, mean = len(scores), sum(scores) / len(scores)
        var = sum((x - mean) ** 2 for x in scores) / (n - 1) if n > 1 else None
        out.append(
            {
                **row,
                "benchmark": f"{row['benchmark']}:{subject}",
                "subject": subject,
                "value": mean,
                "stderr": (var / n) ** 0.5 if var is not None else None,
                "items": {"doc_ids": ids, "scores": scores},
            }
        )
    return out


def macro_row(row: dict, per_subject: List[dict]) -> dict:
    """The unweighted mean over subjects (MMLU's usual figure) as a row of its own, metric `<metric>_macro`; its
    standard error from the subjects' own (None when a subject has a single item)."""
    values = [s["value"] for s in per_subject]
    errors = [s["stderr"] for s in per_subject]
    stderr = (sum(e * e for e in errors) ** 0.5 / len(errors)) if all(e is not None for e in errors) else None
    keep = {k: v for k, v in row.items() if k not in ("items", "value", "stderr", "metric")}
    return {
        **keep,
        "metric": row["metric"] + MACRO,
        "value": sum(values) / len(values),
        "stderr": stderr,
        "subject_count": len(values),
    }
