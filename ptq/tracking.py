"""The `tracking` group: each run's final record logged as one MLflow run, and a report's files as another.

The run record (run.json) is the source of truth. Once it is final (finished or failed), `track` logs it:
the composed config as params (dotted keys) and as config.yaml, the figures as metrics (fidelity with its
standard errors and interval bounds, every benchmark result with its standard error and its difference from
BF16, sizes, stage timings), what the run was as tags (model, recipe, algorithm, KV cache, status, hardware,
backend, package versions), and run.json as an artifact. A tracking failure is a warning and a note in the
record (record["tracking"]["error"]), never a failed or changed run.

`check_tracking` refuses a bad setting before any model is loaded. MLflow is imported inside the functions
that log, so planning and dry runs never import it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from ptq.errors import ConfigError
from ptq.files import write_json_atomic
from ptq.run_record import RunRecord
from ptq.schema import RunConfig, TrackingConfig
from ptq.stats import item_scores_by_id, paired_delta_stderr

log = logging.getLogger(__name__)

BACKENDS = ("none", "mlflow")
INSTALL = "pip install -e . (or: pip install 'mlflow-skinny==3.17.2' 'sqlalchemy>=2,<3' 'alembic>=1.13,<2')"
# MLflow's limits (mlflow/utils/validation.py): longer keys are refused, longer values truncated.
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_EXPERIMENT_NAME = 500
# Schemes whose store is a database MLflow opens itself; without an artifact_location its artifacts would go
# to ./mlruns in the working folder.
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
# What a record holds that is not a figure (per-sequence and per-item lists, long layer lists).
SKIPPED_FIGURES = ("per_sequence", "worst_layers", "items", "subjects")


# ----------------------------------------------------------------------------------------------- checking


def local_store(uri: str) -> Optional[Path]:
    """The local file or folder an MLflow tracking URI stores into (resolved), or None for a remote store."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative/path, sqlite:////absolute/path (SQLAlchemy's form)
        path = unquote(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else ""
        return Path(os.path.expanduser(path)).resolve() if path and path != ":memory:" else None
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path)).expanduser().resolve()
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive letter)
        return Path(os.path.expanduser(uri)).resolve()
    return None


def _scheme(uri: str) -> str:
    scheme = urlparse(uri).scheme
    return "file" if len(scheme) <= 1 else scheme.split("+")[0]


def _inside(path: Path, roots: Sequence[Tuple[str, Path]]) -> bool:
    return any(root in path.parents for _, root in roots)


def artifact_location(settings: TrackingConfig) -> Optional[str]:
    """Where a new experiment keeps its artifacts: the setting, else <store folder>/artifacts beside a local
    store, else the server's choice (None)."""
    if settings.artifact_location:
        path = local_store(settings.artifact_location)
        return path.as_uri() if path is not None else settings.artifact_location
    store = local_store(settings.tracking_uri or "")
    if store is None:
        return None
    folder = store.parent if _scheme(settings.tracking_uri) == "sqlite" else store
    return (folder / "artifacts").as_uri()


def normalized_uri(uri: str) -> str:
    """The tracking URI with a local store's path made absolute (as MLflow and the record should see it)."""
    store = local_store(uri)
    if store is None:
        return uri
    return f"sqlite:///{store}" if _scheme(uri) == "sqlite" else store.as_uri()


