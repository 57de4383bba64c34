"""Results collector: synthetic run records in, exact comparison tables and report files out (no model)."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench import records as bench_records
from ptq.layout import LOCK_NAME
from ptq.lock import holder_info
from ptq.report import (
    BF16,
    build_report,
    find_run_records,
    load_records,
    main,
    render_markdown,
    variant_label,
    wide_table,
)
from ptq.report.render import format_cell, with_error, with_interval
from ptq.run_record import RECORD_VERSION, RunRecord

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# Synthetic run records, shaped like the ones ptq/run.py writes


def make_record(
    model,
    recipe,
    *,
    status="finished",
    kv_cache="none",
    calib_size=512,
    seq_len=512,
    finished_at="2026-11-21T12:00:00+0000",
    results=None,
    baseline=None,
    fidelity=None,
    size=None,
    calibrate_s=None,
    error=None,
    fidelity_seq_len=None,
    fidelity_samples=32,
    calib_dataset="self",
    output_dir=None,
    eval_tag=None,
):
    """A run record as ptq/run.py writes it, built with its type (ptq/run_record.py); its composed config holds the
    calibration and fidelity settings (fidelity.seq_len defaults to calib.seq_len, as in conf/fidelity/default.yaml)."""
    sections = {}
    if results is not None or baseline is not None:
        sections["evaluation"] = {"results": results or []}
        if baseline is not None:
            sections["evaluation"]["baseline"] = baseline
    if fidelity is not None:
        sections["fidelity"] = fidelity
    if size is not None:
        sections["size"] = size
    if calibrate_s is not None:
        sections["timings_s"] = {"load": 1.0, "calibrate": calibrate_s, "export": 2.0}
    output_dir = output_dir or f"runs/{model}/{recipe}"
    if eval_tag is None:  # ptq/run.py names the output folder after the evaluation settings' tag
        named = re.search(r"-(eval_[A-Za-z0-9_.]+_[0-9a-f]{6})$", output_dir)
        eval_tag = named.group(1) if named else ""
    record = RunRecord(
        model=model,
        recipe=recipe,
        status=status,
        eval_tag=eval_tag,
        kv_cache=kv_cache,
        calib_size=calib_size,
        calib_seq_len=seq_len,
        output_dir=output_dir,
        config_hash="0" * 16,
        started_at="2026-11-20T09:00:00+0000",
        finished_at=finished_at,
        error=error,
        config={
            "model": {"name": model},
            "recipe": {"name": recipe},
            "calib": {"dataset": calib_dataset, "size": calib_size, "seq_len": seq_len, "batch_size": 0, "seed": 1234},
            "fidelity": {
                "enabled": True,
                "text": "self",
                "samples": fidelity_samples,
                "seq_len": fidelity_seq_len or seq_len,
                "batch_size": 0,
                "seed": 4321,
            },
        },
        sections=sections,
    )
    return record.to_dict()


def scores(**values):
    """`evaluation.results` entries from benchmark__metric=value keywords."""
    entries = []
    for key, value in values.items():
        benchmark, metric = key.split("__")
        entries.append(
            {"benchmark": benchmark, "metric": metric, "value": value, "stderr": 0.01, "higher_is_better": True}
        )
    return entries


def fidelity(quantized_ppl, mean_kl, top1, bf16_ppl=20.0):
    return {
        "tokens": 4096,
        "bf16_perplexity": bf16_ppl,
        "quantized_perplexity": quantized_ppl,
        "perplexity_ratio": quantized_ppl / bf16_ppl,
        "mean_kl": mean_kl,
        "top1_agreement": top1,
    }


def size(checkpoint_bytes, bf16_bytes=200_000_000):
    return {
        "bf16_bytes": bf16_bytes,
        "checkpoint_bytes": checkpoint_bytes,
        "compression": round(bf16_bytes / checkpoint_bytes, 4),
        "bits_per_weight": round(16 * checkpoint_bytes / bf16_bytes, 3),
    }


def write_record(root: Path, name: str, record) -> Path:
    path = root / name / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path


def write_text(root: Path, name: str, text: str) -> Path:
    path = root / name / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def sweep(tmp_path):
    """Two models' worth of runs; returns (root folder, {short name: run.json path})."""
    root = tmp_path / "runs"
    paths = {}

    def add(name, record):
        paths[name] = write_record(root, name, record)

    # Model "tiny": a BF16 run, several variants, a duplicate, a failure and an unfinished run.
    add(
        "tiny/bf16",
        make_record(
            "tiny",
            "bf16",
            finished_at="2026-11-20T10:00:00+0000",
            results=scores(arc_easy__acc_norm=0.32, hellaswag__acc=0.50),
            fidelity=fidelity(20.0, 0.0, 1.0),
            size=size(200_000_000),
        ),
    )
    add(
        "tiny/fp8-new",
        make_record(
            "tiny",
            "fp8",
            results=scores(arc_easy__acc_norm=0.30, hellaswag__acc=0.45),
            # A stale baseline that must lose against the BF16 run.
            baseline=scores(arc_easy__acc_norm=0.99),
            fidelity=fidelity(25.0, 0.05, 0.9),
            size=size(110_000_000),
            calibrate_s=12.5,
        ),
    )
    add(
        "tiny/fp8-old",
        make_record(
            "tiny",
            "fp8",
            finished_at="2026-11-20T12:00:00+0000",
            results=scores(arc_easy__acc_norm=0.111, hellaswag__acc=0.111),
            fidelity=fidelity(99.0, 1.5, 0.111),
        ),
    )
    add("tiny/fp8-kv", make_record("tiny", "fp8", kv_cache="fp8", fidelity=fidelity(26.0, 0.06, 0.88)))
    add(
        "tiny/int4-128",
        make_record(
            "tiny",
            "int4_awq",
            calib_size=128,
            results=scores(arc_easy__acc_norm=0.28, hellaswag__acc=0.40),
            fidelity=fidelity(32.0, 0.2, 0.75),
            size=size(60_000_000),
            calibrate_s=40.0,
        ),
    )
    # A later retry of the same variant that failed: the finished run stays in use.
    add(
        "tiny/int4-128-retry",
        make_record(
            "tiny",
            "int4_awq",
            calib_size=128,
            status="failed",
            finished_at="2026-11-22T08:00:00+0000",
            error="RuntimeError: disk full",
        ),
    )
    add(
        "tiny/int4-1024",
        make_record(
            "tiny",
            "int4_awq",
            calib_size=1024,
            results=scores(arc_easy__acc_norm=0.31, hellaswag__acc=0.48),
            fidelity=fidelity(22.0, 0.03, 0.85),
            size=size(60_000_000),
            calibrate_s=300.0,
        ),
    )
    add(
        "tiny/nvfp4",
        make_record(
            "tiny",
            "nvfp4",
            status="failed",
            error="torch.OutOfMemoryError: CUDA out of memory.\nTried to allocate 2.00 GiB",
        ),
    )
    add("tiny/w4a8", make_record("tiny", "w4a8_awq", status="running", finished_at=None))
    # Its process (this one) holds the folder, as a live run does.
    (paths["tiny/w4a8"].parent / LOCK_NAME).write_text(json.dumps(holder_info()))
    # Model "other": no BF16 run, so BF16 comes from the baselines inside its quantized records.
    add(
        "other/fp8",
        make_record(
            "other",
            "fp8",
            calib_size=256,
            results=scores(arc_easy__acc_norm=0.36),
            baseline=scores(arc_easy__acc_norm=0.40, hellaswag__acc=0.60),
            fidelity=fidelity(12.5, 0.1, 0.8, bf16_ppl=10.0),
        ),
    )
    add(
        "other/int8",
        make_record(
            "other",
            "int8_sq",
            calib_size=256,
            finished_at="2026-11-19T12:00:00+0000",
            results=scores(arc_easy__acc_norm=0.38),
            baseline=scores(arc_easy__acc_norm=0.41),
        ),
    )
    # Files that are not usable run records.
    paths["half-written"] = write_text(root, "broken/half-written", '{"status": "finished", "model": "tiny", "reci')
    paths["list"] = write_text(root, "broken/list", '["not", "a", "record"]')
    paths["no-recipe"] = write_text(root, "broken/no-recipe", json.dumps({"status": "finished", "model": "tiny"}))
    return root, paths


@pytest.fixture
def report(sweep):
    root, _ = sweep
    records, sources, skipped = load_records(find_run_records([root]))
    return build_report(records, sources, skipped)


def rows_of(table: pd.DataFrame, **where) -> pd.DataFrame:
    mask = pd.Series(True, index=table.index)
    for column, value in where.items():
        mask &= table[column] == value
    return table[mask].reset_index(drop=True)


def median_recovery(report, model):
    summary = rows_of(report.summary, model=model)
    return dict(zip(summary["variant"], summary["median_recovery"]))


# ----------------------------------------------------------------------------------------------
# Naming


