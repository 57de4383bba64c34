"""Reading run records and sweep manifests: files in, plain rows out (no tables)."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

from ptq.evaluation.scores import subject_name
from ptq.layout import MANIFEST_NAME
from ptq.lock import live_holder
from ptq.report.common import (
    BF16,
    DEFAULT_BACKEND,
    FIDELITY_METRIC,
    KV_CACHE_ORDER,
    LOWER_IS_BETTER_METRICS,
    MEAN_KL,
    PERPLEXITY,
    PROGRESS_THRESHOLD,
    RUN_RECORD_NAME,
    TIME_FORMAT,
    TOP1_AGREEMENT,
)
from ptq.run_record import RecordProblem, RunRecord
from ptq.stats import item_scores_by_id


def as_number(x) -> float:
    """A finite-or-NaN float from anything JSON may hold; bools and strings are not numbers."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    return float(x)


def section(obj: dict, key: str) -> dict:
    """obj[key] where it is a JSON object, else {}."""
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def recover_key(recover: dict) -> str:
    """A short hash of the training settings ("" for none): points trained differently are different points."""
    if not recover:
        return ""
    return hashlib.sha256(json.dumps(recover, sort_keys=True, default=str).encode()).hexdigest()[:12]


def variant_label(record: RunRecord, with_seq_len: bool = False, with_recover: bool = True) -> str:
    """`<recipe>[/<algorithm>][+kv_<fmt>][+<qat|qad><steps>][+images][@<calib_size>[x<calib_seq_len>]][ (<backend>[ <parallelism>])]`; the BF16
    baseline is just `bf16`. The algorithm is named when it is not the recipe's own (recipe.algorithm,
    recipe.algorithm_args); the calibration sequence length with `with_seq_len` (the report asks for it where a
    model's variants differ in it: `fp8@32x256`, `fp8@32x128`).

    The in-process backend is the default and is not named; a checkpoint the Megatron-Bridge backend made
    is its own variant, so both backends' checkpoints of one recipe stand side by side, and so is each
    parallel layout other than `single` (tp2 and pp2 runs of one recipe are different checkpoints)."""
    if record.is_bf16:
        return BF16
    label = record.recipe
    if record.algorithm:
        label += f"/{record.algorithm}"
    if record.kv_cache != "none":
        label += f"+kv_{record.kv_cache}"
    # Training after PTQ (recover=qat|qad) makes another checkpoint of the recipe: `+qad20` (left out with
    # `with_recover=False`: the label of the PTQ point it started from).
    recover = record.recover
    if recover and with_recover:
        label += f"+{recover['method']}{recover.get('steps', '')}"
    if record.calib_kind == "image_text":  # a vision-language model calibrated on image-text pairs
        label += "+images"
    if record.calib_size is not None:
        label += f"@{record.calib_size}"
    if with_seq_len and record.calib_seq_len is not None:
        label += f"{'' if record.calib_size is not None else '@'}x{record.calib_seq_len}"
    if record.backend not in (None, DEFAULT_BACKEND):
        layout = record.parallelism
        label += f" ({record.backend} {layout})" if layout not in ("", "single") else f" ({record.backend})"
    return label


def calib_source(record: RunRecord) -> str:
    """What the calibration text was and its sampling, beyond size and sequence length: `<dataset> seed <n>`
    ("" where the record's config has neither). Two checkpoints of one recipe calibrated on different text are
    different variants."""
    calib = section(record.config, "calib")
    dataset, seed = calib.get("dataset"), calib.get("seed")
    parts = [Path(str(dataset)).name] if dataset not in (None, "") else []
    if seed is not None:
        parts.append(f"seed {seed}")
    return " ".join(parts)


def variant_sort_key(recipe: str, kv_cache: str, calib_size, seq_len=math.nan) -> tuple:
    """BF16 first, then by recipe, KV-cache format, numeric calibration size (128 before 1024) and calibration
    sequence length."""
    calib, seq = as_number(calib_size), as_number(seq_len)
    return (
        recipe != BF16,
        recipe,
        KV_CACHE_ORDER.get(kv_cache, len(KV_CACHE_ORDER)),
        kv_cache,
        math.isnan(calib),
        0.0 if math.isnan(calib) else calib,
        math.isnan(seq),
        0.0 if math.isnan(seq) else seq,
    )


