"""Run the real `deepspeed` launcher on the main job (tests and benchmarks), with a hard timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ckf_dist.netbind import free_port

ROOT = Path(__file__).resolve().parents[2]  # the source tree (launchers/ lives there)

TINY = [
    "data.synthetic.num_users=40", "data.synthetic.num_items=30", "data.synthetic.max_interactions=12",
    "data.history_len=4", "data.shard_size=200", "data.train_windows_per_user=2",
    "cf.dim=8", "cf.epochs=5",
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.vocab_size=600",
    "model.max_length=256",
    "multi_lora.rank=4", "multi_lora.task_rank=4", "multi_lora.dropout=0.0", "multi_lora.task_dropout=0.0",
    "train.micro_batch_size=4", "train.lr=0.005", "train.collective_timeout_s=60",
    "eval.max_samples_per_task=6", "eval.max_new_tokens=6", "log.every=1", "log.progress=false",
]

TINY_FILES = [o for o in TINY if not o.startswith("data.synthetic.")]
"""TINY without the synthetic generator's sizes, for jobs on data files (data.source='table' / 'alpaca')."""


def launcher_cmd(nproc: int, overrides: list[str]) -> list[str]:
    ds = Path(sys.executable).with_name("deepspeed")
    return [str(ds), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(ROOT / "launchers" / "train.py"),
            *overrides]


def env(threads: int = 1) -> dict[str, str]:
    """The environment of a launched job. `threads` per rank: tests keep 1 (two ranks on two cores, no
    oversubscription); a 1-rank benchmark run on a 2-core machine wants os.cpu_count() (one thread would leave half
    the machine idle: a SmolLM2 step took 26 s instead of about 17 s)."""
    # CKF_CHECK_COLLECTIVES: a collective of ckf_dist's own that bypasses ckf_dist/comm.py (and would hand NCCL a CPU
    # tensor on a GPU node) fails the job.
    e = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
             PYTHONPATH=str(ROOT), CKF_CHECK_COLLECTIVES="1")
    return e


def run_job(overrides: list[str], nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    # check=False: the callers read the exit code and the output themselves.
    return subprocess.run(launcher_cmd(nproc, overrides), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def start_job(overrides: list[str], nproc: int = 2, log: Path | None = None) -> subprocess.Popen:
    if log is None:
        return subprocess.Popen(launcher_cmd(nproc, overrides), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(launcher_cmd(nproc, overrides), cwd=ROOT, env=env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {what}")
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def last_train_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r][-1]
