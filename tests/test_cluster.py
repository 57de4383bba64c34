"""The `cluster` group without Slurm: derived requests, overrides, batch-script parameters, point states."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, compose_dict, compose_run
from ptq.cluster import check_request, derived_request, request_for, sbatch_parameters
from ptq.sweep import point_state, varying_overrides


def test_cluster_slurm_selects_the_checking_launcher():
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["cluster=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("PtqSlurmLauncher")
    assert cfg.cluster.name == "slurm"
    assert compose_dict([]).cluster.name == "local"


def test_cpu_point_asks_for_cpus_and_memory_only():
    cfg, _ = compose_run(["cluster=slurm"])
    request = request_for(cfg)
    assert request.gpus_per_node == 0 and request.nodes == 1
    # SmolLM2 (0.135 B parameters) in FP32 three times over, plus 4 GB.
    assert request.mem_gb == 6
    assert "gpus_per_node" not in sbatch_parameters(cfg.cluster, request, "x")


def test_gpu_requests_grow_with_the_model():
    small, _ = compose_run(["cluster=slurm", "hardware=h100", "model=qwen3-8b"])
    large, _ = compose_run(["cluster=slurm", "hardware=h100", "model=qwen3-30b-a3b"])
    assert derived_request(small).gpus_per_node == 1
    # 30.5 B parameters = 61 GB of BF16: more than 60% of one 80 GB card.
    assert derived_request(large).gpus_per_node == 2
    assert derived_request(large).mem_gb > derived_request(small).mem_gb


def test_megatron_request_follows_the_parallel_layout():
    cfg, _ = compose_run(["cluster=slurm", "hardware=h100", "backend=megatron_bridge", "model=nemotron-3-super-120b-a12b",
                          "parallelism=tp8_pp2_ep8", "recipe=mamba_moe_nvfp4_conservative"])
    request = request_for(cfg)
    assert (request.nodes, request.gpus_per_node, request.tasks_per_node) == (2, 8, 1)
    params = sbatch_parameters(cfg.cluster, request, "job")
    assert params["gpus_per_node"] == 8
    assert any("MASTER_ADDR" in line for line in params["setup"])
    assert check_request(cfg, request) is None


def test_overrides_win_and_bad_ones_are_refused():
    cfg, _ = compose_run(["cluster=slurm", "hardware=h100", "cluster.mem_gb=500", "cluster.partition=gpu",
                          "+cluster.additional_parameters.mail-type=END"])
    request = request_for(cfg)
    assert request.mem_gb == 500
    params = sbatch_parameters(cfg.cluster, request, "job")
    assert params["partition"] == "gpu" and params["additional_parameters"] == {"mail-type": "END"}

    no_gpu, _ = compose_run(["cluster=slurm", "hardware=h100", "cluster.gpus_per_node=0"])
    assert "needs GPUs" in check_request(no_gpu, request_for(no_gpu))
    megatron, _ = compose_run(["cluster=slurm", "hardware=h100", "backend=megatron_bridge", "model=qwen3-30b-a3b",
                               "parallelism=tp8_ep8", "cluster.gpus_per_node=4"])
    assert "request is 1 x 4 = 4" in check_request(megatron, request_for(megatron))


def test_pyxis_runs_tasks_in_the_container():
    cfg, _ = compose_run(["cluster=slurm_pyxis", "hardware=h100"])
    params = sbatch_parameters(cfg.cluster, request_for(cfg), "job")
    assert "--container-image=nvcr.io/nvidia/nemo:26.04" in params["srun_args"]
    assert any(a.startswith("--container-mounts=") and ":/workspace/ptq-launcher" in a for a in params["srun_args"])
    assert cfg.cluster.python == "python"


@pytest.mark.parametrize("manifest,record,slurm,expected", [
    ("refused", None, None, "refused"),
    ("skipped", None, None, "finished"),
    ("submitted", None, "PENDING", "pending"),
    ("submitted", {"status": "running"}, "RUNNING", "running"),
    ("submitted", {"status": "finished", "checkpoint": "c"}, "COMPLETED", "finished"),
    ("submitted", {"status": "failed", "error": "boom"}, "COMPLETED", "failed"),
    ("submitted", {"status": "running"}, "CANCELLED by 0", "failed"),
    ("submitted", None, "OUT_OF_MEMORY", "failed"),
    ("submitted", None, None, "unknown"),
])
def test_point_state(manifest, record, slurm, expected):
    state, detail = point_state(manifest, "why", record, slurm, "12_3")
    assert state == expected
    if expected == "failed" and record is None or slurm == "CANCELLED by 0":
        assert "12_3" in detail and "ended" in detail


def test_varying_overrides_keep_the_swept_keys():
    labels = varying_overrides([["recipe=fp8", "calib.size=4", "cluster=slurm"],
                                ["recipe=int8_sq", "calib.size=4", "cluster=slurm"]])
    assert labels == ["recipe=fp8", "recipe=int8_sq"]


@pytest.mark.slow
def test_named_sweep_and_command_line_precedence(tmp_path):
    """`sweep=cpu_recipes` is 4 recipes x 2 sizes; a recipe given on the command line replaces its list."""
    def points(*extra):
        out = subprocess.run([sys.executable, "launch.py", "-m", "sweep=cpu_recipes", "dry_run=true",
                              f"output_root={tmp_path}", *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return [line for line in out.stdout.splitlines() if "calibrate on" in line]

    assert len(points()) == 8
    assert len(points("recipe=fp8")) == 2