def test_variant_labels():
    assert variant_label(RunRecord.parse(make_record("m", "bf16", calib_size=512))) == "bf16"
    assert variant_label(RunRecord.parse(make_record("m", "fp8"))) == "fp8@512"
    assert variant_label(RunRecord.parse(make_record("m", "fp8", kv_cache="fp8"))) == "fp8+kv_fp8@512"
    assert (
        variant_label(RunRecord.parse(make_record("m", "nvfp4", kv_cache="nvfp4", calib_size=64)))
        == "nvfp4+kv_nvfp4@64"
    )
    assert variant_label(RunRecord.parse(make_record("m", "int4_awq", calib_size=128.0))) == "int4_awq@128"
    assert (
        variant_label(RunRecord.parse({"model": "m", "recipe": "int8_sq"})) == "int8_sq"
    )  # no kv_cache, no calib_size
    # Megatron-Bridge checkpoints are their own variants, one per parallel layout other than single.
    megatron = {**make_record("m", "fp8"), "backend": "megatron_bridge"}
    assert variant_label(RunRecord.parse(megatron)) == "fp8@512 (megatron_bridge)"
    assert (
        variant_label(RunRecord.parse({**megatron, "config": {"parallelism": {"name": "single"}}}))
        == "fp8@512 (megatron_bridge)"
    )
    assert (
        variant_label(RunRecord.parse({**megatron, "config": {"parallelism": {"name": "tp2"}}}))
        == "fp8@512 (megatron_bridge tp2)"
    )


# ----------------------------------------------------------------------------------------------
# Reading


def test_corrupt_and_non_record_files_are_reported_and_skipped(sweep):
    root, paths = sweep
    files = find_run_records([root, paths["tiny/bf16"]])  # a file inside a given folder counts once
    assert len(files) == 14
    records, sources, skipped = load_records(files)
    reasons = dict(skipped)
    assert set(reasons) == {str(paths["half-written"]), str(paths["list"]), str(paths["no-recipe"])}
    assert reasons[str(paths["half-written"])].startswith("unreadable JSON: ")
    assert reasons[str(paths["list"])] == "not a run record: top-level JSON is list, not an object"
    assert reasons[str(paths["no-recipe"])] == "not a run record: missing 'recipe'"
    assert len(records) == len(sources) == 11


def test_build_report_skips_non_records_it_is_handed():
    report = build_report(
        [["a"], {"model": "m"}, make_record("m", "fp8", fidelity=fidelity(25.0, 0.1, 0.9))],
        sources=["a.json", "b.json", "c.json"],
    )
    assert report.skipped.values.tolist() == [
        ["a.json", "not a run record: top-level JSON is list, not an object"],
        ["b.json", "not a run record: missing 'recipe'"],
    ]
    assert report.summary["variant"].tolist() == ["bf16", "fp8@512"]


# ----------------------------------------------------------------------------------------------
# Tables


def test_scores_of_a_variant_against_the_bf16_run(report):
    table = rows_of(report.scores, model="tiny", variant="fp8@512")
    expected = pd.DataFrame(
        {
            "benchmark": ["arc_easy", "hellaswag", "perplexity", "mean_kl_vs_bf16", "top1_agreement_vs_bf16"],
            "metric": ["acc_norm", "acc", "fidelity", "fidelity", "fidelity"],
            "value": [0.30, 0.45, 25.0, 0.05, 0.9],
            "bf16": [0.32, 0.50, 20.0, 0.0, 1.0],
            "delta": [-0.02, -0.05, 5.0, 0.05, -0.1],
            # 0.30 / 0.32, 0.45 / 0.50, perplexity inverted 20 / 25, KL undefined (BF16 = 0), 0.9 / 1
            "recovery": [0.9375, 0.9, 0.8, math.nan, 0.9],
            "higher_is_better": [True, True, False, False, True],
            "status": ["finished"] * 5,
            "bf16_source": ["bf16 run"] * 5,
        }
    )
    pd.testing.assert_frame_equal(table[expected.columns], expected, check_exact=False, rtol=1e-12, atol=1e-12)
    assert table["stderr"].tolist()[:2] == [0.01, 0.01] and table["stderr"].iloc[2:].isna().all()


def test_median_recovery_per_variant(report):
    medians = median_recovery(report, "tiny")
    assert medians["bf16"] == 1.0
    # Over the benchmark results only; the fidelity figures have columns of their own.
    assert medians["fp8@512"] == pytest.approx((0.9375 + 0.9) / 2)
    assert medians["int4_awq@128"] == pytest.approx((0.875 + 0.8) / 2)
    assert medians["int4_awq@1024"] == pytest.approx((0.96875 + 0.96) / 2)
    assert math.isnan(medians["fp8+kv_fp8@512"])  # fidelity only: no benchmark to take a median of
    assert math.isnan(medians["nvfp4@512"]) and math.isnan(medians["w4a8_awq@512"])
    summary = rows_of(report.summary, model="tiny").set_index("variant")
    assert summary.loc["fp8+kv_fp8@512", "perplexity_ratio"] == pytest.approx(26 / 20)
    assert summary.loc["fp8+kv_fp8@512", "mean_kl"] == pytest.approx(0.06)


def test_lower_is_better_benchmarks_invert_recovery():
    def wikitext(value, **flag):
        return {"results": [{"benchmark": "wikitext", "metric": "word_perplexity", "value": value, **flag}]}

    records = [
        {**make_record("m", "bf16"), "evaluation": wikitext(20.0, higher_is_better=False)},
        {**make_record("m", "fp8"), "evaluation": wikitext(25.0, higher_is_better=False)},
        # No flag: word_perplexity is known to be lower-is-better.
        {**make_record("m", "nvfp4"), "evaluation": wikitext(40.0)},
    ]
    table = build_report(records).scores.set_index("variant")
    assert table.loc["fp8@512", "recovery"] == pytest.approx(0.8)  # 20 / 25
    assert table.loc["fp8@512", "delta"] == pytest.approx(5.0)
    assert table.loc["nvfp4@512", "recovery"] == pytest.approx(0.5)  # 20 / 40
    assert not table.loc["nvfp4@512", "higher_is_better"]


def test_summary_of_a_finished_variant(report):
    row = rows_of(report.summary, model="tiny", variant="fp8@512").iloc[0]
    assert row["status"] == "finished" and row["note"] == ""
    assert row["checkpoint_mb"] == pytest.approx(110.0)
    assert row["compression"] == pytest.approx(1.8182)
    assert row["bits_per_weight"] == pytest.approx(8.8)
    assert row["calib_size"] == 512 and row["calibrate_s"] == 12.5
    assert row["source"].endswith("tiny/fp8-new/run.json")


def test_failed_and_running_points_stay_visible(report):
    summary = rows_of(report.summary, model="tiny").set_index("variant")
    assert summary.loc["nvfp4@512", ["status", "note"]].tolist() == [
        "failed",
        "failed: torch.OutOfMemoryError: CUDA out of memory.",
    ]
    assert summary.loc["w4a8_awq@512", ["status", "note"]].tolist() == ["running", "running (unfinished)"]
    # In the long table (CSV) too, as a row without a benchmark.
    failed = rows_of(report.scores, model="tiny", variant="nvfp4@512")
    assert failed[["benchmark", "status", "note"]].values.tolist() == [
        ["", "failed", "failed: torch.OutOfMemoryError: CUDA out of memory."]
    ]
    assert rows_of(report.scores, model="tiny", variant="w4a8_awq@512")["status"].tolist() == ["running"]
    markdown = render_markdown(report)
    assert "| nvfp4@512 (failed) | w4a8_awq@512 (running) |" in markdown
    assert "| nvfp4@512 | failed |" in markdown and "failed: torch.OutOfMemoryError: CUDA out of memory. |" in markdown


def test_a_running_record_whose_process_is_gone_is_dead(tmp_path):
    """A run killed mid-way (SIGKILL, node lost) leaves a record that says running and nothing holding its folder."""
    killed = write_record(
        tmp_path / "runs", "tiny/int8", make_record("tiny", "int8_sq", status="running", finished_at=None)
    )
    records, sources, _ = load_records(find_run_records([tmp_path / "runs"]))
    summary = build_report(records, sources).summary.set_index("variant")
    assert summary.loc["int8_sq@512", "status"] == "dead"
    assert "process is gone" in summary.loc["int8_sq@512", "note"]
    assert json.loads(killed.read_text())["status"] == "running"  # the report reads; it changes no record


def test_older_duplicates_are_superseded_not_used(report, sweep):
    _, paths = sweep
    superseded = rows_of(report.superseded, model="tiny").set_index("source")
    assert set(superseded.index) == {str(paths["tiny/fp8-old"]), str(paths["tiny/int4-128-retry"])}
    older = superseded.loc[str(paths["tiny/fp8-old"])]
    assert older["kept"] == str(paths["tiny/fp8-new"])
    assert older["reason"] == "older duplicate (finished_at 2026-11-20T12:00:00+0000)"
    retry = superseded.loc[str(paths["tiny/int4-128-retry"])]
    assert retry["reason"] == "failed: RuntimeError: disk full; a finished record of this variant is used"
    fp8 = rows_of(report.scores, model="tiny", variant="fp8@512")
    assert fp8["value"].iloc[0] == 0.30 and (fp8["source"] == str(paths["tiny/fp8-new"])).all()
    assert not report.scores["value"].isin([0.111, 99.0, 1.5]).any()
    assert rows_of(report.summary, model="tiny", variant="int4_awq@128")["status"].tolist() == ["finished"]


def test_bf16_run_wins_over_embedded_baselines(report):
    bf16 = rows_of(report.scores, model="tiny", variant=BF16)
    assert bf16["value"].tolist() == [0.32, 0.50, 20.0, 0.0, 1.0]  # not the 0.99 baseline of fp8
    assert set(bf16["bf16_source"]) == {"bf16 run"} and set(bf16["status"]) == {"finished"}


