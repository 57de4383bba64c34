"""The `eval` group: benchmarks through lm-eval, run in-process on the BF16 and fake-quantized model.

Local data files (no Hub access) are scored by lm-eval tasks defined as YAML in evaluate/tasks/, one per
kind: multiple choice (ARC JSONL, MMLU CSV, HellaSwag text, or a generic JSONL), generation scored by exact
match (GSM8K-style JSONL), and perplexity on a text file. Every local file is first normalised into a
small JSONL under the run's work folder, with a task file that includes its kind's template, so one
template per kind serves every format. Any task name lm-eval knows works too (kind lm_eval).
"""

from __future__ import annotations

import csv
import fcntl
import functools
import hashlib
import io
import json
import logging
import math
import os
import random
import re
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from ptq.errors import ConfigError
from ptq.files import write_json_atomic, write_text_atomic
from ptq.plan import SAFE_NAME
from ptq.schema import BenchmarkConfig, BenchmarkKind, ChoiceFormat, EvalConfig
from ptq.textfiles import checked_once, lines, read_jsonl, read_text

log = logging.getLogger(__name__)

KINDS = tuple(BenchmarkKind)
MC_FORMATS = tuple(ChoiceFormat)
# lm-eval task templates, one per local kind (ptq_<kind>.yaml).
TASKS_DIR = Path(__file__).resolve().parents[1] / "evaluate" / "tasks"
# Under a run's eval work folder: the task files lm-eval reads.
TASK_FILES_NAME = "tasks"
LETTERS = "ABCDEFGHIJ"
CPU_BATCH_SIZE = 8


def _gold_index(answer, labels: List[str], where: str) -> int:
    """The index of the right choice: a label ("B"; ARC also uses "1".."4"), else an index; checked in range."""
    # Labels first: some ARC items are labelled "1".."4", where "2" means the second choice, not index 2.
    if isinstance(answer, str) and answer.strip() in labels:
        return labels.index(answer.strip())
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        index = int(answer)
        if not 0 <= index < len(labels):
            raise ConfigError(
                f"{where}: answer {answer!r} is outside the {len(labels)} choices (indices 0-{len(labels) - 1})."
            )
        return index
    raise ConfigError(f"{where}: answer {answer!r} is neither an index nor one of the labels {labels}.")


def _field(row: dict, key: str, where: str, kind=None):
    if key not in row or (kind is not None and not isinstance(row[key], kind)):
        raise ConfigError(
            f"{where}: no {key!r} field"
            + (f" of type {kind.__name__}" if kind else "")
            + f" (fields: {', '.join(row) or 'none'})."
        )
    return row[key]


def _choices(values, where: str) -> List[str]:
    if not isinstance(values, list) or len(values) < 2 or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}: the choices must be a list of at least two strings, not {values!r:.80}.")
    return values


QUESTION_PROMPT = "Question: {question}\nAnswer:"


class _Fields(dict):
    def __missing__(self, key):
        raise KeyError(key)


def _prompt(template: Optional[str], default: str, row: dict, where: str) -> str:
    """An item's prompt: `template` (a format string over the item's fields) or the format's own `default`."""
    try:
        return (template or default).format_map(_Fields(row))
    except KeyError as exc:
        raise ConfigError(
            f"{where}: the template names the field {exc.args[0]!r}, which this item does not have "
            f"(fields: {', '.join(map(str, row)) or 'none'}); set the benchmark's template to use "
            "those."
        ) from None
    except (ValueError, IndexError, AttributeError) as exc:
        raise ConfigError(
            f"{where}: the template {template!r} is not a usable format string ({exc}); write fields "
            "as {name} and literal braces as {{ }}."
        ) from None


def _question_prompt(template: Optional[str], row: dict, where: str) -> str:
    """The prompt of an item of a layout with a `question` field: the template, else "Question: ...\nAnswer:"
    (which needs the question to be text)."""
    if template is None:
        _field(row, "question", where, str)
    return _prompt(template, QUESTION_PROMPT, row, where)


def _csv_records(file: Path) -> Tuple[List[str], List[Tuple[int, List[str]]]]:
    """(header, [(line the record starts on, fields)]) of a CSV file; blank lines are skipped."""
    reader = csv.reader(io.StringIO(read_text(file), newline=""))
    records = []
    try:
        header = next(reader, [])
        start = reader.line_num + 1
        for fields in reader:
            if fields:
                records.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ConfigError(f"{file}: not a readable CSV ({exc}).") from None
    return header, records


