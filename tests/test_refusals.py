"""Bad input is refused before any model is loaded, with a message naming the problem and the fix, and nothing
written. Each case is one row of the table in docs/refusals.md "Refused before any model is loaded" (the last test keeps
the two in step)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import GGUF_FACTS, GPU_FACTS, REPO, compose_run, plan_for

from ptq.cluster import Request
from ptq.errors import ConfigError
from ptq.lock import OutputLock
from ptq.plan import checkpoint_estimate, find_gguf, gguf_shape, system_folder
from ptq.run import error_text, prepare, run
from ptq.sweep import check_time_limit


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def model_folder(
    root: Path,
    config: str = '{"hidden_size": 64}',
    tensors: bytes = None,
    tokenizer=("tokenizer.json", "tokenizer_config.json"),
) -> Path:
    folder = root / "model"
    write(folder / "config.json", config)
    for name in tokenizer:
        write(folder / name, "{}")
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


# config.json files of vision-language models, as far as planning reads them: a family the launcher knows (Gemma 3)
# and one it has no entry for.
VLM_CONFIG = '{"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "vision_config": {}}'
UNKNOWN_VLM_CONFIG = (
    '{"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3", "vision_config": {}}'
)


def with_file(folder: Path, name: str, text: str) -> Path:
    write(folder / name, text)
    return folder


def pairs_file(root: Path, image: str = "missing.png") -> Path:
    """An image-text calibration file of four pairs, all pointing at `image` (relative to the file)."""
    return write(root / "pairs.jsonl", "".join(json.dumps({"image": image, "text": f"t{i}"}) + "\n" for i in range(4)))


# (row label as in docs/refusals.md, overrides builder (tmp_path -> overrides), expected message fragment)
CASES = [
    ("model.name with a path in it (`../../x`)", lambda d: ["model.name=../../../../tmp/escaped"], "names a folder"),
    ("recipe.name with a `/`", lambda d: ["recipe.name=a/b"], "names a folder"),
    ("output_dir outside output_root (e.g. `/`)", lambda d: ["output_dir=/"], "is not inside output_root"),
    (
        "output_dir inside the source checkpoint",
        lambda d: [f"model.path={model_folder(d)}", f"output_root={d}", f"output_dir={d / 'model' / 'q'}"],
        "never written to",
    ),
    ("model.path that does not exist", lambda d: [f"model.path={d / 'nope'}"], "no such folder"),
    (
        "model.path of a vision-language model of a family the launcher has no entry for",
        lambda d: [f"model.path={model_folder(d, UNKNOWN_VLM_CONFIG)}"],
        "model_type 'idefics3' is a vision-language model the launcher has no entry for",
    ),
    (
        "model.vision_language set for a text checkpoint",
        lambda d: [f"model.path={model_folder(d)}", "model.vision_language=gemma3"],
        "has no vision_config: it is a text model",
    ),
    (
        "image-text calibration file for a text model",
        lambda d: [f"calib.dataset={pairs_file(d)}", "calib.size=4"],
        "is a text model with no vision tower",
    ),
    (
        "eval benchmark of questions about images (kind image_choice) for a text model",
        lambda d: [
            "eval=local_quick",
            f"eval.benchmarks=[{{name: pics, kind: image_choice, path: '{d / 'q.jsonl'}'}}]",
        ],
        "asks questions about images",
    ),
    (
        "image-text calibration file naming an image that does not exist",
        lambda d: [f"model.path={model_folder(d, VLM_CONFIG)}", f"calib.dataset={pairs_file(d)}", "calib.size=4"],
        ":1: image missing.png does not exist",
    ),
    (
        "image-text calibration for a vision-language checkpoint without its chat template",
        lambda d: [
            f"model.path={with_file(model_folder(d, VLM_CONFIG), 'preprocessor_config.json', '{}')}",
            f"calib.dataset={pairs_file(d, str(write(d / 'i.png', b'png')))}",
            "calib.size=4",
        ],
        "has no chat template (chat_template.jinja",
    ),
    (
        "image-text calibration file with fewer pairs than calib.size",
        lambda d: [
            f"model.path={model_folder(d, VLM_CONFIG)}",
            f"calib.dataset={pairs_file(d, str(write(d / 'i.png', b'png')))}",
            "calib.size=8",
        ],
        "holds 4 image-text pairs, fewer than calib.size=8",
    ),
    (
        "model.path with a corrupt config.json",
        lambda d: [f"model.path={model_folder(d, '{oops')}"],
        "config.json is not valid JSON",
    ),
    (
        "model.path with a safetensors header that is not an object",
        lambda d: [f"model.path={model_folder(d, tensors=struct.pack('<Q', 2) + b'[]')}"],
        "damaged header",
    ),
    (
        "model.path with a truncated safetensors file",
        lambda d: [f"model.path={model_folder(d, tensors=safetensors_bytes(truncate=10))}"],
        "is truncated",
    ),
    ("calibration file that does not exist", lambda d: [f"calib.dataset={d / 'none.txt'}"], "is not a file"),
    (
        "calibration file that is binary",
        lambda d: [f"calib.dataset={write(d / 'c.txt', bytes(range(256)) * 64)}"],
        "is not UTF-8 text",
    ),
    ("calibration file that is empty", lambda d: [f"calib.dataset={write(d / 'c.txt', '')}"], "holds no text"),
    (
        "calibration file shorter than calib.size x calib.seq_len tokens",
        lambda d: [f"calib.dataset={write(d / 'c.txt', 'short text')}", "calib.size=32", "calib.seq_len=256"],
        "fewer than the 8,192 tokens",
    ),
    (
        'calibration JSONL line without "text"',
        lambda d: [f"calib.dataset={write(d / 'c.jsonl', json.dumps({'body': 'x'}) + chr(10))}"],
        ':1 has no "text"',
    ),
    (
        "calibration JSONL line that is not JSON",
        lambda d: [f"calib.dataset={write(d / 'c.jsonl', json.dumps({'text': 'x'}) + chr(10) + '{broken' + chr(10))}"],
        ":2 is not valid JSON",
    ),
    (
        "fidelity text that is binary",
        lambda d: [f"fidelity.text={write(d / 'f.txt', bytes(range(256)) * 64)}"],
        "is not UTF-8 text",
    ),
    (
        "benchmark answer index outside the choices",
        lambda d: bench(mc_file(d, [json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 5})])),
        "outside the 2 choices",
    ),
    ("benchmark JSONL line that is not JSON", lambda d: bench(mc_file(d, [GOOD_MC, "{nope"])), ":2 is not valid JSON"),
    (
        "benchmark item without its question",
        lambda d: bench(mc_file(d, [json.dumps({"choices": ["a", "b"], "answer": 0})])),
        "no 'question' field",
    ),
    (
        "MMLU CSV without the expected columns",
        lambda d: bench(write(d / "m.csv", "q,a\nx,1\n"), fmt="mmlu_csv"),
        "needs a header",
    ),
    (
        "MMLU CSV with a field beyond the CSV reader's limit",
        lambda d: bench(
            write(d / "m.csv", 'question,choice0,choice1,answer\n"' + "x" * 200_000 + '",a,b,0\n'), fmt="mmlu_csv"
        ),
        "not a readable CSV",
    ),
    (
        "benchmark name with a `/`",
        lambda d: [
            "eval=local_quick",
            f"eval.benchmarks=[{{name: a/b, kind: perplexity, path: '{write(d / 't.txt', 'text')}'}}]",
        ],
        "becomes a file name",
    ),
    (
        "HellaSwag text whose lines are not in groups of 6",
        lambda d: bench(write(d / "h.txt", "ctx\n0\na\nb\n"), fmt="hellaswag_txt"),
        "not a multiple of 6",
    ),
    ("benchmark file that does not exist", lambda d: bench(d / "missing.jsonl"), "does not exist"),
    ("output_root that is a file", lambda d: [f"output_root={write(d / 'afile', 'x')}"], "is a file, not a folder"),
    (
        "output_root without room for the checkpoint",
        lambda d: ["model.params_b=100000000"],
        "free; this run needs about",
    ),
    (
        "output_root at the file system root (`/`)",
        lambda d: ["output_root=/"],
        "is the file system root /, which belongs to the operating system",
    ),
    (
        "output_root in a system folder (`/etc`, `/usr/...`, `/var/lib/...`)",
        lambda d: ["output_root=/etc"],
        "is the system folder /etc, which belongs to the operating system",
    ),
    (
        "cache_dir in a system folder (`/proc/...`)",
        lambda d: ["cache_dir=/proc/ptq-cache"],
        "is inside the system folder /proc",
    ),
    (
        "cache_dir that is a file",
        lambda d: [f"cache_dir={write(d / 'cfile', 'x')}"],
        "cfile is a file, not a folder; choose another cache_dir",
    ),
    # Tests run as root, which may write anywhere a permission would stop a user: a folder that cannot be created
    # under a file is the "cannot write" case that holds for root too (read-only: the test after the table).
    (
        "cache_dir that cannot be created (below a file)",
        lambda d: [f"cache_dir={write(d / 'cfile', 'x') / 'cache'}"],
        "cannot create",
    ),
    (
        "calib.seq_len beyond the positions of the default GGUF model (8192)",
        lambda d: ["calib.seq_len=10000"],
        "calib.seq_len=10000 exceeds the 8,192 positions",
    ),
    (
        "calib.seq_len beyond max_position_embeddings of a local config.json",
        lambda d: [
            f"model.path={model_folder(d, json.dumps({'hidden_size': 64, 'max_position_embeddings': 128}))}",
            "calib.seq_len=256",
        ],
        "exceeds the 128 positions",
    ),
    (
        "calib.size x calib.seq_len beyond 2^27 tokens (`calib.size=10000000`)",
        lambda d: ["calib.size=10000000"],
        "more than the 134,217,728 this launcher takes",
    ),
    (
        "model.path with config.json only (no tokenizer)",
        lambda d: [f"model.path={model_folder(d, tokenizer=())}"],
        "has no tokenizer: none of tokenizer.json, tokenizer.model",
    ),
    (
        "model.path with tokenizer_config.json but no vocabulary file",
        lambda d: [f"model.path={model_folder(d, tokenizer=('tokenizer_config.json',))}"],
        "(it has tokenizer_config.json)",
    ),
    (
        "MMLU CSV row with more fields than the header",
        lambda d: bench(
            write(d / "m.csv", 'question,choice0,choice1,answer\n"two\nlines",a,b,0\nq,a,b,0,extra\n'), fmt="mmlu_csv"
        ),
        "m.csv:4 has 5 fields, the header 4",
    ),
    (
        "MMLU CSV row with fewer fields than the header",
        lambda d: bench(write(d / "m.csv", "question,choice0,choice1,answer\nq,a,0\n"), fmt="mmlu_csv"),
        "m.csv:2 has 3 fields, the header 4",
    ),
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
    assert Path(cfg.output_dir) == Path("/") or not Path(cfg.output_dir).exists()  # e.g. nothing below /etc


def test_a_cache_dir_on_a_read_only_file_system_is_refused(tmp_path, monkeypatch):
    """As root, permissions stop nothing; a read-only file system does (os.access says so, also to root). Stood in
    for here by os.access answering no for the cache's parent folder."""
    parent = tmp_path / "ro"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != parent and real_access(path, mode))
    cfg, _ = compose_run([f"output_root={tmp_path / 'runs'}", f"cache_dir={parent / 'cache'}"])
    with pytest.raises(
        ConfigError,
        match=r"cache_dir=.*cannot write below .*ro \(read-only file system or no "
        r"permission\); choose another cache_dir",
    ):
        prepare(cfg)
    assert not (tmp_path / "runs").exists() and not (parent / "cache").exists()


