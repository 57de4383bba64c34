"""One writer per output folder (ptq/lock.py): a live holder refuses a second run at once and is named; a dead
holder's lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ptq.errors import ConfigError
from ptq.layout import LOCK_NAME
from ptq.lock import STALE_S, OutputLock, holder_alive, live_holder


def test_a_second_lock_on_a_held_folder_is_refused_naming_the_holder(tmp_path):
    with OutputLock(tmp_path):
        assert live_holder(tmp_path)["pid"] == os.getpid()
        with pytest.raises(ConfigError) as refused:
            OutputLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"PID {os.getpid()}" in message and socket.gethostname() in message and "output_root" in message
    assert not (tmp_path / LOCK_NAME).exists() and live_holder(tmp_path) is None


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ptq.lock import OutputLock; "
            f"OutputLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "held"
    assert live_holder(tmp_path)["pid"] == child.pid
    child.kill()
    child.wait()
    assert live_holder(tmp_path) is None  # its PID is gone
    lock = OutputLock(tmp_path).acquire()
    try:
        assert lock.taken_over["pid"] == child.pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_holder_on_another_host_is_judged_by_its_heartbeat():
    other = {"host": "some-other-node", "pid": 1, "slurm_job": "77_3", "started": "2026-11-30T10:00:00+0000"}
    now = time.time()
    assert holder_alive(other, heartbeat=now - 5, now=now)
    assert not holder_alive(other, heartbeat=now - STALE_S - 1, now=now)
    assert not holder_alive(None, heartbeat=now, now=now)


def test_of_several_runs_finding_one_dead_holder_exactly_one_takes_the_folder(tmp_path):
    import threading

    for _ in range(10):
        (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345}))
        winners, refused = [], []

        def contend(number):
            lock = OutputLock(tmp_path, holder={"host": socket.gethostname(), "pid": os.getpid(), "n": number})
            try:
                lock.acquire()
                winners.append(lock)
            except ConfigError:
                refused.append(number)

        threads = [threading.Thread(target=contend, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(winners) == 1 and len(refused) == 3
        assert json.loads((tmp_path / LOCK_NAME).read_text())["n"] == winners[0].holder["n"]
        winners[0].release()


def test_a_failed_record_is_written_for_the_ended_job_even_while_its_heartbeat_is_fresh(tmp_path):
    """Seen from the submitting host, a job on another node that just died still has a fresh heartbeat."""
    from ptq.run import record_failure

    out = tmp_path / "runs" / "m" / "fp8"
    out.mkdir(parents=True)
    (out / LOCK_NAME).write_text(json.dumps({"host": "node7", "pid": 4242, "slurm_job": "77_3"}))
    config = {
        "output_root": str(tmp_path / "runs"),
        "output_dir": str(out),
        "model": {"name": "m"},
        "recipe": {"name": "fp8"},
    }
    assert record_failure(config, "Slurm job 80_0 ended CANCELLED") is None  # another job's live folder
    assert not (out / "run.json").exists()
    record = record_failure(config, "Slurm job 77_3 ended CANCELLED", ended_job="77_3")
    assert record["status"] == "failed" and json.loads((out / "run.json").read_text())["status"] == "failed"