def _read_mmlu_csv(file: Path, template: Optional[str] = None) -> List[dict]:
    header, records = _csv_records(file)
    columns = header if records else []
    choices = [c for c in columns if c.startswith("choice")]
    if "question" not in columns or "answer" not in columns or len(choices) < 2:
        raise ConfigError(
            f"{file}: an MMLU CSV needs a header question,choice0,choice1,...,answer; it has "
            f"{','.join(columns) or 'no header'}."
        )
    items = []
    for number, fields in records:
        where = f"{file}:{number}"
        if len(fields) != len(columns):  # csv.DictReader would drop extra fields, or fill missing ones with None
            fix = (
                'a field that holds a comma must be quoted ("a, b"): quote it, or remove the extra field'
                if len(fields) > len(columns)
                else "give every column a field (an empty one is written ,,)"
            )
            raise ConfigError(
                f"{where} has {len(fields)} fields, the header {len(columns)} ({','.join(columns)}); {fix}."
            )
        row = dict(zip(columns, fields))
        options = [row[k] for k in sorted(choices)]
        items.append(
            {
                "query": _question_prompt(template, row, where),
                "choices": options,
                "gold": _gold_index(row["answer"], list(LETTERS[: len(options)]), where),
                "subject": file.stem,
            }
        )
    return items


def _read_winogrande(path: Path) -> List[dict]:
    """Partial-scoring items {"contexts", "continuation", "gold"}: the sentence up to its blank completed by each
    option is a context; the rest of the sentence after the blank is the continuation scored under each."""
    items = []
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        sentence = _field(row, "sentence", where, str)
        if sentence.count("_") != 1:
            raise ConfigError(
                f"{where}: the sentence must hold exactly one blank '_' (it holds {sentence.count('_')})."
            )
        options = [str(_field(row, "option1", where)), str(_field(row, "option2", where))]
        prefix, rest = sentence.split("_")
        if not rest.strip():
            raise ConfigError(f"{where}: nothing follows the blank, so there is no shared continuation to score.")
        items.append(
            {
                "contexts": [prefix + option for option in options],
                "continuation": rest.strip(),
                "gold": _gold_index(str(_field(row, "answer", where)), ["1", "2"], where),
            }
        )
    return items


def read_multiple_choice(path: Path, fmt: str, template: Optional[str] = None) -> List[dict]:
    """Items {"query", "choices", "gold"} from one of the supported file layouts ({"contexts", "continuation",
    "gold"} for partial scoring); the prompt from `template` where given; any malformed item is an error naming
    its file and line."""
    items = []
    if fmt == "winogrande_jsonl":
        if template is not None:
            raise ConfigError(
                "format=winogrande_jsonl takes no template: each option completes the sentence's own "
                "beginning, and the rest of the sentence is scored."
            )
        items = _read_winogrande(path)
    elif fmt == "arc_jsonl":
        for number, row in read_jsonl(path):
            where = f"{path}:{number}"
            choices = _field(row, "choices", where, dict)
            labels, texts = choices.get("label"), _choices(choices.get("text"), where)
            if not isinstance(labels, list) or len(labels) != len(texts):
                raise ConfigError(f"{where}: choices.label must list one label per choice.")
            items.append(
                {
                    "query": _question_prompt(template, row, where),
                    "choices": texts,
                    "gold": _gold_index(_field(row, "answerKey", where), [str(x) for x in labels], where),
                }
            )
    elif fmt == "jsonl":
        for number, row in read_jsonl(path):
            where = f"{path}:{number}"
            choices = _choices(_field(row, "choices", where), where)
            items.append(
                {
                    "query": _question_prompt(template, row, where),
                    "choices": choices,
                    "gold": _gold_index(_field(row, "answer", where), list(LETTERS[: len(choices)]), where),
                }
            )
    elif fmt == "mmlu_csv":
        files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
        if not files:
            raise ConfigError(f"{path} holds no .csv files; an mmlu_csv benchmark is a CSV file or a folder of them.")
        for file in files:
            items += _read_mmlu_csv(file, template)
    elif fmt == "hellaswag_txt":
        rows = lines(read_text(path))
        if len(rows) % 6:
            raise ConfigError(
                f"{path}: {len(rows)} lines is not a multiple of 6 (context, gold index, 4 endings per item)."
            )
        for start in range(0, len(rows), 6):
            context, gold, *endings = rows[start : start + 6]
            items.append(
                {
                    "query": _prompt(template, "{context}", {"context": context}, f"{path}:{start + 1}"),
                    "choices": endings,
                    "gold": _gold_index(gold.strip(), ["0", "1", "2", "3"], f"{path}:{start + 2}"),
                }
            )
    else:
        raise ConfigError(f"format={fmt!r} is not a multiple-choice layout; choose one of: {', '.join(MC_FORMATS)}.")
    if not items:
        raise ConfigError(f"{path} holds no items.")
    return items