@pytest.mark.parametrize(
    "path",
    [
        "/tmp/x",
        "/home/u/runs",
        "/root/runs",
        "/work/main/runs",
        "/mnt/data",
        "/scratch/u",
        "/data/runs",
        "/var/tmp/x",
        "/var/home/u",
        "/opt/ckpts",
        "/srv/x",
    ],
)
def test_user_folders_are_not_system_folders(path):
    assert system_folder(Path(path)) is None


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/etc",
        "/etc/ptq",
        "/usr/local/runs",
        "/bin",
        "/sbin",
        "/lib64/x",
        "/boot",
        "/proc/1",
        "/sys/x",
        "/dev/shm/x",
        "/var",
        "/var/lib/ptq",
        "/var/log/x",
        "/run/x",
    ],
)
def test_system_folders_are_refused(path):
    assert system_folder(Path(path))


# SmolLM2-135M's exports as measured (bench/results/algorithms-smollm2-h200/ and cpu-smollm2-sweep-intervals/:
# size.checkpoint_bytes), against the plan's estimate from params_b and the embedding parameters the GGUF file names.
MEASURED = [
    (["recipe=bf16"], 269_060_552),
    (["recipe=fp8"], 162_935_640),
    (["recipe=int8_sq"], 163_882_328),
    (["recipe=int4_awq"], 116_599_768),
    (["recipe=int4_awq", "recipe.awq_block_size=16"], 136_506_976),
    (["recipe=mxfp8", "hardware=h100"], 166_234_672),
    (["recipe=nvfp4", "hardware=h100"], 116_511_080),
    (["recipe=auto_quantize", "recipe.effective_bits=4.8", "hardware=h100"], 120_427_680),
]
SMOLLM2_EMBEDDINGS = 49152 * 576


