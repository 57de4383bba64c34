"""recover=qat and recover=qad with backend=megatron_bridge (ptq/backends/megatron_qat.py, ModelOpt's distill.py):
the planned steps, the refusals, the training rows the launcher writes, and the loss curve read from
Megatron-Bridge's training log.

The training itself needs Megatron-Bridge, Transformer Engine and a CUDA GPU (Python 3.12), none of which this
machine has: it is run on a GPU host by bench/ (see docs/recovery.md); here every part around it is checked."""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

import numpy
import pytest
from conftest import GPU_FACTS, compose_run, plan_for

from ptq.backends.megatron_bridge import LOG_LOSS, parse_training_log, recovery_record, write_train_rows
from ptq.backends.megatron_steps import (
    ENTRY,
    QAD_OUTPUT,
    QAT_CHECKPOINT,
    QAT_SCRIPT,
    TRAIN_ROWS,
    build_steps,
    check_scripts,
)
from ptq.calib_data import token_batches
from ptq.errors import ConfigError
from ptq.run import run

MB = ["backend=megatron_bridge", "hardware=h100", "calib.dataset=cnn_dailymail", "recipe=fp8"]


@pytest.fixture
def train_text(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("Training text for the quantized model, one sentence after another. " * 400)
    return text


def steps_of(plan):
    out = plan.output_dir
    return {s.name: s for s in build_steps(plan, out / "megatron", out / "partial", env={})}


def test_qat_runs_between_quantize_and_the_generate_check_and_the_export_loads_its_checkpoint(tmp_path, train_text):
    plan = plan_for(
        [
            *MB,
            "model=qwen3-8b",
            "parallelism=tp2",
            "recover=qat",
            f"recover.text={train_text}",
            "recover.steps=30",
            "recover.lr=2e-5",
            "recover.warmup_ratio=0.1",
            "recover.seq_len=256",
            f"output_root={tmp_path}",
            f"output_dir={tmp_path / 'out'}",
        ],
        GPU_FACTS,
    )
    steps = steps_of(plan)
    assert list(steps) == ["quantize", "train_data", "qat", "generate", "export"]
    out = tmp_path / "out"
    data = steps["train_data"].argv
    assert data[1:3] == [str(QAT_SCRIPT), "data"] and data[data.index("--rows") + 1] == str(out / TRAIN_ROWS)
    train = steps["qat"].argv
    assert train[:2] == shlex.split("torchrun --nproc_per_node=2")
    assert train[train.index(str(ENTRY)) + 1 : train.index(str(ENTRY)) + 3] == [str(QAT_SCRIPT), "train"]

    def value(argv, flag):
        return argv[argv.index(flag) + 1]

    assert value(train, "--load") == str(out / "megatron")
    assert value(train, "--save") == str(out / QAT_CHECKPOINT)
    assert value(train, "--data") == value(data, "--out")
    assert (value(train, "--steps"), value(train, "--lr"), value(train, "--warmup-iters")) == ("30", "2e-05", "3")
    assert (value(train, "--seq-length"), value(train, "--global-batch-size"), value(train, "--tp")) == (
        "256",
        "16",
        "2",
    )
    for name in ("generate", "export"):
        assert value(steps[name].argv, "--megatron-load-path") == str(out / QAT_CHECKPOINT)
    # Without recovery, the PTQ checkpoint is what they load, and there is no training step.
    ptq = steps_of(plan_for([*MB, "model=qwen3-8b", f"output_root={tmp_path}", f"output_dir={out}"], GPU_FACTS))
    assert list(ptq) == ["quantize", "generate", "export"]
    assert value(ptq["export"].argv, "--megatron-load-path") == str(out / "megatron")


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["recover=qad", "recover.text={text}", "recover.temperature=2.0"], "distill.py, whose logit KL"),
        (["recover=qad", "recover.text={text}", "recover.schedule=linear"], "recover.schedule=cosine"),
        (["recover=qad", "recover.text={text}", "parallelism=tp2", "parallelism.etp=2"], "set parallelism.etp=1"),
        (["recover=qad", "recover.text={text}", "recover.steps=4"], r"64 rows .* at least 100 rows"),
        (["recover=qat"], "recover.text=self samples text from the BF16 model"),
        (
            ["recover=qat", "recover.text={text}", "parallelism.gpus_per_node=4", "recover.batch_size=6"],
            "cannot be split over the 4 data-parallel ranks",
        ),
    ],
)
def test_what_megatron_qat_cannot_run_is_refused_when_planning(overrides, needle, train_text):
    with pytest.raises(ConfigError, match=needle):
        plan_for([*MB, "model=qwen3-8b", *(o.format(text=train_text) for o in overrides)], GPU_FACTS)


