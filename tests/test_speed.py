"""What keeps the launcher's own costs small (bench/results/ measures them): caches that must hit when they
should and miss when the input changes."""

from __future__ import annotations

import sys

import torch
from conftest import WIKITEXT

from ptq import calib_data
from ptq.backends.base import use_extension_cache


def test_the_extension_build_cache_is_keyed_and_kept_under_cache_dir(tmp_path):
    """ModelOpt's kernels are built into cache_dir (shared by the jobs of a sweep), in a folder per torch, CUDA,
    GPU architecture and Python; a TORCH_EXTENSIONS_DIR the user set wins."""
    env = {}
    folder = use_extension_cache(str(tmp_path / "cache"), env)
    assert env["TORCH_EXTENSIONS_DIR"] == folder and folder.startswith(str(tmp_path / "cache" / "torch_extensions"))
    assert f"torch{torch.__version__.split('+')[0]}" in folder
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in folder
    assert use_extension_cache(str(tmp_path / "other"), {"TORCH_EXTENSIONS_DIR": "/mine"}) == "/mine"


def test_each_cuda_architecture_list_builds_in_a_folder_of_its_own(tmp_path):
    """The compile command depends on TORCH_CUDA_ARCH_LIST: processes that differ in it must not share a build
    folder (ninja rebuilt the extensions whenever the command changed), and processes that agree must."""
    cache = str(tmp_path / "cache")
    plain = use_extension_cache(cache, {"TORCH_CUDA_ARCH_LIST": "9.0"})
    assert use_extension_cache(cache, {"TORCH_CUDA_ARCH_LIST": "9.0"}) == plain
    ptx = use_extension_cache(cache, {"TORCH_CUDA_ARCH_LIST": "9.0+PTX"})
    several = use_extension_cache(cache, {"TORCH_CUDA_ARCH_LIST": "8.0;9.0 10.0"})
    assert len({plain, ptx, several}) == 3 and "arch9.0+PTX" in ptx and "arch8.0_9.0_10.0" in several
    env = {}
    unset = use_extension_cache(cache, env)
    if torch.cuda.is_available():  # set to the GPU's own architecture, as ModelOpt would, before anything builds
        major, minor = torch.cuda.get_device_capability()
        assert env["TORCH_CUDA_ARCH_LIST"] == f"{major}.{minor}" and unset == use_extension_cache(
            cache, {"TORCH_CUDA_ARCH_LIST": f"{major}.{minor}"}
        )
    else:
        assert "TORCH_CUDA_ARCH_LIST" not in env and unset.endswith(
            f"-archdefault-py{sys.version_info.major}{sys.version_info.minor}"
        )


def test_a_text_file_is_tokenized_once_then_read_from_memory_or_disk(tmp_path, smollm2_dir, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tmp_path / "calib.txt"
    text.write_text(
        (WIKITEXT.read_text(encoding="utf-8")[:200_000] if WIKITEXT.is_file() else "some words here. " * 20_000)
    )
    calls = []
    real = calib_data.tokens_from_texts
    monkeypatch.setattr(calib_data, "tokens_from_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    memo = {}  # a ProcessState's tokens
    args = dict(
        tokenizer=tokenizer,
        model_id=str(smollm2_dir),
        samples=8,
        seq_len=64,
        cache_dir=str(tmp_path / "cache"),
        memo=memo,
    )
    first = calib_data.file_tokens(text, **args)
    assert calib_data.file_tokens(text, **args) is first and len(calls) == 1  # same process: memory
    memo.clear()
    assert torch.equal(calib_data.file_tokens(text, **args), first) and len(calls) == 1  # another process: disk
    assert len(list((tmp_path / "cache" / "text").glob("file-*.pt"))) == 1
    text.write_text("other words. " * 20_000)  # a new version of the file (another size) is tokenized again
    second = calib_data.file_tokens(text, **args)
    assert len(calls) == 2 and not torch.equal(second, first)


def test_cpu_threads_follow_affinity_and_slurm_unless_the_user_set_them():
    from ptq.backends.base import cpu_threads

    assert cpu_threads({}, affinity=2) == 2
    assert cpu_threads({"SLURM_CPUS_PER_TASK": "1"}, affinity=16) == 1
    assert cpu_threads({"SLURM_CPUS_PER_TASK": "64"}, affinity=4) == 4  # never more than the process may use
    assert cpu_threads({"SLURM_CPUS_PER_TASK": ""}, affinity=3) == 3
    assert cpu_threads({"OMP_NUM_THREADS": "8", "SLURM_CPUS_PER_TASK": "1"}, affinity=2) is None
