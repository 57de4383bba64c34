"""Benchmark data files read into the items lm-eval scores (multiple choice in ARC, MMLU, HellaSwag, WinoGrande and
generic JSONL layouts; GSM8K-style generation; last-word passages; perplexity text), each checked item by item, and
the check of the `eval` group's benchmark definitions before any model is loaded."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

from ptq.errors import ConfigError
from ptq.plan import SAFE_NAME
from ptq.schema import BenchmarkConfig, BenchmarkKind, ChoiceFormat, EvalConfig
from ptq.textfiles import checked_once, lines, read_jsonl, read_text
from ptq.vlm import image_file

KINDS = tuple(BenchmarkKind)
MC_FORMATS = tuple(ChoiceFormat)
LETTERS = "ABCDEFGHIJ"


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


# The prompt of an image_choice item (its `template` when the benchmark gives none).
IMAGE_CHOICE_TEMPLATE = "{question}\nAnswer with one of the choices."


def read_image_choice(path: Path, template: Optional[str] = None) -> List[dict]:
    """Items {"image", "prompt", "choices", "gold"} of an image_choice file; every problem names file and line."""
    path = Path(path)
    items = []
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        image, choices, answer = row.get("image"), row.get("choices"), row.get("answer")
        if not isinstance(image, str) or not image:
            raise ConfigError(
                f'{where} has no "image" path; each line is {{"image", "question", "choices", "answer"}}.'
            )
        file = image_file(path, number, image)
        if not isinstance(row.get("question"), str):
            raise ConfigError(f'{where} has no "question" string.')
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise ConfigError(f'{where}: "choices" must be a list of at least 2 non-empty strings.')
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ConfigError(f'{where}: "answer" {answer!r} is not an index into its {len(choices)} choices.')
        try:
            prompt = (template or IMAGE_CHOICE_TEMPLATE).format(**row)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"{where}: the template {template!r} does not fit this item ({exc}).") from None
        items.append({"image": str(file), "prompt": prompt, "choices": list(choices), "gold": answer})
    if not items:
        raise ConfigError(f"{path} holds no items.")
    return items


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
    if bench.kind == "image_choice":
        return read_image_choice(path, bench.template)
    return None


def _item_count(path: Path, kind: str, fmt: str, template: Optional[str] = None) -> int:
    return len(read_benchmark(BenchmarkConfig(name="check", kind=kind, format=fmt, template=template), path))


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
        if bench.template is not None and bench.kind not in ("multiple_choice", "generation", "image_choice"):
            raise ConfigError(
                f"eval benchmark {bench.name}: template applies to kinds multiple_choice, generation and "
                f"image_choice, not {bench.kind}; remove it."
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
