"""The evaluation stage: local benchmark files through real lm-eval, and the table built from the runs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import pytest
from conftest import REPO, compose_run, small_run_overrides

from ptq.errors import ConfigError
from ptq.evaluation.baseline import cached_baseline
from ptq.evaluation.readers import _final_number, _split_documents, check_eval_config, read_multiple_choice
from ptq.evaluation.tasks import load_tasks
from ptq.report import build_report
from ptq.run import run
from ptq.schema import BenchmarkConfig, EvalConfig

ARC_ROWS = [
    {
        "question": "Which gas do plants take in for photosynthesis?",
        "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    },
    {
        "question": "What is frozen water called?",
        "choices": {"text": ["steam", "ice", "sand", "salt"], "label": ["1", "2", "3", "4"]},
        "answerKey": "2",
    },
    {
        "question": "Which planet is closest to the Sun?",
        "choices": {"text": ["Mercury", "Mars", "Jupiter", "Neptune"], "label": ["A", "B", "C", "D"]},
        "answerKey": "A",
    },
    {
        "question": "What do bees make?",
        "choices": {"text": ["milk", "silk", "honey", "wool"], "label": ["A", "B", "C", "D"]},
        "answerKey": "C",
    },
]
TEXT = "\n".join(
    f"The river town {i} had a market on Saturdays , where farmers sold apples , bread and cheese to visitors ."
    for i in range(60)
)


@pytest.fixture()
def local_files(tmp_path):
    arc = tmp_path / "arc.jsonl"
    arc.write_text("\n".join(json.dumps(r) for r in ARC_ROWS) + "\n")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    return arc, text


def eval_overrides(arc, text):
    return [
        "eval=local_quick",
        "eval.suite=test_suite",
        "eval.limit=4",
        "eval.bootstrap_iters=0",
        f"eval.benchmarks=[{{name: arc, kind: multiple_choice, format: arc_jsonl, path: '{arc}'}},"
        f"{{name: text, kind: perplexity, path: '{text}', limit: 2}}]",
    ]


def test_multiple_choice_layouts(tmp_path, local_files):
    arc, _ = local_files
    items = read_multiple_choice(arc, "arc_jsonl")
    assert [i["gold"] for i in items] == [1, 1, 0, 2]
    assert items[0]["query"].startswith("Question: Which gas") and items[0]["choices"][1] == "carbon dioxide"
    generic = tmp_path / "mc.jsonl"
    generic.write_text(
        json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": "B"})
        + "\n"
        + json.dumps({"question": "1+1?", "choices": ["2", "5"], "answer": 0})
        + "\n"
    )
    assert [i["gold"] for i in read_multiple_choice(generic, "jsonl")] == [1, 0]
    mmlu = tmp_path / "mmlu"
    mmlu.mkdir()
    (mmlu / "a_test.csv").write_text('question,choice0,choice1,choice2,choice3,answer\n"Q, with comma",w,x,y,z,3\n')
    assert read_multiple_choice(mmlu, "mmlu_csv") == [
        {"query": "Question: Q, with comma\nAnswer:", "choices": ["w", "x", "y", "z"], "gold": 3, "subject": "a_test"}
    ]
    swag = tmp_path / "swag.txt"
    swag.write_text("Cooking: A man cracks an egg. he\n2\nflies away.\nsings.\npours it into a pan.\nreads.\n")
    assert read_multiple_choice(swag, "hellaswag_txt") == [
        {
            "query": "Cooking: A man cracks an egg. he",
            "choices": ["flies away.", "sings.", "pours it into a pan.", "reads."],
            "gold": 2,
        }
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "Z"}) + "\n")
    with pytest.raises(ConfigError, match="answer 'Z'"):
        read_multiple_choice(bad, "jsonl")


def test_generation_answers_and_documents():
    assert _final_number("She pays 3 + 4 = 7 dollars.\n#### 1,200") == "1200"
    assert _final_number("The answer is 42.") == "42"
    docs = _split_documents(TEXT, max_chars=1000)
    assert len(docs) > 1 and all(len(d) <= 1100 for d in docs) and "".join(docs).count("river town") == 60


def test_bad_benchmarks_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_eval_config(
            EvalConfig(enabled=True, benchmarks=[BenchmarkConfig(name="x", kind="perplexity", path="/nope.txt")])
        )
    with pytest.raises(ConfigError, match="kind='quiz'"):
        check_eval_config(
            EvalConfig(enabled=True, benchmarks=[BenchmarkConfig(name="x", kind="quiz", path=str(tmp_path))])
        )
    with pytest.raises(ConfigError, match="duplicate"):
        check_eval_config(EvalConfig(enabled=True, benchmarks=[BenchmarkConfig(name="x", kind="lm_eval")] * 2))
    with pytest.raises(ConfigError, match="empty"):
        check_eval_config(EvalConfig(enabled=True))


def test_local_benchmarks_become_lm_eval_tasks_from_the_yaml_templates(tmp_path):
    """Each local benchmark gets a task file that includes its kind's template in evaluate/tasks/; lm-eval's
    TaskManager builds the tasks from those files, with this run's data and limits."""
    arc = tmp_path / "arc.jsonl"
    arc.write_text(
        "".join(
            json.dumps(
                {"question": f"q{i}?", "choices": {"label": ["A", "B"], "text": ["yes", "no"]}, "answerKey": "B"}
            )
            + "\n"
            for i in range(3)
        )
    )
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "so #### 2"}) + "\n")
    text = tmp_path / "wiki.txt"
    text.write_text("One line of text.\nAnother line.\n")
    cfg = EvalConfig(
        enabled=True,
        limit=2,
        benchmarks=[
            BenchmarkConfig(name="arc", kind="multiple_choice", format="arc_jsonl", path=str(arc)),
            BenchmarkConfig(name="gsm", kind="generation", path=str(gsm), max_gen_toks=32),
            BenchmarkConfig(name="wiki", kind="perplexity", path=str(text)),
        ],
    )
    tasks, names, samples, manager, subjects = load_tasks(cfg, tmp_path / "work")
    by_name = {task.config.task: task for task in tasks}
    assert names == {"ptq_arc": "arc", "ptq_gsm": "gsm", "ptq_wiki": "wiki"} and set(by_name) == set(names)
    assert {k: t.config.output_type for k, t in by_name.items()} == {
        "ptq_arc": "multiple_choice",
        "ptq_gsm": "generate_until",
        "ptq_wiki": "loglikelihood_rolling",
    }
    assert samples == {"ptq_arc": [0, 1], "ptq_gsm": [0], "ptq_wiki": [0]}
    arc_docs = list(by_name["ptq_arc"].test_docs())
    assert len(arc_docs) == 3 and arc_docs[0]["gold"] == 1 and arc_docs[0]["choices"] == ["yes", "no"]
    assert by_name["ptq_gsm"].config.generation_kwargs["max_gen_toks"] == 32
    assert by_name["ptq_gsm"].config.generation_kwargs["until"] == ["\n\n", "Question:"]
    assert list(by_name["ptq_gsm"].test_docs())[0]["answer"] == "2"
    assert all("include" in (tmp_path / "work" / "tasks" / f"{k}.yaml").read_text() for k in names)
    assert manager is not None and set(manager.all_tasks) == set(names)  # this run's tasks, not lm-eval's index


