"""Calibration algorithms as a recipe axis (recipe.algorithm, recipe.algorithm_args): which recipes each
applies to (planning, no ModelOpt), their settings checked by ModelOpt's own config classes before any model is
loaded, one output folder and one report variant per choice, and real runs on the CPU."""

from __future__ import annotations

import json

import pytest
from conftest import GGUF_FACTS as GGUF
from conftest import GPU_FACTS as GPU
from conftest import compose_run, plan_for, small_run_overrides

from ptq.errors import ConfigError
from ptq.formats import ALGORITHMS, EXPORT_FORMATS, algorithm_export, algorithm_tag
from ptq.plan import Facts
from ptq.recipes import _algorithm_classes, algorithm_config, build_quant_config
from ptq.report import variant_label
from ptq.run import run
from ptq.run_record import RunRecord


def test_every_algorithm_is_one_of_the_installed_modelopt_and_names_known_formats():
    installed = _algorithm_classes()
    assert set(ALGORITHMS) <= set(installed), set(ALGORITHMS) - set(installed)
    for name, algorithm in ALGORITHMS.items():
        assert set(algorithm.applies_to) <= set(EXPORT_FORMATS), name
        assert all(a in algorithm.applies_to and b in EXPORT_FORMATS for a, b in algorithm.exports_as), name


@pytest.mark.parametrize(
    "overrides, folder",
    [
        (["recipe=fp8"], "fp8-kv_none-calib"),
        (["recipe=fp8", "recipe.algorithm=mse"], "fp8-mse-kv_none-calib"),
        (["recipe=int8_sq", "+recipe.algorithm_args.alpha=0.5"], "int8_sq-alpha0.5-kv_none-calib"),
        (
            ["recipe=nvfp4", "hardware=h100", "recipe.algorithm=mse", "+recipe.algorithm_args.fp8_scale_sweep=true"],
            "nvfp4-mse-fp8_scale_sweepon-kv_none-calib",
        ),
    ],
)
def test_each_calibration_choice_has_its_own_output_folder(overrides, folder):
    plan = plan_for(overrides, GPU if "hardware=h100" in overrides else GGUF)
    assert plan.output_dir.name.startswith(folder)