def test_training_text_too_short_for_the_steps_is_refused_before_anything_runs(tmp_path):
    """Checked with the other inputs, for either backend: here the in-process one, which this machine runs."""
    short = tmp_path / "short.txt"
    short.write_text("Too little text. " * 50)
    cfg, config = compose_run(
        [
            "recipe=fp8",
            "recover=qat",
            f"recover.text={short}",
            "recover.steps=10",
            "recover.batch_size=4",
            "recover.seq_len=128",
            f"output_root={tmp_path / 'runs'}",
            f"cache_dir={tmp_path / 'cache'}",
            "fidelity.enabled=false",
            "calib.dataset=self",
        ]
    )
    with pytest.raises(ConfigError, match=r"recover.text=.*fewer than the 5,120 tokens asked \(40 x 128"):
        run(cfg, config)
    assert not (tmp_path / "runs").exists()


def test_training_rows_are_the_tokens_the_in_process_backend_trains_on(tmp_path, smollm2_dir, train_text):
    from transformers import AutoTokenizer

    plan = plan_for(
        [
            *MB,
            "model=llama3.2-1b",
            f"model.path={smollm2_dir}",
            "model.hf_id=null",
            "recover=qat",
            f"recover.text={train_text}",
            "recover.steps=3",
            "recover.batch_size=2",
            "recover.seq_len=64",
            f"output_root={tmp_path}",
            f"output_dir={tmp_path / 'out'}",
            f"cache_dir={tmp_path / 'cache'}",
        ],
        replace(GPU_FACTS, local_model_ok=True),
    )
    rows = numpy.load(write_train_rows(plan))
    assert rows.shape == (6, 64)
    expected = token_batches(
        str(train_text),
        model=None,
        tokenizer=AutoTokenizer.from_pretrained(smollm2_dir),
        model_id="x",
        samples=6,
        seq_len=64,
        seed=0,
        cache_dir=str(tmp_path / "other-cache"),
        sample_batch_size=1,
    )
    assert rows.tolist() == expected.tolist()
    assert not list((tmp_path / "out").glob(".*tmp*"))  # written atomically: no partial file left beside it


def test_a_rerun_trains_from_the_ptq_checkpoint_again_not_from_an_earlier_attempts_save(
    tmp_path, smollm2_dir, train_text
):
    """distill.py resumes from its own save folder when it holds a checkpoint: the launcher clears it first."""
    from ptq.backends.megatron_bridge import _prepare_inputs
    from ptq.record_parts import StageTimer

    out = tmp_path / "out"
    plan = plan_for(
        [
            *MB,
            "model=llama3.2-1b",
            f"model.path={smollm2_dir}",
            "model.hf_id=null",
            "recover=qad",
            f"recover.text={train_text}",
            "recover.samples=100",
            "recover.seq_len=32",
            f"output_root={tmp_path}",
            f"output_dir={out}",
            f"cache_dir={tmp_path / 'cache'}",
        ],
        replace(GPU_FACTS, local_model_ok=True),
    )
    stale = out / QAD_OUTPUT / "checkpoints" / "iter_0000100"
    stale.mkdir(parents=True)
    (stale.parent / "latest_checkpointed_iteration.txt").write_text("100")
    ptq_checkpoint = out / "megatron" / "iter_0000001"
    ptq_checkpoint.mkdir(parents=True)
    _prepare_inputs(plan, StageTimer())
    assert not (out / QAD_OUTPUT).exists() and ptq_checkpoint.is_dir()
    assert numpy.load(out / TRAIN_ROWS).shape == (100, 32)