def _higher_is_better(entry: dict) -> bool:
    flag = entry.get("higher_is_better")
    if isinstance(flag, bool):
        return flag
    return str(entry.get("metric", "")).lower() not in LOWER_IS_BETTER_METRICS


def _subject_and_benchmark(entry: dict, benchmark: str) -> Tuple[str, str]:
    """(subject, benchmark) of an entry; a per-subject row is named `<benchmark>:<subject>`, the subject as
    ptq/evaluation/ names it now (records written before named it after the file: `mmlu:anatomy_test`)."""
    subject = entry.get("subject") if isinstance(entry.get("subject"), str) else ""
    if not subject:
        return "", benchmark
    name = subject_name(subject)
    if benchmark.endswith(f":{subject}"):
        benchmark = benchmark[: -len(subject)] + name
    return name, benchmark


def _items_setting(items) -> str:
    """How many items a benchmark result covers, as a row's setting: `300 items`, `all items` (the record says it
    evaluated every item) or "" (unknown: the record does not say)."""
    scored = item_scores_by_id(items)
    if scored:
        return f"{len(scored)} items"
    if isinstance(items, int) and not isinstance(items, bool):
        return f"{items} items"
    return ""


def _benchmark_entries(entries) -> List[dict]:
    """Usable entries of an `evaluation.results`/`baseline` list, first of each (benchmark, metric)."""
    if not isinstance(entries, list):
        return []
    rows, seen = [], set()
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        benchmark, metric, value = entry.get("benchmark"), entry.get("metric"), as_number(entry.get("value"))
        if not isinstance(benchmark, str) or not isinstance(metric, str) or math.isnan(value):
            continue
        # A subject's share of a benchmark of several (MMLU's per-subject rows): CSV only.
        subject, benchmark = _subject_and_benchmark(entry, benchmark)
        if (benchmark, metric) in seen:
            continue
        seen.add((benchmark, metric))
        items = entry.get("items")
        rows.append(
            {
                "benchmark": benchmark,
                "metric": metric,
                "value": value,
                "stderr": as_number(entry.get("stderr")),
                "higher_is_better": _higher_is_better(entry),
                "fingerprint": entry.get("fingerprint") or "",
                "items": item_scores_by_id(items),
                # A fingerprinted result without a count evaluated every item (ptq/evaluation/ fingerprint).
                "setting": (
                    "all items"
                    if entry.get("fingerprint") and "items" in entry and items is None
                    else _items_setting(items)
                ),
                "subject": subject,
            }
        )
    return rows


def difference_error(metric: str, paired_se: float, own_se: float) -> float:
    """The standard error of a difference from BF16, as the report judges it: from the per-item pairs where both
    sides kept their items; a fidelity figure's own error (measured against BF16 on the same tokens, so already
    the difference's); else sqrt(2) x the variant's own error (BF16's taken as the same size). NaN if unknown."""
    if not math.isnan(paired_se) and paired_se > 0:
        return paired_se
    if math.isnan(own_se) or own_se <= 0:
        return math.nan
    return own_se if metric == FIDELITY_METRIC else math.sqrt(2.0) * own_se


def fidelity_fingerprint(record: RunRecord) -> str:
    """What a record's fidelity figures were measured on (the held-out text and its sampling), "" if unknown."""
    settings = section(record.config, "fidelity")
    keys = ("text", "samples", "seq_len", "seed")
    if not all(k in settings for k in keys):
        return ""
    return hashlib.sha256(json.dumps([settings[k] for k in keys], default=str).encode()).hexdigest()[:16]


