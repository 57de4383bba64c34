"""One writer per output folder. Imports only the base modules.

A run holds `<output_dir>/run.lock` from before it writes anything until it ends. The lock is a file
created with O_CREAT | O_EXCL, which is atomic on local file systems and on the shared ones Slurm clusters
use (NFSv3+, Lustre, GPFS), holding who took it: host, PID, Slurm job, start time. While the run lives, a
thread touches the file every HEARTBEAT_S seconds; its modification time is the heartbeat.

A holder is alive when its process exists (same host) or, seen from another host, when the heartbeat is
recent. A lock whose holder is dead (killed with SIGKILL, node lost) is taken over by the next run, under a
second O_EXCL file that lets one run at a time judge and replace it, so two runs that find the same stale
lock cannot both win.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ptq.errors import ConfigError
from ptq.layout import LOCK_NAME

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
# A heartbeat older than this (seen from another host) means the holder is gone.
STALE_S = 4 * HEARTBEAT_S


def slurm_job() -> Optional[str]:
    """This process's Slurm job as sacct names it (array jobs as <array>_<task>), or None outside Slurm."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def holder_info() -> dict:
    """Who this process is, as a lock and a run record name it."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": slurm_job(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_alive(holder: Optional[dict], heartbeat: Optional[float], now: Optional[float] = None) -> bool:
    """Whether the process that `holder` names still runs: by PID on this host, by heartbeat elsewhere."""
    if not holder:
        return False
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return pid_alive(holder["pid"])
    if heartbeat is None:
        return False
    return (now or time.time()) - heartbeat < STALE_S


def holder_text(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}{job}, since {holder.get('started', '?')}"


def read_lock(output_dir: Path) -> tuple:
    """(holder dict or None, heartbeat time or None) of the lock in `output_dir`."""
    path = Path(output_dir) / LOCK_NAME
    try:
        heartbeat = path.stat().st_mtime
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):  # being written this instant, or damaged: treat as held, judged by its age
        try:
            return {}, path.stat().st_mtime
        except OSError:
            return None, None
    return (holder if isinstance(holder, dict) else {}), heartbeat


def live_holder(output_dir: Path) -> Optional[dict]:
    """The holder of `output_dir`'s lock if it is alive, else None."""
    holder, heartbeat = read_lock(output_dir)
    if holder is None:
        return None
    if not holder:  # unreadable: alive while its heartbeat is fresh
        return {"host": "?", "pid": "?"} if heartbeat and time.time() - heartbeat < STALE_S else None
    return holder if holder_alive(holder, heartbeat) else None


@dataclass
class OutputLock:
    """`with OutputLock(output_dir):` holds the folder for the block; refuses at once if a live run holds it."""

    output_dir: Path
    holder: dict = field(default_factory=holder_info)
    taken_over: Optional[dict] = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None

    @property
    def path(self) -> Path:
        return Path(self.output_dir) / LOCK_NAME

    def acquire(self) -> "OutputLock":
        Path(self.output_dir).mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            if self._create():
                break
            holder = live_holder(self.output_dir)
            if holder is not None:
                raise ConfigError(
                    f"{self.output_dir} is being written by another run ({holder_text(holder)}); two runs on one "
                    "output folder would corrupt it. Wait for that run to end, or give this one another "
                    f"output_root. If that process is gone for good, delete {self.path}."
                )
            if self._take_over():
                break
            time.sleep(0.1)  # another run is taking a dead holder's lock over: see who won
        else:
            raise ConfigError(f"could not take {self.path}: other runs keep taking it; try again.")
        self._thread = threading.Thread(target=self._beat, name="ptq-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.holder, f)
        return True

    def _take_over(self) -> bool:
        """Replace a dead holder's lock with ours. One run at a time does this, under a second O_EXCL file
        (`run.lock.takeover`), and judges the holder again under it: of two runs that found the same dead
        holder, the second finds the first one's live lock and is refused."""
        guard = self.path.with_name(f"{LOCK_NAME}.takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > STALE_S:  # left by a run that died taking over
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        try:
            if live_holder(self.output_dir) is not None:
                return False
            previous, _ = read_lock(self.output_dir)
            self.path.unlink(missing_ok=True)
            if not self._create():
                return False
            self.taken_over = previous or {}
            return True
        finally:
            guard.unlink(missing_ok=True)

    def _beat(self) -> None:
        """Touch the lock every HEARTBEAT_S; a failing touch (a shared file system's hiccup) is retried, so one
        error does not let other hosts judge this run dead."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return  # removed by hand: nothing to keep alive
            except OSError as exc:
                log.warning("Could not touch %s (%s); trying again in %.0f s", self.path, exc, HEARTBEAT_S)

    def release(self) -> None:
        self._stop.set()
        holder, _ = read_lock(self.output_dir)
        if holder and holder.get("pid") == self.holder["pid"] and holder.get("host") == self.holder["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
