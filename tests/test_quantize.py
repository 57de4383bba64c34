"""Real ModelOpt quantization and export on the CPU: a tiny Llama built from a config, and SmolLM2."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TEST_CACHE, compose_run, load_tensors, small_run_overrides

from ptq.errors import ConfigError
from ptq.run import run
from ptq.run_record import RECORD_VERSION

pytestmark = pytest.mark.slow  # real quantization, installs or Slurm jobs: minutes in all


# What each recipe's export must hold for a quantized linear layer: weight dtype and quant_algo.
EXPORT = {
    "fp8": (torch.float8_e4m3fn, "FP8"),
    "int8_sq": (torch.int8, "W8A8_SQ_PER_CHANNEL"),
    "int4_awq": (torch.uint8, "W4A16_AWQ"),
    "w4a8_awq": (torch.uint8, "W4A8_AWQ"),
}
CPU_RECIPES = list(EXPORT)


def check_export(record: dict, recipe: str, layer: str, out_features: int, in_features: int, block: int | None):
    assert record["status"] == "finished", record.get("error")
    assert record["validation"]["passed"], record["validation"]["problems"]
    checkpoint = Path(record["checkpoint"])
    assert not (checkpoint.parent / "checkpoint.partial").exists()
    dtype, algo = EXPORT[recipe]
    quant = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == algo
    assert "lm_head" in quant["exclude_modules"]
    assert json.loads((checkpoint / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    tensors = load_tensors(checkpoint)
    weight, scale = tensors[f"{layer}.weight"], tensors[f"{layer}.weight_scale"]
    assert weight.dtype == dtype
    if block:  # int4 packs two values per byte (along the output dim); one scale per block of inputs
        assert list(weight.shape) == [out_features // 2, in_features]
        assert list(scale.shape) == [out_features, in_features // block]
    else:
        assert list(weight.shape) == [out_features, in_features]
    # Unquantized tensors are written in BF16, whatever the compute dtype was.
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert (checkpoint / "tokenizer.json").exists()
    fid = record["fidelity"]
    assert fid["tokens"] > 0 and fid["mean_kl"] > 0 and 0 < fid["top1_agreement"] < 1
    # The checkpoint as written is checked (fidelity.exported_check=weights, the default): its stored weights
    # against the source's, or, for smoothed exports (AWQ, SmoothQuant), read back from disk and scored like the
    # model measured in memory.
    written = fid["exported_checkpoint"]
    if written["check"] == "stored weights":
        assert (
            written["applicable"] and written["problems"] == [] and written["layers"] == record["layers"]["quantized"]
        )
        assert all(0 < error < 0.1 for error in written["max_relative_error"].values())
    else:
        assert written["check"] == "full read-back" and "fallback_reason" in written
        assert written["simulated"]["formats"] == {algo: record["layers"]["quantized"]}
        assert 0 < written["mean_kl"] <= 1.5 * fid["mean_kl"] + 0.005
    assert record["size"]["checkpoint_bytes"] < record["size"]["bf16_bytes"]
    assert set(record["timings_s"]) >= {"load", "calibrate", "export", "validate"}
    assert record["versions"]["nvidia-modelopt"] == "0.47.0"
    assert record["record_version"] == RECORD_VERSION


@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_tiny_llama_quantizes_and_exports(recipe, tiny_llama_dir, tmp_path):
    cfg, config = compose_run(
        small_run_overrides(
            tmp_path,
            f"recipe={recipe}",
            f"model.path={tiny_llama_dir}",
            "model.name=tiny-llama",
            "model.layer_widths=[]",
        )
    )
    record = run(cfg, config)
    assert record["details"]["awq_block_size"] == (128 if "awq" in recipe else None)
    check_export(record, recipe, "model.layers.1.mlp.down_proj", 128, 384, record["details"]["awq_block_size"])
    assert record["layers"]["quantized"] == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers


def test_fp8_weights_dequantize_to_the_originals(tiny_llama_dir, tmp_path):
    cfg, config = compose_run(
        small_run_overrides(
            tmp_path, "recipe=fp8", f"model.path={tiny_llama_dir}", "model.name=tiny-llama", "model.layer_widths=[]"
        )
    )
    record = run(cfg, config)
    exported = load_tensors(Path(record["checkpoint"]))
    original = load_tensors(tiny_llama_dir)
    name = "model.layers.0.self_attn.q_proj"
    restored = exported[f"{name}.weight"].float() * exported[f"{name}.weight_scale"].float()
    reference = original[f"{name}.weight"].float()
    rel_err = (restored - reference).norm() / reference.norm()
    assert rel_err < 0.05  # FP8 E4M3 keeps ~3 mantissa bits: a few percent at most
    assert rel_err > 0  # and it really was quantized


@pytest.mark.parametrize("recipe", CPU_RECIPES)
def test_smollm2_quantizes_and_exports(recipe, smollm2_dir, tmp_path):
    cfg, config = compose_run(small_run_overrides(tmp_path, f"recipe={recipe}"))
    record = run(cfg, config)
    block = 64 if "awq" in recipe else None  # 128 does not divide SmolLM2's width 576
    check_export(record, recipe, "model.layers.29.mlp.down_proj", 576, 1536, block)
    assert record["layers"]["quantized"] == 30 * 7
    assert record["layers"]["unexpected_bf16"] == []
    assert record["fidelity"]["bf16_perplexity"] < 200  # a real pretrained model, not random weights


def test_bf16_recipe_and_fp8_kv_cache(smollm2_dir, tmp_path):
    cfg, config = compose_run(small_run_overrides(tmp_path, "recipe=bf16"))
    baseline = run(cfg, config)
    assert baseline["status"] == "finished" and baseline["fidelity"]["mean_kl"] == 0
    assert not (Path(baseline["checkpoint"]) / "hf_quant_config.json").exists()
    assert baseline["size"]["compression"] == pytest.approx(1.0, abs=0.01)

    cfg, config = compose_run(small_run_overrides(tmp_path, "recipe=fp8", "recipe.kv_cache=fp8"))
    record = run(cfg, config)
    assert record["validation"]["kv_cache_quant_algo"] == "FP8"
    tensors = load_tensors(Path(record["checkpoint"]))
    assert "model.layers.0.self_attn.k_scale" in tensors or "model.layers.0.self_attn.k_proj.k_scale" in tensors


def test_finished_run_is_skipped_and_overwrite_reruns(tiny_llama_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ptq")
    overrides = small_run_overrides(
        tmp_path, "recipe=fp8", f"model.path={tiny_llama_dir}", "model.name=tiny-llama", "model.layer_widths=[]"
    )
    first = run(*compose_run(overrides))
    again = run(*compose_run(overrides))
    assert again["finished_at"] == first["finished_at"]
    assert "skipping it" in caplog.text
    rerun = run(*compose_run(overrides + ["overwrite=true"]))
    assert rerun["started_at"] >= first["finished_at"] and rerun["status"] == "finished"
    assert Path(rerun["checkpoint"], "model.safetensors").exists()


def test_failure_mid_run_leaves_a_failed_record_and_no_finished_checkpoint(tiny_llama_dir, tmp_path):
    # The config claims widths an AWQ block of 128 divides, but the real layers are 128 and 384:
    # 256 does not divide them, so the check on the loaded model fails before calibration.
    overrides = small_run_overrides(
        tmp_path,
        "recipe=int4_awq",
        f"model.path={tiny_llama_dir}",
        "model.name=tiny-llama",
        "model.layer_widths=[256]",
        "recipe.awq_block_size=256",
    )
    with pytest.raises(ConfigError, match="does not divide the input width"):
        run(*compose_run(overrides))
    out = next((tmp_path / "runs" / "tiny-llama").iterdir())
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and "does not divide" in record["error"]
    assert not (out / "checkpoint").exists() and not (out / "checkpoint.partial").exists()
    assert "calibrate" not in record["timings_s"]


def test_source_checkpoint_is_untouched(tiny_llama_dir, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_llama_dir.iterdir()}
    run(
        *compose_run(
            small_run_overrides(
                tmp_path,
                "recipe=int8_sq",
                f"model.path={tiny_llama_dir}",
                "model.name=tiny-llama",
                "model.layer_widths=[]",
            )
        )
    )
    assert {p.name: p.stat().st_mtime_ns for p in tiny_llama_dir.iterdir()} == before


def test_launch_py_runs_end_to_end_with_self_sampled_calibration(smollm2_dir, tmp_path):
    """The README's main command, shrunk: offline default data (text the model samples itself)."""
    proc = subprocess.run(
        [
            sys.executable,
            "launch.py",
            f"output_root={tmp_path / 'runs'}",
            f"cache_dir={TEST_CACHE}",
            "calib.size=4",
            "calib.seq_len=32",
            "fidelity.samples=2",
            "fidelity.seq_len=32",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "runs" / "smollm2-135m" / "fp8-kv_none-calib4x32" / "run.json").read_text())
    assert record["status"] == "finished" and record["config"]["calib"]["dataset"] == "self"
    assert "calibrating fp8" in proc.stderr  # progress bar
    run_dir = tmp_path / "runs" / "smollm2-135m" / "fp8-kv_none-calib4x32"
    assert (run_dir / "hydra" / "config.yaml").is_file() and "Quantized" in (run_dir / "run.log").read_text()
    assert not (run_dir / "run.lock").exists()  # released at the end