def check_tracking(cfg: RunConfig) -> None:
    """Refuse a tracking setting that cannot work, before any model is loaded; the message names the fix."""
    settings = cfg.tracking
    if settings.backend not in BACKENDS:
        raise ConfigError(
            f"tracking.backend={settings.backend} is unknown; choose tracking=none or tracking=mlflow (conf/tracking/)."
        )
    if settings.backend == "none":
        return
    uri = settings.tracking_uri
    if not uri:
        raise ConfigError(
            "tracking=mlflow needs tracking.tracking_uri, e.g. "
            "tracking.tracking_uri=sqlite:///runs/mlflow/mlflow.db (the default of conf/tracking/mlflow.yaml)."
        )
    scheme = _scheme(uri)
    needed = ["mlflow"] + (["sqlalchemy", "alembic"] if scheme == "sqlite" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"tracking=mlflow with tracking.tracking_uri={uri} needs the Python package(s) "
            f"{', '.join(missing)}, which are not installed: run {INSTALL}; or set tracking=none."
        )
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise ConfigError(
            f"tracking.tracking_uri={uri} is MLflow's file store, which MLflow 3 keeps in maintenance "
            "mode and refuses; use a local SQLite store instead, e.g. "
            "tracking.tracking_uri=sqlite:///runs/mlflow/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)."
        )
    if scheme in DATABASES and scheme != "sqlite" and not settings.artifact_location:
        raise ConfigError(
            f"tracking.tracking_uri={uri} is a database without a server: set "
            "tracking.artifact_location (else MLflow writes artifacts to ./mlruns in the working folder)."
        )
    if not settings.experiment or len(settings.experiment) > MAX_EXPERIMENT_NAME:
        raise ConfigError(
            f"tracking.experiment={settings.experiment!r} must be a name of 1 to {MAX_EXPERIMENT_NAME} "
            "characters, e.g. tracking.experiment=ptq-launcher."
        )
    roots = [
        ("output_root", Path(os.path.expanduser(cfg.output_root)).resolve()),
        ("cache_dir", Path(os.path.expanduser(cfg.cache_dir)).resolve()),
    ]
    for key, value in (("tracking.tracking_uri", uri), ("tracking.artifact_location", settings.artifact_location)):
        path = local_store(value) if value else None
        if path is not None and not _inside(path, roots):
            raise ConfigError(
                f"{key}={value} stores into {path}, outside output_root={roots[0][1]} and cache_dir={roots[1][1]}; "
                "a run writes only below those. Put the store below one of them, e.g. "
                f"{key}={'sqlite:///' if key.endswith('uri') else ''}{roots[0][1]}/mlflow/"
                f"{'mlflow.db' if key.endswith('uri') else 'artifacts'}, or use a tracking server (http://host:5000)."
            )


# ----------------------------------------------------------------------------------------- what is logged


def _key(name: str) -> str:
    """A param, metric or tag key MLflow accepts: letters, digits, _ - . space and colon, no '..', at most 250
    long (MLflow also takes '/', as a path: left out here, the keys are dotted)."""
    key = "".join(c if c.isalnum() or c in "_-. :" else "_" for c in str(name)).lstrip(".") or "_"
    while ".." in key:
        key = key.replace("..", "._")
    return key[:MAX_KEY]


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def flatten_config(config: dict, prefix: str = "") -> Dict[str, str]:
    """Dotted keys of a composed config with their values as MLflow params (lists as JSON, long values cut)."""
    params: Dict[str, str] = {}
    for name, value in config.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            params.update(flatten_config(value, f"{key}."))
            continue
        text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
        params[_key(key)] = text[:MAX_PARAM_VALUE]
    return params


def _figures(section, prefix: str) -> Dict[str, float]:
    """Every number in a record section as a metric `prefix.key`; a pair of numbers (an interval such as
    perplexity_ratio_ci95) as `key_low` / `key_high`."""
    metrics: Dict[str, float] = {}
    if not isinstance(section, dict):
        return metrics
    for name, value in section.items():
        key = f"{prefix}.{name}"
        if name in SKIPPED_FIGURES:
            continue
        if isinstance(value, dict):
            metrics.update(_figures(value, key))
        elif isinstance(value, list) and len(value) == 2 and all(_number(v) is not None for v in value):
            metrics[f"{key}_low"], metrics[f"{key}_high"] = float(value[0]), float(value[1])
        elif _number(value) is not None:
            metrics[key] = float(value)
    return metrics


def _paired_stderr(items, bf16_items) -> Tuple[Optional[float], int]:
    """The report's paired error of a difference from BF16 (ptq/stats.py), from two records' per-item scores."""
    stderr, paired = paired_delta_stderr(item_scores_by_id(items), item_scores_by_id(bf16_items))
    return (None if math.isnan(stderr) else stderr), paired


