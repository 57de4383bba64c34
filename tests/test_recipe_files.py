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
    assert cfg.recipe.name == "fp8_default-kv_fp8"
    assert "/fp8_default-kv_fp8-kv_none-" in resolved["output_dir"]


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
        (
            ["recipe=modelopt", f"recipe.modelopt_recipe={SHIPPED_FP8}", "backend=megatron_bridge", "hardware=h100"],
            "Megatron-Bridge's quantize step takes its own format names",
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