# Lines as Megatron-Bridge's training_log prints them (megatron/bridge/training/utils/train_utils.py), with the
# noise around them that a real log has.
LOG = """\
ptq: gradient_accumulation_fusion forced off (APEX's fused_weight_gradient_mlp_cuda is not installed)
> building train, validation, and test datasets ...
 [2026-12-07 15:02:11] iteration        1/       3 | consumed samples:           16 | elapsed time per iteration (ms): 2140.2 | learning rate: 0.000000E+00 | global batch size:    16 | lm loss: 3.104512E+00 | loss scale: 1.0 | grad norm: 4.210 | number of skipped iterations:   0 | number of nan iterations:   0 |
 [2026-12-07 15:02:12] iteration        2/       3 | consumed samples:           32 | elapsed time per iteration (ms): 410.9 | learning rate: 1.000000E-05 | global batch size:    16 | lm loss: 2.981220E+00 | loss scale: 1.0 | grad norm: 3.877 | number of skipped iterations:   0 | number of nan iterations:   0 |
 [2026-12-07 15:02:12] iteration        3/       3 | consumed samples:           48 | elapsed time per iteration (ms): 409.5 | learning rate: 5.000000E-06 | global batch size:    16 | loss scale: 1.0 | number of skipped iterations:   1 | number of nan iterations:   0 |
[after training is done] datetime: 2026-12-07 15:02:13
"""


def test_the_loss_curve_is_read_from_the_training_log(tmp_path, train_text):
    curve = parse_training_log(LOG)
    assert curve == [
        {"step": 1, "loss": 3.104512, "lr": 0.0, "grad_norm": 4.21},
        {"step": 2, "loss": 2.98122, "lr": 1e-05, "grad_norm": 3.877},
    ]  # iteration 3 was skipped: it logged no loss
    plan = plan_for([*MB, "model=qwen3-8b", "recover=qat", f"recover.text={train_text}", "recover.steps=2"], GPU_FACTS)
    log = tmp_path / "qat.log"
    log.write_text(LOG)
    record = recovery_record(plan, log, 12.5)
    assert record["steps"] == 2 and record["loss_curve"] == curve
    assert record["tokens_seen"] == 2 * 16 * 512 and record["text_source"] == str(Path(train_text).resolve())


def value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_qad_runs_modelopts_distill_script_on_the_ptq_checkpoint_with_the_bf16_model_as_teacher(tmp_path, train_text):
    out = tmp_path / "out"
    plan = plan_for(
        [
            *MB,
            "model=qwen3-8b",
            "parallelism=tp2",
            "recover=qad",
            f"recover.text={train_text}",
            "recover.steps=40",
            "recover.lr=1e-5",
            "recover.warmup_ratio=0.05",
            "recover.seq_len=256",
            "backend.distill_script=/mo/examples/megatron_bridge/distill.py",
            f"output_root={tmp_path}",
            f"output_dir={out}",
        ],
        GPU_FACTS,
    )
    steps = steps_of(plan)
    assert list(steps) == ["quantize", "train_data", "qad", "generate", "export"]
    qad = steps["qad"].argv
    assert qad[:2] == shlex.split("torchrun --nproc_per_node=2")
    assert qad[qad.index(str(ENTRY)) + 1] == "/mo/examples/megatron_bridge/distill.py"
    model = plan.cfg.model.hf_id
    assert value(qad, "--student_hf_path") == value(qad, "--teacher_hf_path") == model
    assert value(qad, "--student_megatron_path") == str(out / "megatron")
    # Trained on the rows the data step writes (weight 1.0, then the dataset prefix).
    assert qad[qad.index("--data_paths") + 1 : qad.index("--data_paths") + 3] == [
        "1.0",
        value(steps["train_data"].argv, "--out"),
    ]
    assert [value(qad, f) for f in ("--train_iters", "--gbs", "--mbs", "--seq_length", "--lr_warmup_iters")] == [
        "40",
        "16",
        "1",
        "256",
        "2",
    ]
    assert (value(qad, "--lr"), value(qad, "--min_lr"), value(qad, "--tp_size"), value(qad, "--eval_iters")) == (
        "1e-05",
        "0.0",
        "2",
        "0",
    )
    for name in ("generate", "export"):  # distill.py saves under <output_dir>/checkpoints/iter_N
        assert value(steps[name].argv, "--megatron-load-path") == str(out / QAD_OUTPUT / "checkpoints")


