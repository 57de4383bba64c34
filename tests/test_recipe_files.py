"""ModelOpt recipe files in (recipe=modelopt, `recipe=<file.yaml>`) and the applied configuration out
(modelopt_recipe.yaml in every quantized checkpoint, `details.applied_recipe` in run.json)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import GPU_FACTS, REPO, compose_run, plan_for, small_run_overrides

from ptq import recipe_files
from ptq.errors import ConfigError

SHIPPED_FP8 = "general/ptq/fp8_default-kv_fp8"


def test_a_shipped_recipe_is_found_by_its_library_path_and_named_by_its_file():
    path = recipe_files.resolve(SHIPPED_FP8)
    assert path.name == "fp8_default-kv_fp8.yaml" and path.is_file()
    assert recipe_files.resolve(SHIPPED_FP8 + ".yaml") == path
    assert SHIPPED_FP8 in recipe_files.shipped_recipes()
    cfg, resolved = compose_run(["recipe=modelopt", f"recipe.modelopt_recipe={SHIPPED_FP8}"])
    # Named by its path in the library: file names repeat across its folders (and huggingface/vit/ptq/fp8 would
    # otherwise be called fp8, like this launcher's own recipe).
    assert cfg.recipe.name == "general.ptq.fp8_default-kv_fp8"
    assert "/general.ptq.fp8_default-kv_fp8-kv_none-" in resolved["output_dir"]
    names = [recipe_files.recipe_name(n) for n in recipe_files.shipped_recipes()]
    assert len(set(names)) == len(names)


def test_a_users_file_is_named_by_its_name_and_content_so_an_edit_gets_its_own_folder(tmp_path):
    mine = tmp_path / "my_recipe.yaml"
    mine.write_text(recipe_files.resolve(SHIPPED_FP8).read_text())
    first = recipe_files.recipe_name(str(mine))
    assert first.startswith("my_recipe-") and len(first) == len("my_recipe-") + 6
    mine.write_text(mine.read_text() + "\n# edited\n")
    assert recipe_files.recipe_name(str(mine)) != first


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["recipe=modelopt"], "recipe=modelopt runs a ModelOpt recipe file: name it with recipe.modelopt_recipe="),
        (["recipe=modelopt", "recipe.modelopt_recipe=general/ptq/no_such_recipe"], "no such recipe file"),
        (
            ["recipe=modelopt", "recipe.modelopt_recipe=general/auto_quantize/nvfp4_fp8_at_5p4bits"],
            "is an auto_quantize recipe",
        ),
        (
            ["recipe=modelopt", f"recipe.modelopt_recipe={SHIPPED_FP8}", "recipe.modelopt_cfg=FP8_DEFAULT_CFG"],
            "sets both recipe.modelopt_cfg=FP8_DEFAULT_CFG and recipe.modelopt_recipe",
        ),
        (  # the backend's own refusal comes first: no Megatron-Bridge name for the recipe
            ["recipe=modelopt", f"recipe.modelopt_recipe={SHIPPED_FP8}", "backend=megatron_bridge", "hardware=h100"],
            "has no Megatron-Bridge --export-quant-cfg name",
        ),
        (  # and with one set by hand, the recipe file itself is refused there
            [
                "recipe=modelopt",
                f"recipe.modelopt_recipe={SHIPPED_FP8}",
                "recipe.megatron_cfg=fp8",
                "backend=megatron_bridge",
                "hardware=h100",
                "calib.dataset=/data/calib.txt",
            ],
            "Megatron-Bridge's quantize step takes its own format names",
        ),
        (
            ["recipe=w4a16_nvfp4", "backend=megatron_bridge", "hardware=h100"],
            "has no Megatron-Bridge --export-quant-cfg name",
        ),
    ],
)
def test_bad_recipe_file_settings_are_refused_when_planning(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_for(overrides, GPU_FACTS)


def test_a_file_that_is_not_yaml_is_refused_with_its_path(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("metadata: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot be read as YAML"):
        plan_for(["recipe=modelopt", f"recipe.modelopt_recipe={bad}"])


def test_recipe_equals_a_file_is_the_shortcut_for_recipe_modelopt(tmp_path):
    sys.path.insert(0, str(REPO))
    from launch import recipe_file_shortcut

    file = tmp_path / "r.yaml"
    assert recipe_file_shortcut([f"recipe={file}", "calib.size=8"]) == [
        "recipe=modelopt",
        f"recipe.modelopt_recipe={file}",
        "calib.size=8",
    ]
    assert recipe_file_shortcut(["recipe=fp8", "recipe.kv_cache=fp8"]) == ["recipe=fp8", "recipe.kv_cache=fp8"]
    file.write_text("metadata: {recipe_type: ptq}\n")  # a file that exists here: by its absolute path
    assert recipe_file_shortcut([f"recipe={file}"])[1] == f"recipe.modelopt_recipe={file.resolve()}"
    # A path in ModelOpt's library, suffix and all, is passed as given (resolve() finds it there).
    shipped = "general/ptq/fp8_default-kv_fp8.yaml"
    assert recipe_file_shortcut([f"recipe={shipped}"]) == ["recipe=modelopt", f"recipe.modelopt_recipe={shipped}"]


def test_modelopt_loads_a_shipped_recipe_and_the_launcher_checks_its_formats_and_kv_cache():
    from ptq.backends import check_before_run
    from ptq.recipes import build_quant_config, formats_of

    cfg, _ = compose_run(["recipe=modelopt", f"recipe.modelopt_recipe={SHIPPED_FP8}"])
    quant_cfg = build_quant_config(cfg.recipe, ["*lm_head*", "*my_layer*"], None)
    assert formats_of(quant_cfg) == ["fp8"]
    assert quant_cfg["algorithm"] == "max"
    # The model's exclusions are added once: lm_head is in the file's own disabled list already.
    assert quant_cfg["quant_cfg"][-1] == {"quantizer_name": "*my_layer*", "enable": False}
    assert sum(e["quantizer_name"] == "*lm_head*" for e in quant_cfg["quant_cfg"]) == 1
    # The file quantizes the KV cache itself: asking for another KV format on top is refused.
    cfg, _ = compose_run(["recipe=modelopt", f"recipe.modelopt_recipe={SHIPPED_FP8}", "recipe.kv_cache=nvfp4"])
    with pytest.raises(ConfigError, match="quantizes the KV cache itself"):
        build_quant_config(cfg.recipe, [], None)
    # NVFP4 cannot be calibrated on the CPU: refused from the loaded file's entries, before any model is loaded.
    with pytest.raises(ConfigError, match="computes in nvfp4.*hardware=cpu"):
        check_before_run(plan_for(["recipe=modelopt", "recipe.modelopt_recipe=general/ptq/nvfp4_default-kv_fp8"]))


def test_the_applied_configuration_written_as_a_recipe_reads_back_through_modelopt_unchanged(tmp_path):
    from modelopt.recipe import load_recipe
    from modelopt.torch.quantization.config import QuantizeConfig

    from ptq.recipes import build_quant_config

    for recipe in (["recipe=int4_awq", "recipe.awq_block_size=64"], ["recipe=nvfp4", "recipe.kv_cache=fp8"]):
        cfg, _ = compose_run(recipe)
        applied = build_quant_config(cfg.recipe, ["*lm_head*"], 64 if "awq" in recipe[0] else None)
        written = recipe_files.write_applied(tmp_path, recipe_files.applied_recipe(applied, "test"))
        back = load_recipe(written).quantize.model_dump()
        assert back == QuantizeConfig(**applied).model_dump()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fp8", "int4_awq"])
def test_running_the_written_recipe_file_again_reproduces_the_checkpoint_bit_for_bit(recipe, smollm2_dir, tmp_path):
    from ptq.run import run

    first = run(*compose_run(small_run_overrides(tmp_path, f"recipe={recipe}")))
    written = Path(first["checkpoint"]) / recipe_files.WRITTEN_NAME
    assert first["details"]["applied_recipe"]["quantize"]["quant_cfg"]
    again = run(*compose_run(small_run_overrides(tmp_path, "recipe=modelopt", f"recipe.modelopt_recipe={written}")))
    assert again["status"] == "finished" and again["output_dir"] != first["output_dir"]
    # The same configuration, as ModelOpt reads it (the file holds every field; the constant only those it sets).
    from modelopt.torch.quantization.config import QuantizeConfig

    def applied(record):
        return QuantizeConfig(**record["details"]["applied_recipe"]["quantize"]).model_dump()

    assert applied(again) == applied(first)
    made = {p.name: p.read_bytes() for p in Path(first["checkpoint"]).glob("*.safetensors")}
    remade = {p.name: p.read_bytes() for p in Path(again["checkpoint"]).glob("*.safetensors")}
    assert made and made == remade


def test_a_recipe_of_ours_that_modelopt_ships_as_a_file_runs_that_file_and_it_equals_the_constant():
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.config import QuantizeConfig

    from ptq.recipes import load_recipe_file

    cfg, resolved = compose_run(["recipe=w4a16_nvfp4"])
    assert cfg.recipe.modelopt_recipe == "general/ptq/nvfp4_weight_only-kv_fp16" and cfg.recipe.modelopt_cfg is None
    assert "/w4a16_nvfp4-kv_none-" in resolved["output_dir"]
    shipped = QuantizeConfig(**load_recipe_file(cfg.recipe.modelopt_recipe)).model_dump()
    assert shipped == QuantizeConfig(**mtq.W4A16_NVFP4_CFG).model_dump()


def test_shipped_recipe_units_are_not_offered_as_recipes():
    names = recipe_files.shipped_recipes()
    assert names and all("disabled_quantizers" not in n and not n.endswith(".quant_cfg") for n in names)
    assert all(recipe_files.recipe_type(recipe_files.resolve(n)) == "ptq" for n in names)


def test_the_kv_cache_a_recipe_file_applies_is_read_from_its_entries():
    from ptq.recipes import load_recipe_file

    assert recipe_files.kv_cache_of(load_recipe_file(SHIPPED_FP8)) == "fp8"
    assert recipe_files.kv_cache_of(load_recipe_file("general/ptq/nvfp4_default-kv_nvfp4_cast")) == "nvfp4"
    assert recipe_files.kv_cache_of(load_recipe_file("general/ptq/int4_blockwise_weight_only")) == "none"
    later_off = {
        "quant_cfg": [
            {"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": (4, 3)}},
            {"quantizer_name": "*[kv]_bmm_quantizer", "enable": False},
        ]
    }
    assert recipe_files.kv_cache_of(later_off) == "none"  # the last entry wins, as in ModelOpt's list


def test_a_recipe_file_in_a_format_the_launcher_does_not_check_is_refused_before_loading():
    from ptq.backends import check_before_run
    from ptq.recipes import formats_of

    mx_int8 = {"num_bits": 8, "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}
    assert formats_of({"quant_cfg": [{"quantizer_name": "*", "cfg": mx_int8}]}) == ["mxint8"]
    assert formats_of({"quant_cfg": [{"quantizer_name": "*", "cfg": {"num_bits": (3, 2)}}]}) == ["num_bits=(3, 2)"]
    mxfp4 = ["recipe=modelopt", "recipe.modelopt_recipe=general/ptq/mxfp4_mlp_weight_only", "hardware=h100"]
    with pytest.raises(ConfigError, match="computes in mxfp4, which this launcher does not calibrate and validate"):
        check_before_run(plan_for(mxfp4, GPU_FACTS))


@pytest.mark.slow
def test_a_shipped_recipe_that_quantizes_the_kv_cache_runs_and_validates_its_kv_format(smollm2_dir, tmp_path):
    from ptq.run import run

    overrides = small_run_overrides(tmp_path, "recipe=modelopt", f"recipe.modelopt_recipe={SHIPPED_FP8}")
    record = run(*compose_run(overrides))
    assert record["status"] == "finished", record.get("error")
    assert record["kv_cache"] == "fp8" and record["validation"]["kv_cache_quant_algo"] == "FP8"
    assert record["validation"]["quant_algo"] == "FP8"


def test_a_dry_run_prints_the_configuration_modelopt_would_apply(tmp_path, capsys):
    from ptq.run import run

    summary = run(*compose_run(["recipe=int4_awq", "dry_run=true", f"output_root={tmp_path}"]))
    entries = summary["recipe"]["quantize"]["quant_cfg"]
    # The run's own axes are in it: the AWQ block size it chose and the model's exclusions.
    weight = next(e for e in entries if e.get("quantizer_name") == "*weight_quantizer" and "cfg" in e)
    assert weight["cfg"]["block_sizes"][-1] == summary_block(summary)
    assert {"quantizer_name": "*lm_head*", "enable": False} in entries
    printed = capsys.readouterr().out
    assert "ModelOpt configuration it applies (the modelopt_recipe.yaml it writes):" in printed
    assert "quantizer_name: '*lm_head*'" in printed
    assert not list(tmp_path.rglob("*")), "a dry run writes nothing"
    bf16 = run(*compose_run(["recipe=bf16", "dry_run=true", f"output_root={tmp_path}"]))
    assert "recipe" not in bf16


def summary_block(summary) -> int:
    """The AWQ block size the dry run's description names (`AWQ block N`)."""
    [line] = summary["commands"]
    return int(line.split("AWQ block ")[1].split(",")[0])


