"""Composition of every config group option, and the recipe -> ModelOpt config mapping (no model)."""

from __future__ import annotations

import shutil

import pytest
from conftest import CONF, compose_dict, compose_run
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from hydra_plugins.ptq_slurm_launcher.ptq_slurm_launcher import PtqSlurmLauncherConf
from ptq.errors import ConfigError
from ptq.plan import Facts, make_plan
from ptq.recipes import build_quant_config, disabled_patterns

# `sweep` is not a group of one run: its options set Hydra's sweep parameters (tests/test_cluster.py).
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "sweep")
# Groups that set how points are launched and add no node to the run's config: `cluster` selects Hydra's launcher,
# `local` holds a user's own cluster settings, which the Slurm cluster options read.
LAUNCH_GROUPS = ("cluster", "local")


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_are_the_documented_ones():
    assert GROUPS == [
        "backend",
        "calib",
        "cluster",
        "eval",
        "fidelity",
        "hardware",
        "local",
        "model",
        "parallelism",
        "recipe",
        "recover",
        "tracking",
    ]
    assert set(options("recipe")) == {
        "bf16",
        "fp8",
        "fp8_blockwise",
        "fp8_pc_pt",
        "int8_sq",
        "int4_awq",
        "w4a8_awq",
        "nvfp4",
        "nvfp4_awq",
        "nvfp4_svdquant",
        "nvfp4_mse",
        "nvfp4_local_hessian",
        "w4a16_nvfp4",
        "mxfp8",
        "mamba_moe_fp8_aggressive",
        "mamba_moe_fp8_conservative",
        "mamba_moe_nvfp4_aggressive",
        "mamba_moe_nvfp4_conservative",
        "auto_quantize",
        "auto_quantize_awq",
        "auto_quantize_cpu",
        "modelopt",
    }
    assert set(options("model")) == {
        "smollm2-135m",
        "llama3.2-1b",
        "qwen3-8b",
        "qwen3-30b-a3b",
        "nemotron-h-8b",
        "nemotron-3-nano-30b-a3b",
        "nemotron-3-super-120b-a12b",
        "qwen2.5-vl-3b",
        "qwen2.5-vl-7b",
        "gemma-3-4b",
    }
    assert set(options("hardware")) == {"cpu", "a100", "h100", "h200", "b200", "gb200"}


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_into_the_typed_schema(group):
    for option in options(group):
        cfg, resolved = compose_run([*(["cluster=slurm"] if group == "local" else []), f"{group}={option}"])
        assert resolved["output_dir"].startswith("runs/")
        if group in LAUNCH_GROUPS:
            assert not hasattr(cfg, group)
            continue
        node = getattr(cfg, group)
        # Options that carry a name must carry their own file's name, so records name them right.
        if hasattr(node, "name"):
            # Mixed-precision recipes add their budget (auto_quantize_4.8b), so budgets get their own folders.
            budget = f"_{node.effective_bits}b" if group == "recipe" and node.candidates else ""
            assert node.name == option + budget, f"{group}/{option}.yaml says name={node.name}"


def _compose(conf, overrides) -> tuple:
    """(the run's config, hydra.launcher) as plain dicts, composed from the config folder `conf`."""
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    config = OmegaConf.to_container(cfg, resolve=False)
    return {k: v for k, v in config.items() if k != "hydra"}, config["hydra"]["launcher"]