def _evaluation_metrics(evaluation) -> Dict[str, float]:
    """eval.<benchmark>.<metric>: the value, its stderr, the BF16 baseline's (bf16, bf16_stderr), the difference
    from it (delta; delta_stderr from the items both scored), and any other figure a result row carries."""
    metrics: Dict[str, float] = {}
    if not isinstance(evaluation, dict):
        return metrics
    baseline = {
        (r.get("benchmark"), r.get("metric")): r for r in evaluation.get("baseline") or [] if isinstance(r, dict)
    }
    for row in evaluation.get("results") or []:
        if not isinstance(row, dict) or _number(row.get("value")) is None:
            continue
        key = f"eval.{row.get('benchmark')}.{row.get('metric')}"
        metrics[key] = float(row["value"])
        for name, value in row.items():
            if name not in ("value",) + SKIPPED_FIGURES and _number(value) is not None:
                metrics[f"{key}.{name}"] = float(value)
        bf16 = baseline.get((row.get("benchmark"), row.get("metric")))
        if bf16 is None or _number(bf16.get("value")) is None:
            continue
        if row.get("fingerprint") and bf16.get("fingerprint") and row["fingerprint"] != bf16["fingerprint"]:
            continue  # measured on other items or settings: not a comparison
        metrics[f"{key}.bf16"] = float(bf16["value"])
        if _number(bf16.get("stderr")) is not None:
            metrics[f"{key}.bf16_stderr"] = float(bf16["stderr"])
        metrics[f"{key}.delta"] = float(row["value"]) - float(bf16["value"])
        stderr, paired = _paired_stderr(row.get("items"), bf16.get("items"))
        if stderr is not None:
            metrics[f"{key}.delta_stderr"] = stderr
            metrics[f"{key}.paired_items"] = float(paired)
    return metrics


def record_metrics(record: RunRecord) -> Dict[str, float]:
    """The figures of a run record as MLflow metrics."""
    metrics = _figures(record.section("fidelity"), "fidelity")
    metrics.update(_evaluation_metrics(record.section("evaluation")))
    metrics.update(_figures(record.section("size"), "size"))
    timings = record.section("timings_s")
    metrics.update({f"time.{stage}_s": float(s) for stage, s in timings.items() if _number(s) is not None})
    if timings:
        metrics["time.total_s"] = float(sum(s for s in timings.values() if _number(s) is not None))
    layers = record.section("layers")
    if _number(layers.get("quantized")) is not None:
        metrics["layers.quantized"] = float(layers["quantized"])
    validation = record.section("validation")
    if isinstance(validation.get("passed"), bool):
        metrics["validation.passed"] = float(validation["passed"])
    return {_key(k): v for k, v in metrics.items()}


def record_tags(record: RunRecord) -> Dict[str, str]:
    """What the run was, as MLflow tags (searchable in the UI: tags.recipe = 'fp8')."""
    hardware, validation, serving = record.section("hardware"), record.section("validation"), record.section("serving")
    tags = {
        "model": record.model,
        "recipe": record.recipe,
        "algorithm": record.algorithm or "default",
        "kv_cache": record.kv_cache,
        "status": record.status,
        "hardware": record.hardware_profile,
        "backend": record.backend,
        "calib": f"{record.calib_size}x{record.calib_seq_len}",
        "config_hash": record.config_hash,
        "output_dir": record.output_dir,
        "checkpoint": record.checkpoint,
        "host": hardware.get("host"),
        "gpus": ", ".join(hardware.get("gpus") or []) or None,
        "quant_algo": serving.get("quant_algo"),
        "serving_engines": ", ".join(serving.get("engines") or []) or None,
        "eval_suite": record.section("evaluation").get("suite"),
        "validation": None if not validation else ("passed" if validation.get("passed") else "failed"),
        "error": record.error,
    }
    for package, version in record.section("versions").items():
        tags[f"version.{package}"] = version
    return {_key(k): str(v)[:MAX_TAG_VALUE] for k, v in tags.items() if v is not None}


def _millis(stamp: Optional[str]) -> Optional[int]:
    """A record's time stamp (ptq/record_parts.py now(), with its UTC offset) in epoch milliseconds."""
    try:
        return int(datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp() * 1000) if stamp else None
    except (TypeError, ValueError):
        return None


def _run_name(record: RunRecord, settings: TrackingConfig) -> str:
    if settings.run_name:
        return settings.run_name
    output_dir = Path(record.output_dir or "run")
    root = record.config.get("output_root")
    try:
        return str(output_dir.relative_to(Path(os.path.expanduser(str(root))).resolve()))
    except (TypeError, ValueError):
        return output_dir.name