@pytest.mark.parametrize(
    "overrides, export",
    [
        (["recipe=nvfp4", "recipe.algorithm=awq_lite"], "NVFP4_AWQ"),
        (["recipe=nvfp4", "recipe.algorithm=svdquant"], "NVFP4_SVD"),
        (["recipe=nvfp4", "recipe.algorithm=gptq"], "NVFP4"),
        (["recipe=w4a16_nvfp4", "recipe.algorithm=local_hessian"], "W4A16_NVFP4"),
        (["recipe=int4_awq", "recipe.algorithm=gptq"], "W4A16_AWQ"),
    ],
)
def test_the_export_format_an_algorithm_leads_to_is_what_validation_expects(overrides, export):
    assert plan_for(["hardware=h100"] + overrides, GPU).export_quant_algo == export


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["recipe=fp8", "recipe.algorithm=smoothquant"], "does not apply to recipe=fp8, which exports FP8"),
        (["recipe=fp8", "recipe.algorithm=awq_lite"], "it applies to recipes exporting W4A16_AWQ"),
        (["recipe=int8_sq", "recipe.algorithm=svdquant"], "does not apply to recipe=int8_sq"),
        (["recipe=fp8", "recipe.algorithm=magic"], "recipe.algorithm=magic is not a calibration algorithm"),
        (["recipe=bf16", "recipe.algorithm=max"], "which quantizes nothing"),
        (["recipe=auto_quantize_cpu", "recipe.algorithm=mse"], "AutoQuantize calibrates every candidate"),
    ],
)
def test_an_algorithm_a_recipe_cannot_take_is_refused_when_planning(overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_for(overrides)


def test_the_megatron_backend_refuses_an_algorithm():
    with pytest.raises(ConfigError, match="apply to backend=hf_modelopt"):
        plan_for(
            ["backend=megatron_bridge", "hardware=h100", "model=llama3.2-1b", "recipe=fp8", "recipe.algorithm=mse"],
            Facts(cuda_available=True, local_model_ok=True),
        )


def test_a_rotating_kv_cache_needs_its_hadamard_package_before_anything_loads():
    import importlib.util

    cfg, _ = compose_run(["recipe=fp8", "recipe.kv_cache=nvfp4_rotate", "hardware=h100"])
    if importlib.util.find_spec("fast_hadamard_transform") is None:
        with pytest.raises(
            ConfigError, match="recipe.kv_cache=nvfp4_rotate rotates .*k_bmm_quantizer.* fast_hadamard_transform"
        ):
            build_quant_config(cfg.recipe, [], None)
    else:  # installed: the config is built, with its rotation
        entries = build_quant_config(cfg.recipe, [], None)["quant_cfg"]
        assert any(e["cfg"].get("rotate") for e in entries if isinstance(e.get("cfg"), dict))
    cfg, _ = compose_run(["recipe=fp8", "recipe.kv_cache=nvfp4", "hardware=h100"])
    assert not any(
        isinstance(e.get("cfg"), dict) and e["cfg"].get("rotate")
        for e in build_quant_config(cfg.recipe, [], None)["quant_cfg"]
        if e.get("enable", True)
    )


def test_settings_merge_into_the_configs_own_algorithm_or_replace_it():
    cfg, _ = compose_run(["recipe=int8_sq", "+recipe.algorithm_args.alpha=0.5"])
    assert build_quant_config(cfg.recipe, ["*lm_head*"], None)["algorithm"] == {"method": "smoothquant", "alpha": 0.5}
    cfg, _ = compose_run(["recipe=int4_awq", "+recipe.algorithm_args.alpha_step=0.2"])
    assert build_quant_config(cfg.recipe, [], 128)["algorithm"] == {"method": "awq_lite", "alpha_step": 0.2}
    cfg, _ = compose_run(["recipe=int4_awq", "recipe.algorithm=gptq", "+recipe.algorithm_args.perc_damp=0.05"])
    assert build_quant_config(cfg.recipe, [], 128)["algorithm"] == {"method": "gptq", "perc_damp": 0.05}
    cfg, _ = compose_run(["recipe=fp8"])
    assert build_quant_config(cfg.recipe, [], None)["algorithm"] == "max"  # ModelOpt's own entry, untouched


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["recipe=int8_sq", "+recipe.algorithm_args.alpah=0.5"],
            r"alpah: Extra inputs are not permitted.*SmoothQuantCalibConfig takes: alpha",
        ),
        (
            ["recipe=fp8", "recipe.algorithm=mse", "+recipe.algorithm_args.step_size=fast"],
            r"step_size: Input should be a valid number",
        ),
        (["recipe=mxfp8", "hardware=h100", "+recipe.algorithm_args.alpha=0.5"], "MXFP8_DEFAULT_CFG calibrates nothing"),
    ],
)
def test_a_bad_setting_names_itself_and_the_methods_settings(overrides, message):
    cfg, _ = compose_run(overrides)
    with pytest.raises(ConfigError, match=message):
        algorithm_config(
            cfg.recipe,
            __import__("modelopt.torch.quantization", fromlist=["x"])
            .__dict__[cfg.recipe.modelopt_cfg]
            .get("algorithm"),
        )


@pytest.mark.parametrize(
    "overrides",
    [
        ["recipe=nvfp4", "recipe.algorithm=local_hessian"],
        ["recipe=w4a16_nvfp4", "recipe.algorithm=mse", "+recipe.algorithm_args.fp8_scale_sweep=true"],
    ],
)
def test_a_block_scale_search_on_run_time_block_scales_is_refused(overrides):
    """Measured on an H200: on NVFP4_DEFAULT_CFG both searches gave the mean KL of max calibration to every digit."""
    cfg, _ = compose_run(["hardware=h100"] + overrides)
    with pytest.raises(ConfigError, match="recipe=nvfp4_mse or recipe=nvfp4_local_hessian"):
        build_quant_config(cfg.recipe, [], None)
    for recipe in ("nvfp4_mse", "nvfp4_local_hessian"):  # ModelOpt's own configs for them: static block scales
        cfg, _ = compose_run(["hardware=h100", f"recipe={recipe}"])
        assert build_quant_config(cfg.recipe, [], None)["algorithm"]["method"] in ("mse", "local_hessian")


