"""recipe=auto_quantize*: ModelOpt's per-layer mixed-precision search (mtq.auto_quantize).

Plan checks without a model, then a real search on the CPU over INT4 AWQ / FP8 / BF16 at two budgets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import GPU_FACTS as GPU
from conftest import compose_run, plan_for, small_run_overrides
from safetensors import safe_open

from ptq import recipe_files
from ptq.errors import ConfigError
from ptq.formats import CANDIDATES
from ptq.recipes import load_recipe_file
from ptq.run import run
from ptq.validate import validate_checkpoint


def test_recipe_name_carries_the_budget_so_a_budget_sweep_writes_one_folder_per_point():
    dirs = {
        compose_run(["recipe=auto_quantize_cpu", f"recipe.effective_bits={b}"])[1]["output_dir"] for b in (4.5, 6, 7.25)
    }
    assert len(dirs) == 3
    assert any(d.endswith("smollm2-135m/auto_quantize_cpu_6.0b-kv_none-calib16x128") for d in dirs)
    cfg, config = compose_run(["recipe=auto_quantize", "hardware=h100"])
    assert cfg.recipe.name == "auto_quantize_4.8b" and cfg.recipe.effective_bits == 4.8
    assert cfg.recipe.candidates == ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"] and cfg.recipe.formats == ["nvfp4", "fp8"]


def test_nvfp4_candidates_are_refused_on_the_cpu_naming_the_fix():
    with pytest.raises(ConfigError) as err:
        plan_for(["recipe=auto_quantize"])
    msg = str(err.value)
    assert "NVFP4_DEFAULT_CFG" in msg and "hardware=cpu" in msg and "CUDA" in msg
    assert "recipe=auto_quantize_cpu" in msg and "hardware=h100" in msg
    # An nvfp4 candidate added on the command line is caught too, whatever recipe.formats says.
    with pytest.raises(ConfigError, match="NVFP4_AWQ_LITE_CFG"):
        plan_for(["recipe=auto_quantize_cpu", "recipe.candidates=[FP8_DEFAULT_CFG,NVFP4_AWQ_LITE_CFG]"])
    # On a GPU it plans, with the usual warning that NVFP4 is served on Blackwell.
    plan = plan_for(["recipe=auto_quantize", "hardware=h100"], GPU)
    assert plan.quantize and any("Blackwell" in w for w in plan.warnings)


def test_budget_must_lie_between_the_lowest_candidate_and_16_bits():
    assert plan_for(["recipe=auto_quantize_cpu", "recipe.effective_bits=4"]).quantize  # all INT4 is allowed
    with pytest.raises(ConfigError) as err:
        plan_for(["recipe=auto_quantize_cpu", "recipe.effective_bits=3.5"])
    assert (
        "at least 4" in str(err.value)
        and "INT4_AWQ_CFG" in str(err.value)
        and "recipe.effective_bits=" in str(err.value)
    )
    with pytest.raises(ConfigError, match="recipe=bf16"):
        plan_for(["recipe=auto_quantize_cpu", "recipe.effective_bits=16"])
    with pytest.raises(ConfigError, match="at least 4.5"):  # NVFP4 costs 4.5 bits (FP8 scale per 16 values)
        plan_for(["recipe=auto_quantize", "hardware=b200", "recipe.effective_bits=4.2"], GPU)
    with pytest.raises(ConfigError, match="at least 8"):  # FP8 alone cannot go below 8
        plan_for(["recipe=auto_quantize_cpu", "recipe.candidates=[FP8_DEFAULT_CFG]", "recipe.formats=[fp8]"])


def test_other_auto_quantize_settings_are_checked():
    with pytest.raises(ConfigError, match="choose from: FP8_DEFAULT_CFG"):
        plan_for(["recipe=auto_quantize_cpu", "recipe.candidates=[FP8_DEFAULT_CFG,INT3_CFG]"])
    with pytest.raises(ConfigError, match="recipe.kv_cache=none"):
        plan_for(["recipe=auto_quantize_cpu", "recipe.kv_cache=fp8"])
    with pytest.raises(ConfigError, match="modelopt_cfg=null"):
        plan_for(["recipe=auto_quantize_cpu", "recipe.modelopt_cfg=FP8_DEFAULT_CFG"])
    with pytest.raises(ConfigError, match="no Megatron-Bridge"):
        plan_for(["recipe=auto_quantize", "backend=megatron_bridge", "hardware=h100"], GPU)
    # INT4 candidates get the AWQ block size that divides SmolLM2's widths; FP8-only searches need none.
    assert plan_for(["recipe=auto_quantize_cpu"]).awq_block_size == 64
    assert (
        plan_for(
            [
                "recipe=auto_quantize_cpu",
                "recipe.candidates=[FP8_DEFAULT_CFG,INT8_WEIGHT_ONLY_CFG]",
                "recipe.effective_bits=10",
            ]
        ).awq_block_size
        is None
    )
    warned = plan_for(["recipe=auto_quantize_cpu", "calib.size=4"])
    assert any("score_size=16 exceeds calib.size=4" in w for w in warned.warnings)


@pytest.mark.slow
def test_candidate_table_matches_modelopts_bit_costs():
    """The plan's budget check uses this table; ModelOpt's own cost must agree with it."""
    from modelopt.torch.quantization.algorithms import QuantRecipe

    for name, candidate in CANDIDATES.items():
        assert QuantRecipe(name).compression * 16 == pytest.approx(candidate.bits), name


def _tensors_dtypes(checkpoint: Path) -> dict:
    out = {}
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_slice(name).get_dtype()
    return out


@pytest.mark.slow
def test_search_on_the_cpu_at_two_budgets(tiny_llama_dir, tmp_path):
    """A real search (gradient scores from the causal-LM loss) over INT4 AWQ, FP8 and BF16: the export
    validates, the record holds the per-layer choice, and a lower budget buys more INT4 layers."""
    records = {}
    for bits in (4.5, 7):
        cfg, config = compose_run(
            small_run_overrides(
                tmp_path,
                "recipe=auto_quantize_cpu",
                f"recipe.effective_bits={bits}",
                "recipe.score_size=4",
                f"model.path={tiny_llama_dir}",
                "model.name=tiny-llama",
                "model.layer_widths=[]",
            )
        )
        records[bits] = run(cfg, config)
    low, high = records[4.5], records[7]
    assert low["output_dir"] != high["output_dir"] and low["recipe"] == "auto_quantize_cpu_4.5b"
    decoder_layers = {
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    for bits, record in records.items():
        assert record["status"] == "finished", record.get("error")
        assert record["validation"]["passed"], record["validation"]["problems"]
        search = record["details"]["auto_quantize"]
        assert search["budget_bits"] == bits and search["effective_bits"] <= bits + 1e-6 and search["satisfied"]
        assert set(search["assignment"]) == decoder_layers  # lm_head is kept out of the search and the budget
        assert set(search["assignment"].values()) <= {"int4_awq", "fp8", "bf16"}
        assert search["excluded"] == ["lm_head"]
        quantized = [n for n, f in search["assignment"].items() if f != "bf16"]
        assert record["layers"]["quantized"] == len(quantized)
        # The export holds each layer in the format chosen for it.
        checkpoint = Path(record["checkpoint"])
        dtypes = _tensors_dtypes(checkpoint)
        want = {"int4_awq": "U8", "fp8": "F8_E4M3", "bf16": "BF16"}
        for layer, fmt in search["assignment"].items():
            assert dtypes[f"{layer}.weight"] == want[fmt], (layer, fmt)
            assert (f"{layer}.weight_scale" in dtypes) == (fmt != "bf16"), layer
        quant = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
        if len({f for f in search["assignment"].values() if f != "bf16"}) > 1:
            assert quant["quant_algo"] == "MIXED_PRECISION"
            assert set(quant["quantized_layers"]) == set(quantized)
            assert {
                quant["quantized_layers"][n]["quant_algo"] for n in quantized if search["assignment"][n] == "int4_awq"
            } <= {"W4A16_AWQ"}
        assert record["fidelity"]["mean_kl"] > 0
        # The choice as a recipe file beside the checkpoint, read back through ModelOpt's loader: each searched
        # layer's weight quantizer is switched on exactly where the search chose a format.
        written = load_recipe_file(str(checkpoint / recipe_files.WRITTEN_NAME))
        switched = {}
        for entry in written["quant_cfg"]:
            name = entry.get("quantizer_name", "")
            if name.endswith(".weight_quantizer") and name[: -len(".weight_quantizer")] in decoder_layers:
                switched[name[: -len(".weight_quantizer")]] = entry.get("enable") is not False
        assert {n for n, on in switched.items() if on} == set(quantized)
        assert "AutoQuantize chose" in (checkpoint / recipe_files.WRITTEN_NAME).read_text()
    int4 = {
        b: sum(f == "int4_awq" for f in r["details"]["auto_quantize"]["assignment"].values())
        for b, r in records.items()
    }
    assert low["details"]["auto_quantize"]["assignment"] != high["details"]["auto_quantize"]["assignment"]
    assert int4[4.5] > int4[7]
    assert low["details"]["auto_quantize"]["effective_bits"] < high["details"]["auto_quantize"]["effective_bits"]
    assert low["size"]["checkpoint_bytes"] < high["size"]["checkpoint_bytes"]
    # The second budget reused the first search's calibration and scores (they do not depend on the budget).
    assert not low["details"]["auto_quantize"]["search_state_reused"]
    assert high["details"]["auto_quantize"]["search_state_reused"]

    # Validation catches a mixed-precision map that leaves out a layer the run quantized.
    mixed = next((r for r in records.values() if r["validation"]["quant_algo"] == "MIXED_PRECISION"), None)
    assert mixed is not None
    tampered = tmp_path / "tampered"
    shutil.copytree(mixed["checkpoint"], tampered)
    quant_file = tampered / "hf_quant_config.json"
    doc = json.loads(quant_file.read_text())
    dropped = sorted(doc["quantization"]["quantized_layers"])[0]
    del doc["quantization"]["quantized_layers"][dropped]
    quant_file.write_text(json.dumps(doc))
    quantized = [n for n, f in mixed["details"]["auto_quantize"]["assignment"].items() if f != "bf16"]
    result = validate_checkpoint(
        tampered,
        expect_quantized=quantized,
        expect_quant_algo="MIXED_PRECISION",
        expect_kv_cache="none",
        unexpected_bf16=[],
    )
    assert not result["passed"] and dropped in " ".join(result["problems"])


@pytest.mark.slow
def test_kl_div_scores_work_too(tiny_llama_dir, tmp_path):
    cfg, config = compose_run(
        small_run_overrides(
            tmp_path,
            "recipe=auto_quantize_cpu",
            "recipe.effective_bits=6",
            "recipe.score_method=kl_div",
            "recipe.score_size=4",
            f"model.path={tiny_llama_dir}",
            "model.name=tiny-llama",
            "model.layer_widths=[]",
        )
    )
    record = run(cfg, config)
    assert record["status"] == "finished" and record["validation"]["passed"], record["validation"]["problems"]
    search = record["details"]["auto_quantize"]
    assert search["method"] == "kl_div" and search["effective_bits"] <= 6
    assert len(search["assignment"]) == 14