def fidelity_setting(record: RunRecord) -> str:
    """What the fidelity figures were measured on, for a reader: `256 tok x 32` (sequence length x sequences), the
    held-out text's file name first unless the text is self-sampled (`test.txt, 256 tok x 32`); "" if unknown."""
    settings = section(record.config, "fidelity")
    seq_len, samples, text = settings.get("seq_len"), settings.get("samples"), settings.get("text")
    if seq_len is None or samples is None:
        return ""
    size = f"{seq_len} tok x {samples}"
    if record.fidelity_kind == "image_text":  # whole image-text pairs: no sequence length applies
        size = f"{samples} image-text pairs"
    return size if text in (None, "", "self") else f"{Path(str(text)).name}, {size}"


def _fidelity_row(
    benchmark: str, value: float, higher_is_better: bool, fingerprint: str, setting: str, stderr: float = math.nan
) -> dict:
    return {
        "benchmark": benchmark,
        "metric": FIDELITY_METRIC,
        "value": value,
        "stderr": stderr,
        "higher_is_better": higher_is_better,
        "fingerprint": fingerprint,
        "items": None,
        "setting": setting,
        "subject": "",
    }


def _bf16_fidelity_rows(record: RunRecord) -> List[dict]:
    """The BF16 model's fidelity figures: its own perplexity, and by definition KL 0 and agreement 1, each carrying
    what they were measured on (a quantized record's BF16 perplexity is on its own held-out tokens)."""
    ppl = as_number(record.section("fidelity").get("bf16_perplexity"))
    if math.isnan(ppl):
        return []
    fingerprint, setting = fidelity_fingerprint(record), fidelity_setting(record)
    return [
        _fidelity_row(PERPLEXITY, ppl, False, fingerprint, setting),
        _fidelity_row(MEAN_KL, 0.0, False, fingerprint, setting),
        _fidelity_row(TOP1_AGREEMENT, 1.0, True, fingerprint, setting),
    ]


def record_scores(record: RunRecord) -> List[dict]:
    """Scores of the model a record describes: its evaluation results plus its fidelity figures."""
    rows = _benchmark_entries(record.section("evaluation").get("results"))
    fidelity, fingerprint, setting = record.section("fidelity"), fidelity_fingerprint(record), fidelity_setting(record)
    if record.is_bf16:
        return rows + _bf16_fidelity_rows(record)
    # Standard errors across the held-out sequences (ptq/fidelity.py); the perplexity's is that of its ratio to
    # BF16 on the same tokens (a paired difference), in perplexity units. Older records have none (NaN).
    ppl_se = as_number(fidelity.get("quantized_perplexity")) * as_number(fidelity.get("log_perplexity_ratio_stderr"))
    figures = (
        (PERPLEXITY, "quantized_perplexity", False, ppl_se),
        (MEAN_KL, "mean_kl", False, as_number(fidelity.get("mean_kl_stderr"))),
        (TOP1_AGREEMENT, "top1_agreement", True, as_number(fidelity.get("top1_agreement_stderr"))),
    )
    for benchmark, key, higher, stderr in figures:
        value = as_number(fidelity.get(key))
        if not math.isnan(value):
            rows.append(_fidelity_row(benchmark, value, higher, fingerprint, setting, stderr))
    return rows


def baseline_scores(record: RunRecord) -> List[dict]:
    """BF16 scores a quantized record carries for comparison (evaluation baseline, BF16 fidelity)."""
    return _benchmark_entries(record.section("evaluation").get("baseline")) + _bf16_fidelity_rows(record)


NOTE_CHARS = 300


def fidelity_summary(fid) -> dict:
    """The perplexity ratio (with its 95% interval) and mean KL (with its standard error) of a record's fidelity
    section; NaN where it has none (older records have no interval)."""
    fid = fid if isinstance(fid, dict) else {}
    interval = fid.get("perplexity_ratio_ci95")
    low, high = (
        (as_number(interval[0]), as_number(interval[1]))
        if isinstance(interval, list) and len(interval) == 2
        else (math.nan, math.nan)
    )
    return {
        "perplexity_ratio": as_number(fid.get("perplexity_ratio")),
        "perplexity_ratio_lo": low,
        "perplexity_ratio_hi": high,
        "mean_kl": as_number(fid.get("mean_kl")),
        "mean_kl_stderr": as_number(fid.get("mean_kl_stderr")),
    }


