"""Experiment tracking (tracking=mlflow, ptq/tracking.py) against a real MLflow store on disk: what a run record
becomes in MLflow, read back through MlflowClient; a broken store never fails or changes the run; bad settings
are refused before loading; the report's files go to MLflow too."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import GPU_FACTS, REPO, TEST_CACHE, compose_run

from ptq.errors import ConfigError
from ptq.plan import make_plan
from ptq.record_parts import config_hash, package_versions
from ptq.report.cli import main as report_main
from ptq.run import execute, prepare
from ptq.schema import TrackingConfig
from ptq.tracking import MAX_PARAM_VALUE, track

mlflow_tracking = pytest.importorskip("mlflow.tracking")


def client(uri: str):
    return mlflow_tracking.MlflowClient(tracking_uri=uri)


def items(scores):
    return {"doc_ids": list(range(len(scores))), "scores": scores}


# Per-item scores of one benchmark (1 = right) for BF16 and the quantized model, on the same 6 items.
BF16_ITEMS = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
FP8_ITEMS = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def realistic_record(tmp_path: Path, status: str = "finished") -> dict:
    """A run record shaped like the one `python launch.py` writes (ptq/run.py), with an evaluation."""
    cfg, config = compose_run([f"output_root={tmp_path / 'runs'}", "recipe=fp8", "eval=local_quick", "tracking=mlflow"])
    config["model"]["exclude_modules"] = ["*" + "x" * 7000]  # a param value beyond MLflow's 6000 characters
    output_dir = Path(config["output_dir"]).resolve()
    bench = {"benchmark": "arc_easy", "metric": "acc", "higher_is_better": True, "fingerprint": "9e0bd7cdb03e6006"}
    record = {
        "status": status,
        "model": "smollm2-135m",
        "recipe": "fp8",
        "algorithm": None,
        "kv_cache": "none",
        "calib_size": 32,
        "calib_seq_len": 256,
        "hardware_profile": "cpu",
        "backend": "hf_modelopt",
        "output_dir": str(output_dir),
        "checkpoint": str(output_dir / "checkpoint") if status == "finished" else None,
        "config_hash": config_hash(asdict(cfg)),
        "config": config,
        "plan": {
            "source": {"kind": "gguf", "location": "/x.gguf", "converted_dir": "/c"},
            "awq_block_size": None,
            "exclude_patterns": ["*lm_head*"],
        },
        "warnings": [],
        "versions": package_versions(),
        "hardware": {"host": "vm", "cpu_count": 2, "cuda": False},
        "started_at": "2026-12-01T02:29:51+0000",
        "holder": None,
        "validation": {
            "passed": True,
            "problems": [],
            "quantized_layers": 210,
            "quant_algo": "FP8",
            "kv_cache_quant_algo": None,
        },
        "serving": {"engines": ["vLLM", "SGLang", "TensorRT-LLM"], "quant_algo": "FP8", "kv_cache_quant_algo": None},
        "fidelity": {
            "tokens": 2040,
            "sequences": 8,
            "bf16_perplexity": 23.75,
            "quantized_perplexity": 24.68,
            "perplexity_ratio": 1.0393,
            "perplexity_ratio_ci95": [1.0259, 1.0529],
            "log_perplexity_ratio_stderr": 0.0066,
            "mean_kl": 0.0440,
            "mean_kl_stderr": 0.0035,
            "top1_agreement": 0.878,
            "top1_agreement_stderr": 0.0099,
            "per_sequence": {"kl": [0.05, 0.04], "top1_agreement": [0.85, 0.9], "log_perplexity_ratio": [0.07, 0.0]},
            "exported_checkpoint": {
                "check": "stored weights",
                "applicable": True,
                "layers": 210,
                "max_relative_error": {"FP8": 0.0272},
                "problems": [],
            },
        },
        "evaluation": {
            "suite": "local_quick",
            "results": [
                {**bench, "value": 0.5, "stderr": 0.2236, "items": items(FP8_ITEMS)},
                {
                    "benchmark": "wikitext2",
                    "metric": "word_perplexity",
                    "value": 54.7,
                    "stderr": None,
                    "higher_is_better": False,
                    "fingerprint": "2241bae10709d19e",
                },
            ],
            "baseline": [
                {**bench, "value": 0.6667, "stderr": 0.2108, "items": items(BF16_ITEMS)},
                {
                    "benchmark": "wikitext2",
                    "metric": "word_perplexity",
                    "value": 53.9,
                    "stderr": None,
                    "higher_is_better": False,
                    "fingerprint": "2241bae10709d19e",
                },
            ],
        },
        "size": {
            "bf16_bytes": 269030016,
            "checkpoint_bytes": 162935640,
            "compression": 1.6511,
            "bits_per_weight": 9.69,
        },
        "layers": {"quantized": 210, "excluded": ["lm_head"], "unexpected_bf16": []},
        "details": {"calib_batch_size": 8},
        "timings_s": {
            "load": 2.4,
            "calib_data": 82.8,
            "calibrate": 47.0,
            "fidelity": 23.3,
            "eval": 61.0,
            "export": 1.67,
            "validate": 0.004,
        },
        "finished_at": "2026-12-01T02:33:27+0000",
    }
    if status == "failed":
        record["error"] = "ValidationFailed: checkpoint validation failed: lm_head left in BF16"
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "run.json").write_text(json.dumps(record))
    return record


def test_a_run_record_is_logged_as_one_mlflow_run_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own default would write ./mlruns here: nothing may appear
    record = realistic_record(tmp_path)
    record_path = Path(record["output_dir"]) / "run.json"
    cfg, _ = compose_run([f"output_root={tmp_path / 'runs'}", "tracking=mlflow"])
    outcome = track(record, cfg.tracking, record_path)

    assert "error" not in outcome, outcome
    uri = outcome["uri"]
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}"
    # The record notes where it went, in memory and on disk.
    assert (
        json.loads(record_path.read_text())["tracking"]["run_id"] == outcome["run_id"] == record["tracking"]["run_id"]
    )

    run = client(uri).get_run(outcome["run_id"])
    # Named by the output folder below the output root.
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("smollm2-135m/fp8-kv_none-calib16x128")
    assert run.info.run_name == str(Path(record["output_dir"]).relative_to(tmp_path / "runs"))
    assert client(uri).get_experiment(run.info.experiment_id).name == "ptq-launcher"

    params = run.data.params
    assert params["recipe.name"] == "fp8" and params["calib.size"] == "16" and params["tracking.backend"] == "mlflow"
    assert params["recipe.exclude"] == "[]" and params["eval.suite"] == "local_quick"
    assert len(params["model.exclude_modules"]) == MAX_PARAM_VALUE  # cut to MLflow's limit, not refused

    metrics = run.data.metrics
    assert metrics["fidelity.mean_kl"] == pytest.approx(0.0440)
    assert metrics["fidelity.mean_kl_stderr"] == pytest.approx(0.0035)
    assert metrics["fidelity.perplexity_ratio"] == pytest.approx(1.0393)
    assert (
        metrics["fidelity.perplexity_ratio_ci95_low"],
        metrics["fidelity.perplexity_ratio_ci95_high"],
    ) == pytest.approx((1.0259, 1.0529))
    assert metrics["fidelity.top1_agreement"] == pytest.approx(0.878)
    assert metrics["fidelity.top1_agreement_stderr"] == pytest.approx(0.0099)
    assert metrics["fidelity.exported_checkpoint.max_relative_error.FP8"] == pytest.approx(0.0272)
    assert not any(k.startswith("fidelity.per_sequence") for k in metrics)
    # Each benchmark result with its standard error, BF16's, and the difference; its standard error from the
    # six items both scored (differences 0, -1, 0, 0, 0, 0: mean -1/6, sd sqrt(1/6), se sqrt(1/6)/sqrt(6) = 1/6).
    assert metrics["eval.arc_easy.acc"] == 0.5 and metrics["eval.arc_easy.acc.stderr"] == pytest.approx(0.2236)
    assert metrics["eval.arc_easy.acc.bf16"] == pytest.approx(0.6667)
    assert metrics["eval.arc_easy.acc.bf16_stderr"] == pytest.approx(0.2108)
    assert metrics["eval.arc_easy.acc.delta"] == pytest.approx(0.5 - 0.6667)
    assert metrics["eval.arc_easy.acc.delta_stderr"] == pytest.approx(1 / 6)
    assert metrics["eval.arc_easy.acc.paired_items"] == 6
    assert metrics["eval.wikitext2.word_perplexity.delta"] == pytest.approx(0.8)
    assert "eval.wikitext2.word_perplexity.stderr" not in metrics  # lm-eval gave none: nothing is made up
    assert metrics["size.bits_per_weight"] == 9.69 and metrics["size.checkpoint_bytes"] == 162935640
    assert metrics["time.calibrate_s"] == 47.0 and metrics["time.total_s"] == pytest.approx(218.174)

    tags = run.data.tags
    assert {k: tags[k] for k in ("model", "recipe", "algorithm", "kv_cache", "status", "hardware", "backend")} == {
        "model": "smollm2-135m",
        "recipe": "fp8",
        "algorithm": "default",
        "kv_cache": "none",
        "status": "finished",
        "hardware": "cpu",
        "backend": "hf_modelopt",
    }
    assert tags["version.lm_eval"] == record["versions"]["lm_eval"] is not None
    assert tags["version.nvidia-modelopt"] == "0.47.0" and tags["serving_engines"] == "vLLM, SGLang, TensorRT-LLM"

    store = client(uri)
    assert sorted(a.path for a in store.list_artifacts(outcome["run_id"])) == ["config.yaml", "run.json"]
    logged = json.loads(Path(store.download_artifacts(outcome["run_id"], "run.json", str(tmp_path / "dl"))).read_text())
    assert (
        logged["fidelity"]["mean_kl"] == record["fidelity"]["mean_kl"]
        and logged["tracking"]["run_id"] == outcome["run_id"]
    )
    config_yaml = Path(store.download_artifacts(outcome["run_id"], "config.yaml", str(tmp_path / "dl"))).read_text()
    assert "recipe:" in config_yaml and "name: fp8" in config_yaml
    # Everything lies below the output root: the store and the artifacts beside it.
    assert outcome["artifact_uri"].startswith((tmp_path / "runs" / "mlflow" / "artifacts").as_uri())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl", "runs"]


def test_a_failed_run_is_logged_as_failed_with_its_error(tmp_path):
    record = realistic_record(tmp_path, status="failed")
    outcome = track(
        record,
        TrackingConfig(
            backend="mlflow",
            tracking_uri=f"sqlite:///{tmp_path}/store/m.db",
            experiment="failures",
            run_name="the failed one",
        ),
        None,
    )
    run = client(outcome["uri"]).get_run(outcome["run_id"])
    assert run.info.status == "FAILED" and run.info.run_name == "the failed one"
    assert run.data.tags["status"] == "failed" and run.data.tags["error"].startswith("ValidationFailed:")


def test_tracking_none_logs_nothing_and_leaves_the_record_alone(tmp_path):
    record = {"status": "finished"}
    assert track(record, TrackingConfig(), tmp_path / "run.json") is None
    assert record == {"status": "finished"} and not (tmp_path / "run.json").exists()


def test_a_broken_store_does_not_fail_the_run_and_is_noted_in_the_record(tmp_path):
    """A store that cannot be opened when the run ends (here: a file that is not a database) leaves the run's own
    outcome as it was: the record file says finished, and why tracking failed."""
    record = realistic_record(tmp_path)
    broken = tmp_path / "runs" / "mlflow" / "mlflow.db"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a database " * 100)
    record_path = Path(record["output_dir"]) / "run.json"
    outcome = track(record, TrackingConfig(backend="mlflow", tracking_uri=f"sqlite:///{broken}"), record_path)
    on_disk = json.loads(record_path.read_text())
    assert on_disk["status"] == "finished" and on_disk["fidelity"] == record["fidelity"]
    assert on_disk["tracking"] == outcome and "run_id" not in outcome
    assert "not a database" in outcome["error"] and outcome["uri"] == f"sqlite:///{broken}"


MEGATRON_FAILS = [
    "backend=megatron_bridge",
    "calib.dataset=cnn_dailymail",
    "model=qwen3-8b",
    "recipe=fp8",
    "hardware=h100",
    "tracking=mlflow",
]


def test_the_run_path_keeps_its_own_error_when_the_store_is_broken(tmp_path):
    """execute() of a run that fails (a Megatron-Bridge scripts folder that does not exist) with a broken store:
    the run's own error is raised and recorded; tracking's failure is only noted."""
    broken = tmp_path / "runs" / "mlflow" / "mlflow.db"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a database " * 100)
    cfg, config = compose_run(
        [*MEGATRON_FAILS, f"backend.scripts_dir={tmp_path / 'nowhere'}", f"output_root={tmp_path / 'runs'}"]
    )
    with pytest.raises(ConfigError, match="backend.scripts_dir=.* does not exist"):
        execute(make_plan(cfg, GPU_FACTS), config)
    record = json.loads(next((tmp_path / "runs" / "qwen3-8b").glob("*/run.json")).read_text())
    assert record["status"] == "failed" and "scripts_dir" in record["error"]
    assert "not a database" in record["tracking"]["error"]


def test_the_run_path_logs_a_failed_run_to_a_working_store(tmp_path):
    cfg, config = compose_run(
        [*MEGATRON_FAILS, f"backend.scripts_dir={tmp_path / 'nowhere'}", f"output_root={tmp_path / 'runs'}"]
    )
    with pytest.raises(ConfigError):
        execute(make_plan(cfg, GPU_FACTS), config)
    record = json.loads(next((tmp_path / "runs" / "qwen3-8b").glob("*/run.json")).read_text())
    run = client(record["tracking"]["uri"]).get_run(record["tracking"]["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["error"] == record["error"][:8000]
    assert run.data.params["backend.name"] == "megatron_bridge" and run.data.tags["hardware"] == "h100"


def test_tracking_mlflow_composes_with_a_store_below_the_output_root(tmp_path):
    cfg, config = compose_run([f"output_root={tmp_path / 'runs'}", "tracking=mlflow"])
    assert cfg.tracking.backend == "mlflow" and config["tracking"]["experiment"] == "ptq-launcher"
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'runs'}/mlflow/mlflow.db"
    prepare(cfg)  # passes every check
    # Where a run is reported is not what it makes: the config hash (resume, skip) does not change.
    none, _ = compose_run([f"output_root={tmp_path / 'runs'}"])
    assert none.tracking.backend == "none" and config_hash(asdict(cfg)) == config_hash(asdict(none))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["tracking.backend=wandb"], "tracking.backend=wandb is unknown; choose tracking=none or tracking=mlflow"),
        (["tracking=mlflow", "tracking.tracking_uri=sqlite:////elsewhere/mlflow.db"], "outside output_root="),
        (
            ["tracking=mlflow", "tracking.artifact_location=/elsewhere/artifacts"],
            "tracking.artifact_location=/elsewhere",
        ),
        (["tracking=mlflow", "tracking.tracking_uri=file://{root}/mlruns"], "use a local SQLite store instead"),
        (["tracking=mlflow", "tracking.tracking_uri=postgresql://db/mlflow"], "set tracking.artifact_location"),
        (["tracking=mlflow", "tracking.tracking_uri=null"], "needs tracking.tracking_uri"),
        (["tracking=mlflow", "tracking.experiment=''"], "tracking.experiment=''"),
    ],
)
def test_bad_tracking_settings_are_refused_before_loading(tmp_path, monkeypatch, overrides, message):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    root = tmp_path / "runs"
    cfg, _ = compose_run([f"output_root={root}", *[o.format(root=root) for o in overrides]])
    with pytest.raises(ConfigError) as refused:
        prepare(cfg)
    assert message in str(refused.value)
    assert not root.exists()


def test_tracking_mlflow_without_mlflow_installed_is_refused_naming_the_install(tmp_path, monkeypatch):
    """A module set to None in sys.modules is what Python reports as not installed (importlib.util.find_spec)."""
    monkeypatch.setitem(sys.modules, "mlflow", None)
    cfg, _ = compose_run([f"output_root={tmp_path / 'runs'}", "tracking=mlflow"])
    with pytest.raises(
        ConfigError, match=r"needs the Python package\(s\) mlflow, which are not installed: run pip install"
    ):
        prepare(cfg)
    none, _ = compose_run([f"output_root={tmp_path / 'runs'}"])
    prepare(none)  # tracking=none does not need it


def test_planning_with_tracking_imports_no_mlflow():
    """Checking tracking=mlflow asks whether MLflow is installed without importing it (dry runs stay light)."""
    code = (
        "import sys\nfrom hydra import compose, initialize_config_dir\nfrom omegaconf import OmegaConf\n"
        "from ptq.schema import register_schemas\nfrom ptq.run import prepare\nregister_schemas()\n"
        f"with initialize_config_dir(config_dir={str(REPO / 'conf')!r}, version_base='1.3'):\n"
        "    cfg = compose(config_name='config', overrides=['tracking=mlflow', 'dry_run=true'])\n"
        "prepare(OmegaConf.to_object(cfg))\n"
        "print(sorted(m for m in ('mlflow', 'sqlalchemy', 'alembic', 'torch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_versions_include_lm_eval():
    versions = package_versions()
    assert versions["lm_eval"] and versions["lm_eval"][0].isdigit()
    assert (versions.get("mlflow-skinny") or versions.get("mlflow") or "")[:1].isdigit()  # the tracking client


def test_the_report_files_are_logged_as_the_artifacts_of_one_mlflow_run(tmp_path, capsys):
    realistic_record(tmp_path)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}"
    out = tmp_path / "report"
    assert (
        report_main([str(tmp_path / "runs"), "--out", str(out), "--mlflow-uri", uri, "--mlflow-experiment", "reports"])
        == 0
    )
    assert "MLflow: logged" in capsys.readouterr().err
    store = client(uri)
    (run,) = store.search_runs([store.get_experiment_by_name("reports").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "report"
    logged = {a.path for a in store.list_artifacts(run.info.run_id)}
    assert {"results.md", "results.csv", "results.html"} <= logged
    assert logged == {p.name for p in out.iterdir()}  # every file the report wrote, plots included


@pytest.mark.slow
def test_launch_py_with_tracking_mlflow_logs_the_run(smollm2_dir, tmp_path):
    """The README's command with tracking=mlflow, shrunk as tests/test_quantize.py shrinks it."""
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            "launch.py",
            f"output_root={runs}",
            f"cache_dir={TEST_CACHE}",
            "tracking=mlflow",
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
    record = json.loads((runs / "smollm2-135m" / "fp8-kv_none-calib4x32" / "run.json").read_text())
    assert record["status"] == "finished" and "error" not in record["tracking"], record.get("tracking")
    uri = record["tracking"]["uri"]
    assert uri == f"sqlite:///{runs / 'mlflow' / 'mlflow.db'}"
    run = client(uri).get_run(record["tracking"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "smollm2-135m/fp8-kv_none-calib4x32"
    assert run.data.params["recipe.name"] == "fp8" and run.data.params["calib.size"] == "4"
    fid = record["fidelity"]
    for key in ("mean_kl", "mean_kl_stderr", "perplexity_ratio", "top1_agreement"):
        value = run.data.metrics[f"fidelity.{key}"]
        assert value == pytest.approx(fid[key]) or (math.isnan(value) and math.isnan(fid[key]))
    assert run.data.metrics["fidelity.perplexity_ratio_ci95_low"] == pytest.approx(fid["perplexity_ratio_ci95"][0])
    assert run.data.metrics["size.bits_per_weight"] == pytest.approx(record["size"]["bits_per_weight"])
    assert run.data.metrics["time.calibrate_s"] == pytest.approx(record["timings_s"]["calibrate"])
    assert run.data.tags["status"] == "finished" and run.data.tags["version.lm_eval"] == record["versions"]["lm_eval"]
    assert {a.path for a in client(uri).list_artifacts(run.info.run_id)} == {"config.yaml", "run.json"}
    assert "Logged to MLflow" in (runs / "smollm2-135m" / "fp8-kv_none-calib4x32" / "run.log").read_text()
    # Nothing outside the output root: no ./mlruns or mlflow.db in the working folder.
    assert not (REPO / "mlruns").exists() and not (REPO / "mlflow.db").exists()