def test_a_missing_or_too_old_distill_script_is_named_before_anything_runs(tmp_path, train_text):
    overrides = [
        *MB,
        "model=qwen3-8b",
        "recover=qad",
        f"recover.text={train_text}",
        f"output_root={tmp_path}",
        f"output_dir={tmp_path / 'o'}",
    ]
    scripts = Path(__file__).parent / "megatron_standin"
    plan = plan_for(
        [*overrides, f"backend.scripts_dir={scripts}", f"backend.distill_script={tmp_path / 'no.py'}"], GPU_FACTS
    )
    with pytest.raises(ConfigError, match=r"backend.distill_script=.*no.py does not exist.*Model-Optimizer checkout"):
        check_scripts(plan, build_steps(plan, tmp_path / "m", tmp_path / "e", env={}))
    # A distill.py from before QAD (no --student_megatron_path): its flags are read, the missing one named.
    old = tmp_path / "distill.py"
    flags = ["--student_hf_path", "--teacher_hf_path", "--data_paths", "--output_dir", "--train_iters", "--lr"]
    old.write_text("".join(f'parser.add_argument("{f}")\n' for f in flags))
    plan = plan_for([*overrides, f"backend.scripts_dir={scripts}", f"backend.distill_script={old}"], GPU_FACTS)
    with pytest.raises(ConfigError, match="does not accept --student_megatron_path.*0.47 or later"):
        check_scripts(plan, build_steps(plan, tmp_path / "m", tmp_path / "e", env={}))


# A distillation run's lines: Megatron-Bridge's distillation loss function reports the KD loss; the LM loss, which
# distill.py leaves out of training, reads 0.
QAD_LOG = """\
Detected ModelOpt state in /out/megatron; restoring quantizers for Quantization Aware Distillation (QAD).
 [2026-12-07 16:10:01] iteration        1/       2 | consumed samples:           16 | elapsed time per iteration (ms): 3120.0 | learning rate: 1.000000E-05 | global batch size:    16 | lm loss: 0.000000E+00 | total loss: 4.100000E-01 | logits distillation loss: 4.100000E-01 | intermediate distillation loss: 0.000000E+00 | loss scale: 1.0 | grad norm: 1.250 | number of skipped iterations:   0 | number of nan iterations:   0 |
 [2026-12-07 16:10:02] iteration        2/       2 | consumed samples:           32 | elapsed time per iteration (ms): 880.4 | learning rate: 0.000000E+00 | global batch size:    16 | lm loss: 0.000000E+00 | total loss: 3.600000E-01 | logits distillation loss: 3.600000E-01 | intermediate distillation loss: 0.000000E+00 | loss scale: 1.0 | grad norm: 1.110 | number of skipped iterations:   0 | number of nan iterations:   0 |
"""


def test_the_qad_loss_curve_is_the_distillation_loss(tmp_path, train_text):
    curve = parse_training_log(QAD_LOG, LOG_LOSS["qad"])
    assert [(e["step"], e["loss"], e["grad_norm"]) for e in curve] == [(1, 0.41, 1.25), (2, 0.36, 1.11)]
    assert [e["loss"] for e in parse_training_log(QAD_LOG)] == [0.0, 0.0]  # QAT's field: what QAD does not train
    plan = plan_for(
        [*MB, "model=qwen3-8b", "recover=qad", f"recover.text={train_text}", "recover.steps=2", "recover.samples=100"],
        GPU_FACTS,
    )
    log = tmp_path / "qad.log"
    log.write_text(QAD_LOG)
    record = recovery_record(plan, log, 4.0)
    assert record["method"] == "qad" and record["loss_curve"] == curve and "distill.py" in record["trainer"]
    assert record["teacher"].startswith("the BF16 model") and record["checkpoint"].endswith("megatron-qad/checkpoints")


def test_the_distill_script_folder_gets_the_same_check_of_missing_packages(tmp_path):
    """ModelOpt's examples/megatron_bridge (its helper _distillation_provider.py beside distill.py) is checked
    for Megatron-Bridge, Megatron-Core, Transformer Engine and ModelOpt before distill.py starts (this machine
    lacks the first three)."""
    import os
    import subprocess
    import sys

    from ptq.backends.megatron_entry import MISSING_EXIT

    (tmp_path / "_distillation_provider.py").write_text("raise SystemExit('the script itself must not start')\n")
    (tmp_path / "distill.py").write_text("import _distillation_provider\n")
    done = subprocess.run(
        [sys.executable, str(ENTRY), str(tmp_path / "distill.py")], capture_output=True, text=True, env=os.environ
    )
    assert done.returncode == MISSING_EXIT
    assert "megatron-bridge, megatron-core, transformer-engine" in done.stderr
    assert "the script itself must not start" not in done.stderr