def test_tags_and_report_labels_name_the_choice():
    assert algorithm_tag(None, {}) == ""
    assert algorithm_tag("svdquant", {"lowrank": 64}) == "svdquant-lowrank64"
    assert algorithm_tag("awq_lite", {}, 32) == "awq_lite-block32" and algorithm_tag(None, {}, 16) == "block16"
    assert algorithm_export("awq_lite", "NVFP4") == "NVFP4_AWQ" and algorithm_export(None, "FP8") == "FP8"
    # Clipping alone leaves no pre-quantization scale, which is what ModelOpt's export calls NVFP4_AWQ.
    assert algorithm_export("awq_clip", "NVFP4") == "NVFP4" and algorithm_export("awq_clip", "NVFP4_AWQ") == "NVFP4"
    record = RunRecord("m", "int8_sq", algorithm="alpha0.5", calib_size=32)
    assert variant_label(record) == "int8_sq/alpha0.5@32"
    assert variant_label(record.replace(algorithm=None)) == "int8_sq@32"


def test_a_bad_setting_stops_the_run_before_the_model_is_loaded(tiny_llama_dir, tmp_path):
    cfg, config = compose_run(
        small_run_overrides(
            tmp_path,
            "recipe=int8_sq",
            "+recipe.algorithm_args.alpah=0.5",
            f"model.path={tiny_llama_dir}",
            "model.name=tiny-llama",
            "model.layer_widths=[]",
        )
    )
    with pytest.raises(ConfigError, match="alpah"):
        run(cfg, config)
    # Checked before the run takes its folder: no record, no folder, not even output_root.
    assert not (tmp_path / "runs").exists()


def test_algorithms_run_and_export_on_the_cpu(tiny_llama_dir, tmp_path):
    """Real ModelOpt calibration with other algorithms than the recipe's own: each point its own folder and record."""
    base = [f"model.path={tiny_llama_dir}", "model.name=tiny-llama", "model.layer_widths=[]"]
    records = {}
    for extra in (
        ["recipe=int8_sq", "+recipe.algorithm_args.alpha=0.5"],
        ["recipe=int4_awq", "recipe.algorithm=gptq"],
        ["recipe=fp8", "recipe.algorithm=mse"],
        ["recipe=fp8"],
    ):
        cfg, config = compose_run(small_run_overrides(tmp_path, *extra, *base))
        record = run(cfg, config)
        assert record["status"] == "finished", record.get("error")
        records[" ".join(extra)] = record
    assert len({r["output_dir"] for r in records.values()}) == 4
    sq, gptq, mse, fp8 = records.values()
    assert sq["algorithm"] == "alpha0.5" and gptq["algorithm"] == "gptq" and mse["algorithm"] == "mse"
    assert fp8["algorithm"] is None
    for record, algo in ((sq, "W8A8_SQ_PER_CHANNEL"), (gptq, "W4A16_AWQ"), (mse, "FP8")):
        quant = json.loads(
            (tmp_path / record["checkpoint"] / "hf_quant_config.json").read_text()
            if not record["checkpoint"].startswith("/")
            else open(f"{record['checkpoint']}/hf_quant_config.json").read()
        )
        assert quant["quantization"]["quant_algo"] == algo
    # MSE searched the weight scales: its weights round differently from max calibration's.
    assert mse["fidelity"]["mean_kl"] != fp8["fidelity"]["mean_kl"]
    # Each record names the engines that load its checkpoint.
    assert fp8["serving"]["engines"] == ["vLLM", "SGLang", "TensorRT-LLM"] and sq["serving"]["engines"] == [
        "TensorRT-LLM"
    ]


def test_serving_engines_follow_the_export_and_its_kv_cache():
    from ptq.formats import serving_engines

    assert serving_engines("FP8") == ["vLLM", "SGLang", "TensorRT-LLM"]
    assert serving_engines("fp8_pb_wo") == ["vLLM", "TensorRT-LLM"]  # ModelOpt writes some names in lower case
    assert serving_engines("W8A8_SQ_PER_CHANNEL") == ["TensorRT-LLM"]
    assert serving_engines("NVFP4_SVD") == []
    assert serving_engines("FP8", "NVFP4") == ["TensorRT-LLM"]
    assert serving_engines("MIXED_PRECISION") == ["vLLM", "SGLang", "TensorRT-LLM"]
    assert serving_engines(None) == []