def served_by(record: RunRecord) -> str:
    """The serving engines the record says load its checkpoint ("" for BF16 or an older record)."""
    if record.is_bf16:
        return ""
    engines = record.section("serving").get("engines")
    if not isinstance(engines, list):
        return ""
    return ", ".join(str(e) for e in engines) or "none of vLLM, SGLang, TensorRT-LLM"


def status_note(status: str, error) -> str:
    """Why a point is not a finished result ("" when it is)."""
    if status == "finished":
        return ""
    if status == "failed":
        lines = str(error).strip().splitlines() if error else []
        if not lines:
            return "failed: no error recorded"
        first = lines[0].strip()
        # A table cell, not the whole error (a validation can name hundreds of layers): the record keeps it all.
        return f"failed: {first[:NOTE_CHARS]}" + (
            f"... ({len(first)} characters; the run record has all)" if len(first) > NOTE_CHARS else ""
        )
    if status == "running":
        return "running (unfinished)"
    if status == "dead":
        return "dead: the record says running but its process is gone; run the point again"
    if status == "pending":
        return "pending (submitted, not started)"
    return f"{status} (unrecognised status)"


def as_timestamp(text) -> float:
    """Seconds since the epoch for ordering; -inf for a missing or unreadable time (counts as oldest)."""
    if not isinstance(text, str):
        return -math.inf
    for parse in (lambda s: datetime.strptime(s, TIME_FORMAT), datetime.fromisoformat):
        try:
            return parse(text).timestamp()
        except ValueError:
            continue
    return -math.inf


def find_run_records(paths: Iterable[Path]) -> List[Path]:
    """Every run.json below the given folders, plus the given files themselves; each once, in order."""
    found, seen = [], set()
    for path in map(Path, paths):
        if path.is_dir():
            candidates = sorted(p for p in path.rglob(RUN_RECORD_NAME) if p.is_file())
        elif path.is_file():
            candidates = [path]
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
    return found


def pending_points(paths: Iterable[Path]) -> List[RunRecord]:
    """Points of Slurm sweeps (their sweep.json) submitted but without a run record yet, as records."""
    points = []
    for path in map(Path, paths):
        for manifest in sorted(path.rglob(MANIFEST_NAME)) if path.is_dir() else []:
            try:
                entries = json.loads(manifest.read_text(encoding="utf-8"))["points"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            for point in entries:
                out = point.get("output_dir")
                if point.get("state") != "submitted" or not out or (Path(out).expanduser() / RUN_RECORD_NAME).exists():
                    continue
                fields = ("model", "recipe", "kv_cache", "calib_size", "calib_seq_len")
                try:
                    record = RunRecord.parse({**{k: point.get(k) for k in fields}, "output_dir": out})
                except RecordProblem:
                    continue
                sweep = {"slurm_job": point.get("job_id"), "manifest": str(manifest)}
                points.append(record.replace(status="pending", sections=sweep))
    return points


def load_records(files: Sequence[Path]) -> Tuple[List[RunRecord], List[str], List[Tuple[str, str]]]:
    """(records, their paths, skipped (path, reason)): unreadable or non-record files never stop the load."""
    from tqdm import tqdm

    records, sources, skipped = [], [], []
    for path in tqdm(
        files, desc="reading run records", unit="file", file=sys.stderr, disable=len(files) < PROGRESS_THRESHOLD
    ):
        try:
            record = RunRecord.parse(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # RecordProblem is a ValueError
            reason = str(exc) if isinstance(exc, RecordProblem) else f"unreadable JSON: {exc}"
            skipped.append((str(path), reason))
            continue
        if record.status == "running" and live_holder(Path(path).parent) is None:
            # Its process is gone (killed, node lost): not running, whatever the record says.
            record = record.replace(status="dead")
        records.append(record)
        sources.append(str(path))
    return records, sources, skipped
