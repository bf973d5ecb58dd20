"""The run-directory lock: a second job on a locked run dir is refused with the holder named; a holder killed by
SIGKILL leaves no lock behind; a finished job releases it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckf_dist.train.runlock import LOCK_NAME, RunDirLock, RunDirLocked

ROOT = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from ckf_dist.train.runlock import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_job_is_refused_with_the_holder_named_and_a_killed_holder_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(RunDirLocked) as e:
            RunDirLock(run).acquire()
        msg = str(e.value)
        assert f"log.run_dir={run}" in msg
        assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in msg, msg
        assert "another log.run_dir" in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert (run / LOCK_NAME).is_file()  # the dead holder's file stays; its lock went with the process
    lock = RunDirLock(run).acquire()
    try:
        assert lock.held
        assert f'"pid": {os.getpid()}' in (run / LOCK_NAME).read_text()
    finally:
        lock.release()


def test_a_released_lock_can_be_taken_again_and_one_process_cannot_take_it_twice(tmp_path):
    first = RunDirLock(tmp_path).acquire()
    with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
        RunDirLock(tmp_path).acquire()  # flock is per open file: a second job in this process is refused too
    first.release()
    with RunDirLock(tmp_path) as again:
        assert again.held
    assert not again.held


def test_the_lock_is_not_inherited_by_subprocesses(tmp_path):
    # Ray's raylet and workers are subprocesses of rank 0: one that outlived the job must not keep the lock.
    lock = RunDirLock(tmp_path).acquire()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], close_fds=False)
    try:
        lock.release()
        time.sleep(0.1)
        RunDirLock(tmp_path).acquire().release()
    finally:
        child.kill()
        child.wait(10)