def test_a_users_local_file_sets_the_slurm_account_and_nothing_else(tmp_path):
    """conf/local/default.yaml (a user's own, ignored by git) is read by cluster=slurm and cluster=slurm_pyxis: its
    account and partitions reach the Slurm launcher and win over the cluster option's own settings, the command
    line wins over it, and cluster=local never reads it. Without the file nothing changes."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "local" / "default.yaml").unlink(missing_ok=True)  # a user's own file in this checkout
    clusters = ("local", "slurm", "slurm_pyxis")
    before = {c: _compose(conf, [f"cluster={c}"]) for c in clusters}
    # Without the file, cluster=slurm's launcher settings are the launcher's own defaults.
    assert before["slurm"][1] == OmegaConf.to_container(OmegaConf.structured(PtqSlurmLauncherConf))
    (conf / "local" / "default.yaml").write_text(
        "# @package _global_\nhydra:\n  launcher:\n    account: my_lab\n    partition: gpu,gpu_long\n"
        "    container_image: my/image:1\n"
    )
    after = {c: _compose(conf, [f"cluster={c}"]) for c in clusters}
    assert after["local"] == before["local"]
    for cluster in ("slurm", "slurm_pyxis"):
        run, launcher = after[cluster]
        assert run == before[cluster][0]  # the run's config, and so its hash and folder, is the same
        assert (launcher["account"], launcher["partition"]) == ("my_lab", "gpu,gpu_long")
        assert launcher["container_image"] == "my/image:1"  # over slurm_pyxis's NeMo image
        changed = {k for k in launcher if launcher[k] != before[cluster][1][k]}
        assert changed == {"account", "partition", "container_image"}
    _, launcher = _compose(conf, ["cluster=slurm", "hydra.launcher.account=other"])
    assert (launcher["account"], launcher["partition"]) == ("other", "gpu,gpu_long")
    # The template in the repository composes, as `local=example`.
    _, launcher = _compose(CONF, ["cluster=slurm", "local=example"])
    assert (launcher["account"], launcher["partition"]) == ("my_account", "gpu")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as err:
        compose_dict(["recipe=int4"])
    message = str(err.value)
    assert "recipe/int4" in message and "int4_awq" in message and "w4a8_awq" in message


@pytest.mark.parametrize("override", ["recipe.awq_blocksize=64", "calib.sise=8", "hardware.gpus=2"])
def test_misspelt_key_is_an_error(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_dict([override])


def test_wrong_type_is_an_error():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_dict(["calib.size=many"])


def test_calibration_sizes_follow_the_hardware_unless_set():
    cpu, _ = compose_run([])
    h100, _ = compose_run(["hardware=h100"])
    assert (cpu.calib.size, cpu.calib.seq_len) == (cpu.hardware.calib_size, cpu.hardware.calib_seq_len)
    assert (h100.calib.size, h100.calib.seq_len) == (512, 512)
    assert compose_run(["hardware=h100", "calib.size=128"])[0].calib.size == 128


def test_output_dir_separates_sweep_points():
    dirs = {
        compose_run(o)[1]["output_dir"]
        for o in (
            ["recipe=fp8"],
            ["recipe=int8_sq"],
            ["recipe=fp8", "recipe.kv_cache=fp8"],
            ["recipe=fp8", "calib.size=128"],
        )
    }
    assert len(dirs) == 4


# Names differ between ModelOpt 0.47 and Megatron-Bridge's --export-quant-cfg; both are recorded.
EXPECTED_NAMES = {
    "fp8": ("FP8_DEFAULT_CFG", "fp8"),
    "fp8_blockwise": ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "fp8_blockwise"),
    "int8_sq": ("INT8_SMOOTHQUANT_CFG", "int8_sq"),
    "int4_awq": ("INT4_AWQ_CFG", "int4_awq"),
    "w4a8_awq": ("W4A8_AWQ_BETA_CFG", "w4a8_awq"),
    "nvfp4": ("NVFP4_DEFAULT_CFG", "nvfp4"),
    "nvfp4_awq": ("NVFP4_AWQ_LITE_CFG", None),
    "mamba_moe_nvfp4_conservative": ("MAMBA_MOE_NVFP4_CONSERVATIVE_CFG", "mamba_moe_nvfp4_conservative"),
    "bf16": (None, None),
}


@pytest.mark.parametrize("recipe", options("recipe"))
def test_recipe_names_and_modelopt_config(recipe):
    cfg, _ = compose_run([f"recipe={recipe}", "hardware=b200"])
    if recipe in EXPECTED_NAMES:
        assert (cfg.recipe.modelopt_cfg, cfg.recipe.megatron_cfg) == EXPECTED_NAMES[recipe]
    if cfg.recipe.modelopt_cfg is None:
        return
    plan = make_plan(cfg, Facts(cuda_available=True, gguf_path="/x.gguf"))
    quant_cfg = build_quant_config(cfg.recipe, plan.exclude_patterns, plan.awq_block_size)
    assert isinstance(quant_cfg["quant_cfg"], list)
    assert "*lm_head*" in disabled_patterns(quant_cfg)


def _weight_entry(quant_cfg):
    return [e for e in quant_cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"][-1]


def test_awq_block_size_reaches_the_modelopt_config():
    cfg, _ = compose_run(["recipe=w4a8_awq", "hardware=h100"])
    plan = make_plan(cfg, Facts(cuda_available=True, gguf_path="/x.gguf"))
    assert plan.awq_block_size == 64  # SmolLM2's widths 576 and 1536: 128 does not divide 576
    entry = _weight_entry(build_quant_config(cfg.recipe, [], plan.awq_block_size))
    int4_cfg = entry["cfg"][0]  # W4A8: int4 block quantizer first, then fp8
    assert int4_cfg["block_sizes"][-1] == 64
    # The library's own constant is untouched (deep copy).
    import modelopt.torch.quantization as mtq

    assert _weight_entry(mtq.W4A8_AWQ_BETA_CFG)["cfg"][0]["block_sizes"][-1] == 128


def test_options_become_config_entries():
    cfg, _ = compose_run(
        ["recipe=fp8", "recipe.kv_cache=fp8", "recipe.exclude=[*mlp.down_proj*]", "recipe.algorithm=max"]
    )
    quant_cfg = build_quant_config(cfg.recipe, ["*lm_head*", "*mlp.down_proj*"], None)
    names = [e["quantizer_name"] for e in quant_cfg["quant_cfg"]]
    assert "*[kv]_bmm_quantizer" in names
    assert "*mlp.down_proj*" in disabled_patterns(quant_cfg)
    assert quant_cfg["algorithm"] == {"method": "max"}
    wo, _ = compose_run(["recipe=fp8", "recipe.weight_only=true"])
    assert "*input_quantizer" in disabled_patterns(build_quant_config(wo.recipe, [], None))


def test_unknown_modelopt_config_name_is_a_clear_error():
    cfg, _ = compose_run(["recipe=fp8", "recipe.modelopt_cfg=FP8_TYPO_CFG"])
    with pytest.raises(ConfigError, match="FP8_TYPO_CFG.*FP8_DEFAULT_CFG"):
        build_quant_config(cfg.recipe, [], None)
