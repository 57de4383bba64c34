"""What a user sees on the console: a refusal once, and library warnings in run.log only."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import warnings

from conftest import REPO

from ptq.run import run_log


def test_a_refusal_is_printed_once(tmp_path):
    done = subprocess.run(
        [sys.executable, "launch.py", "calib.size=0", f"output_root={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    said = done.stdout + done.stderr
    assert said.count("calibration needs at least 1 sample") == 1, said
    assert not any(tmp_path.iterdir())


def test_library_warnings_go_to_run_log_only(tmp_path):
    console = io.StringIO()
    deepspeed = logging.getLogger("DeepSpeed")
    handler = logging.StreamHandler(console)  # stands for the console handler DeepSpeed gives its logger
    deepspeed.addHandler(handler)
    try:
        deepspeed.warning("Setting accelerator to CPU (said before the run's log opened)")
        with run_log(tmp_path):
            warnings.warn("a library's UserWarning", UserWarning)
            deepspeed.warning("said during the run")
            logging.getLogger("ptq.test").warning("the launcher's own line")
    finally:
        deepspeed.removeHandler(handler)
    assert console.getvalue() == ""
    text = (tmp_path / "run.log").read_text()
    for line in (
        "Setting accelerator to CPU",
        "a library's UserWarning",
        "said during the run",
        "the launcher's own line",
    ):
        assert line in text


def test_a_dry_run_sweep_leaves_no_folders(tmp_path):
    done = subprocess.run(
        [sys.executable, "launch.py", "-m", "recipe=fp8,int8_sq", "dry_run=true", f"output_root={tmp_path / 'runs'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "quantize with INT8_SMOOTHQUANT_CFG" in done.stdout + done.stderr
    assert not (tmp_path / "runs" / "sweeps").exists()


def test_a_forked_worker_dies_of_sigterm_instead_of_raising_the_runs_exception():
    """lm-eval's bootstrap pool ends its workers with SIGTERM; forked inside a run, they inherit the run's
    handler, which must not turn it into the run's Terminated exception there."""
    import multiprocessing
    import signal
    import time

    from ptq.run import sigterm_raises

    with sigterm_raises():
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        worker.start()
        time.sleep(0.5)
        worker.terminate()
        worker.join(timeout=20)
    assert worker.exitcode == -signal.SIGTERM


def test_a_template_with_a_literal_backslash_n_is_warned_about():
    from conftest import plan_for

    literal = (
        "eval.benchmarks=[{name: boolq, kind: multiple_choice, format: jsonl, path: /x.jsonl, "
        'template: "{passage}\\nQuestion: {question}?\\nAnswer:"}]'
    )
    real = literal.replace("\\n", "\n")
    warned = [w for w in plan_for(["eval=local_quick", literal]).warnings if "backslash followed by n" in w]
    assert len(warned) == 1 and "boolq" in warned[0] and "$'...'" in warned[0]
    assert not [w for w in plan_for(["eval=local_quick", real]).warnings if "backslash followed by n" in w]
