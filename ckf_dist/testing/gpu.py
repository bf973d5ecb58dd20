"""Shared pieces of the GPU tests (tests/gpu): the CUDA skip, and the main job run on one GPU as one plain process (world size 1,
NCCL), with the environment a bare GPU machine needs (carried wheels on PYTHONPATH, no Ray: CKF_DATA_ENGINE=local).

The CPU helpers in ckf_dist/testing/jobs.py pin DS_ACCELERATOR=cpu, set PYTHONPATH to the source tree alone (the
carried wheels would vanish) and start the `deepspeed` script next to sys.executable (a wheel installed with --target
has none there), so these tests start launchers/train.py directly: without launcher variables it runs as one rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckf_dist.testing.jobs import ROOT, TINY, kill_group  # noqa: F401 - kill_group: for tests/gpu

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA (torch.cuda.is_available() is False); on a GPU machine run python benchmarks/gpu_check.py")

GPU_TINY = [*TINY, "train.ds_config=ds_configs/zero3.json", "eval.baselines=[]"]
"""The CPU tests' tiny job, with the production ZeRO-3 JSON (CPU tests use zero3_cpu.json)."""

BF16 = ["train.precision=bf16", "model.dtype=bfloat16"]


def gpu_env(threads: int = 2) -> dict[str, str]:
    """This process's environment for a job on the GPU: CUDA accelerator for DeepSpeed (tests/conftest.py defaults it
    to cpu), the source tree in front of whatever PYTHONPATH already holds (the carried wheels), the collective
    check on."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    # CKF_CHECK_COLLECTIVES: as in every job the CPU suite launches (ckf_dist/comm.py names a direct call).
    return dict(os.environ, DS_ACCELERATOR="cuda", CKF_DATA_ENGINE="local", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join([str(ROOT), *paths]),
                CKF_CHECK_COLLECTIVES="1")


def train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "launchers" / "train.py"), *overrides]


def run_train(overrides: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(overrides), cwd=ROOT, env=gpu_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def start_train(overrides: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(train_cmd(overrides), cwd=ROOT, env=gpu_env(), stdout=out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)


def wait_for_file(path: Path, timeout: float, proc: subprocess.Popen) -> None:
    """Poll often: a tiny model's GPU steps take milliseconds, so a coarse poll would see the run already finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return
        if proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {path} appeared")
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout}s waiting for {path}")


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def failed(res: subprocess.CompletedProcess) -> str:
    return f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