def test_sweep_finishes_the_points_that_can_run(tiny_llama_dir, tmp_path):
    """Hydra multirun: an impossible point (nvfp4 on the CPU) is refused and the others still run."""
    proc = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "-m",
            "recipe=nvfp4,fp8",
            *small_run_overrides(tmp_path),
            f"model.path={tiny_llama_dir}",
            "model.name=tiny-llama",
            "model.layer_widths=[]",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr  # Hydra's job log goes to stdout in a sweep
    assert "recipe=nvfp4" in output and "CUDA" in output
    fp8 = json.loads((tmp_path / "runs" / "tiny-llama" / "fp8-kv_none-calib4x64" / "run.json").read_text())
    assert fp8["status"] == "finished"
    # The refused point leaves a failed record with the reason (the results table lists it) and no checkpoint.
    nvfp4_dir = tmp_path / "runs" / "tiny-llama" / "nvfp4-kv_none-calib4x64"
    refused = json.loads((nvfp4_dir / "run.json").read_text())
    assert refused["status"] == "failed" and refused["error"].startswith("refused: ") and "CUDA" in refused["error"]
    assert sorted(p.name for p in nvfp4_dir.iterdir()) == ["run.json"]
    # The sweep folder: a manifest that `python -m ptq.status` follows, and no empty per-point folders.
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml", "sweep.json"]
    status = subprocess.run(
        [sys.executable, "-m", "ptq.status", str(sweep), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    states = {row["point"]: row["state"] for row in json.loads(status.stdout)}
    assert states == {"recipe=nvfp4": "failed", "recipe=fp8": "finished"}