@pytest.mark.parametrize("overrides,measured", MEASURED, ids=[" ".join(m[0]) for m in MEASURED])
def test_the_checkpoint_size_estimate_is_within_3_percent_of_smollm2s_exports(overrides, measured):
    facts = replace(GPU_FACTS, embedding_params=SMOLLM2_EMBEDDINGS)
    plan = plan_for(overrides, facts)
    size, how = checkpoint_estimate(plan.cfg, facts, plan.quantize, plan.export_quant_algo, plan.awq_block_size)
    assert abs(size / measured - 1) < 0.03, (size, measured, how)


def test_the_gguf_header_gives_positions_and_embeddings():
    cfg, _ = compose_run([])
    assert gguf_shape(find_gguf(cfg.model.gguf_package, cfg.model.gguf_file)) == {
        "max_positions": 8192,
        "embedding_params": SMOLLM2_EMBEDDINGS,
    }
    assert gguf_shape(__file__) == {}


@pytest.mark.parametrize(
    "free,refused", [(60_000_000, True), (100_000_000, True), (180_000_000, True), (200_000_000, False)]
)
def test_free_space_is_checked_against_the_estimated_checkpoint(free, refused):
    """Free space comes from Facts (gather_facts reads it), so the check is tested without filling a disk: SmolLM2's
    FP8 checkpoint is 163 MB; a 100 MB disk was let through by the old check (0.06 GiB) and died in the export."""
    facts = replace(GGUF_FACTS, embedding_params=SMOLLM2_EMBEDDINGS, output_free_bytes=free)
    if not refused:
        assert plan_for([], facts).action == "run"
        return
    with pytest.raises(ConfigError) as err:
        plan_for([], facts)
    assert f"has {free / 1e6:.1f} MB free; this run needs about 187.5 MB: a checkpoint of 163.3 MB" in str(err.value)
    assert "106.7M parameters in FP8 at 8 bits per weight, 28.3M embedding parameters in BF16" in str(err.value)
    assert plan_for(["dry_run=true"], facts).action == "run"  # a dry run does not check the room


