"""recover=qat with backend=megatron_bridge (ptq/backends/megatron_qat.py): the planned steps, the refusals, the
training rows the launcher writes, and the loss curve read from Megatron-Bridge's training log.

The training itself needs Megatron-Bridge, Transformer Engine and a CUDA GPU (Python 3.12), none of which this
machine has: it is run on a GPU host by bench/ (see docs/recovery.md); here every part around it is checked."""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

import numpy
import pytest
from conftest import GPU_FACTS, compose_run, plan_for

from ptq.backends.megatron_bridge import parse_training_log, qat_record, write_qat_rows
from ptq.backends.megatron_steps import ENTRY, QAT_CHECKPOINT, QAT_ROWS, QAT_SCRIPT, build_steps
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
    assert list(steps) == ["quantize", "qat_data", "qat", "generate", "export"]
    out = tmp_path / "out"
    data = steps["qat_data"].argv
    assert data[1:3] == [str(QAT_SCRIPT), "data"] and data[data.index("--rows") + 1] == str(out / QAT_ROWS)
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
        (["recover=qad", "recover.text={text}"], "distill.py"),
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
    rows = numpy.load(write_qat_rows(plan))
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
    record = qat_record(plan, log, 12.5)
    assert record["steps"] == 2 and record["loss_curve"] == curve
    assert record["tokens_seen"] == 2 * 16 * 512 and record["text_source"] == str(Path(train_text).resolve())