MLP_ONLY = """\
imports:
  base_disable_all: configs/ptq/units/base_disable_all
  default_disabled_quantizers: configs/ptq/units/default_disabled_quantizers
  fp8: configs/numerics/fp8
metadata:
  recipe_type: ptq
  description: FP8 in the MLP projections only.
quantize:
  algorithm: max
  quant_cfg:
    - $import: base_disable_all
    - quantizer_name: '*mlp*weight_quantizer'
      cfg:
        $import: fp8
    - quantizer_name: '*mlp*input_quantizer'
      cfg:
        $import: fp8
    - $import: default_disabled_quantizers
"""


def test_a_layer_the_configuration_itself_switches_off_is_meant_to_stay_bf16():
    from ptq.recipes import meant_off

    entries = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*mlp*weight_quantizer", "cfg": {"num_bits": [4, 3]}},
        {"quantizer_name": "*lm_head*", "enable": False},
        {"quantizer_name": "*", "parent_class": "nn.Linear", "enable": False},  # by class: not matched by name
    ]
    assert meant_off("model.layers.0.self_attn.q_proj", entries)  # only the leading catch-all names it
    assert not meant_off("model.layers.0.mlp.up_proj", entries)  # the recipe means it quantized
    assert meant_off("lm_head", entries)
    assert not meant_off("model.layers.0.self_attn.q_proj", [])  # no configuration: nothing is meant


def test_a_users_recipe_that_quantizes_only_the_mlp_validates_with_attention_excluded(smollm2_dir, tmp_path):
    from ptq.run import run

    mine = tmp_path / "fp8_mlp_only.yaml"
    mine.write_text(MLP_ONLY)
    record = run(*compose_run(small_run_overrides(tmp_path, "recipe=modelopt", f"recipe.modelopt_recipe={mine}")))
    assert record["status"] == "finished", record.get("error")
    layers = record["layers"]
    assert layers["unexpected_bf16"] == []
    assert layers["quantized"] == 30 * 3  # gate, up and down projections of SmolLM2's 30 layers
    assert "model.layers.0.self_attn.q_proj" in layers["excluded"]
