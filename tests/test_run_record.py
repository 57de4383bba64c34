"""The typed run record (ptq/run_record.py): every reader parses run.json through RunRecord alone."""

from __future__ import annotations

import json

import pytest

from ptq import run_record
from ptq.recipe_files import WRITTEN_NAME
from ptq.run_record import RECORD_VERSION, RecordProblem, RunRecord


def test_a_record_round_trips_through_its_json_form():
    record = RunRecord(
        "m",
        "fp8",
        status="finished",
        calib_size=64,
        calib_seq_len=256,
        checkpoint="/out/checkpoint",
        config={"parallelism": {"name": "tp2"}},
        sections={"fidelity": {"mean_kl": 0.1}, "details": {"applied_recipe": {"quantize": {}}}},
    )
    text = json.dumps(record.to_dict())
    again = RunRecord.parse(json.loads(text))
    assert again == record
    assert again.to_dict()["record_version"] == RECORD_VERSION
    assert again.section("fidelity") == {"mean_kl": 0.1} and again.section("evaluation") == {}
    assert again.parallelism == "tp2" and again.recipe_file == f"/out/checkpoint/{WRITTEN_NAME}"


def test_fields_of_the_wrong_type_read_as_absent():
    record = RunRecord.parse(
        {"model": "m", "recipe": "int4_awq", "calib_size": 128.0, "calib_seq_len": True, "kv_cache": 3, "status": 1}
    )
    assert record.calib_size == 128 and isinstance(record.calib_size, int)
    assert record.calib_seq_len is None and record.kv_cache == "none" and record.status == "unknown"
    assert record.record_version == 1  # written before the field existed
    assert RunRecord.parse({"model": "m", "recipe": "fp8", "calib_size": "lots"}).calib_size is None


@pytest.mark.parametrize(
    "obj,reason",
    [
        (["a"], "not a run record: top-level JSON is list, not an object"),
        ({"model": "m"}, "not a run record: missing 'recipe'"),
        ({"model": "", "recipe": "fp8"}, "not a run record: 'model' is not a non-empty string"),
        ({"model": "m", "recipe": "fp8", "record_version": "2"}, "record_version='2' is not a positive whole number"),
        ({"model": "m", "recipe": "fp8", "record_version": RECORD_VERSION + 1}, "written by a newer ptq-launcher"),
    ],
)
def test_what_is_not_a_readable_record_is_refused_with_its_reason(obj, reason):
    with pytest.raises(RecordProblem, match=reason.replace("(", r"\(").replace(")", r"\)")):
        RunRecord.parse(obj)
    assert reason in RunRecord.problem(obj)


def test_recover_settings_are_empty_unless_the_run_trained():
    assert RunRecord("m", "fp8", config={"recover": {"method": "none"}}).recover == {}
    assert RunRecord("m", "fp8", config={"recover": {"method": "qad", "steps": 20}}).recover["steps"] == 20


def test_load_tells_a_missing_record_from_a_broken_one(tmp_path):
    assert run_record.load(tmp_path) is None and run_record.load(None) is None
    (tmp_path / "run.json").write_text('{"model": "m", "recipe": "fp8", "sta')
    with pytest.raises(RecordProblem, match="unreadable JSON"):
        run_record.load(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps(RunRecord("m", "fp8", status="failed", error="boom").to_dict()))
    loaded = run_record.load(tmp_path)
    assert loaded.status == "failed" and loaded.error == "boom"