def test_a_sweep_point_planned_for_later_does_not_check_the_room(tmp_path):
    cfg, _ = compose_run([f"output_root={tmp_path / 'runs'}", "model.params_b=100000000"])
    assert prepare(cfg, space=False).action == "run"


def test_a_calibration_far_beyond_the_hardwares_default_is_warned_about_with_its_time():
    plan = plan_for(["calib.size=4096"])
    assert any(
        "4096 x calib.seq_len=128 = 524,288 calibration tokens, 256 times the 16 x 128 hardware=cpu "
        "calibrates on by default: calibration (and sampling the text, with calib.dataset=self) takes about "
        "256 times as long" in w
        for w in plan.warnings
    ), plan.warnings
    assert plan_for(["calib.size=512"]).warnings == []


def test_a_bad_algorithm_setting_is_refused_before_the_run_takes_its_folder(tmp_path):
    """ModelOpt's config class refuses the value (imported here, as a run does); the output folder, and the
    output_root it would create, are not left behind."""
    cfg, config = compose_run(
        [f"output_root={tmp_path / 'runs'}", "recipe=int8_sq", "+recipe.algorithm_args.alpha=banana"]
    )
    with pytest.raises(ConfigError, match=r"recipe.algorithm_args=\{'alpha': 'banana'\} for smoothquant: alpha: "):
        run(cfg, config)
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
    proc = subprocess.run(
        [sys.executable, "launch.py", f"output_root={tmp_path / 'runs'}", "model.name=../../x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    proc = subprocess.run(
        [sys.executable, "-m", "ptq.status", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "is not a sweep manifest" in proc.stderr and "Traceback" not in proc.stderr


def test_the_refusals_page_lists_every_refused_input():
    page = (REPO / "docs" / "refusals.md").read_text()
    table = page.split("# Refused before any model is loaded", 1)[1]
    rows = {re.sub(r"\s+", " ", line.split("|")[1].strip()) for line in table.splitlines() if line.startswith("| ")}
    assert {label for label, _, _ in CASES} <= rows


def test_jsonl_text_may_hold_unicode_line_separators_and_a_byte_order_mark(tmp_path):
    from ptq.textfiles import read_texts

    data = tmp_path / "c.jsonl"
    data.write_bytes(
        b"\xef\xbb\xbf"
        + (
            json.dumps({"text": "one\u2028two\u0085three"}, ensure_ascii=False)
            + "\n"
            + json.dumps({"text": "four"})
            + "\r\n"
        ).encode("utf-8")
    )
    assert read_texts(data) == ["one\u2028two\u0085three", "four"]