def read_generation(path: Path, template: Optional[str] = None) -> List[dict]:
    """Items {"query", "answer"} of a GSM8K-style JSONL; the answer reduced to its final number."""
    rows = []
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        rows.append(
            {
                "query": _question_prompt(template, row, where),
                "answer": _final_number(str(_field(row, "answer", where))),
            }
        )
    if not rows:
        raise ConfigError(f"{path} holds no items.")
    return rows


def read_last_words(path: Path) -> List[dict]:
    """Items {"context", "target"} of a LAMBADA-style file: a JSONL of {"text"} (a .jsonl file) or one passage per
    line; the target is the passage's last word with the space before it, the context everything before."""
    if path.suffix == ".jsonl":
        texts = [(f"{path}:{n}", _field(row, "text", f"{path}:{n}", str)) for n, row in read_jsonl(path)]
    else:
        texts = [(f"{path}:{n}", line) for n, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
    items = []
    for where, text in texts:
        context, _, word = text.strip().rpartition(" ")
        if not context or not word:
            raise ConfigError(
                f"{where}: a passage needs at least two words (its last word is predicted from the rest)."
            )
        items.append({"context": context, "target": " " + word})
    if not items:
        raise ConfigError(f"{path} holds no passages.")
    return items


def read_documents(path: Path) -> List[dict]:
    docs = _split_documents(read_text(path))
    if not docs:
        raise ConfigError(f"{path} holds no text.")
    return [{"text": d} for d in docs]


def _final_number(text: str) -> str:
    if "####" in text:
        text = text.split("####")[-1]
    numbers = re.findall(r"-?[\d,]*\.?\d+", text)
    return numbers[-1].replace(",", "") if numbers else text.strip()


def _write_jsonl(rows: List[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _split_documents(text: str, max_chars: int = 4000) -> List[str]:
    """Line-aligned documents of bounded size, so rolling windows stay short on small machines."""
    docs, current = [], []
    size = 0
    for line in text.splitlines():
        if current and size + len(line) > max_chars:
            docs.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        docs.append("\n".join(current))
    return [d for d in docs if d.strip()]


FETCH_HINT = (
    "get the files with `bash scripts/fetch-evaldata.sh DIR` on a machine with internet access (it checks "
    "their checksums), then set PTQ_EVALDATA=DIR or eval.data_dir=DIR"
)


def benchmark_path(bench: BenchmarkConfig, data_dir: Optional[str]) -> Path:
    """The benchmark's file: its path as given when absolute (or ~), else under eval.data_dir."""
    path = Path(os.path.expanduser(bench.path or ""))
    if path.is_absolute():
        return path
    if not data_dir:
        raise ConfigError(
            f"eval benchmark {bench.name} reads {bench.path} from eval.data_dir, which is not set: "
            f"{FETCH_HINT} (or eval=none to skip benchmarks)."
        )
    return Path(os.path.expanduser(data_dir)) / path


def read_benchmark(bench: BenchmarkConfig, path: Path) -> Optional[List[dict]]:
    """The normalised items of a local benchmark file (None for kind lm_eval), checked item by item."""
    if bench.kind == "multiple_choice":
        return read_multiple_choice(path, bench.format, bench.template)
    if bench.kind == "generation":
        return read_generation(path, bench.template)
    if bench.kind == "perplexity":
        return read_documents(path)
    if bench.kind == "last_word":
        return read_last_words(path)
    return None


def _item_count(path: Path, kind: str, fmt: str, template: Optional[str] = None) -> int:
    return len(read_benchmark(BenchmarkConfig(name="check", kind=kind, format=fmt, template=template), path))


def task_template(bench: BenchmarkConfig) -> Path:
    """The lm-eval task template a local benchmark's task file includes (evaluate/tasks/)."""
    if bench.kind == "multiple_choice" and bench.format == "winogrande_jsonl":
        return TASKS_DIR / "ptq_partial_choice.yaml"
    return TASKS_DIR / f"ptq_{bench.kind}.yaml"


def stratified_indices(subjects: List[str], n: int, seed: int = 0) -> List[int]:
    """`n` item indices spread evenly over the subjects (round robin over the subjects in name order, each
    subject's items in a fixed random order), sorted; the first `n` when there is one subject."""
    by_subject: Dict[str, List[int]] = {}
    for index, subject in enumerate(subjects):
        by_subject.setdefault(subject, []).append(index)
    if len(by_subject) < 2:
        return list(range(min(n, len(subjects))))
    rng = random.Random(seed)
    pools = [rng.sample(ids, len(ids)) for _, ids in sorted(by_subject.items())]
    picked: List[int] = []
    while len(picked) < min(n, len(subjects)):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return sorted(picked)


def task_file(bench: BenchmarkConfig, work_dir: Path, data_dir: Optional[str] = None) -> Tuple[Path, List[str]]:
    """Normalise a local benchmark file into `work_dir` and write its lm-eval task file there: (task YAML, the
    subject of each item: one per file of a folder benchmark, "" otherwise).

    The task file includes the kind's template from evaluate/tasks/ and adds the data file (and, for
    generation, the benchmark's token budget)."""
    path = benchmark_path(bench, data_dir)
    if not path.exists():
        raise ConfigError(f"eval benchmark {bench.name}: path {path} does not exist; set eval.benchmarks[...].path.")
    rows = read_benchmark(bench, path)
    if rows is None:
        raise ConfigError(
            f"eval benchmark {bench.name}: kind={bench.kind} has no local data; "
            f"choose one of: {', '.join(k for k in KINDS if k != 'lm_eval')}."
        )
    data = _write_jsonl(rows, work_dir / f"{bench.name}.jsonl")
    template = task_template(bench)
    task = {
        "include": str(template),
        "task": f"ptq_{bench.name}",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
    }
    if bench.kind == "multiple_choice":
        task["target_delimiter"] = bench.delimiter
    if bench.kind == "generation":
        generation = yaml.safe_load(template.read_text())["generation_kwargs"]
        task["generation_kwargs"] = {**generation, "max_gen_toks": bench.max_gen_toks}
    out = work_dir / TASK_FILES_NAME / f"ptq_{bench.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(task, sort_keys=False))
    return out, [str(row.get("subject", "")) for row in rows]


def load_tasks(cfg: EvalConfig, work_dir: Path):
    """(tasks for lm-eval, {task name: benchmark name}, {task name: items to evaluate}, task manager,
    {task name: the subject of each item} for local benchmarks of several subjects).

    Local benchmarks become Task objects, built by an lm-eval TaskManager over this run's task files only
    (indexing lm-eval's own few thousand task files takes seconds); benchmarks of kind lm_eval stay names,
    which simple_evaluate resolves through lm-eval's full index, built once per process."""
    from lm_eval.tasks import TaskManager

    tasks, names, samples, local, by_subject = [], {}, {}, {}, {}
    for bench in cfg.benchmarks:
        if bench.kind == "lm_eval":
            key, subjects = bench.task or bench.name, None
            tasks.append(key)
        else:
            _, subjects = task_file(bench, work_dir, cfg.data_dir)
            key = f"ptq_{bench.name}"
            local[key] = None
        names[key] = bench.name
        if subjects is not None and len(set(subjects)) > 1:
            by_subject[key] = subjects
        # Per-benchmark item limits go through `samples`: the first n items of a one-subject set; spread evenly
        # over the subjects of a folder of subjects (MMLU), so a limit never means "the first subject only".
        n = bench.limit or cfg.limit
        if n:
            samples[key] = stratified_indices(subjects, n) if subjects is not None else list(range(n))
    manager = None
    if local:
        manager = TaskManager(include_path=str(work_dir / TASK_FILES_NAME), include_defaults=False)
        built = manager.load(list(local))["tasks"]
        tasks += [built[key] for key in local]
    if len(tasks) > len(local):
        manager = _task_manager()
    return tasks, names, samples, manager, by_subject


def check_eval_config(cfg: EvalConfig) -> None:
    """Refuse bad benchmark definitions before any model is loaded."""
    if not cfg.enabled:
        return
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval.enabled=true needs lm-eval: `pip install lm-eval==0.4.13` (or eval=none).")
    if not cfg.benchmarks:
        raise ConfigError("eval.enabled=true but eval.benchmarks is empty; choose eval=local_quick or eval=none.")
    names = [b.name for b in cfg.benchmarks]
    unsafe = [n for n in names if not SAFE_NAME.match(str(n))]
    if unsafe:
        raise ConfigError(
            f"eval benchmark name {unsafe[0]!r} becomes a file name of the run: use one plain name "
            "(letters, digits and . _ + @ = -, no '/' and no '..')."
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.benchmarks has duplicate names {names}; give each benchmark its own name.")
    for bench in cfg.benchmarks:
        if bench.kind not in KINDS:
            raise ConfigError(
                f"eval benchmark {bench.name}: kind={bench.kind!r} is unknown; choose one of: {', '.join(KINDS)}."
            )
        if bench.kind != "lm_eval" and not benchmark_path(bench, cfg.data_dir).exists():
            where = (
                f" under eval.data_dir={cfg.data_dir}"
                if not Path(os.path.expanduser(bench.path or "")).is_absolute()
                else ""
            )
            raise ConfigError(
                f"eval benchmark {bench.name}: {benchmark_path(bench, cfg.data_dir)} does not exist{where}; "
                f"point the path at your data file, or {FETCH_HINT}."
            )
        if bench.kind == "multiple_choice" and bench.format not in MC_FORMATS:
            raise ConfigError(
                f"eval benchmark {bench.name}: format={bench.format!r}; choose one of: {', '.join(MC_FORMATS)}."
            )
        if bench.template is not None and bench.kind not in ("multiple_choice", "generation"):
            raise ConfigError(
                f"eval benchmark {bench.name}: template applies to kinds multiple_choice and generation, "
                f"not {bench.kind}; remove it."
            )
        if bench.limit is not None and bench.limit < 1:
            raise ConfigError(
                f"eval benchmark {bench.name}: limit={bench.limit}; use a positive number of items, or null."
            )
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"eval.limit={cfg.limit}: use a positive number of items per benchmark, or null for all.")
    for bench in cfg.benchmarks:  # every item read and checked now, not after the model is loaded
        if bench.kind != "lm_eval":
            try:  # the path exists: checked above
                checked_once(_item_count, benchmark_path(bench, cfg.data_dir), bench.kind, bench.format, bench.template)
            except ConfigError as exc:
                raise ConfigError(f"eval benchmark {bench.name}: {exc}") from None


# Bump when what a fingerprint covers changes: cached BF16 baselines of another version are not reused.
FINGERPRINT_VERSION = 3  # 2: a limit on a folder of subjects samples across them; 3: prompt template, delimiter


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_digest(path: Path) -> str:
    """sha256 of a benchmark's data: the file, or a folder's .csv files (names and contents) in order."""
    if path.is_dir():
        parts = [(f.name, checked_once(_file_digest, f)) for f in sorted(path.glob("*.csv"))]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    return checked_once(_file_digest, path)


def fingerprint(bench: BenchmarkConfig, cfg: EvalConfig, items: Optional[List[int]]) -> dict:
    """What a benchmark result was measured on: two results are comparable only when these are equal."""
    from importlib import metadata

    local = bench.kind != "lm_eval"
    template = task_template(bench)
    parts = {
        "version": FINGERPRINT_VERSION,
        "benchmark": bench.name,
        "kind": str(bench.kind),
        "format": str(bench.format) if bench.kind == "multiple_choice" else None,
        "data": data_digest(benchmark_path(bench, cfg.data_dir)) if local else (bench.task or bench.name),
        "template": checked_once(_file_digest, template) if local else None,
        "prompt": bench.template if local else None,
        "delimiter": bench.delimiter if bench.kind == "multiple_choice" else None,
        "items": items,  # the indices evaluated; None: all
        "num_fewshot": cfg.num_fewshot,
        "chat_template": cfg.apply_chat_template,
        "max_gen_toks": bench.max_gen_toks if bench.kind == "generation" else None,
        "lm_eval": metadata.version("lm_eval"),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return {"fingerprint": digest, "items": len(items) if items is not None else None}


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


def _flatten(
    results: dict,
    names: Dict[str, str],
    prints: Optional[Dict[str, dict]] = None,
    subjects: Optional[Dict[str, List[str]]] = None,
) -> List[dict]:
    prints, subjects = prints or {}, subjects or {}
    logged = results.get("samples") or {}
    rows = []
    for task, metrics in results["results"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            if not isinstance(stderr, (int, float)) and metric in RATIO_METRICS:
                stderr = ratio_stderr(logged.get(task) or [], metric, filt)
            row = {
                "benchmark": names.get(task, task),
                "metric": metric if filt in ("none", "last-number") else key,
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "higher_is_better": bool(better.get(metric, True)),
                **prints.get(task, {}),
            }
            # Per-item scores, so a comparison with BF16 on the same items can be paired (ptq/report).
            items = item_scores(logged.get(task) or [], metric, filt, float(value))
            if items:
                row["items"] = items
            rows.append(row)
            if items and task in subjects:
                # Per subject (each with its items, so the report pairs it with BF16's), and the macro average
                # over subjects beside lm-eval's mean over items.
                per_subject = subject_rows(row, subjects[task])
                rows += per_subject + [macro_row(row, per_subject)]
    return sorted(rows, key=lambda r: (r["benchmark"], r["metric"]))


@functools.lru_cache(maxsize=1)
def _task_manager():
    """lm-eval's index of its task files, built once per process: building it takes about 11 s on the
    GPU machine (bench/results/evaluation-throughput-h100.md), every evaluation of a sweep reuses it."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def run_benchmarks(model, tokenizer, cfg: EvalConfig, work_dir: Path, label: str) -> List[dict]:
    """Evaluate an in-memory model on every benchmark of `cfg`; rows of benchmark/metric/value/stderr."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks, names, samples, manager, subjects = load_tasks(cfg, work_dir)
    prints = {
        key: fingerprint(bench, cfg, samples.get(key))
        for bench in cfg.benchmarks
        for key, name in names.items()
        if name == bench.name
    }
    log.info("Evaluating %s on %s", label, ", ".join(names.values()))
    # lm-eval's automatic batch size probes with full-length batches: minutes per probe on a CPU.
    on_cpu = next(model.parameters()).device.type == "cpu"
    batch_size = cfg.batch_size or (CPU_BATCH_SIZE if on_cpu else "auto")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=64)
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot or None,
        samples=samples or None,
        apply_chat_template=cfg.apply_chat_template,
        log_samples=True,
        bootstrap_iters=cfg.bootstrap_iters,
        verbosity="WARNING",
        task_manager=manager,
    )
    _write_samples(results.get("samples") or {}, names, work_dir / f"samples-{_safe(label)}.jsonl")
    return _flatten(results, names, prints, subjects)


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _write_samples(samples: Dict[str, List[dict]], names: Dict[str, str], path: Path) -> None:
    """What each item was asked, answered and scored (generation outputs included), one JSON line per item, in
    the run's evaluation folder."""
    lines = []
    for task, items in samples.items():
        for item in items:
            metrics = {m: item.get(m) for m in item.get("metrics", []) if isinstance(item.get(m), (int, float, bool))}
            lines.append(
                json.dumps(
                    {
                        "benchmark": names.get(task, task),
                        "doc_id": item.get("doc_id"),
                        "filter": item.get("filter"),
                        "target": item.get("target"),
                        "response": item.get("filtered_resps"),
                        **metrics,
                    },
                    default=str,
                )
            )
    if lines:
        write_text_atomic(path, "\n".join(lines) + "\n")


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def baseline_key(model_id: str, cfg: EvalConfig) -> str:
    """The cached BF16 baseline's identity: model, settings, and what the fingerprints cover that the settings do
    not (each data file's contents, lm-eval's version), so a changed file or an upgrade evaluates BF16 again."""
    from importlib import metadata

    data = [data_digest(benchmark_path(b, cfg.data_dir)) if b.kind != "lm_eval" else None for b in cfg.benchmarks]
    key = {
        "model": model_id,
        "eval": asdict(cfg),
        "fingerprint": FINGERPRINT_VERSION,
        "data": data,
        "lm_eval": metadata.version("lm_eval"),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_baseline(
    model, tokenizer, cfg: EvalConfig, *, model_id: str, model_name: str, cache_dir: str, work_dir: Path
) -> List[dict]:
    """BF16 scores for (model, evaluation settings), evaluated once and shared by every run that asks.

    A file lock makes concurrent jobs of a sweep wait for the first one instead of evaluating twice.
    """
    key = baseline_key(model_id, cfg)
    path = Path(os.path.expanduser(cache_dir)) / "baselines" / f"{model_name}-{key}.json"
    with _locked(path.with_suffix(".lock")):
        if path.exists():
            log.info("Using the cached BF16 baseline %s", path)
            return json.loads(path.read_text())["results"]
        rows = run_benchmarks(model, tokenizer, cfg, work_dir, "BF16 baseline")
        write_json_atomic(path, {"model": model_id, "eval": asdict(cfg), "results": rows})
        return rows