def _experiment_id(client, settings: TrackingConfig) -> str:
    found = client.get_experiment_by_name(settings.experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(settings.experiment, artifact_location=artifact_location(settings))
    except Exception:  # created meanwhile by another point of the sweep
        found = client.get_experiment_by_name(settings.experiment)
        if found is None:
            raise
        return found.experiment_id


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    store = local_store(uri)
    if store is not None:
        store.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _log_values(client, run_id: str, params: Dict[str, str], metrics: Dict[str, float], tags: Dict[str, str]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    stamp = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )


def _end_failed(client, run_id: str) -> None:
    """Mark a run whose logging broke off as failed, if the store still answers (the first error is the one raised)."""
    try:
        client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001
        pass


def log_record(record: dict, settings: TrackingConfig) -> dict:
    """Log a final run record as one MLflow run; returns what record["tracking"] keeps. Raises on any failure."""
    import yaml

    plain = json.loads(json.dumps(record, default=str))  # plain types, as run.json holds them
    record = RunRecord.parse(plain)
    uri = normalized_uri(settings.tracking_uri)
    client = _client(uri)
    experiment_id = _experiment_id(client, settings)
    run = client.create_run(experiment_id, start_time=_millis(record.started_at), run_name=_run_name(record, settings))
    run_id = run.info.run_id
    where = {
        "backend": "mlflow",
        "uri": uri,
        "experiment": settings.experiment,
        "experiment_id": experiment_id,
        "run_id": run_id,
        "artifact_uri": run.info.artifact_uri,
    }
    finished = record.status == "finished"
    try:
        _log_values(client, run_id, flatten_config(record.config), record_metrics(record), record_tags(record))
        client.log_text(run_id, yaml.safe_dump(record.config, sort_keys=False), "config.yaml")
        client.log_text(run_id, json.dumps({**plain, "tracking": where}, indent=2) + "\n", "run.json")
    except BaseException:
        _end_failed(client, run_id)
        raise
    client.set_terminated(run_id, "FINISHED" if finished else "FAILED", end_time=_millis(record.finished_at))
    return where


def track(record: dict, settings: TrackingConfig, record_path: Optional[Path] = None) -> Optional[dict]:
    """Log a final run record (tracking=mlflow) and note the outcome in record["tracking"] and, when given, in the
    record file. Never raises: the run's own outcome stands whatever happens here."""
    if settings.backend == "none":
        return None
    try:
        outcome = log_record(record, settings)
        log.info(
            "Logged to MLflow: run %s in experiment %s at %s", outcome["run_id"], settings.experiment, outcome["uri"]
        )
    except Exception as exc:  # noqa: BLE001 - whatever MLflow raises, the run is not failed by it
        text = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
        outcome = {
            "backend": settings.backend,
            "uri": settings.tracking_uri,
            "error": f"{type(exc).__name__}: {text}" if text else type(exc).__name__,
        }
        log.warning("Experiment tracking failed; the run record is unaffected: %s", outcome["error"])
    record["tracking"] = outcome
    if record_path is not None:
        try:
            write_json_atomic(record_path, record)
        except OSError as exc:
            log.warning("Could not note the tracking outcome in %s: %s", record_path, exc)
    return outcome


def log_files(
    uri: str, experiment: str, files: Iterable[Path], run_name: str = "report", tags: Optional[Dict[str, str]] = None
) -> dict:
    """Log files (a report's tables, plots, recommendation) as the artifacts of one MLflow run; returns where."""
    settings = TrackingConfig(backend="mlflow", tracking_uri=uri, experiment=experiment, run_name=run_name)
    uri = normalized_uri(uri)
    client = _client(uri)
    experiment_id = _experiment_id(client, settings)
    run = client.create_run(experiment_id, run_name=run_name, tags={"kind": "report", **(tags or {})})
    logged: List[str] = []
    try:
        for path in files:
            client.log_artifact(run.info.run_id, str(path))
            logged.append(Path(path).name)
    except BaseException:
        _end_failed(client, run.info.run_id)
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return {"uri": uri, "experiment": experiment, "run_id": run.info.run_id, "artifacts": logged}