def test_bf16_from_embedded_baseline_without_a_bf16_run(report):
    bf16 = rows_of(report.scores, model="other", variant=BF16)
    # The newest finished record's baseline (0.40) wins over the older int8 one (0.41).
    assert bf16[["benchmark", "metric", "value"]].values.tolist() == [
        ["arc_easy", "acc_norm", 0.40],
        ["hellaswag", "acc", 0.60],
        ["perplexity", "fidelity", 10.0],
        ["mean_kl_vs_bf16", "fidelity", 0.0],
        ["top1_agreement_vs_bf16", "fidelity", 1.0],
    ]
    assert set(bf16["bf16_source"]) == {"embedded baseline"} and set(bf16["status"]) == {"baseline"}
    fp8 = rows_of(report.scores, model="other", variant="fp8@256").set_index("benchmark")
    assert fp8.loc["arc_easy", "recovery"] == pytest.approx(0.9)  # 0.36 / 0.40
    assert fp8.loc["perplexity", "recovery"] == pytest.approx(0.8)  # 10 / 12.5
    int8 = rows_of(report.scores, model="other", variant="int8_sq@256").set_index("benchmark")
    assert int8.loc["arc_easy", "recovery"] == pytest.approx(0.95)  # 0.38 / 0.40
    # Median recovery is over benchmarks only (fp8's perplexity recovery 0.8 is in its own column).
    assert median_recovery(report, "other") == pytest.approx({"bf16": 1.0, "fp8@256": 0.9, "int8_sq@256": 0.95})
    baseline_row = rows_of(report.summary, model="other", variant=BF16).iloc[0]
    assert baseline_row["status"] == "baseline" and "embedded" in baseline_row["note"]


def test_a_small_standard_error_is_shown_not_rounded_to_zero():
    # Measured on a VLM shape: mean KL 0.0265 with a standard error of 0.00012 over 16 held-out pairs.
    assert with_error(0.02651, 0.00012) == "0.02651 ± 0.00012"
    assert with_error(0.330, 0.015) == "0.330 ± 0.015"  # three decimals already show it
    assert with_error(0.330, 0.0005) == "0.330 ± 0.001"  # rounds to a visible 0.001
    assert with_error(0.5, float("nan")) == "0.500" and with_error(0.5, 0.0) == "0.500"
    cell = format_cell(0.02651, 0.02651, float("nan"), 0.00012, 0.00012)
    assert cell == "0.02651 ± 0.00012 (+0.02651)"  # the difference at the digits of its own error
    assert format_cell(0.5, -0.00001, 1.0, 0.01, 0.01) == "0.500 ± 0.010 (+0.000 n.s., 100.0%)"  # no "-0.000"
    # An interval narrower than three decimals show keeps the digits of its width.
    assert with_interval(1.0003, 1.0001, 1.0005) == "1.00030 [1.00010, 1.00050]"
    assert with_interval(1.313, 1.290, 1.336) == "1.313 [1.290, 1.336]"
    assert with_interval(1.2, float("nan"), float("nan")) == "1.200" and with_interval(float("nan"), 1, 2) == ""


def test_wide_table_cells_and_column_order(report):
    table = wide_table(report.scores, "tiny")
    # Numeric calibration order (128 before 1024), KV-cache variants after their plain recipe.
    assert table.columns.tolist() == [
        "benchmark",
        "metric",
        "bf16",
        "fp8@512",
        "fp8+kv_fp8@512",
        "int4_awq@128",
        "int4_awq@1024",
        "nvfp4@512",
        "w4a8_awq@512",
    ]
    assert table.values.tolist() == [
        # Standard error 0.010 each: a difference under 1.96 x sqrt(2) x 0.010 = 0.028 is marked n.s.
        [
            "arc_easy",
            "acc_norm",
            "0.320 ± 0.010",
            "0.300 ± 0.010 (-0.020 n.s., 93.8%)",
            "",
            "0.280 ± 0.010 (-0.040, 87.5%)",
            "0.310 ± 0.010 (-0.010 n.s., 96.9%)",
            "",
            "",
        ],
        [
            "hellaswag",
            "acc",
            "0.500 ± 0.010",
            "0.450 ± 0.010 (-0.050, 90.0%)",
            "",
            "0.400 ± 0.010 (-0.100, 80.0%)",
            "0.480 ± 0.010 (-0.020 n.s., 96.0%)",
            "",
            "",
        ],
        [
            "perplexity",
            "fidelity",
            "20.000",
            "25.000 (+5.000, 80.0%)",
            "26.000 (+6.000, 76.9%)",
            "32.000 (+12.000, 62.5%)",
            "22.000 (+2.000, 90.9%)",
            "",
            "",
        ],
        [
            "mean_kl_vs_bf16",
            "fidelity",
            "0.000",
            "0.050 (+0.050)",
            "0.060 (+0.060)",
            "0.200 (+0.200)",
            "0.030 (+0.030)",
            "",
            "",
        ],
        [
            "top1_agreement_vs_bf16",
            "fidelity",
            "1.000",
            "0.900 (-0.100, 90.0%)",
            "0.880 (-0.120, 88.0%)",
            "0.750 (-0.250, 75.0%)",
            "0.850 (-0.150, 85.0%)",
            "",
            "",
        ],
    ]
    other = wide_table(report.scores, "other")
    assert other.columns.tolist() == ["benchmark", "metric", "bf16", "fp8@256", "int8_sq@256"]
    assert other.values.tolist()[1] == ["hellaswag", "acc", "0.600 ± 0.010", "", ""]  # BF16-only row kept


def test_malformed_fields_are_read_defensively():
    record = {
        "model": "m",
        "recipe": "fp8",
        "status": None,
        "calib_size": 512,
        "fidelity": [],
        "size": "?",
        "timings_s": None,
        "evaluation": {
            "results": [
                {"benchmark": "arc_easy", "metric": "acc", "value": "n/a"},
                5,
                None,
                {"benchmark": "arc_easy", "metric": "acc_norm", "value": 0.3, "stderr": "N/A"},
            ]
        },
    }
    report = build_report([record])
    assert report.scores[["variant", "benchmark", "value", "status"]].values.tolist() == [
        ["fp8@512", "arc_easy", 0.3, "unknown"]
    ]
    assert math.isnan(report.scores["stderr"].iloc[0]) and math.isnan(report.scores["bf16"].iloc[0])
    assert report.summary[["variant", "status", "note"]].values.tolist() == [
        ["fp8@512", "unknown", "unknown (unrecognised status)"]
    ]
    assert build_report([]).scores.empty


