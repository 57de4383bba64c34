"""Mixture-of-Experts and hybrid Mamba-MoE models: layer kinds, recipe promises, expert coverage, and real
ModelOpt quantization of tiny random-weight NemotronH (Nemotron 3 Nano's layer kinds) and Qwen3-MoE models."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import compose_run, load_tensors, plan_for, small_run_overrides

from ptq import layerkinds
from ptq.errors import ConfigError
from ptq.moe import coverage, warning
from ptq.run_record import RunRecord
from ptq.validate import exclude_problems, export_names, repair_exclude_modules


def entry(dtype, *shape):
    return {"dtype": dtype, "shape": list(shape)}


# A checkpoint index shaped like a NemotronH export: Mamba layer 0, MoE layer 1 with 2 routed experts in NVFP4,
# attention layer 2 in BF16.
INDEX = {
    "backbone.embeddings.weight": entry("BF16", 64, 8),
    "backbone.layers.0.mixer.in_proj.weight": entry("BF16", 40, 8),
    "backbone.layers.0.mixer.out_proj.weight": entry("BF16", 8, 16),
    "backbone.layers.0.mixer.conv1d.weight": entry("BF16", 24, 1, 4),
    "backbone.layers.0.mixer.A_log": entry("BF16", 2),
    "backbone.layers.0.norm.weight": entry("BF16", 8),
    "backbone.layers.1.mixer.gate.weight": entry("BF16", 2, 8),
    "backbone.layers.1.mixer.experts.0.up_proj.weight": entry("U8", 16, 4),
    "backbone.layers.1.mixer.experts.0.up_proj.weight_scale": entry("F8_E4M3", 16, 1),
    "backbone.layers.1.mixer.experts.0.up_proj.weight_scale_2": entry("F32"),
    "backbone.layers.1.mixer.experts.1.up_proj.weight": entry("U8", 16, 4),
    "backbone.layers.1.mixer.experts.1.up_proj.weight_scale": entry("F8_E4M3", 16, 1),
    "backbone.layers.1.mixer.experts.1.up_proj.weight_scale_2": entry("F32"),
    "backbone.layers.1.mixer.shared_experts.up_proj.weight": entry("F8_E4M3", 16, 8),
    "backbone.layers.1.mixer.shared_experts.up_proj.weight_scale": entry("F32"),
    "backbone.layers.2.mixer.q_proj.weight": entry("BF16", 8, 8),
    "lm_head.weight": entry("BF16", 64, 8),
}


def test_layer_kinds_summarize_formats_parameters_and_experts():
    summary = layerkinds.summarize(INDEX)
    kinds = summary["kinds"]
    assert list(kinds) == [
        "routed_expert",
        "shared_expert",
        "router",
        "mamba_in_proj",
        "mamba_out_proj",
        "mamba_conv1d",
        "attention",
        "embedding",
        "lm_head",
    ]
    # Two 4-bit codes per stored byte: 16 x 4 bytes hold a 16 x 8 weight.
    assert kinds["routed_expert"] == {"NVFP4": {"layers": 2, "params": 2 * 16 * 8}}
    assert kinds["shared_expert"] == {"FP8": {"layers": 1, "params": 128}}
    assert kinds["mamba_conv1d"] == {"BF16": {"layers": 1, "params": 96}}
    assert summary["experts"] == {"backbone.layers.1.mixer.experts": 2}
    assert summary["params"] == sum(cell["params"] for formats in kinds.values() for cell in formats.values())


def test_promises_are_checked_per_kind_and_experts_per_layer():
    summary = layerkinds.summarize(INDEX)
    conservative = {
        "routed_expert": "quantized",
        "shared_expert": "quantized",
        "mamba_in_proj": "bf16",
        "attention": "bf16",
        "lm_head": "bf16",
    }
    assert layerkinds.promise_problems(summary, conservative, expected_experts=2) == []
    aggressive = dict(conservative, mamba_in_proj="quantized")
    [problem] = layerkinds.promise_problems(summary, aggressive, expected_experts=2)
    assert problem.startswith("mamba_in_proj layers should be quantized but 1 in BF16")
    # A model with 4 experts per layer whose export holds 2.
    [problem] = layerkinds.promise_problems(summary, conservative, expected_experts=4)
    assert "1 MoE layers do not hold all 4 routed experts" in problem
    # The router stays BF16 under every recipe, promised or not.
    quantized_router = dict(INDEX, **{"backbone.layers.1.mixer.gate.weight": entry("F8_E4M3", 2, 8)})
    [problem] = layerkinds.promise_problems(layerkinds.summarize(quantized_router), {}, None)
    assert problem.startswith("router layers should be left in BF16")


def test_export_names_follow_the_checkpoints_top_level_name():
    names = export_names(["model.layers.1.mixer.experts.0.up_proj", "model.layers.9.mixer.in_proj", "lm_head"], INDEX)
    assert names == ["backbone.layers.1.mixer.experts.0.up_proj", "model.layers.9.mixer.in_proj", "lm_head"]


def test_exclude_modules_with_modelopts_name_marker_are_repaired(tmp_path):
    marker = "\x00backbone.pt_name_sentinel"
    broken = [f"lm_head.{marker}", f"backbone.layers.0.{marker}*", f"backbone.layers.1.mixer.gate.{marker}"]
    (tmp_path / "hf_quant_config.json").write_text(
        json.dumps({"quantization": {"quant_algo": "FP8", "exclude_modules": broken}})
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "modelopt", "exclude_modules": broken}})
    )
    (tmp_path / "config.json").chmod(0o640)
    index = {k: v for k, v in INDEX.items() if "layers.2" not in k and "experts" not in k and "shared" not in k}
    problems = exclude_problems(broken, index)
    assert "3 of 3 exclude_modules entries in hf_quant_config.json are not module names" in problems[0]
    # None of the BF16 layers is named by a broken entry.
    assert problems[1].startswith(
        "4 layers are stored in BF16 but hf_quant_config.json's exclude_modules does not name them"
    )

    assert repair_exclude_modules(tmp_path) == broken
    fixed = ["lm_head", "backbone.layers.0.*", "backbone.layers.1.mixer.gate"]
    assert json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"] == fixed
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["exclude_modules"] == fixed
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o640
    assert exclude_problems(fixed, index) == []
    assert repair_exclude_modules(tmp_path) == []


def test_coverage_names_experts_without_tokens_and_the_size_that_covers_them():
    counts = {"model.layers.1.mlp": [0, 40, 30, 2], "model.layers.3.mlp": [20, 20, 20, 12]}
    summary = coverage(counts, {"model.layers.1.mlp": 2, "model.layers.3.mlp": 2}, tokens=36, samples=4, min_tokens=8)
    assert summary["uncovered"] == ["model.layers.1.mlp.experts.0"]
    assert summary["few_tokens"] == ["model.layers.1.mlp.experts.3"]
    assert summary["tokens_per_expert"] == {"min": 0, "median": 20, "max": 40}
    # The expert with none counts as half a token in 36: 8 tokens need 576 tokens, 16x the 4 samples.
    assert summary["suggested_calib_size"] == 64
    text = warning(summary, calib_size=4)
    assert "1 routed experts received no calibration tokens and 1 fewer than 8" in text
    assert "model.layers.1.mlp.experts.0" in text and "calib.size=64 (now 4)" in text
    assert warning(coverage({"l": [9, 9]}, {"l": 1}, tokens=18, samples=1, min_tokens=8), 1) is None


def test_a_promise_for_an_unknown_kind_is_refused_before_loading():
    with pytest.raises(ConfigError, match="recipe.layer_kinds names 'mamba_inproj', not a layer kind"):
        plan_for(["recipe=mamba_moe_fp8_conservative", "+recipe.layer_kinds.mamba_inproj=bf16"])
    with pytest.raises(ConfigError, match=r"recipe.layer_kinds.attention='fp8'; use quantized or bf16"):
        plan_for(["recipe=fp8", "recipe.layer_kinds.attention=fp8"])


def test_the_moe_recipes_promise_what_conservative_and_aggressive_mean():
    conservative, _ = compose_run(["recipe=mamba_moe_nvfp4_conservative"])
    aggressive, _ = compose_run(["recipe=mamba_moe_fp8_aggressive"])
    assert conservative.recipe.layer_kinds["mamba_in_proj"] == "bf16"
    assert aggressive.recipe.layer_kinds["mamba_in_proj"] == "quantized"
    assert all(
        r.recipe.layer_kinds[k] == "quantized"
        for r in (conservative, aggressive)
        for k in ("routed_expert", "shared_expert")
    )


# --- real ModelOpt quantization of tiny random-weight MoE models on the CPU -----------------------------------


def nemotron_overrides(tmp_path, model_dir, recipe, *extra):
    return small_run_overrides(
        tmp_path,
        "model=nemotron-3-nano-30b-a3b",
        f"model.path={model_dir}",
        "model.name=nemotron-tiny",
        "model.hf_id=null",
        f"recipe={recipe}",
        *extra,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe,mamba_format", [("mamba_moe_fp8_conservative", "BF16"), ("mamba_moe_fp8_aggressive", "FP8"), ("fp8", "FP8")]
)
def test_nemotron_moe_quantizes_exports_and_validates_per_kind(recipe, mamba_format, nemotron_tiny_dir, tmp_path):
    from ptq.run import run

    record = run(*compose_run(nemotron_overrides(tmp_path, nemotron_tiny_dir, recipe)))
    assert record["status"] == "finished", record.get("error")
    validation = record["validation"]
    assert validation["passed"], validation["problems"]
    kinds = validation["layer_kinds"]["kinds"]
    # Every one of the 16 routed experts of each of the 3 MoE layers, both projections, in FP8 with its own scale.
    assert kinds["routed_expert"] == {"FP8": {"layers": 3 * 16 * 2, "params": 3 * 16 * 2 * 256 * 128}}
    assert set(validation["layer_kinds"]["experts"].values()) == {16}
    assert set(kinds["shared_expert"]) == {"FP8"}
    assert set(kinds["mamba_in_proj"]) == set(kinds["mamba_out_proj"]) == {mamba_format}
    assert set(kinds["attention"]) == ({"BF16"} if recipe.startswith("mamba_moe") else {"FP8"})
    assert set(kinds["router"]) == set(kinds["mamba_conv1d"]) == set(kinds["lm_head"]) == {"BF16"}
    checkpoint = Path(record["checkpoint"])
    tensors = load_tensors(
        checkpoint, [f"backbone.layers.4.mixer.experts.{i}.down_proj.weight_scale" for i in range(16)]
    )
    assert len({float(t) for t in tensors.values()}) > 1  # each expert's own weight scale
    # ModelOpt's export writes NemotronH's exclude_modules with its name marker attached; the launcher repairs them.
    exclude = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert "lm_head" in exclude and all("\x00" not in e for e in exclude)
    assert record["details"]["exclude_modules_repaired"]
    # The checkpoint as written: every quantized layer's stored weight dequantizes to the source's.
    written = record["fidelity"]["exported_checkpoint"]
    assert written["problems"] == [] and written["layers"] == record["layers"]["quantized"]
    coverage_record = record["details"]["expert_coverage"]
    assert coverage_record["moe_layers"] == 3 and coverage_record["experts"] == 48
    assert sum(map(sum, coverage_record["counts"].values())) == 3 * 2 * 4 * 64  # layers x top_k x tokens
    # The Mamba layers' path is recorded (the CPU: transformers' PyTorch path, whatever is installed).
    assert record["details"]["mamba"]["path"] == "PyTorch" and record["details"]["mamba"]["use_mamba_kernels"] is False


@pytest.mark.slow
def test_an_expert_that_gets_no_calibration_tokens_is_reported(nemotron_tiny_dir, tmp_path, caplog):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ptq.run import run

    # The router of layer 1 can never pick expert 3: its score correction bias is far below any sigmoid score.
    model = AutoModelForCausalLM.from_pretrained(nemotron_tiny_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mixer.gate.e_score_correction_bias[3] = -100.0
    starved = tmp_path / "starved"
    model.save_pretrained(starved)
    AutoTokenizer.from_pretrained(nemotron_tiny_dir).save_pretrained(starved)

    with caplog.at_level(logging.WARNING):
        record = run(*compose_run(nemotron_overrides(tmp_path, starved, "mamba_moe_fp8_conservative")))
    assert record["status"] == "finished", record.get("error")
    summary = record["details"]["expert_coverage"]
    assert "model.layers.1.mixer.experts.3" in summary["uncovered"]
    assert summary["counts"]["model.layers.1.mixer"][3] == 0
    assert summary["suggested_calib_size"] > 4
    assert any(
        "model.layers.1.mixer.experts.3" in r.getMessage() and "received no calibration tokens" in r.getMessage()
        for r in caplog.records
    )
    # Its weight scale still comes from its own weights, and the checkpoint validates.
    assert record["validation"]["passed"], record["validation"]["problems"]
    scale = load_tensors(Path(record["checkpoint"]), ["backbone.layers.1.mixer.experts.3.up_proj.weight_scale"])
    assert float(next(iter(scale.values()))) > 0


@pytest.mark.slow
def test_qwen3_moe_gated_experts_export_per_expert(qwen3_moe_tiny_dir, tmp_path):
    from ptq.run import run

    overrides = small_run_overrides(
        tmp_path,
        "model=qwen3-30b-a3b",
        f"model.path={qwen3_moe_tiny_dir}",
        "model.name=qwen3-moe-tiny",
        "model.hf_id=null",
        "model.layer_widths=[]",
        "recipe=fp8",
    )
    record = run(*compose_run(overrides))
    assert record["status"] == "finished", record.get("error")
    assert record["validation"]["passed"], record["validation"]["problems"]
    kinds = record["validation"]["layer_kinds"]["kinds"]
    # gate_up_proj is split on export: gate, up and down projections for each of 16 experts in 3 layers.
    assert kinds["routed_expert"]["FP8"]["layers"] == 3 * 16 * 3
    assert kinds["router"] == {"BF16": {"layers": 3, "params": 3 * 16 * 256}}
    assert not record["details"].get("exclude_modules_repaired") and "mamba" not in record["details"]
    names = load_tensors(Path(record["checkpoint"]), ["model.layers.2.mlp.experts.15.gate_proj.weight"])
    assert str(next(iter(names.values())).dtype) == "torch.float8_e4m3fn"


def test_tiny_shapes_keep_the_published_layer_kinds():
    from bench.random_checkpoint import MOE_SHAPES, NANO_PATTERN, moe_config

    nano = moe_config("nemotron3-nano-30b-a3b")
    assert NANO_PATTERN.count("M") == 23 and NANO_PATTERN.count("E") == 23 and NANO_PATTERN.count("*") == 6
    assert (nano.n_routed_experts, nano.num_experts_per_tok, nano.hidden_size) == (128, 6, 2688)
    tiny = moe_config("nemotron3-nano-tiny")
    assert set(tiny.layers_block_type) == set(nano.layers_block_type) and tiny.use_mamba_kernels is False
    assert MOE_SHAPES["qwen3-30b-a3b"][1]["num_experts"] == 128


def test_report_shows_layer_kinds_per_variant():
    import pandas as pd

    from ptq.report.render import layer_kind_table
    from ptq.report.tables import _layer_kinds

    def record(quantized_mamba: bool) -> RunRecord:
        index = dict(INDEX)
        if quantized_mamba:
            index["backbone.layers.0.mixer.in_proj.weight"] = entry("F8_E4M3", 40, 8)
        return RunRecord("nano", "fp8", sections={"validation": {"layer_kinds": layerkinds.summarize(index)}})

    dense = RunRecord(
        "llama",
        "fp8",
        sections={
            "validation": {
                "layer_kinds": layerkinds.summarize({"model.layers.0.mlp.up_proj.weight": entry("F8_E4M3", 8, 8)})
            }
        },
    )
    kept = pd.DataFrame(
        {
            "index": [0, 1, 2],
            "model": ["nano", "nano", "llama"],
            "variant": ["conservative@256", "aggressive@256", "fp8@256"],
        }
    )
    rows = _layer_kinds([record(False), record(True), dense], kept)
    assert set(rows["model"]) == {"nano"}  # a dense model gets no layer-kind table
    table = layer_kind_table(rows, "nano").set_index("layer kind")
    total = layerkinds.summarize(INDEX)["params"]
    assert table.loc["mamba_in_proj", "conservative@256"] == f"BF16 1 ({100 * 320 / total:.1f}%)"
    assert table.loc["mamba_in_proj", "aggressive@256"].startswith("FP8 1 (")
    assert table.loc["routed_expert", "aggressive@256"].startswith("NVFP4 2 (")


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model=llama3.2-1b", "model.mamba_kernels=true"], "model=llama3.2-1b has none"),
        (
            ["model=nemotron-3-nano-30b-a3b", "backend=megatron_bridge", "hardware=h200", "model.mamba_kernels=false"],
            "always run mamba-ssm's kernels",
        ),
        (["model=nemotron-3-nano-30b-a3b", "hardware=cpu", "model.mamba_kernels=true"], "run on CUDA GPUs"),
    ],
)
def test_a_mamba_kernel_choice_that_cannot_apply_is_refused_when_planning(overrides, needle):
    from conftest import GPU_FACTS

    with pytest.raises(ConfigError, match=needle):
        plan_for(["calib.dataset=cnn_dailymail", *overrides], GPU_FACTS)
    # Unset (as the checkpoint says) plans everywhere.
    plan_for(["calib.dataset=cnn_dailymail", *overrides[:-1]], GPU_FACTS)


def test_mamba_kernels_asked_for_but_not_importable_are_named_before_loading(monkeypatch):
    """Whether mamba-ssm and causal-conv1d import is made false here (CUDA builds may or may not be installed)."""
    import importlib.util

    from ptq.inputs import check_mamba_packages

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("mamba_ssm", "causal_conv1d") else real(name, *a)
    )
    cfg, _ = compose_run(["model=nemotron-3-nano-30b-a3b", "hardware=h200", "model.mamba_kernels=true"])
    with pytest.raises(ConfigError, match=r"mamba-ssm, causal-conv1d cannot be imported here.*scripts/mamba-wheels.sh"):
        check_mamba_packages(cfg)
    cfg, _ = compose_run(["model=nemotron-3-nano-30b-a3b", "hardware=h200"])
    check_mamba_packages(cfg)  # not asked for: nothing to check


def test_the_mamba_path_is_read_from_the_config_the_packages_and_the_device(monkeypatch):
    import ptq.models
    from bench.random_checkpoint import build_model

    model = build_model("nemotron3-nano-tiny", "cpu")
    assert ptq.models.mamba_path(model)["path"] == "PyTorch"
    monkeypatch.setattr(ptq.models, "installed_version", lambda name: "9.9")
    model.config.use_mamba_kernels = True
    # Both packages "installed" and the config asking for them: still PyTorch, as transformers built the layers
    # without the kernels and the model is on the CPU.
    assert ptq.models.mamba_path(model) == {
        "path": "PyTorch",
        "how": "read from transformers' modeling module",
        "use_mamba_kernels": True,
        "mamba-ssm": "9.9",
        "causal-conv1d": "9.9",
    }
    assert ptq.models.mamba_path(build_model("qwen3-moe-tiny", "cpu")) is None


def test_modelopts_experts_ratio_is_refused_where_it_would_do_nothing():
    """ModelOpt 0.47's moe_calib_experts_ratio reaches experts that are separate modules only; transformers 5
    fuses them, and then the setting changes nothing (measured: the same tokens per expert with it)."""
    import torch

    from bench.random_checkpoint import build_model
    from ptq.moe import experts_ratio_problem

    assert "keeps its experts fused" in experts_ratio_problem(build_model("nemotron3-nano-tiny", "cpu"))
    assert "keeps its experts fused" in experts_ratio_problem(build_model("qwen3-moe-tiny", "cpu"))
    assert experts_ratio_problem(torch.nn.Linear(4, 4)) == "has no Mixture-of-Experts layers"

    class Gate(torch.nn.Module):
        top_k, num_experts = 2, 4

    class Block(torch.nn.Module):  # the older layout: one module per expert
        def __init__(self):
            super().__init__()
            self.gate = Gate()
            self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))

    assert experts_ratio_problem(torch.nn.Sequential(Block())) is None


@pytest.mark.slow
def test_a_run_asking_for_the_experts_ratio_on_fused_experts_stops_before_calibrating(nemotron_tiny_dir, tmp_path):
    from ptq.run import run

    overrides = nemotron_overrides(
        tmp_path, nemotron_tiny_dir, "fp8", "recipe.algorithm=max", "+recipe.algorithm_args.moe_calib_experts_ratio=1.0"
    )
    with pytest.raises(ConfigError, match=r"moe_calib_experts_ratio=1.0: nemotron-tiny keeps its experts fused"):
        run(*compose_run(overrides))
    (record_path,) = tmp_path.rglob("run.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "failed" and "calibrate" not in record["timings_s"]
    assert not list(record_path.parent.glob("checkpoint*"))  # no partial checkpoint left behind


def test_a_calibration_algorithm_applies_to_the_mamba_moe_recipes_by_their_export_format():
    """The Mamba-MoE recipes write one format (FP8 or NVFP4, measured on an H100 with ModelOpt 0.47), so an
    algorithm is checked against it; on a MoE model only the algorithms that reach fused experts are offered."""
    from conftest import GPU_FACTS

    base = ["calib.dataset=cnn_dailymail", "model=nemotron-3-nano-30b-a3b", "hardware=h100"]
    plan = plan_for([*base, "recipe=mamba_moe_fp8_aggressive", "recipe.algorithm=mse"], GPU_FACTS)
    assert plan.export_quant_algo == "FP8"
    assert (
        plan_for([*base, "recipe=mamba_moe_nvfp4_conservative", "recipe.algorithm=max"], GPU_FACTS).export_quant_algo
        == "NVFP4"
    )
    # local_hessian: ModelOpt 0.47 hooks fused experts for it (read in its source; NVFP4 needs CUDA to run it).
    assert plan_for([*base, "recipe=nvfp4_local_hessian"], GPU_FACTS).action == "run"
    for recipe, method, why in (
        ("mamba_moe_nvfp4_conservative", "awq_lite", "calibrates with awq_lite"),
        ("mamba_moe_nvfp4_conservative", "gptq", "calibrates with gptq, which ModelOpt applies to linear layers"),
    ):
        with pytest.raises(ConfigError, match=rf"recipe.algorithm={method} {why}.* fused in 3-D weights"):
            plan_for([*base, f"recipe={recipe}", f"recipe.algorithm={method}"], GPU_FACTS)
    # The same algorithm on a dense model is checked against the recipe's format only.
    dense = plan_for(
        ["calib.dataset=cnn_dailymail", "model=qwen3-8b", "hardware=h100", "recipe=nvfp4", "recipe.algorithm=awq_lite"],
        GPU_FACTS,
    )
    assert dense.export_quant_algo == "NVFP4_AWQ"


def test_awq_formats_and_smoothquant_are_refused_on_moe_models_in_planning():
    """Measured on the tiny shapes (CPU, ModelOpt 0.47): int4_awq fails in ModelOpt's export step on fused experts
    (`object of type 'QuantQwen3MoeExperts' has no len()`, after calibrating, also with recipe.algorithm=max) and
    int8_sq writes experts the written-checkpoint check cannot read back. Refused from the config in planning, so a
    dry run and a sweep's submission refuse them too; so are AutoQuantize searches over such candidates. A
    max-calibrated recipe passes, and the dense-MLP hybrid Nemotron-H keeps every recipe."""
    from conftest import GPU_FACTS

    for model, recipe, why in (
        ("qwen3-30b-a3b", "int4_awq", "exports W4A16_AWQ"),
        ("qwen3-30b-a3b", "int4_awq recipe.algorithm=max", "exports W4A16_AWQ"),
        ("nemotron-3-nano-30b-a3b", "nvfp4_svdquant", "exports NVFP4_SVD"),
        ("nemotron-3-nano-30b-a3b", "int8_sq", "calibrates with SmoothQuant"),
    ):
        name, *extra = recipe.split()
        overrides = ["calib.dataset=cnn_dailymail", f"model={model}", f"recipe={name}", "hardware=h100", *extra]
        with pytest.raises(ConfigError, match=rf"recipe={name}.* {why}.*fused in 3-D weights"):
            plan_for([*overrides, "dry_run=true"])
    search = ["calib.dataset=cnn_dailymail", "model=qwen3-30b-a3b", "hardware=h100", "recipe=auto_quantize_awq"]
    with pytest.raises(ConfigError, match=r"searches over NVFP4_AWQ_LITE_CFG .*candidates=\[FP8_DEFAULT_CFG\]"):
        plan_for(search, GPU_FACTS)
    assert plan_for([*search, "recipe.candidates=[NVFP4_DEFAULT_CFG,FP8_DEFAULT_CFG]"], GPU_FACTS).action == "run"
    assert plan_for(["calib.dataset=cnn_dailymail", "model=nemotron-h-8b", "recipe=int4_awq"]).action == "run"


def test_a_recipe_file_is_checked_for_fused_experts_once_modelopt_has_loaded_it(tmp_path):
    """A recipe file's algorithm is known only once ModelOpt loads it: ModelOpt's shipped GPTQ recipe is refused on
    a MoE model before the run takes its folder, its plain NVFP4 one passes."""
    from conftest import GPU_FACTS

    from ptq.backends import check_before_run

    base = ["calib.dataset=cnn_dailymail", "model=qwen3-30b-a3b", "hardware=h100", f"output_root={tmp_path}"]
    gptq = plan_for(
        [*base, "recipe=modelopt", "recipe.modelopt_recipe=general/ptq/nvfp4_default-kv_none-gptq"], GPU_FACTS
    )
    with pytest.raises(ConfigError, match=r"calibrates with gptq, which ModelOpt applies to linear layers .*fused"):
        check_before_run(gptq)
    check_before_run(
        plan_for([*base, "recipe=modelopt", "recipe.modelopt_recipe=general/ptq/nvfp4_default-kv_fp8"], GPU_FACTS)
    )
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_mamba_moe_fp8_with_mse_scales_quantizes_and_validates(nemotron_tiny_dir, tmp_path):
    from ptq.run import run

    record = run(
        *compose_run(
            nemotron_overrides(tmp_path, nemotron_tiny_dir, "mamba_moe_fp8_conservative", "recipe.algorithm=mse")
        )
    )
    assert record["status"] == "finished", record.get("error")
    assert record["validation"]["passed"] and record["validation"]["quant_algo"] == "FP8"
    assert record["algorithm"] == "mse"
