"""The `cluster` group without Slurm: derived requests, overrides, batch-script parameters, point states."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, REPO, compose_run, plan_for
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from ptq.cluster import check_request, derived_request, request_for, sbatch_parameters
from ptq.errors import ConfigError
from ptq.plan import Facts
from ptq.run_record import RunRecord
from ptq.sweep import point_state, varying_overrides


def compose_slurm(overrides):
    """(RunConfig, hydra.launcher settings) of a point, as the Slurm launcher sees them."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_object(cfg), launcher


def test_cluster_slurm_selects_the_checking_launcher():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["cluster=slurm"], return_hydra_config=True)
        default = compose(config_name="config", return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("PtqSlurmLauncher")
    assert cfg.hydra.runtime.choices.cluster == "slurm"
    assert default.hydra.runtime.choices.cluster == "local"
    assert default.hydra.launcher._target_.endswith("BasicLauncher")
    # The choice selects the launcher; it adds nothing to the run's config.
    assert "cluster" not in cfg and "cluster" not in default


def test_cpu_point_asks_for_cpus_and_memory_only():
    cfg, launcher = compose_slurm(["cluster=slurm"])
    request = request_for(cfg, launcher)
    assert request.gpus_per_node == 0 and request.nodes == 1
    # SmolLM2 (0.135 B parameters) in FP32 three times over, plus 4 GB.
    assert request.mem_gb == 6
    assert "gpus_per_node" not in sbatch_parameters(launcher, request, "x")


def test_gpu_requests_grow_with_the_model():
    small, _ = compose_run(["cluster=slurm", "hardware=h100", "model=qwen3-8b"])
    large, _ = compose_run(["cluster=slurm", "hardware=h100", "model=nemotron-3-super-120b-a12b"])
    assert derived_request(small).gpus_per_node == 1
    # 120 B parameters = 223.5 GiB of BF16: 90% of an 80 GB card holds 72 GiB, so four cards.
    assert derived_request(large).gpus_per_node == 4
    assert derived_request(large).mem_gb > derived_request(small).mem_gb


@pytest.mark.parametrize(
    "model,hardware,extra",
    [
        ("nemotron-3-super-120b-a12b", "h200", []),
        ("nemotron-3-super-120b-a12b", "h100", []),
        ("qwen3-30b-a3b", "h100", []),
        ("qwen3-30b-a3b", "h100", ["backend.max_gpu_memory_gb=40"]),
        # 38.5 B parameters = 71.7 GiB: under 90% of 80 GiB, over 90% of the 79.2 GiB CUDA reports for an H100.
        ("qwen3-8b", "h100", ["model.params_b=38.5"]),
    ],
)
def test_slurm_request_is_the_count_planning_requires(model, hardware, extra):
    """One answer to "how many GPUs does this model need in process": what a sweep point asks Slurm for is the
    count a dry run names as the minimum; that many GPUs of the memory CUDA reports for the card are accepted
    before loading, one fewer is refused."""
    overrides = [f"model={model}", f"hardware={hardware}", *extra]
    cfg, _ = compose_run(["cluster=slurm", *overrides])
    gpus = derived_request(cfg).gpus_per_node
    dry = plan_for([*overrides, "dry_run=true"])
    # What torch reports for the card: 79.19 GiB for an H100 80GB, 139.8 GiB for an H200.
    reported = {"h100": 79.19, "h200": 139.8}[hardware]
    assert plan_for(overrides, Facts(cuda_available=True, gpu_count=gpus, gpu_memory_gib=[reported] * gpus)).action
    if gpus > 1:
        assert any(f"at least {gpus} GPUs of hardware={hardware}" in w for w in dry.warnings)
        fewer = Facts(cuda_available=True, gpu_count=gpus - 1, gpu_memory_gib=[reported] * (gpus - 1))
        # (under a cap the refusal offers raising it, besides more GPUs)
        with pytest.raises(ConfigError, match=rf"at least {gpus} such GPUs|make more GPUs visible"):
            plan_for(overrides, fewer)
    else:
        assert not any("GPUs of hardware" in w for w in dry.warnings)


def test_a_gpu_request_below_what_the_weights_need_is_refused_before_submitting():
    cfg, launcher = compose_slurm(["cluster=slurm", "hardware=h100", "model=nemotron-3-super-120b-a12b"])
    assert check_request(cfg, request_for(cfg, launcher)) is None
    launcher["gpus_per_node"] = 2
    problem = check_request(cfg, request_for(cfg, launcher))
    assert "need at least 4 GPUs of hardware=h100" in problem and "gpus_per_node=2" in problem
    # More than one node holds: in process that cannot run at all.
    big, launcher = compose_slurm(
        ["cluster=slurm", "hardware=h100", "model=nemotron-3-super-120b-a12b", "model.params_b=400"]
    )
    assert "more than the 8 of one node" in check_request(big, request_for(big, launcher))


def test_megatron_request_follows_the_parallel_layout():
    cfg, launcher = compose_slurm(
        [
            "cluster=slurm",
            "hardware=h100",
            "backend=megatron_bridge",
            "model=nemotron-3-super-120b-a12b",
            "parallelism=tp8_pp2_ep8",
            "recipe=mamba_moe_nvfp4_conservative",
        ]
    )
    request = request_for(cfg, launcher)
    assert (request.nodes, request.gpus_per_node, request.tasks_per_node) == (2, 8, 1)
    params = sbatch_parameters(launcher, request, "job")
    assert params["gpus_per_node"] == 8
    assert any("MASTER_ADDR" in line for line in params["setup"])
    assert check_request(cfg, request) is None


def test_overrides_win_and_bad_ones_are_refused():
    cfg, launcher = compose_slurm(
        [
            "cluster=slurm",
            "hardware=h100",
            "hydra.launcher.mem_gb=500",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gres=gpu:h100:1",
            "+hydra.launcher.additional_parameters.mail-type=END",
        ]
    )
    request = request_for(cfg, launcher)
    assert request.mem_gb == 500 and request.timeout_min == derived_request(cfg).timeout_min
    params = sbatch_parameters(launcher, request, "job")
    assert params["partition"] == "gpu" and params["additional_parameters"] == {"mail-type": "END"}
    assert params["gres"] == "gpu:h100:1"  # a key of hydra-submitit-launcher's schema this launcher does not model

    no_gpu, launcher = compose_slurm(["cluster=slurm", "hardware=h100", "hydra.launcher.gpus_per_node=0"])
    assert "needs GPUs" in check_request(no_gpu, request_for(no_gpu, launcher))
    megatron, launcher = compose_slurm(
        [
            "cluster=slurm",
            "hardware=h100",
            "backend=megatron_bridge",
            "model=qwen3-30b-a3b",
            "parallelism=tp8_ep8",
            "hydra.launcher.gpus_per_node=4",
        ]
    )
    assert "request is 1 x 4 = 4" in check_request(megatron, request_for(megatron, launcher))


def test_the_launcher_settings_are_hydra_submitit_launchers_schema_extended():
    """Every key of the plugin's Slurm schema is a key of this launcher's, so its documentation applies as is."""
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    _, launcher = compose_slurm(["cluster=slurm"])
    assert set(OmegaConf.structured(SlurmQueueConf).keys()) <= set(launcher)
    assert {"pack", "poll_s", "container_image", "srun_args", "python"} <= set(launcher)
    with pytest.raises(Exception, match="partitionn"):
        compose_slurm(["cluster=slurm", "hydra.launcher.partitionn=gpu"])


def test_pyxis_runs_tasks_in_the_container():
    cfg, launcher = compose_slurm(["cluster=slurm_pyxis", "hardware=h100"])
    params = sbatch_parameters(launcher, request_for(cfg, launcher), "job")
    assert "--container-image=nvcr.io/nvidia/nemo:26.04" in params["srun_args"]
    assert any(a.startswith("--container-mounts=") and "/workspace/ptq-launcher" in a for a in params["srun_args"])
    assert launcher["python"] == "python"


@pytest.mark.parametrize(
    "manifest,record,slurm,expected",
    [
        ("refused", None, None, "refused"),
        ("skipped", None, None, "finished"),
        ("submitted", None, "PENDING", "pending"),
        ("submitted", RunRecord("m", "fp8", status="running"), "RUNNING", "running"),
        ("submitted", RunRecord("m", "fp8", status="finished", checkpoint="c"), "COMPLETED", "finished"),
        ("submitted", RunRecord("m", "fp8", status="failed", error="boom"), "COMPLETED", "failed"),
        ("submitted", RunRecord("m", "fp8", status="running"), "CANCELLED by 0", "failed"),
        ("submitted", None, "OUT_OF_MEMORY", "failed"),
        ("submitted", None, None, "unknown"),
    ],
)
def test_point_state(manifest, record, slurm, expected):
    state, detail = point_state(manifest, "why", record, slurm, "12_3")
    assert state == expected
    if expected == "failed" and record is None or slurm == "CANCELLED by 0":
        assert "12_3" in detail and "ended" in detail


def test_varying_overrides_keep_the_swept_keys():
    labels = varying_overrides(
        [["recipe=fp8", "calib.size=4", "cluster=slurm"], ["recipe=int8_sq", "calib.size=4", "cluster=slurm"]]
    )
    assert labels == ["recipe=fp8", "recipe=int8_sq"]


@pytest.mark.slow
def test_named_sweep_and_command_line_precedence(tmp_path):
    """`sweep=cpu_recipes` is 4 recipes x 2 sizes; a recipe given on the command line replaces its list."""

    def points(*extra):
        out = subprocess.run(
            [sys.executable, "launch.py", "-m", "sweep=cpu_recipes", "dry_run=true", f"output_root={tmp_path}", *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return [line for line in out.stdout.splitlines() if "calibrate on" in line]

    assert len(points()) == 8
    assert len(points("recipe=fp8")) == 2


def _point(overrides):
    from ptq.sweep import Point

    cfg, launcher = compose_slurm(overrides)
    _, config = compose_run([o for o in overrides if not o.startswith("hydra.")])
    return Point(index=0, overrides=list(overrides), config=config, cfg=cfg), launcher


def test_a_dry_run_previews_a_resume_and_points_that_are_running(tmp_path):
    """A dry run shows what a real sweep would do: finished points skipped, points another run holds left alone."""
    from dataclasses import asdict

    from ptq.files import write_json_atomic
    from ptq.lock import OutputLock
    from ptq.record_parts import config_hash
    from ptq.sweep import RUNNING, SKIPPED, SUBMITTED, check_point

    point, launcher = _point(["cluster=slurm", f"output_root={tmp_path}"])
    assert check_point(point, True, launcher).state == SUBMITTED
    out = Path(point.config["output_dir"])
    finished = RunRecord(
        point.cfg.model.name,
        point.cfg.recipe.name,
        status="finished",
        config_hash=config_hash(asdict(point.cfg)),
        finished_at="2026-11-30T12:00:00+0000",
    )
    write_json_atomic(out / "run.json", finished.to_dict())
    point, launcher = _point(["cluster=slurm", f"output_root={tmp_path}"])
    assert check_point(point, True, launcher).state == SKIPPED
    (out / "run.json").unlink()
    with OutputLock(out):
        point, launcher = _point(["cluster=slurm", f"output_root={tmp_path}"])
        checked = check_point(point, True, launcher)
        assert checked.state == RUNNING and "being run by host" in checked.reason


def test_a_point_refused_for_sharing_a_folder_writes_nothing_into_the_other_points_folder(tmp_path):
    from ptq.sweep import REFUSED, check_point, record_refusals, refuse_shared_folders

    points = []
    for index in range(2):
        point, launcher = _point(["cluster=slurm", f"output_root={tmp_path}", "output_dir=${output_root}/same"])
        point.index = index
        points.append(check_point(point, False, launcher))
    refuse_shared_folders(points)
    assert [p.state for p in points] == ["submitted", REFUSED]
    record_refusals(points)
    assert not (tmp_path / "same" / "run.json").exists()