def test_ten_thousand_records_are_tabulated():
    # How fast is measured in bench/collector.py (bench/results/collector-10k-cpu.json), not asserted here.
    recipes = ["fp8", "int4_awq", "nvfp4", "int8_sq"]
    records = [
        make_record(
            f"model{i % 4}",
            recipes[i // 4 % 4],
            calib_size=64 * (1 + i // 16 % 25),
            finished_at=f"2026-11-{1 + i % 28:02d}T12:00:00+0000",
            results=scores(arc_easy__acc_norm=0.3, hellaswag__acc=0.4, mmlu__acc=0.5),
            baseline=scores(arc_easy__acc_norm=0.32, hellaswag__acc=0.5, mmlu__acc=0.5),
            fidelity=fidelity(25.0, 0.1, 0.9),
            size=size(100_000_000),
            calibrate_s=1.0,
        )
        for i in range(10_000)
    ]
    report = build_report(records)
    assert render_markdown(report).count("\n| fp8@") >= 4 * 25
    # 4 models x 4 recipes x 25 calibration sizes, plus one BF16 baseline line per model.
    assert len(report.summary) == 4 * 100 + 4
    assert len(report.superseded) == 10_000 - 400


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_every_output(sweep, tmp_path):
    root, paths = sweep
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "ptq.report", str(root), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    markdown = (out / "results.md").read_text()
    assert done.stdout == markdown
    assert "| arc_easy | acc_norm | 0.320 ± 0.010 | 0.300 ± 0.010 (-0.020 n.s., 93.8%) |" in markdown
    for skipped in ("half-written", "list", "no-recipe"):
        assert f"- `{paths[skipped]}`: " in markdown
    assert f"- `{paths['tiny/fp8-old']}` (fp8@512): older duplicate" in markdown

    csv = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert rows_of(csv, model="tiny", variant="nvfp4@512")["status"].tolist() == ["failed"]
    assert float(rows_of(csv, model="tiny", variant="fp8@512", benchmark="arc_easy")["recovery"].iloc[0]) == 0.9375

    # Per model: the benchmark differences; recovery and the perplexity ratio against bits where variants have
    # sizes (the "other" records carry none); "tiny" also ran int4_awq at two calibration sizes.
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == [
        "deltas_other.png",
        "deltas_tiny.png",
        "perplexity_vs_bits_tiny.png",
        "recovery_vs_bits_tiny.png",
        "vs_calib_size_tiny.png",
    ]
    assert all((out / name).read_bytes().startswith(PNG_MAGIC) for name in plots)
    page = (out / "results.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(plots) and all(base64.b64decode(image).startswith(PNG_MAGIC) for image in embedded)
    assert (
        "0.300 ± 0.010 (-0.020 n.s., 93.8%)" in page and "failed: torch.OutOfMemoryError: CUDA out of memory." in page
    )


def test_cli_default_out_dir_and_bad_arguments(sweep, tmp_path, capsys):
    root, _ = sweep
    assert main([str(root)]) == 0
    assert (root / "report" / "results.md").read_text() == capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 1  # no run.json at all
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2


def with_fingerprint(entries, fingerprint):
    return [{**entry, "fingerprint": fingerprint} for entry in entries]


def test_results_measured_differently_are_not_compared():
    """BF16 on the full set, fp8 on 25 items: no recovery is computed, the row says why, and the BF16 result stays."""
    full = with_fingerprint(scores(arc__acc=0.26), "full-set")
    bf16 = make_record("m", "bf16", results=full)
    fp8 = make_record("m", "fp8", results=with_fingerprint(scores(arc__acc=0.21), "first-25"), baseline=full)
    report = build_report([bf16, fp8], ["bf16.json", "fp8.json"])
    row = rows_of(report.scores, model="m", variant="fp8@512", benchmark="arc").iloc[0]
    assert math.isnan(row["bf16"]) and math.isnan(row["recovery"]) and math.isnan(row["delta"])
    assert "not compared: no BF16 result measured on the same items" in row["note"]
    assert rows_of(report.scores, model="m", variant="bf16", benchmark="arc")["value"].tolist() == [0.26]
    # A row per way of measuring, named by its fingerprint (these entries say nothing else): the variant's score
    # stands in a row of its own, beside no BF16 value.
    table = wide_table(report.scores, "m").set_index("benchmark")
    assert table.loc["arc [#first-]", ["bf16", "fp8@512"]].tolist() == ["", "0.210 ± 0.010"]
    assert table.loc["arc [#full-s]", ["bf16", "fp8@512"]].tolist() == ["0.260 ± 0.010", ""]


def test_a_variant_is_compared_with_the_bf16_result_measured_the_same_way():
    """Two BF16 measurements of one benchmark (all items, 25 items) both stay visible; each variant is compared
    with the one of its own fingerprint."""
    bf16 = make_record("m", "bf16", results=with_fingerprint(scores(arc__acc=0.26), "full-set"))
    fp8 = make_record(
        "m",
        "fp8",
        results=with_fingerprint(scores(arc__acc=0.21), "first-25"),
        baseline=with_fingerprint(scores(arc__acc=0.28), "first-25"),
    )
    int8 = make_record("m", "int8_sq", results=with_fingerprint(scores(arc__acc=0.25), "full-set"))
    report = build_report([bf16, fp8, int8], ["bf16.json", "fp8.json", "int8.json"])
    fp8_row = rows_of(report.scores, variant="fp8@512", benchmark="arc").iloc[0]
    int8_row = rows_of(report.scores, variant="int8_sq@512", benchmark="arc").iloc[0]
    assert fp8_row["bf16"] == 0.28 and fp8_row["recovery"] == pytest.approx(0.21 / 0.28)
    assert int8_row["bf16"] == 0.26 and int8_row["recovery"] == pytest.approx(0.25 / 0.26)
    assert sorted(rows_of(report.scores, variant="bf16", benchmark="arc")["value"].tolist()) == [0.26, 0.28]


def test_a_long_failure_is_cut_in_the_table_and_says_where_the_rest_is():
    from ptq.report.read import NOTE_CHARS, status_note

    error = "ValidationFailed: " + "; ".join(f"layer {i} stores no input_scale" for i in range(200))
    note = status_note("failed", error)
    assert note.startswith("failed: ValidationFailed: layer 0 stores no input_scale")
    assert len(note) < NOTE_CHARS + 80 and note.endswith(f"({len(error)} characters; the run record has all)")
    assert status_note("failed", "short\nsecond line") == "failed: short"


def test_the_summary_says_which_engines_serve_each_checkpoint():
    fp8 = make_record("tiny", "fp8", fidelity=fidelity(21.0, 0.04, 0.9), size=size(110_000_000))
    fp8["serving"] = {"engines": ["vLLM", "SGLang", "TensorRT-LLM"], "quant_algo": "FP8"}
    svd = make_record("tiny", "nvfp4_svdquant", fidelity=fidelity(24.0, 0.3, 0.7), size=size(60_000_000))
    svd["serving"] = {"engines": [], "quant_algo": "NVFP4_SVD"}
    old = make_record("tiny", "int8_sq", fidelity=fidelity(22.0, 0.07, 0.85), size=size(110_000_000))  # older record
    report = build_report([make_record("tiny", BF16, fidelity=fidelity(20.0, 0.0, 1.0)), fp8, svd, old])
    served = dict(zip(report.summary["variant"], report.summary["served_by"]))
    assert served == {
        "bf16": "",
        "fp8@512": "vLLM, SGLang, TensorRT-LLM",
        "int8_sq@512": "",
        "nvfp4_svdquant@512": "none of vLLM, SGLang, TensorRT-LLM",
    }
    assert "| served by |" in render_markdown(report)


def test_fidelity_rows_carry_their_standard_errors():
    quantized = make_record(
        "tiny",
        "fp8",
        fidelity={
            **fidelity(21.0, 0.04, 0.9),
            "mean_kl_stderr": 0.002,
            "top1_agreement_stderr": 0.01,
            "log_perplexity_ratio_stderr": 0.005,
            "perplexity_ratio_ci95": [1.0398, 1.0604],
        },
    )
    older = make_record("tiny", "int8_sq", fidelity=fidelity(22.0, 0.07, 0.85))  # recorded before the errors were
    report = build_report([make_record("tiny", BF16, fidelity=fidelity(20.0, 0.0, 1.0)), quantized, older])
    fp8 = rows_of(report.scores, variant="fp8@512").set_index("benchmark")["stderr"]
    assert fp8["mean_kl_vs_bf16"] == pytest.approx(0.002) and fp8["top1_agreement_vs_bf16"] == pytest.approx(0.01)
    assert fp8["perplexity"] == pytest.approx(21.0 * 0.005)
    assert rows_of(report.scores, variant="int8_sq@512")["stderr"].isna().all()
    markdown = render_markdown(report)  # the summary keeps the fidelity figures apart, with their uncertainty
    assert "| fp8@512 | finished |  |  | 1.050 [1.040, 1.060] | 0.040 ± 0.002 | 512 tok x 32 |" in markdown
    assert "| int8_sq@512 | finished |  |  | 1.100 | 0.070 | 512 tok x 32 |" in markdown


def test_the_recommendation_picks_the_smallest_checkpoint_within_the_budget_with_confidence(tmp_path):
    from ptq.report.recommend import parse_budget, recommend

    def point(recipe, mb, arc, ppl_hi, engines, status="finished"):
        record = make_record(
            "m",
            recipe,
            status=status,
            results=scores(arc_easy__acc_norm=arc),
            fidelity={**fidelity(20.0 * ppl_hi, 0.05, 0.9), "perplexity_ratio_ci95": [1.0, ppl_hi]},
            size=size(mb * 1_000_000),
        )
        record["serving"] = {"engines": engines}
        return record

    bf16 = make_record(
        "m", BF16, results=scores(arc_easy__acc_norm=0.60), fidelity=fidelity(20.0, 0.0, 1.0), size=size(200_000_000)
    )
    records = [
        bf16,
        point("fp8", 110, 0.60, 1.004, ["vLLM", "SGLang", "TensorRT-LLM"]),  # within 1%
        point("int4_awq", 60, 0.60, 1.004, ["TensorRT-LLM"]),  # smaller, TensorRT-LLM only
        point("nvfp4", 55, 0.58, 1.004, ["vLLM", "SGLang", "TensorRT-LLM"]),  # 3.3% loss: out
        point("int8_sq", 50, 0.60, 1.080, ["TensorRT-LLM"]),  # perplexity bound out
        point("w4a8_awq", 40, 0.60, 1.0, [], status="failed"),
    ]
    report = build_report(records)
    result = recommend(report, parse_budget("5%"))["m"]
    assert result["pick"] == "int4_awq@512"
    assert result["per_engine"] == {"vLLM": "fp8@512", "SGLang": "fp8@512", "TensorRT-LLM": "int4_awq@512"}
    reasons = {v["variant"]: " ".join(v["reasons"]) for v in result["verdicts"]}
    # 0.58 vs 0.60 with standard errors 0.01: loss 3.3%, bound 3.3% + 1.96 x sqrt(2) x 0.01 / 0.60 = 8.0%.
    assert reasons["nvfp4@512"] == "arc_easy/acc_norm: loss 3.3%, up to 8.0% at 95% confidence (budget 5%)"
    assert reasons["int8_sq@512"] == "perplexity ratio 1.080, up to 1.080 at 95% confidence (budget 1.050)"
    assert reasons["w4a8_awq@512"].startswith("failed")
    # With 1%, even an equal score is not enough: 100 items' errors leave a bound of 4.6%.
    strict = recommend(report, parse_budget("1%"))["m"]
    assert strict["pick"] is None and set(strict["per_engine"].values()) == {None}
    fp8 = next(v for v in strict["verdicts"] if v["variant"] == "fp8@512")
    assert fp8["reasons"] == ["arc_easy/acc_norm: loss 0.0%, up to 4.6% at 95% confidence (budget 1%)"]
    assert (
        main(
            [
                str(write_record(tmp_path / "runs", "m/bf16", bf16).parent.parent),
                "--out",
                str(tmp_path / "out"),
                "--budget",
                "5%",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "out" / "recommendation.json").read_text())["m"]["pick"] is None  # BF16 alone
    assert "## m: recommendation (loss budget 5%)" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(ValueError, match="between 0 and 100%"):
        parse_budget("150%")


def test_a_difference_on_the_same_items_is_judged_by_its_own_paired_error():
    """100 items: the variant loses 4 that BF16 got right and gains none. Unpaired, 0.04 is inside the noise of two
    accuracies near 0.5 (standard errors 0.05); paired, the per-item differences vary little and it is a finding."""
    ids = list(range(100))
    bf16_scores = [1.0 if i % 2 == 0 else 0.0 for i in ids]
    variant_scores = [0.0 if i in (0, 2, 4, 6) else s for i, s in zip(ids, bf16_scores)]

    def result(values):
        mean = sum(values) / 100
        return [
            {
                "benchmark": "arc",
                "metric": "acc",
                "value": mean,
                "stderr": 0.05,
                "higher_is_better": True,
                "items": {"doc_ids": ids, "scores": values},
            }
        ]

    report = build_report(
        [
            make_record("m", BF16, results=result(bf16_scores)),
            make_record("m", "fp8", results=result(variant_scores)),
            make_record("m", "int8_sq", results=[{**result(variant_scores)[0], "items": None}]),
        ]
    )
    fp8 = rows_of(report.scores, variant="fp8@512").iloc[0]
    assert fp8["paired_items"] == 100 and fp8["delta"] == pytest.approx(-0.04)
    assert fp8["delta_stderr"] == pytest.approx((0.04 * 0.96 / 99) ** 0.5)  # sd of {-1 x4, 0 x96} / 10
    table = wide_table(report.scores, "m").set_index("benchmark")
    assert table.loc["arc", "fp8@512"] == "0.460 ± 0.050 (-0.040, 92.0%)"  # paired: a finding
    assert table.loc["arc", "int8_sq@512"] == "0.460 ± 0.050 (-0.040 n.s., 92.0%)"  # no items: sqrt(2) x 0.05


def test_the_pareto_front_keeps_what_nothing_beats_on_both_counts():
    from ptq.report.plots import pareto_front

    points = [(8.0, 1.03), (4.5, 1.30), (4.5, 1.60), (9.7, 1.02), (6.9, 1.29), (16.0, 1.0), (8.0, 1.05)]
    assert [points[i] for i in pareto_front(points)] == [
        (4.5, 1.30),
        (6.9, 1.29),
        (8.0, 1.03),
        (9.7, 1.02),
        (16.0, 1.0),
    ]
    assert pareto_front([]) == []


def test_a_crowded_scatter_names_only_its_pareto_front():
    from ptq.report.plots import MAX_LABELS, _figure, _label, pareto_front

    def names(count):
        points = pd.DataFrame(
            {
                "variant": [f"v{i}" for i in range(count)],
                "bits_per_weight": [4.0 + i % 5 for i in range(count)],
                "perplexity_ratio": [1.5 - 0.01 * i for i in range(count)],
            }
        )
        front = pareto_front(list(zip(points["bits_per_weight"], points["perplexity_ratio"])))
        _, axes = _figure()
        _label(axes, points, "perplexity_ratio", front)
        return {t.get_text() for t in axes.texts}, {f"v{i}" for i in front}

    few, _ = names(MAX_LABELS)
    assert few == {f"v{i}" for i in range(MAX_LABELS)}
    crowded, front = names(MAX_LABELS + 8)
    assert crowded == front | {f"{MAX_LABELS + 8} variants; named: the Pareto front"} and len(front) < MAX_LABELS


def test_per_subject_rows_are_compared_in_the_csv_and_kept_out_of_tables_and_medians():
    """An MMLU-style result comes with a row per subject (with its items) and a macro average: each subject is
    paired with BF16's same subject in the long table; the model-card table, the median recovery and the
    recommendation use the whole benchmark and its macro figure only."""

    def result(whole, per_subject):
        rows = [
            {"benchmark": "mmlu", "metric": "acc", "value": whole, "stderr": 0.05, "higher_is_better": True},
            {"benchmark": "mmlu", "metric": "acc_macro", "value": whole, "stderr": 0.05, "higher_is_better": True},
        ]
        for subject, values in per_subject.items():
            rows.append(
                {
                    "benchmark": f"mmlu:{subject}",
                    "subject": subject,
                    "metric": "acc",
                    "value": sum(values) / 4,
                    "stderr": 0.2,
                    "higher_is_better": True,
                    "items": {"doc_ids": [0, 1, 2, 3], "scores": values},
                }
            )
        return rows

    bf16 = make_record("m", BF16, results=result(0.5, {"anatomy": [1, 1, 0, 0], "law": [1, 1, 0, 0]}))
    fp8 = make_record("m", "fp8", results=result(0.5, {"anatomy": [0, 0, 0, 0], "law": [1, 1, 1, 1]}))
    report = build_report([bf16, fp8])
    anatomy = rows_of(report.scores, variant="fp8@512", benchmark="mmlu:anatomy").iloc[0]
    assert anatomy["subject"] == "anatomy" and anatomy["delta"] == pytest.approx(-0.5) and anatomy["paired_items"] == 4
    table = wide_table(report.scores, "m")
    assert sorted(zip(table["benchmark"], table["metric"])) == [("mmlu", "acc"), ("mmlu", "acc_macro")]
    # Subjects at 0% and 200% recovery would move a median over rows; over the whole and macro figures it is 100%.
    assert rows_of(report.summary, variant="fp8@512")["median_recovery"].iloc[0] == pytest.approx(1.0)


def test_one_recipe_evaluated_two_ways_is_two_columns_not_a_duplicate():
    """Evaluation settings name the output folder (-eval_<suite>_<hash>): a second evaluation of a recipe is kept
    beside the first, each column named by its tag; within one evaluation the older record is still superseded."""

    def evaluated(tag, value, finished_at="2026-11-21T12:00:00+0000"):
        record = make_record("m", "fp8", results=scores(arc__acc=value), finished_at=finished_at)
        record["output_dir"], record["eval_tag"] = f"runs/m/fp8-kv_none-calib512x512-{tag}", tag
        return record

    records = [
        make_record("m", BF16, results=scores(arc__acc=0.5)),
        evaluated("eval_local_quick_aaaaaa", 0.45),
        evaluated("eval_local_quick_bbbbbb", 0.40),
        evaluated("eval_local_quick_aaaaaa", 0.30, finished_at="2026-11-20T12:00:00+0000"),
    ]
    report = build_report(records)
    variants = set(report.summary["variant"])
    assert {"fp8@512 [eval_local_quick_aaaaaa]", "fp8@512 [eval_local_quick_bbbbbb]"} <= variants
    assert rows_of(report.scores, variant="fp8@512 [eval_local_quick_aaaaaa]")["value"].tolist() == [0.45]
    assert len(report.superseded) == 1 and report.superseded["reason"].iloc[0].startswith("older duplicate")
    # One evaluation only: the plain label, as before.
    assert "fp8@512" in set(build_report(records[:2]).summary["variant"])


# ----------------------------------------------------------------------------------------------
# Only like is compared with like (issue 24, item 4)


def test_fidelity_is_shown_beside_the_bf16_measured_on_the_same_tokens():
    """calib.seq_len sets fidelity.seq_len: BF16's perplexity at 128 tokens and fp8's at 256 are different rows, each
    variant beside (and compared with) the BF16 value measured on its own tokens, never beside another."""
    bf16 = make_record("m", BF16, seq_len=128, fidelity=fidelity(17.438, 0.0, 1.0, bf16_ppl=17.438))
    fp8 = make_record("m", "fp8", calib_size=32, seq_len=256, fidelity=fidelity(24.711, 0.05, 0.9, bf16_ppl=23.75))
    int8 = make_record("m", "int8_sq", calib_size=32, seq_len=128, fidelity=fidelity(18.0, 0.02, 0.95, bf16_ppl=17.438))
    report = build_report([bf16, fp8, int8], ["bf16.json", "fp8.json", "int8.json"])
    ppl = rows_of(report.scores, benchmark="perplexity")
    reference = ppl[ppl["variant"] == BF16]
    assert sorted(zip(reference["setting"], reference["value"], reference["bf16_source"])) == [
        ("128 tok x 32", 17.438, "bf16 run"),
        ("256 tok x 32", 23.75, "embedded baseline"),
    ]
    fp8_row = rows_of(ppl, variant="fp8@32x256").iloc[0]
    assert fp8_row["bf16"] == 23.75 and fp8_row["delta"] == pytest.approx(24.711 - 23.75)
    assert rows_of(ppl, variant="int8_sq@32x128")["bf16"].tolist() == [17.438]
    # Every compared row's BF16 value is the BF16 row of its own fingerprint.
    by_print = {
        (b, f): v
        for b, f, v in zip(
            *(report.scores.loc[report.scores["variant"] == BF16, c] for c in ("benchmark", "fingerprint", "value"))
        )
    }
    compared = report.scores[(report.scores["variant"] != BF16) & report.scores["bf16"].notna()]
    assert len(compared) == 6 and all(
        by_print[(b, f)] == v for b, f, v in zip(compared["benchmark"], compared["fingerprint"], compared["bf16"])
    )
    table = wide_table(report.scores, "m").set_index("benchmark")
    assert table.loc["perplexity [256 tok x 32]", ["bf16", "fp8@32x256", "int8_sq@32x128"]].tolist() == [
        "23.750",
        "24.711 (+0.961, 96.1%)",
        "",
    ]
    assert table.loc["perplexity [128 tok x 32]", ["bf16", "fp8@32x256", "int8_sq@32x128"]].tolist() == [
        "17.438",
        "",
        "18.000 (+0.562, 96.9%)",
    ]
    assert "perplexity" not in table.index and "mean_kl_vs_bf16 [256 tok x 32]" in table.index
    # Measured alike, one row as before.
    alike = wide_table(build_report([bf16, int8]).scores, "m")
    assert alike["benchmark"].tolist() == ["perplexity", "mean_kl_vs_bf16", "top1_agreement_vs_bf16"]


def test_variant_labels_name_every_setting_in_which_a_models_variants_differ():
    def point(recipe, seq_len=256, **kw):
        return make_record("m", recipe, calib_size=32, seq_len=seq_len, fidelity=fidelity(21.0, 0.05, 0.9), **kw)

    assert (
        variant_label(RunRecord.parse(point("fp8")), with_seq_len=True) == "fp8@32x256"
        and variant_label(RunRecord.parse(point("fp8"))) == "fp8@32"
    )
    assert variant_label(RunRecord.parse(make_record("m", BF16)), with_seq_len=True) == "bf16"
    bf16 = make_record("m", BF16, seq_len=256, fidelity=fidelity(20.0, 0.0, 1.0))
    report = build_report([bf16, point("fp8"), point("fp8", seq_len=128), point("int4_awq")])
    # Another sequence length is another checkpoint, not an older duplicate; every variant of the model says its own.
    assert report.summary["variant"].tolist() == ["bf16", "fp8@32x128", "fp8@32x256", "int4_awq@32x256"]
    assert report.superseded.empty
    assert report.summary["calib_seq_len"].tolist()[1:] == [128, 256, 256]
    assert build_report([bf16, point("fp8"), point("int4_awq")]).summary["variant"].tolist() == [
        "bf16",
        "fp8@32",
        "int4_awq@32",
    ]
    # Other calibration text: another checkpoint (not a duplicate), named by its text.
    other_text = point("fp8", calib_dataset="/data/wikitext2/valid.txt")
    assert set(build_report([bf16, point("fp8"), other_text, point("int4_awq")]).summary["variant"]) == {
        "bf16",
        "fp8@32 [calib self seed 1234]",
        "fp8@32 [calib valid.txt seed 1234]",
        "int4_awq@32",
    }
    # One checkpoint's settings, its fidelity measured on fewer sequences elsewhere: both kept, named by that.
    fewer = point("fp8", fidelity_samples=16)
    assert set(build_report([bf16, point("fp8"), fewer]).summary["variant"]) == {
        "bf16",
        "fp8@32 [fidelity 256 tok x 32]",
        "fp8@32 [fidelity 256 tok x 16]",
    }


def test_the_calibration_size_plot_draws_a_line_per_recipe_and_sequence_length():
    from ptq.report.plots import calib_size_lines, vs_calib_size_figure

    ratios = {128: {32: 1.10, 64: 1.05}, 256: {32: 1.04, 64: 1.02}}
    records = [make_record("m", BF16, fidelity=fidelity(20.0, 0.0, 1.0))]
    records += [
        make_record("m", "fp8", calib_size=size, seq_len=seq, fidelity=fidelity(20.0 * ratio, 0.05, 0.9))
        for seq, by_size in ratios.items()
        for size, ratio in by_size.items()
    ]
    records.append(make_record("m", "int4_awq", calib_size=32, fidelity=fidelity(26.0, 0.2, 0.8)))  # one size: no line
    summary = build_report(records).summary
    lines = calib_size_lines(summary, "m")
    assert sorted(lines) == ["fp8 (calib seq 128)", "fp8 (calib seq 256)"]
    for seq in ratios:
        line = lines[f"fp8 (calib seq {seq})"]
        assert line["calib_seq_len"].tolist() == [seq, seq] and line["calib_size"].tolist() == [32, 64]
        assert line["perplexity_ratio"].tolist() == pytest.approx(list(ratios[seq].values()))
    axes = vs_calib_size_figure(summary, "m").axes[0]
    drawn = {c.get_label(): c.lines[0].get_ydata().tolist() for c in axes.containers}
    assert drawn.keys() == lines.keys()
    assert drawn["fp8 (calib seq 128)"] == pytest.approx(list(ratios[128].values()))


def test_perplexity_plot_labels_never_overlap_and_the_pareto_front_stands_out():
    from matplotlib.text import Text

    from ptq.report.plots import perplexity_vs_bits_figure

    def point(recipe, calib, ratio, mb):
        return make_record(
            "m", recipe, calib_size=calib, fidelity=fidelity(20.0 * ratio, 0.05, 0.9), size=size(mb * 1_000_000)
        )

    # Five fp8 checkpoints of one size (one bits-per-weight) with nearly equal ratios: their names used to pile up.
    records = [make_record("m", BF16, fidelity=fidelity(20.0, 0.0, 1.0))]
    records += [point("fp8", calib, 1.010 + 0.001 * i, 110) for i, calib in enumerate((16, 32, 64, 128, 256))]
    records += [point("int4_awq", 128, 1.30, 56), point("nvfp4", 128, 1.20, 57.5), point("int8_sq", 128, 1.02, 110)]
    summary = build_report(records).summary
    figure = perplexity_vs_bits_figure(summary, "m")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes = figure.axes[0]
    boxes = [Text.get_window_extent(text, renderer) for text in axes.texts]
    named = [name for text in axes.texts for name in text.get_text().split("\n")]
    assert sorted(named) == sorted(v for v in summary["variant"] if v != BF16)
    assert not [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
    # The front: its own line and markers, named in the legend.
    front = [line for line in axes.lines if line.get_label().startswith("Pareto front")]
    assert len(front) == 1 and front[0].get_marker() not in (None, "", "None")
    assert front[0].get_color() != axes.containers[0].lines[0].get_color()
    assert any(label.startswith("Pareto front") for label in axes.get_legend_handles_labels()[1])
    bits = dict(zip(summary["variant"], summary["bits_per_weight"]))
    assert front[0].get_xdata().tolist() == [bits["int4_awq@128"], bits["nvfp4@128"], bits["fp8@16"]]
    assert front[0].get_ydata().tolist() == pytest.approx([1.30, 1.20, 1.010])


def test_bf16_runs_evaluated_differently_are_both_kept_and_each_compared_with_its_like(tmp_path):
    """A full-set BF16 run in one folder, a sweep's 300-item BF16 run in another: neither is an older duplicate of the
    other; the CSV keeps both runs' rows, and each variant is compared with the BF16 measured its way."""

    def results(values, how, items):
        return [
            {
                "benchmark": name,
                "metric": "acc",
                "value": value,
                "stderr": 0.01,
                "higher_is_better": True,
                "fingerprint": f"{how}-{name}",
                "items": items,
            }
            for name, value in values.items()
        ]

    full = results({"lambada": 0.40, "boolq": 0.62, "mmlu": 0.30}, "full", None)
    quick = results({"lambada": 0.42, "boolq": 0.60, "mmlu": 0.33}, "quick", 300)
    a, b, out = tmp_path / "A", tmp_path / "B", tmp_path / "out"
    write_record(
        a,
        "m/bf16",
        make_record(
            "m",
            BF16,
            results=full,
            finished_at="2026-11-20T12:00:00+0000",
            output_dir=str(a / "m/bf16-kv_none-calib512x512-eval_local_full_aaaaaa"),
        ),
    )
    write_record(
        b,
        "m/bf16",
        make_record(
            "m", BF16, results=quick, output_dir=str(b / "m/bf16-kv_none-calib512x512-eval_local_quick_bbbbbb")
        ),
    )
    write_record(
        b,
        "m/fp8",
        make_record(
            "m",
            "fp8",
            baseline=quick,
            results=results({"lambada": 0.40, "boolq": 0.59, "mmlu": 0.31}, "quick", 300),
            output_dir=str(b / "m/fp8-kv_none-calib512x512-eval_local_quick_bbbbbb"),
        ),
    )
    assert main([str(a), str(b), "--out", str(out)]) == 0
    markdown = (out / "results.md").read_text()
    assert "superseded" not in markdown and "older duplicate" not in markdown
    assert "| bf16 [eval_local_full_aaaaaa] | finished |" in markdown
    assert "| bf16 [eval_local_quick_bbbbbb] | finished |" in markdown
    csv = pd.read_csv(out / "results.csv", keep_default_na=False)
    bf16 = rows_of(csv, variant=BF16)
    assert sorted(zip(bf16["benchmark"], bf16["setting"], bf16["value"])) == sorted(
        [(e["benchmark"], "all items", e["value"]) for e in full]
        + [(e["benchmark"], "300 items", e["value"]) for e in quick]
    )
    fp8 = rows_of(csv, variant="fp8@512")
    assert dict(zip(fp8["benchmark"], fp8["bf16"].astype(float))) == {e["benchmark"]: e["value"] for e in quick}
    # The table: a row per way of measuring; the variant's cell beside the 300-item BF16 value only.
    assert "| lambada [300 items] | acc | 0.420 ± 0.010 | 0.400 ± 0.010 (-0.020 n.s., 95.2%) |" in markdown
    assert "| lambada [all items] | acc | 0.400 ± 0.010 |  |" in markdown


def test_the_worst_significant_loss_stands_beside_the_median_and_in_the_recovery_plot(tmp_path):
    """A median over four benchmarks near 102% hides a 14.6% drop on one: the summary names it with its error and
    share of BF16, the median carries its interval, and the recovery plot marks the drop."""
    from ptq.report.plots import WORST_LABEL, recovery_vs_bits_figure
    from ptq.report.render import write_report

    bf16_scores = dict(arc_easy__acc=0.60, hellaswag__acc=0.45, piqa__acc=0.70, hellaswag__acc_norm=0.48)
    int4_scores = dict(arc_easy__acc=0.61, hellaswag__acc=0.46, piqa__acc=0.715, hellaswag__acc_norm=0.41)
    fp8_scores = dict(arc_easy__acc=0.59, hellaswag__acc=0.44, piqa__acc=0.70, hellaswag__acc_norm=0.475)
    report = build_report(
        [
            make_record("m", BF16, results=scores(**bf16_scores), size=size(200_000_000)),
            make_record("m", "int4_awq", results=scores(**int4_scores), size=size(60_000_000)),
            make_record("m", "fp8", results=scores(**fp8_scores), size=size(110_000_000)),
        ]
    )
    summary = report.summary.set_index("variant")
    error = 2**0.5 * 0.01  # no per-item scores: sqrt(2) x the variant's standard error
    int4 = summary.loc["int4_awq@512"]
    assert (int4["worst_benchmark"], int4["worst_metric"]) == ("hellaswag", "acc_norm")
    assert int4["worst_delta"] == pytest.approx(0.41 - 0.48) and int4["worst_delta_error"] == pytest.approx(error)
    assert int4["worst_relative"] == pytest.approx((0.41 - 0.48) / 0.48)
    assert (int4["significant_losses"], int4["judged"]) == (1, 4)
    recoveries = [int4_scores[k] / bf16_scores[k] for k in bf16_scores]
    assert int4["median_recovery"] == pytest.approx(sorted(recoveries)[1:3] and sum(sorted(recoveries)[1:3]) / 2)
    low = sorted((int4_scores[k] - 1.96 * error) / bf16_scores[k] for k in bf16_scores)
    assert int4["median_recovery_lo"] == pytest.approx((low[1] + low[2]) / 2)
    assert int4["median_recovery_lo"] < int4["median_recovery"] < int4["median_recovery_hi"]
    assert summary.loc["fp8@512", "worst_benchmark"] == "" and summary.loc["fp8@512", "significant_losses"] == 0
    markdown = render_markdown(report)
    median = f"{100 * int4['median_recovery']:.1f}% [{100 * int4['median_recovery_lo']:.1f}, {100 * int4['median_recovery_hi']:.1f}]"
    assert (
        f"| int4_awq@512 | finished | {median} | hellaswag/acc_norm -0.070 ± 0.014 (-14.6% of BF16); 1 of 4 significant |"
        in markdown
    )
    assert "| none of 4 significant |" in markdown  # fp8's losses are all within noise
    write_report(report, tmp_path / "out")
    csv = pd.read_csv(tmp_path / "out" / "summary.csv", keep_default_na=False).set_index("variant")
    assert csv.loc["int4_awq@512", "worst_benchmark"] == "hellaswag"
    assert float(csv.loc["int4_awq@512", "worst_relative"]) == pytest.approx((0.41 - 0.48) / 0.48)
    axes = recovery_vs_bits_figure(report.summary, "m").axes[0]
    (worst,) = [container for container in axes.containers if container.get_label() == WORST_LABEL]
    assert worst.lines[0].get_xdata().tolist() == [int4["bits_per_weight"]]
    assert worst.lines[0].get_ydata().tolist() == pytest.approx([100 * 0.41 / 0.48])
    (bar,) = worst.lines[2]  # its 95% interval: (delta -/+ 1.96 errors) / BF16
    assert sorted(bar.get_segments()[0][:, 1]) == pytest.approx(
        [100 * (0.41 - 1.96 * error) / 0.48, 100 * (0.41 + 1.96 * error) / 0.48]
    )
    assert any("hellaswag/acc_norm -14.6%" in text.get_text() for text in axes.texts)
    assert WORST_LABEL in axes.get_legend_handles_labels()[1]


def test_per_subject_rows_are_named_after_the_subject_not_its_file():
    """ptq/evaluation/ names a subject row `mmlu:<subject>` (not after anatomy_test.csv); records written before
    are read under the same names, so an old BF16 subject still pairs with a new variant's."""
    from ptq.evaluation.scores import subject_rows

    row = {
        "benchmark": "mmlu",
        "metric": "acc",
        "value": 0.75,
        "stderr": 0.2,
        "higher_is_better": True,
        "items": {"doc_ids": [0, 1, 2, 3], "scores": [1.0, 0.0, 1.0, 1.0]},
    }
    named = subject_rows(row, ["abstract_algebra_test", "abstract_algebra_test", "anatomy_test", "anatomy_test"])
    assert [(r["benchmark"], r["subject"], r["value"]) for r in named] == [
        ("mmlu:abstract_algebra", "abstract_algebra", 0.5),
        ("mmlu:anatomy", "anatomy", 1.0),
    ]

    def subject(name, values):
        return {
            "benchmark": f"mmlu:{name}",
            "subject": name,
            "metric": "acc",
            "value": sum(values) / 4,
            "stderr": 0.2,
            "higher_is_better": True,
            "items": {"doc_ids": [0, 1, 2, 3], "scores": values},
        }

    older_bf16 = make_record("m", BF16, results=[subject("anatomy_test", [1, 1, 0, 0])])
    fp8 = make_record("m", "fp8", results=[subject("anatomy", [1, 0, 0, 0])])
    scores_table = build_report([older_bf16, fp8]).scores
    assert set(scores_table["benchmark"]) == {"mmlu:anatomy"} and set(scores_table["subject"]) == {"anatomy"}
    paired = rows_of(scores_table, variant="fp8@512").iloc[0]
    assert paired["bf16"] == 0.5 and paired["paired_items"] == 4


# ----------------------------------------------------------------------------------------------
# Training after PTQ (recover=qat|qad) against its PTQ point


def trained(record, method="qad", steps=20, lr=1e-5):
    record["config"]["recover"] = {"method": method, "steps": steps, "lr": lr, "schedule": "cosine"}
    return record


def fid_with_interval(ratio, ratio_halfwidth, kl, kl_stderr):
    out = fidelity(20.0 * ratio, kl, 0.8)
    out["perplexity_ratio_ci95"] = [ratio - ratio_halfwidth, ratio + ratio_halfwidth]
    out["mean_kl_stderr"] = kl_stderr
    return out


def test_training_after_ptq_is_shown_against_its_ptq_point_with_the_share_of_the_gap_closed(tmp_path):
    ptq = make_record("m", "nvfp4", fidelity=fid_with_interval(1.6, 0.02, 0.40, 0.01))
    short = trained(make_record("m", "nvfp4", fidelity=fid_with_interval(1.3, 0.02, 0.20, 0.01)), steps=20)
    long = trained(make_record("m", "nvfp4", fidelity=fid_with_interval(1.2, 0.02, 0.10, 0.01)), steps=100)
    other_lr = trained(make_record("m", "nvfp4", fidelity=fid_with_interval(1.7, 0.02, 0.50, 0.01)), steps=100, lr=1e-3)
    report = build_report([ptq, short, long, other_lr])
    # Four points, none superseded: the training settings (steps, lr) make different points.
    assert report.superseded.empty
    table = report.training
    assert len(table) == 3 and set(table["ptq_variant"]) == {"nvfp4@512"}
    row = table[(table["steps"] == 20)].iloc[0]
    assert row["variant"] == "nvfp4+qad20@512"
    assert row["kl_gap_closed"] == pytest.approx(0.5)  # 0.40 -> 0.20 of a gap of 0.40 to BF16's 0
    # delta method: sqrt(0.01^2 + (1 - 0.5)^2 0.01^2) / 0.40
    stderr = math.sqrt(0.01**2 + 0.25 * 0.01**2) / 0.40
    assert row["kl_gap_closed_lo"] == pytest.approx(0.5 - 1.96 * stderr)
    assert row["ppl_gap_closed"] == pytest.approx(0.5)  # 1.6 -> 1.3 of a gap of 0.6 to 1
    assert not row["worse_than_ptq"]
    # Same steps, another learning rate: the labels name the learning rate, and the worse one is flagged.
    hundred = table[table["steps"] == 100]
    assert sorted(hundred["variant"]) == ["nvfp4+qad100@512 [lr 0.001]", "nvfp4+qad100@512 [lr 1e-05]"]
    bad = hundred[hundred["lr"] == 1e-3].iloc[0]
    assert bad["worse_than_ptq"] and bad["kl_gap_closed"] == pytest.approx(-0.25)
    assert "worse than PTQ" in bad["note"]
    markdown = render_markdown(report)
    assert "### m: training after PTQ" in markdown and "WORSE:" in markdown and "50% [" in markdown
    from ptq.report import write_report

    _, written = write_report(report, tmp_path / "out")
    names = {p.name for p in written}
    assert {"training.csv", "training_m.png"} <= names
    assert (tmp_path / "out" / "training_m.png").read_bytes().startswith(PNG_MAGIC)


def test_a_ptq_gap_within_noise_has_no_share_to_close_and_a_lone_trained_point_says_what_is_missing():
    ptq = make_record("m", "fp8", fidelity=fid_with_interval(1.01, 0.03, 0.004, 0.003))
    closer = trained(make_record("m", "fp8", fidelity=fid_with_interval(1.0, 0.03, 0.002, 0.003)))
    row = build_report([ptq, closer]).training.iloc[0]
    assert math.isnan(row["kl_gap_closed"]) and math.isnan(row["ppl_gap_closed"])
    assert "within noise" in row["note"]
    lone = build_report([trained(make_record("m", "int4_awq", fidelity=fid_with_interval(1.1, 0.01, 0.1, 0.01)))])
    assert lone.training.iloc[0]["note"].startswith("no finished PTQ point")
    # A trained run's own fidelity before training (the same held-out tokens) stands in for a missing PTQ point.
    own = trained(make_record("m", "int4_awq", fidelity=fid_with_interval(1.1, 0.01, 0.1, 0.01)))
    own["recovery"] = {"ptq_fidelity": fid_with_interval(1.2, 0.01, 0.2, 0.01)}
    row = build_report([own]).training.iloc[0]
    assert row["ptq_variant"] == "int4_awq@512 (same run, before training)"
    assert row["kl_gap_closed"] == pytest.approx(0.5) and row["ppl_gap_closed"] == pytest.approx(0.5)


def test_benchmark_losses_closed_by_training_count_only_rows_where_ptq_lost_beyond_noise():
    base = make_record("m", BF16, results=scores(arc__acc=0.60, hs__acc=0.50))
    ptq = make_record(
        "m", "nvfp4", results=scores(arc__acc=0.50, hs__acc=0.495), fidelity=fid_with_interval(1.5, 0.02, 0.3, 0.01)
    )
    after = trained(
        make_record(
            "m", "nvfp4", results=scores(arc__acc=0.56, hs__acc=0.50), fidelity=fid_with_interval(1.2, 0.02, 0.1, 0.01)
        )
    )
    row = build_report([base, ptq, after]).training.iloc[0]
    # arc lost 0.10 (beyond noise) and got 0.06 back; hs lost 0.005, within noise, so it is not counted.
    assert row["benchmarks_closed"] == 1
    assert row["benchmark_gap_closed"] == pytest.approx(0.6)
    # A benchmark PTQ gained on beyond noise has no gap to close: not counted either.
    gained = make_record(
        "m", "nvfp4", results=scores(arc__acc=0.50, hs__acc=0.60), fidelity=fid_with_interval(1.5, 0.02, 0.3, 0.01)
    )
    row = build_report([base, gained, after]).training.iloc[0]
    assert row["benchmarks_closed"] == 1 and row["benchmark_gap_closed"] == pytest.approx(0.6)


def test_each_variant_links_the_recipe_file_written_beside_its_checkpoint():
    made = make_record("m", "fp8", fidelity=fidelity(21.0, 0.03, 0.9))
    made["checkpoint"] = "/runs/m/fp8/checkpoint"
    made["details"] = {"applied_recipe": {"metadata": {"recipe_type": "ptq"}, "quantize": {"quant_cfg": []}}}
    older = make_record("m", "int8_sq", fidelity=fidelity(21.0, 0.03, 0.9))  # a record from before recipe files
    report = build_report([made, older])
    files = dict(zip(report.summary["variant"], report.summary["recipe_file"]))
    assert files == {"fp8@512": "/runs/m/fp8/checkpoint/modelopt_recipe.yaml", "int8_sq@512": "", BF16: ""}
    assert "[modelopt_recipe.yaml](/runs/m/fp8/checkpoint/modelopt_recipe.yaml)" in render_markdown(report)


def test_records_carry_a_version_and_one_from_a_newer_launcher_is_skipped_naming_it():

    older = make_record("m", "fp8", fidelity=fidelity(21.0, 0.03, 0.9))  # no record_version: version 1, read
    newer = make_record("m", "nvfp4", fidelity=fidelity(24.0, 0.3, 0.7))
    newer["record_version"] = RECORD_VERSION + 1
    odd = make_record("m", "int8_sq")
    odd["record_version"] = "two"
    report = build_report([older, newer, odd], ["old.json", "new.json", "odd.json"])
    assert list(report.summary["variant"]) == ["bf16", "fp8@512"]
    reasons = dict(zip(report.skipped["source"], report.skipped["reason"]))
    assert reasons["new.json"].startswith(f"written by a newer ptq-launcher (record_version {RECORD_VERSION + 1}; ")
    assert "record_version='two'" in reasons["odd.json"]


def test_the_eval_tag_is_the_records_own_and_read_off_the_folder_only_for_older_records():
    record = make_record("m", "fp8", output_dir="runs/m/fp8-kv_none-calib512x512-eval_quick_aaaaaa")
    older = {k: v for k, v in record.items() if k not in ("eval_tag", "record_version")}
    assert RunRecord.parse(older).eval_tag == "eval_quick_aaaaaa"  # an older record: from the folder's name
    assert RunRecord.parse({**record, "eval_tag": "eval_quick_bbbbbb"}).eval_tag == "eval_quick_bbbbbb"
    # Evaluation off, whatever the folder is called.
    assert RunRecord.parse({**record, "eval_tag": ""}).eval_tag == ""


def test_a_submitted_point_without_a_record_is_reported_as_pending(tmp_path, capsys):
    """A Slurm sweep's manifest names a point whose job has not started: the report lists it, as pending, beside
    the finished runs (the Slurm test covers this against a real cluster; here without one)."""
    from ptq.report import main

    write_record(tmp_path, "m/bf16", make_record("m", BF16, fidelity=fidelity(20.0, 0.0, 1.0)))
    waiting = {"model": "m", "recipe": "fp8", "kv_cache": "none", "calib_size": 512, "calib_seq_len": 512}
    manifest = tmp_path / "sweeps" / "s1" / "sweep.json"
    manifest.parent.mkdir(parents=True)
    point = {**waiting, "state": "submitted", "output_dir": str(tmp_path / "m" / "fp8"), "job_id": "7_0"}
    manifest.write_text(json.dumps({"points": [point]}))
    assert main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    row = summary[summary["variant"] == "fp8@512"].iloc[0]
    assert row["status"] == "pending" and "pending" in row["note"]
    capsys.readouterr()


def test_peak_gpu_memory_is_shown_as_gigabytes_and_a_multiple_of_the_bf16_weights():
    size = {"bf16_bytes": 15_000_000_000, "checkpoint_bytes": 8_000_000_000, "compression": 1.875}
    on_gpu = {
        **make_record("moe", "fp8", size=size),
        # The largest stage counts (here calibration), whichever it is.
        "peak_gpu_memory_bytes": {"load": 15_100_000_000, "calibrate": 19_500_000_000, "export": 16_000_000_000},
    }
    on_cpu = make_record("moe", "int8_sq", size=size)  # no GPU: no peak
    report = build_report([on_gpu, on_cpu])
    summary = report.summary.set_index("variant")
    assert summary.loc["fp8@512", "peak_gpu_gb"] == pytest.approx(19.5)
    assert summary.loc["fp8@512", "peak_gpu_x_bf16"] == pytest.approx(1.3)
    assert math.isnan(summary.loc["int8_sq@512", "peak_gpu_gb"])
    text = render_markdown(report)
    assert "| peak GPU (GB) |" in text and "| 19.5 (1.30x BF16) |" in text


def test_committed_records_unpack_into_runs_the_report_reads_again(tmp_path):
    """bench/records.py gathers a bench's run.json files into one committed file; --unpack writes them back so a
    committed result's report can be made again by the current code, and never over an existing folder."""
    root = tmp_path / "runs"
    write_record(root, "tiny/bf16", make_record("tiny", "bf16", fidelity=fidelity(20.0, 0.0, 1.0)))
    write_record(root, "tiny/fp8", make_record("tiny", "fp8", fidelity=fidelity(25.0, 0.05, 0.9)))
    gathered = tmp_path / "gathered"
    records = bench_records.gather(root, gathered)
    assert sorted(records) == ["tiny/bf16", "tiny/fp8"]
    again = tmp_path / "again"
    assert bench_records.unpack(gathered / "run-records.json", again) == 2
    for name in records:
        assert json.loads((again / name / "run.json").read_text()) == json.loads((root / name / "run.json").read_text())
    first = render_markdown(build_report(*load_records(find_run_records([root]))))
    second = render_markdown(build_report(*load_records(find_run_records([again]))))
    assert "fp8@512" in first and first.replace(str(root), "") == second.replace(str(again), "")
    with pytest.raises(SystemExit, match="exists"):
        bench_records.unpack(gathered / "run-records.json", again)
    (tmp_path / "bad.json").write_text(json.dumps({"tiny/fp8": {}, "../outside/x": {}}))
    with pytest.raises(SystemExit, match="not a <model>/<point> folder name"):
        bench_records.unpack(tmp_path / "bad.json", tmp_path / "bad")
    assert not (tmp_path / "outside").exists() and not (tmp_path / "bad").exists()  # nothing half-written
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(SystemExit, match="is not a run-records.json file"):
        bench_records.unpack(tmp_path / "list.json", tmp_path / "list")
