"""One job per run directory: an exclusive flock on <log.run_dir>/.run.lock, taken by rank 0 before anything is
written there and held for the job's lifetime. A second job on the same run dir is refused, naming the holder (pid,
host, start time, command line); two jobs writing one run dir would interleave checkpoints, metrics and reports.

Crash-safe: the kernel drops a flock when the last descriptor of the open file goes, so a job killed by SIGKILL
(or OOM) leaves no lock behind; the file itself stays, with the dead holder's details, and the next job takes it
over. The descriptor is close-on-exec (subprocesses such as Ray's never hold the lock), but a fork()ed child of
rank 0 that outlives it (a DataLoader worker) would keep it until that child exits too. On NFS, Linux maps flock to
POSIX byte-range locks (NLM/NFSv4), which need the server's lock service; on storage without one the acquire fails
with that error rather than silently not locking.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Self

LOCK_NAME = ".run.lock"


class RunDirLocked(RuntimeError):
    """Another live job holds the run directory's lock."""


class RunDirLock:
    """The exclusive lock on `run_dir`; `acquire()` raises RunDirLocked when another job holds it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> Self:
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunDirLocked(
                f"log.run_dir={self.run_dir} is in use by another job ({holder}; lock file {self.path}). Two jobs "
                f"in one run dir would overwrite each other's checkpoints, metrics and reports: wait for that job "
                f"to finish, stop it, or give this one another log.run_dir.") from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock (the file stays: removing it would race with a job that has just opened it)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "null")
    except (OSError, ValueError):
        return None


def _describe(info: dict | None) -> str:
    if not isinstance(info, dict):
        return "holder not recorded yet: it is starting"
    argv = " ".join(map(str, info.get("argv") or []))
    argv = argv if len(argv) <= 300 else argv[:297] + "..."
    return (f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"
            + (f", command: {argv}" if argv else ""))