def test_a_suite_without_its_data_folder_says_how_to_get_the_files(tmp_path):
    """A new user with no evaluation files: the run stops before loading and names the fetch script."""
    env = {k: v for k, v in os.environ.items() if k != "PTQ_EVALDATA"}
    proc = subprocess.run(
        [sys.executable, "launch.py", "eval=local_quick", f"output_root={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "eval.data_dir, which is not set" in proc.stderr and "scripts/fetch-evaldata.sh" in proc.stderr
    assert "Loading" not in proc.stderr and not list(tmp_path.rglob("run.json"))


def test_eval_suite_with_missing_data_is_refused_before_loading(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch.py", "eval=local_quick", "eval.data_dir=/no/such/folder", f"output_root={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "eval.data_dir" in proc.stderr


@pytest.mark.slow
def test_bf16_baseline_is_evaluated_once_under_concurrency(tiny_llama_dir, tmp_path, local_files, caplog):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arc, _ = local_files
    caplog.set_level(logging.INFO, logger="ptq")
    cfg = EvalConfig(
        enabled=True,
        limit=2,
        bootstrap_iters=0,
        benchmarks=[BenchmarkConfig(name="arc", kind="multiple_choice", format="arc_jsonl", path=str(arc))],
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    models = [AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32) for _ in range(2)]
    results = [None, None]

    def job(i):
        results[i] = cached_baseline(
            models[i],
            tokenizer,
            cfg,
            model_id=str(tiny_llama_dir),
            model_name="tiny",
            cache_dir=str(tmp_path / "cache"),
            work_dir=tmp_path / f"work{i}",
        )

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] and results[0][0]["benchmark"] == "arc"
    assert caplog.text.count("Evaluating BF16 baseline") == 1
    assert caplog.text.count("Using the cached BF16 baseline") == 1


@pytest.mark.slow
def test_two_recipes_and_bf16_end_to_end_into_the_table(smollm2_dir, tmp_path, local_files):
    arc, text = local_files
    records = {}
    for recipe in ("bf16", "fp8", "int8_sq"):
        records[recipe] = run(
            *compose_run(small_run_overrides(tmp_path, f"recipe={recipe}", *eval_overrides(arc, text)))
        )
        assert records[recipe]["status"] == "finished", records[recipe].get("error")
    fp8 = records["fp8"]["evaluation"]
    assert {(r["benchmark"], r["metric"]) for r in fp8["results"]} >= {
        ("arc", "acc"),
        ("arc", "acc_norm"),
        ("text", "word_perplexity"),
    }
    assert fp8["limits"] == {"arc": 4, "text": 2}  # each benchmark's limit, stated in the record
    # The record names its evaluation settings' tag, the one its output folder ends with.
    tag = records["fp8"]["eval_tag"]
    assert tag.startswith("eval_test_suite_") and records["fp8"]["output_dir"].endswith("-" + tag)
    # Accuracies keep their per-item scores (perplexities only where their aggregate is the items' mean).
    kept = {(r["benchmark"], r["metric"]) for r in fp8["results"] if "items" in r}
    assert {("arc", "acc"), ("arc", "acc_norm")} <= kept
    assert fp8["baseline"] == records["bf16"]["evaluation"]["results"]  # one cached BF16 evaluation, shared
    assert "eval_baseline" in records["int8_sq"]["timings_s"] and "eval" in records["int8_sq"]["timings_s"]

    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "ptq.report", str(tmp_path / "runs"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    markdown = (out / "results.md").read_text()
    assert "bf16" in markdown and "fp8@4" in markdown and "int8_sq@4" in markdown
    assert list(out.glob("*.png")) and (out / "results.html").exists()

    # Recovery by hand: the quantized word perplexity against BF16's, inverted (lower is better).
    report = build_report([json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("run.json")])
    scores = report.scores
    row = scores[
        (scores.variant == "fp8@4") & (scores.benchmark == "text") & (scores.metric == "word_perplexity")
    ].iloc[0]
    bf16_ppl = next(r["value"] for r in records["bf16"]["evaluation"]["results"] if r["metric"] == "word_perplexity")
    fp8_ppl = next(r["value"] for r in fp8["results"] if r["metric"] == "word_perplexity")
    assert row["value"] == pytest.approx(fp8_ppl) and row["bf16"] == pytest.approx(bf16_ppl)
    assert row["recovery"] == pytest.approx(bf16_ppl / fp8_ppl)
    assert fp8_ppl != bf16_ppl  # quantization changed the model
    arc_acc = scores[(scores.variant == "fp8@4") & (scores.benchmark == "arc") & (scores.metric == "acc")].iloc[0]
    assert arc_acc["paired_items"] == len(next(r for r in fp8["results"] if r["metric"] == "acc")["items"]["doc_ids"])


def test_generation_benchmark_runs_through_lm_eval(tiny_llama_dir, tmp_path):
    """A GSM8K-style file: greedy generation, the final number compared by exact match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptq.evaluation.runner import run_benchmarks

    data = tmp_path / "math.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
                    "answer": "3 + 4 = 7\n#### 7",
                },
                {"question": "A box holds 12 eggs. How many eggs are in 2 boxes?", "answer": "#### 24"},
            ]
        )
        + "\n"
    )
    cfg = EvalConfig(
        enabled=True,
        bootstrap_iters=0,
        benchmarks=[BenchmarkConfig(name="math", kind="generation", path=str(data), max_gen_toks=8)],
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    rows = run_benchmarks(model, tokenizer, cfg, tmp_path / "work", "tiny")
    assert [(r["benchmark"], r["metric"]) for r in rows] == [("math", "exact_match")]
    assert 0.0 <= rows[0]["value"] <= 1.0 and rows[0]["higher_is_better"] is True
    normalised = [json.loads(line) for line in (tmp_path / "work" / "math.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in normalised] == ["7", "24"]
    # Per-item scores (their mean is the result) and, in the work folder, what the model wrote for each item.
    assert rows[0]["items"]["doc_ids"] == [0, 1]
    assert sum(rows[0]["items"]["scores"]) / 2 == pytest.approx(rows[0]["value"])
    outputs = [json.loads(line) for line in (tmp_path / "work" / "samples-tiny.jsonl").read_text().splitlines()]
    assert [(o["benchmark"], o["doc_id"], o["target"]) for o in outputs] == [("math", 0, "7"), ("math", 1, "24")]
    assert all(isinstance(o["response"], list) and "exact_match" in o for o in outputs)


def test_a_limit_on_a_folder_of_subjects_samples_every_subject(tmp_path):
    """MMLU-style: 25 items must not all come from the first file (abstract algebra)."""
    from ptq.evaluation.tasks import load_tasks, stratified_indices

    subjects = ["algebra"] * 10 + ["anatomy"] * 4 + ["astronomy"] * 10
    picked = stratified_indices(subjects, 9)
    assert picked == sorted(picked) and len(set(picked)) == 9 and picked == stratified_indices(subjects, 9)
    assert [sum(subjects[i] == s for i in picked) for s in ("algebra", "anatomy", "astronomy")] == [3, 3, 3]
    # A subject that runs out leaves its turns to the others; one subject keeps the first n.
    assert [
        sum(subjects[i] == s for i in stratified_indices(subjects, 20)) for s in ("algebra", "anatomy", "astronomy")
    ] == [8, 4, 8]
    assert stratified_indices(["x"] * 5, 3) == [0, 1, 2] and stratified_indices(subjects, 100) == list(range(24))

    folder = tmp_path / "mmlu"
    folder.mkdir()
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    for subject, count in (("abstract_algebra_test", 10), ("anatomy_test", 10), ("astronomy_test", 10)):
        (folder / f"{subject}.csv").write_text(header + "".join(f"{subject} q{i},a,b,c,d,A\n" for i in range(count)))
    cfg = EvalConfig(
        enabled=True,
        limit=6,
        benchmarks=[BenchmarkConfig(name="mmlu", kind="multiple_choice", format="mmlu_csv", path=str(folder))],
    )
    _, _, samples, _, subjects = load_tasks(cfg, tmp_path / "work")
    rows = [json.loads(line) for line in (tmp_path / "work" / "mmlu.jsonl").read_text().splitlines()]
    assert (
        sorted(rows[i]["subject"] for i in samples["ptq_mmlu"])
        == ["abstract_algebra_test"] * 2 + ["anatomy_test"] * 2 + ["astronomy_test"] * 2
    )


def test_per_item_scores_are_kept_only_where_their_mean_is_the_result():
    from ptq.evaluation.scores import item_scores

    samples = [
        {"doc_id": 1, "filter": "none", "acc": 0.0, "word_perplexity": (-10.0, 4)},
        {"doc_id": 0, "filter": "none", "acc": 1.0, "word_perplexity": (-30.0, 5)},
        {"doc_id": 0, "filter": "other", "acc": 0.0},
    ]
    assert item_scores(samples, "acc", "none", 0.5) == {"doc_ids": [0, 1], "scores": [1.0, 0.0]}
    assert item_scores(samples, "acc", "none", 0.7) is None  # aggregated some other way
    assert item_scores(samples, "word_perplexity", "none", 50.0) is None  # not a number per item


def test_a_benchmark_fingerprint_changes_with_what_was_measured(tmp_path):
    """Two results are compared only when measured on the same data, items and settings (the report matches on it)."""
    from ptq.evaluation.tasks import fingerprint

    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 0}) + "\n")
    bench = BenchmarkConfig(name="mc", kind="multiple_choice", format="jsonl", path=str(data))
    cfg = EvalConfig(enabled=True, benchmarks=[bench])
    base = fingerprint(bench, cfg, None)
    assert base == fingerprint(bench, cfg, None) and base["items"] is None
    assert fingerprint(bench, cfg, [0])["fingerprint"] != base["fingerprint"]  # a subset
    assert fingerprint(bench, EvalConfig(enabled=True, num_fewshot=5, benchmarks=[bench]), None) != base
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "q2?", "choices": ["a", "b"], "answer": 1}) + "\n")
    moved = BenchmarkConfig(name="mc", kind="multiple_choice", format="jsonl", path=str(other))
    assert fingerprint(moved, cfg, None) != base  # other contents
    for changed in ({"template": "Q: {question}\nA:"}, {"delimiter": ""}):  # another prompt
        other_prompt = BenchmarkConfig(name="mc", kind="multiple_choice", format="jsonl", path=str(data), **changed)
        assert fingerprint(other_prompt, cfg, None)["fingerprint"] != base["fingerprint"]


# Items written for these tests, in the layouts of WinoGrande, BoolQ and LAMBADA.
WINO_ROWS = [
    {
        "sentence": "The trophy did not fit in the suitcase because the _ was too big.",
        "option1": "trophy",
        "option2": "suitcase",
        "answer": "1",
    },
    {
        "sentence": "Anna lent Maria her umbrella because _ had forgotten her own at home.",
        "option1": "Anna",
        "option2": "Maria",
        "answer": "2",
    },
    {
        "sentence": "The cat chased the mouse until the _ was too tired to run any further.",
        "option1": "cat",
        "option2": "mouse",
        "answer": "2",
    },
]
PASSAGE_ROWS = [
    {
        "passage": "Tomatoes are botanically fruits, though cooks treat them as vegetables.",
        "question": "is a tomato a fruit",
        "choices": ["no", "yes"],
        "answer": 1,
    },
    {
        "passage": "Penguins are birds that cannot fly but swim very well.",
        "question": "can penguins fly",
        "choices": ["no", "yes"],
        "answer": 0,
    },
]
LAST_WORD_TEXT = (
    "She opened the door and the cold wind rushed into the room\n"
    "After the long walk home he finally sat down in his favourite chair\n"
    "The children built a castle of sand on the beach\n"
)


def test_a_prompt_template_and_delimiter_shape_each_item_and_are_checked_before_loading(tmp_path):
    data = tmp_path / "boolq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PASSAGE_ROWS))
    template = "{passage}\nQuestion: {question}?\nAnswer:"
    items = read_multiple_choice(data, "jsonl", template)
    assert items[0]["query"] == (
        "Tomatoes are botanically fruits, though cooks treat them as vegetables.\n"
        "Question: is a tomato a fruit?\nAnswer:"
    )
    bench = BenchmarkConfig(
        name="boolq", kind="multiple_choice", format="jsonl", path=str(data), template=template, delimiter=" -> "
    )
    tasks, *_ = load_tasks(EvalConfig(enabled=True, benchmarks=[bench]), tmp_path / "work")
    assert tasks[0].config.target_delimiter == " -> "
    assert tasks[0].doc_to_text(next(iter(tasks[0].test_docs()))) == items[0]["query"]
    # A field the items lack, a broken format string, or a template on a kind without prompts: refused with the
    # problem named (check_eval_config runs before any model is loaded).
    for bad, message in (
        ("{passage} {title}", "names the field 'title'.*fields: passage, question, choices, answer"),
        ("{passage", "not a usable format string"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_eval_config(
                EvalConfig(
                    enabled=True,
                    benchmarks=[
                        BenchmarkConfig(
                            name="boolq", kind="multiple_choice", format="jsonl", path=str(data), template=bad
                        )
                    ],
                )
            )
    with pytest.raises(ConfigError, match="template applies to kinds multiple_choice, generation and image_choice"):
        check_eval_config(
            EvalConfig(
                enabled=True, benchmarks=[BenchmarkConfig(name="t", kind="perplexity", path=str(data), template="{x}")]
            )
        )
    # Without a template the generic layout still needs its question.
    with pytest.raises(ConfigError, match="no 'question' field"):
        read_multiple_choice(
            data.parent / _write(tmp_path / "noq.jsonl", [{"choices": ["a", "b"], "answer": 0}]), "jsonl"
        )


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


def test_winogrande_and_last_word_files_are_read_and_checked(tmp_path):
    from ptq.evaluation.readers import read_last_words

    wino = tmp_path / "wino.jsonl"
    _write(wino, WINO_ROWS)
    items = read_multiple_choice(wino, "winogrande_jsonl")
    assert items[0] == {
        "contexts": [
            "The trophy did not fit in the suitcase because the trophy",
            "The trophy did not fit in the suitcase because the suitcase",
        ],
        "continuation": "was too big.",
        "gold": 0,
    }
    assert [i["gold"] for i in items] == [0, 1, 1]
    _write(tmp_path / "two.jsonl", [dict(WINO_ROWS[0], sentence="_ and _ again.")])
    with pytest.raises(ConfigError, match="exactly one blank"):
        read_multiple_choice(tmp_path / "two.jsonl", "winogrande_jsonl")
    with pytest.raises(ConfigError, match="takes no template"):
        read_multiple_choice(wino, "winogrande_jsonl", "{sentence}")
    text = tmp_path / "lambada.txt"
    text.write_text(LAST_WORD_TEXT)
    words = read_last_words(text)
    assert words[0] == {"context": "She opened the door and the cold wind rushed into the", "target": " room"}
    jsonl = tmp_path / "lambada.jsonl"
    _write(jsonl, [{"text": "one two three"}])
    assert read_last_words(jsonl) == [{"context": "one two", "target": " three"}]
    _write(jsonl, [{"text": "alone"}])
    with pytest.raises(ConfigError, match="at least two words"):
        read_last_words(jsonl)


def test_partial_scoring_last_word_and_subject_scores_through_lm_eval(tiny_llama_dir, tmp_path):
    """Real lm-eval on a small model: partial scoring compares the shared continuation after each option (checked
    against the model's own log-likelihoods), last-word accuracy is per item, MMLU-style folders get per-subject
    and macro-averaged scores."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptq.evaluation.runner import run_benchmarks

    wino = tmp_path / "wino.jsonl"
    _write(wino, WINO_ROWS)
    lambada = tmp_path / "lambada.txt"
    lambada.write_text(LAST_WORD_TEXT)
    folder = tmp_path / "mmlu"
    folder.mkdir()
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    for subject in ("anatomy_test", "astronomy_test"):
        (folder / f"{subject}.csv").write_text(
            header + "".join(f"{subject} question {i}?,red,green,blue,white,B\n" for i in range(3))
        )
    cfg = EvalConfig(
        enabled=True,
        bootstrap_iters=0,
        benchmarks=[
            BenchmarkConfig(name="wino", kind="multiple_choice", format="winogrande_jsonl", path=str(wino)),
            BenchmarkConfig(name="lambada", kind="last_word", path=str(lambada)),
            BenchmarkConfig(name="mmlu", kind="multiple_choice", format="mmlu_csv", path=str(folder)),
        ],
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    rows = {(r["benchmark"], r["metric"]): r for r in run_benchmarks(model, tokenizer, cfg, tmp_path / "work", "tiny")}
    # Named by subject, not by file (anatomy_test.csv): mmlu:anatomy.
    subjects = {(f"mmlu:{s}", m) for s in ("anatomy", "astronomy") for m in ("acc", "acc_norm")}
    assert (
        set(rows)
        == {
            ("wino", "acc"),
            ("lambada", "acc"),
            ("lambada", "perplexity"),
            ("mmlu", "acc"),
            ("mmlu", "acc_norm"),
            ("mmlu", "acc_macro"),
            ("mmlu", "acc_norm_macro"),
        }
        | subjects
    )

    def loglikelihood(context, continuation):
        ids = tokenizer(context + continuation, return_tensors="pt").input_ids
        start = len(tokenizer(context).input_ids)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        return sum(logprobs[i - 1, ids[0, i]].item() for i in range(start, ids.shape[1]))

    expected = []
    for item in read_multiple_choice(wino, "winogrande_jsonl"):
        scores = [loglikelihood(context, " " + item["continuation"]) for context in item["contexts"]]
        expected.append(float(scores.index(max(scores)) == item["gold"]))
    assert rows[("wino", "acc")]["items"]["scores"] == expected
    lam = rows[("lambada", "acc")]
    assert lam["items"]["doc_ids"] == [0, 1, 2] and set(lam["items"]["scores"]) <= {0.0, 1.0}
    assert rows[("lambada", "perplexity")]["value"] > 1 and rows[("lambada", "perplexity")]["higher_is_better"] is False
    mmlu = rows[("mmlu", "acc")]
    anatomy, astronomy = rows[("mmlu:anatomy", "acc")], rows[("mmlu:astronomy", "acc")]
    assert anatomy["subject"] == "anatomy" and anatomy["items"]["doc_ids"] == [0, 1, 2]
    assert astronomy["items"]["doc_ids"] == [3, 4, 5]
    assert anatomy["value"] == pytest.approx(sum(anatomy["items"]["scores"]) / 3)
    assert (anatomy["value"] + astronomy["value"]) / 2 == pytest.approx(mmlu["value"])  # equal sizes: macro = micro
    macro = rows[("mmlu", "acc_macro")]
    assert macro["value"] == pytest.approx((anatomy["value"] + astronomy["value"]) / 2)
    assert macro["subject_count"] == 2 and "items" not in macro and macro["fingerprint"] == mmlu["fingerprint"]


def test_evaluation_settings_name_the_output_folder_and_an_inherited_limit_is_said():
    from ptq.run import inherited_limit_warning

    def folder(*overrides):
        return compose_run(list(overrides))[1]["output_dir"]

    assert folder().endswith("-calib16x128")  # evaluation off: no tag
    quick = folder("eval=local_quick")
    assert "-eval_local_quick_" in quick
    assert folder("eval=local_quick", "eval.limit=5") != quick  # measures something else: another folder
    assert folder("eval=local_quick", "eval.batch_size=4") == quick  # same measurement
    assert folder("eval=local_quick", "eval.data_dir=/elsewhere") == quick  # same files, moved
    assert folder("eval=local_quick", "eval.benchmarks.0.template='Q: {question}\\nA:'") != quick

    given = ["eval=local_quick", "eval.benchmarks=[{name: boolq, kind: multiple_choice, path: /data/boolq.jsonl}]"]
    cfg, _ = compose_run(given)
    warning = inherited_limit_warning(cfg, given)
    assert "eval.limit=100 of eval=local_quick still applies: boolq will be cut to 100 items" in warning
    assert inherited_limit_warning(cfg, ["eval=local_quick"]) is None  # the suite's own benchmarks
    cfg, _ = compose_run(given + ["eval.limit=null"])
    assert inherited_limit_warning(cfg, given + ["eval.limit=null"]) is None


def test_a_perplexity_over_documents_gets_a_jackknife_standard_error():
    """lm-eval gives word/byte perplexity no standard error; the documents' (log-likelihood, words) pairs do."""
    import math

    from ptq.evaluation.scores import ratio_stderr

    docs = [(-20.0, 10), (-36.0, 12), (-12.0, 8), (-50.0, 20)]
    samples = [{"filter": "none", "word_perplexity": d, "bits_per_byte": d} for d in docs]
    se = ratio_stderr(samples, "word_perplexity", "none")
    total = math.exp(118 / 50)
    assert 0 < se < total
    # Leave-one-out by hand.
    values = [math.exp((118 + ll) / (50 - n)) for ll, n in docs]
    mean = sum(values) / 4
    assert se == pytest.approx(math.sqrt(3 / 4 * sum((v - mean) ** 2 for v in values)))
    assert ratio_stderr(samples[:1], "word_perplexity", "none") is None  # one document: no error
    assert ratio_stderr(samples, "acc", "none") is None
    same = [{"filter": "none", "word_perplexity": (-20.0, 10)}] * 3  # identical documents: no spread
    assert ratio_stderr(same, "word_perplexity", "none") == pytest.approx(0.0)
