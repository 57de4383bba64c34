"""Bad input is refused before any model is loaded, with a message naming the problem and the fix, and nothing
written. Each case is one row of the README's table "Refused before any model is loaded" (the last test keeps
the two in step)."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, compose_run
from ptq.cluster import Request
from ptq.errors import ConfigError
from ptq.lock import OutputLock
from ptq.run import error_text, prepare, run
from ptq.sweep import check_time_limit


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def model_folder(root: Path, config: str = '{"hidden_size": 64}', tensors: bytes = None) -> Path:
    folder = root / "model"
    write(folder / "config.json", config)
    if tensors is not None:
        write(folder / "model.safetensors", tensors)
    return folder


def safetensors_bytes(truncate: int = 0) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    data = struct.pack("<Q", len(header)) + header + bytes(64)
    return data[: len(data) - truncate]


def mc_file(root: Path, lines) -> Path:
    return write(root / "mc.jsonl", "".join(line + "\n" for line in lines))


GOOD_MC = json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 1})


def bench(path: Path, fmt: str = "jsonl", kind: str = "multiple_choice") -> list:
    return ["eval=local_quick", f"eval.benchmarks=[{{name: b, kind: {kind}, format: {fmt}, path: '{path}'}}]"]


# (row label as in the README, overrides builder (tmp_path -> overrides), expected message fragment)
CASES = [
    ("model.name with a path in it (`../../x`)", lambda d: ["model.name=../../../../tmp/escaped"], "names a folder"),
    ("recipe.name with a `/`", lambda d: ["recipe.name=a/b"], "names a folder"),
    ("output_dir outside output_root (e.g. `/`)", lambda d: ["output_dir=/"], "is not inside output_root"),
    ("output_dir inside the source checkpoint", lambda d: [f"model.path={model_folder(d)}", f"output_root={d}",
                                                          f"output_dir={d / 'model' / 'q'}"], "never written to"),
    ("model.path that does not exist", lambda d: [f"model.path={d / 'nope'}"], "no such folder"),
    ("model.path with a corrupt config.json", lambda d: [f"model.path={model_folder(d, '{oops')}"],
     "config.json is not valid JSON"),
    ("model.path with a safetensors header that is not an object", lambda d: [
        f"model.path={model_folder(d, tensors=struct.pack('<Q', 2) + b'[]')}"], "damaged header"),
    ("model.path with a truncated safetensors file", lambda d: [
        f"model.path={model_folder(d, tensors=safetensors_bytes(truncate=10))}"], "is truncated"),
    ("calibration file that does not exist", lambda d: [f"calib.dataset={d / 'none.txt'}"], "is not a file"),
    ("calibration file that is binary", lambda d: [f"calib.dataset={write(d / 'c.txt', bytes(range(256)) * 64)}"],
     "is not UTF-8 text"),
    ("calibration file that is empty", lambda d: [f"calib.dataset={write(d / 'c.txt', '')}"], "holds no text"),
    ("calibration file shorter than calib.size x calib.seq_len tokens", lambda d: [
        f"calib.dataset={write(d / 'c.txt', 'short text')}"], "fewer than the 8,192 tokens"),
    ("calibration JSONL line without \"text\"", lambda d: [
        f"calib.dataset={write(d / 'c.jsonl', json.dumps({'body': 'x'}) + chr(10))}"], ':1 has no "text"'),
    ("calibration JSONL line that is not JSON", lambda d: [
        f"calib.dataset={write(d / 'c.jsonl', json.dumps({'text': 'x'}) + chr(10) + '{broken' + chr(10))}"],
     ":2 is not valid JSON"),
    ("fidelity text that is binary", lambda d: [f"fidelity.text={write(d / 'f.txt', bytes(range(256)) * 64)}"],
     "is not UTF-8 text"),
    ("benchmark answer index outside the choices", lambda d: bench(mc_file(d, [
        json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 5})])), "outside the 2 choices"),
    ("benchmark JSONL line that is not JSON", lambda d: bench(mc_file(d, [GOOD_MC, "{nope"])), ":2 is not valid JSON"),
    ("benchmark item without its question", lambda d: bench(mc_file(d, [json.dumps({"choices": ["a", "b"], "answer": 0})])),
     "no 'question' field"),
    ("MMLU CSV without the expected columns", lambda d: bench(write(d / "m.csv", "q,a\nx,1\n"), fmt="mmlu_csv"),
     "needs a header"),
    ("MMLU CSV with a field beyond the CSV reader's limit", lambda d: bench(
        write(d / "m.csv", 'question,choice0,choice1,answer\n"' + "x" * 200_000 + '",a,b,0\n'), fmt="mmlu_csv"),
     "not a readable CSV"),
    ("benchmark name with a `/`", lambda d: ["eval=local_quick", f"eval.benchmarks=[{{name: a/b, kind: perplexity, "
                                                                  f"path: '{write(d / 't.txt', 'text')}'}}]"],
     "becomes a file name"),
    ("HellaSwag text whose lines are not in groups of 6", lambda d: bench(write(d / "h.txt", "ctx\n0\na\nb\n"),
                                                                          fmt="hellaswag_txt"), "not a multiple of 6"),
    ("benchmark file that does not exist", lambda d: bench(d / "missing.jsonl"), "does not exist"),
    ("output_root that is a file", lambda d: [f"output_root={write(d / 'afile', 'x')}"], "is a file, not a folder"),
    ("output_root without room for the checkpoint", lambda d: ["model.params_b=100000000"], "GiB free"),
]


@pytest.mark.parametrize("label,overrides,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_loading_and_writes_nothing(tmp_path, label, overrides, message):
    data = tmp_path / "data"
    extra = overrides(data)
    root = [] if any(o.startswith("output_root=") for o in extra) else [f"output_root={tmp_path / 'runs'}"]
    cfg, config = compose_run([*root, *extra])
    with pytest.raises(ConfigError) as refused:
        prepare(cfg)
    assert message in str(refused.value)
    assert not (tmp_path / "runs").exists()


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder(tmp_path):
    cfg, config = compose_run([f"output_root={tmp_path / 'runs'}"])
    plan = prepare(cfg)
    with OutputLock(plan.output_dir):
        with pytest.raises(ConfigError, match=r"being written by another run \(host .*, PID \d+"):
            run(cfg, config)
    assert not (plan.output_dir / "run.json").exists()


def test_a_refused_single_run_leaves_nothing_behind(tmp_path):
    """Hydra writes nothing of its own for a run: no output folder, no .hydra/, no log file."""
    proc = subprocess.run([sys.executable, "launch.py", f"output_root={tmp_path / 'runs'}", "model.name=../../x"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "names a folder" in proc.stderr
    assert not (tmp_path / "runs").exists() and not (REPO / ".hydra").exists() and not list(REPO.glob("*.log"))


def test_a_time_limit_inside_slurms_warning_margin_is_refused():
    request = Request(nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=2, mem_gb=4, timeout_min=2)
    problem = check_time_limit(request, {"signal_delay_s": 120})
    assert "hydra.launcher.timeout_min=2" in problem and "at least 4" in problem
    assert check_time_limit(Request(**{**request.as_dict(), "timeout_min": 4}), {"signal_delay_s": 120}) is None


def test_an_interrupted_run_records_what_happened():
    assert "interrupted" in error_text(KeyboardInterrupt())
    assert error_text(RuntimeError()) == "RuntimeError (no message)"


def test_a_corrupt_sweep_manifest_is_reported_not_a_traceback(tmp_path):
    write(tmp_path / "sweep.json", "{not json")
    proc = subprocess.run([sys.executable, "-m", "ptq.status", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "is not a sweep manifest" in proc.stderr and "Traceback" not in proc.stderr


def test_the_readme_lists_every_refused_input():
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Refused before any model is loaded", 1)[1].split("\n## ", 1)[0]
    rows = {re.sub(r"\s+", " ", line.split("|")[1].strip()) for line in table.splitlines() if line.startswith("| ")}
    assert {label for label, _, _ in CASES} <= rows


def test_jsonl_text_may_hold_unicode_line_separators_and_a_byte_order_mark(tmp_path):
    from ptq.textfiles import read_texts

    data = tmp_path / "c.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + (json.dumps({"text": "one\u2028two\u0085three"}, ensure_ascii=False) + "\n"
                                        + json.dumps({"text": "four"}) + "\r\n").encode("utf-8"))
    assert read_texts(data) == ["one\u2028two\u0085three", "four"]
