"""Several runs in one process (a Hydra sweep, a packed Slurm job) load the BF16 model once and
quantize copies of it (ptq/models.py), with the same results as runs that load it themselves."""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_run, load_tensors, small_run_overrides

from ptq import models
from ptq.run import run
from ptq.state import ProcessState

pytestmark = pytest.mark.slow  # real quantization, installs or Slurm jobs: minutes in all


def tiny(tmp_path, tiny_llama_dir, *extra, root="runs"):
    overrides = small_run_overrides(
        tmp_path, f"model.path={tiny_llama_dir}", "model.name=tiny-llama", "model.layer_widths=[]", *extra
    )
    # small_run_overrides puts every run under tmp_path/runs; a second root keeps the separate-load runs apart.
    return [o.replace(str(tmp_path / "runs"), str(tmp_path / root)) for o in overrides]


@pytest.fixture
def state():
    """What the runs of one process keep for each other, as launch.py passes it to every run of its process."""
    kept = ProcessState()
    yield kept
    models.clear_model_cache(kept)


def test_runs_in_one_process_load_once_and_match_separate_loads(tiny_llama_dir, tmp_path, caplog, state):
    caplog.set_level(logging.INFO, logger="ptq")
    packed = {
        recipe: run(*compose_run(tiny(tmp_path, tiny_llama_dir, f"recipe={recipe}")), state=state)
        for recipe in ("fp8", "int4_awq")
    }
    assert state.loads == {"disk": 1, "copy": 1}  # two runs, one load
    assert state.summary()["models"] == 1 and state.summary()["references"] == 1
    assert packed["fp8"]["details"]["model_load"]["from"] == "disk" and packed["fp8"]["details"]["model_load"]["kept"]
    assert packed["int4_awq"]["details"]["model_load"]["from"] == "copy"
    assert "Keeping the BF16 model for later runs" in caplog.text
    # The BF16 fidelity reference is computed once too.
    assert "Using the BF16 fidelity reference computed earlier" in caplog.text
    assert all(
        r["fidelity"]["bf16_perplexity"] == packed["fp8"]["fidelity"]["bf16_perplexity"] for r in packed.values()
    )

    # Each run's quantized copy is gone once the run is over (nothing pins it: see import_modelopt).
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some of torch's deprecated aliases warns
        warnings.simplefilter("ignore")
        assert not [o for o in gc.get_objects() if isinstance(o, torch.nn.Module) and hasattr(o, "weight_quantizer")]

    # The pristine model is untouched by quantizing the copies: no quantizers, the checkpoint's weights.
    ((pristine, _, _),) = state.models.values()
    assert not any(hasattr(m, "weight_quantizer") or hasattr(m, "input_quantizer") for m in pristine.modules())
    assert all(type(m) is torch.nn.Linear for n, m in pristine.named_modules() if n.endswith("_proj"))
    original = load_tensors(tiny_llama_dir)
    weights = pristine.state_dict()
    assert all(torch.equal(weights[name].to(torch.bfloat16), tensor) for name, tensor in original.items())

    # The same recipes with the model loaded afresh for each run give the same checkpoints and numbers.
    models.clear_model_cache(state)
    for recipe in ("fp8", "int4_awq"):
        alone = run(
            *compose_run(
                tiny(tmp_path, tiny_llama_dir, f"recipe={recipe}", "backend.reuse_loaded_model=false", root="alone")
            ),
            state=state,
        )
        assert alone["details"]["model_load"]["from"] == "disk" and not state.models
        assert alone["fidelity"] == packed[recipe]["fidelity"]
        a, b = load_tensors(Path(alone["checkpoint"])), load_tensors(Path(packed[recipe]["checkpoint"]))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), recipe


def test_switch_off_loads_every_run(tiny_llama_dir, tmp_path, state):
    for recipe in ("fp8", "int8_sq"):
        record = run(
            *compose_run(tiny(tmp_path, tiny_llama_dir, f"recipe={recipe}", "backend.reuse_loaded_model=false")),
            state=state,
        )
        assert record["status"] == "finished"
    assert state.loads["disk"] == 2 and not state.models


def test_no_copy_is_kept_when_two_do_not_fit(tiny_llama_dir, tmp_path, caplog, monkeypatch, state):
    caplog.set_level(logging.INFO, logger="ptq")
    size = sum(p.numel() * p.element_size() for p in torch.nn.Linear(1, 1).parameters())  # any small number
    monkeypatch.setattr(models, "available_bytes", lambda device: size)
    for recipe in ("fp8", "int8_sq"):
        record = run(*compose_run(tiny(tmp_path, tiny_llama_dir, f"recipe={recipe}")), state=state)
        assert record["details"]["model_load"]["from"] == "disk" and not record["details"]["model_load"]["kept"]
    assert state.loads["disk"] == 2 and not state.models
    assert "Not keeping the BF16 model" in caplog.text and "each run loads it afresh" in caplog.text


def test_a_hydra_sweep_loads_the_model_once(tiny_llama_dir, tmp_path):
    """`launch.py -m`: Hydra's basic launcher runs the points in one process, so the second point gets a copy."""
    proc = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "-m",
            "recipe=fp8,int8_sq",
            *tiny(tmp_path, tiny_llama_dir),
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("Keeping the BF16 model for later runs") == 1
    assert output.count("Using a copy of the BF16 model loaded earlier") == 1
    loads = {}
    for recipe in ("fp8", "int8_sq"):
        record = json.loads((tmp_path / "runs" / "tiny-llama" / f"{recipe}-kv_none-calib4x64" / "run.json").read_text())
        assert record["status"] == "finished"
        loads[recipe] = record["details"]["model_load"]["from"]
    assert loads == {"fp8": "disk", "int8_sq": "copy"}


def test_a_single_launch_keeps_no_second_copy(tiny_llama_dir, tmp_path):
    """`launch.py` without -m runs one point: no later run could use a kept copy, so its memory goes to the run."""
    proc = subprocess.run(
        [sys.executable, "launch.py", "recipe=fp8", *tiny(tmp_path, tiny_llama_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Keeping the BF16 model for later runs" not in proc.stdout + proc.stderr
    record = json.loads((tmp_path / "runs" / "tiny-llama" / "fp8-kv_none-calib4x64" / "run.json").read_text())
    assert record["status"] == "finished"
    assert record["details"]["model_load"]["from"] == "disk" and not record["details"]["model_load"]["kept"]
