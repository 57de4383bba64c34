"""Recovery after PTQ (recover=qat|qad, ptq/recover.py): planning refusals, the output folder, and a real QAD run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_run, plan_for, small_run_overrides
from transformers import PreTrainedModel

from ptq.errors import ConfigError
from ptq.exported.stored_weights import check_stored_weights
from ptq.formats import STORED_WEIGHTS_CHECK
from ptq.models import kept_model
from ptq.plan import ModelSource
from ptq.report.read import variant_label
from ptq.run import run
from ptq.run_record import RunRecord
from ptq.state import ProcessState


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["recover=qad", "recover.steps=0"], "recover.steps=0"),
        (["recover=qat", "recover.steps=-5"], "recover.steps=-5"),
        (["recover=qat", "recover.lr=-1e-5"], "recover.lr=-1e-05"),
        (["recover=qad", "recover.lr=0"], "recover.lr=0"),
        (["recover=qad", "recover.warmup_ratio=1.5"], "recover.warmup_ratio=1.5"),
        (["recover=qad", "recover.temperature=0"], "recover.temperature=0"),
        (["recover=qat", "recover.batch_size=-1"], "recover.batch_size=-1"),
        (["recover=qat", "recover.seq_len=1"], "recover.seq_len=1"),
        (["recover=qad", "recipe=bf16"], "recipe=bf16 quantizes nothing"),
        (["recover=qad", "recover.text=cnn_dailymail"], "recover.text=cnn_dailymail"),
    ],
)
def test_bad_recovery_settings_are_refused_when_planning(overrides, needle):
    with pytest.raises(ConfigError) as err:
        plan_for(overrides)
    assert needle in str(err.value)


def test_training_on_the_fidelity_text_is_refused(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("some text\n")
    with pytest.raises(ConfigError, match="the fidelity check must measure on text the training never saw"):
        plan_for(["recover=qad", f"recover.text={text}", f"fidelity.text={text}"])
    # The same sampled text: "self" with the fidelity seed.
    with pytest.raises(ConfigError, match="recover.seed=4322"):
        plan_for(["recover=qat", "recover.seed=4321"])
    # Another seed, another file, or no fidelity check: planned.
    plan_for(["recover=qat", "recover.seed=4322"])
    plan_for(["recover=qad", f"recover.text={text}"])
    plan_for(["recover=qad", f"recover.text={text}", f"fidelity.text={text}", "fidelity=none"])


def test_recovered_points_get_their_own_folder():
    ptq = plan_for(["recipe=int4_awq"]).output_dir
    qad = plan_for(["recipe=int4_awq", "recover=qad", "recover.steps=20"]).output_dir
    qad_lr = plan_for(["recipe=int4_awq", "recover=qad", "recover.steps=20", "recover.lr=1e-4"]).output_dir
    qad_text = plan_for(["recipe=int4_awq", "recover=qad", "recover.steps=20", "recover.seed=7"]).output_dir
    qat = plan_for(["recipe=int4_awq", "recover=qat", "recover.steps=20"]).output_dir
    assert ptq.name == "int4_awq-kv_none-calib16x128"
    assert qad.name.startswith("int4_awq-kv_none-calib16x128-qad20_lr1e-05_")
    assert len({ptq, qad, qad_lr, qad_text, qat}) == 5
    # recover=none keeps the folders of runs made before the group existed.
    assert plan_for(["recipe=int4_awq", "recover=none"]).output_dir == ptq


def test_recover_defaults_are_modelopts():
    cfg, _ = compose_run(["recover=qad"])
    assert (cfg.recover.lr, str(cfg.recover.schedule), cfg.recover.warmup_ratio) == (1e-5, "cosine", 0.05)
    assert cfg.recover.seq_len == cfg.calib.seq_len
    assert compose_run([])[0].recover.method == "none"


@pytest.mark.slow
def test_qad_lowers_the_held_out_kl_of_int4_awq(tmp_path, smollm2_dir):
    """SmolLM2 quantized to INT4 AWQ, then 20 steps of QAD on text the BF16 model wrote (seed 2468): the mean KL
    on the held-out fidelity text (another text) drops below the same run's PTQ KL, the export validates, and the
    checkpoint as written scores like the trained model in memory."""
    overrides = small_run_overrides(
        tmp_path,
        f"model.path={smollm2_dir}",
        "recipe=int4_awq",
        "calib.size=8",
        "fidelity.samples=4",
        "recover=qad",
        "recover.steps=20",
        "recover.batch_size=4",
        "recover.seq_len=64",
        "recover.lr=1e-4",
    )
    cfg, resolved = compose_run(overrides)
    record = run(cfg, resolved)
    assert record["status"] == "finished", record.get("error")
    assert record["validation"]["passed"], record["validation"]["problems"]
    rec = record["recovery"]
    ptq_kl, recovered_kl = rec["ptq_fidelity"]["mean_kl"], record["fidelity"]["mean_kl"]
    assert recovered_kl < ptq_kl, (ptq_kl, recovered_kl)
    assert rec["method"] == "qad" and rec["steps"] == 20 and rec["tokens_seen"] == 20 * 4 * 64
    assert rec["teacher"].startswith("the pristine BF16 model") or rec["teacher"].startswith("a second copy")
    assert rec["text_source"].startswith("self") and rec["text_samples"] == 80
    assert [p["step"] for p in rec["loss_curve"]] == list(range(1, 21))
    assert all(p["loss"] >= 0 for p in rec["loss_curve"])
    # The calibrated ranges are buffers: training leaves them as calibrated.
    assert rec["scales"]["amax_buffers"] > 0 and rec["scales"]["moved"] == 0
    assert record["timings_s"]["recover"] > 0
    # AWQ folds its scales into other tensors: the written checkpoint is read back whole and measured.
    written = record["fidelity"]["exported_checkpoint"]
    assert written["check"] == "full read-back"
    # Training ran on the model as the export writes it (AWQ scales of q/k/v and gate/up already one per group, see
    # hf_modelopt.align_with_export): the written checkpoint scores like the model in memory. Unaligned, the export
    # averaged the trained per-projection scales afterwards and the written KL was about 11% above (0.306 vs 0.276).
    assert abs(written["mean_kl"] - recovered_kl) <= 0.02 * recovered_kl + 0.002, (written["mean_kl"], recovered_kl)
    on_disk = json.loads((Path(record["output_dir"]) / "run.json").read_text())
    assert on_disk["recovery"]["ptq_fidelity"]["mean_kl"] == ptq_kl
    # ModelOpt's checkpointing patch, which its trainers turn on, is put back: nothing of it in the export.
    assert not list((tmp_path / "runs").rglob("modelopt_state*.pth"))


@pytest.mark.slow
def test_qat_on_fp8_trains_and_the_stored_weights_match_the_trained_ones(tmp_path, tiny_llama_dir):
    """QAT (causal-LM loss) on a small Llama in FP8, text from a local file: the run finishes and validates, the
    loss curve has a point per step, and the stored-weight check compares the export with the trained weights."""
    text = tmp_path / "train.txt"
    text.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7}.\n" for i in range(400)))
    overrides = small_run_overrides(
        tmp_path,
        f"model.path={tiny_llama_dir}",
        "model.name=tiny-llama",
        "recipe=fp8",
        "recover=qat",
        "recover.steps=3",
        "recover.batch_size=2",
        "recover.seq_len=32",
        f"recover.text={text}",
        "recover.lr=1e-2",
        "recover.samples=5",
    )
    cfg, resolved = compose_run(overrides)
    record = run(cfg, resolved)
    assert record["status"] == "finished", record.get("error")
    assert record["validation"]["passed"], record["validation"]["problems"]
    rec = record["recovery"]
    assert rec["method"] == "qat" and rec["loss"] == "causal-LM cross-entropy" and "teacher" not in rec
    # 5 sequences in batches of 2: the third step takes the last one alone.
    assert rec["text_source"] == str(text.resolve()) and rec["text_samples"] == 5 and rec["tokens_seen"] == 5 * 32
    assert [p["step"] for p in rec["loss_curve"]] == [1, 2, 3]
    assert rec["scales"]["moved"] == 0
    # The weights moved: the stored weights are compared with the trained ones held in memory, not the source's.
    written = record["fidelity"]["exported_checkpoint"]
    assert written["check"] == STORED_WEIGHTS_CHECK and written["reference"] == "the weights in memory"
    assert written["layers"] == 14 and written["formats"] == {"FP8": 14} and not written["problems"]
    # ... which is what lets it pass: at this lr the weights moved far beyond FP8's rounding, and the same check
    # against the source checkpoint finds every layer's stored weight off.
    against_source = check_stored_weights(Path(record["checkpoint"]), Path(tiny_llama_dir))
    assert against_source["applicable"] and len(against_source["problems"]) >= 14


@pytest.mark.slow
def test_qad_teacher_is_the_kept_bf16_model_left_as_found_or_a_second_copy(tmp_path, tiny_llama_dir):
    """QAD distils from the pristine BF16 model this process keeps (no copy) and hands it on unchanged: trainable
    as before, and transformers' loading no longer patched by ModelOpt's trainer; without a kept model, from a
    second copy made before quantizing."""

    def qad(*extra):
        overrides = small_run_overrides(
            tmp_path,
            f"model.path={tiny_llama_dir}",
            "model.name=tiny-llama",
            "recipe=fp8",
            "recover=qad",
            "recover.steps=2",
            "recover.batch_size=2",
            "recover.seq_len=32",
            *extra,
        )
        cfg, resolved = compose_run(overrides)
        record = run(cfg, resolved, state=state)
        assert record["status"] == "finished", record.get("error")
        return record["recovery"]

    state = ProcessState()
    kept = qad()
    assert kept["teacher"].startswith("the pristine BF16 model this process keeps")
    teacher = kept_model(
        state, ModelSource("local", str(tiny_llama_dir)), device="cpu", dtype="float32", trust_remote_code=False
    )
    assert teacher is not None and all(p.requires_grad for p in teacher.parameters())
    assert "_modelopt_cache" not in PreTrainedModel.__dict__
    copied = qad("backend.reuse_loaded_model=false", "recover.seed=99")
    assert copied["teacher"].startswith("a second copy of the BF16 model")


def test_a_recovered_checkpoint_is_its_own_variant_in_the_report():
    ptq = RunRecord("m", "int4_awq", calib_size=16, config={"recover": {"method": "none"}})
    qad = ptq.replace(config={"recover": {"method": "qad", "steps": 20}})
    assert variant_label(ptq) == "int4_awq@16"
    assert variant_label(qad) == "int4_awq+qad20@16"


def test_a_sweep_over_recovery_settings_launches_the_plain_ptq_point_once(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "-m",
            "recipe=int4_awq",
            "recover=none,qad",
            "recover.steps=10,20",
            "dry_run=true",
            f"output_root={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # recover=none ignores recover.steps: 2 x 2 combinations are 3 checkpoints (PTQ, QAD 10, QAD 20).
    assert "Launching 3 jobs locally" in out
    assert "it is the point recipe=int4_awq recover=none recover.steps=10" in out
    assert out.count("then QAD for") == 2
