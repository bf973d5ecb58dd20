"""Exact resume after SIGKILL, and a dead / hung rank stopping the job (2 CPU ranks, real launcher).

The runs use the gradient-balanced sampler with batches built one step ahead (train.prefetch, the default), so the
resume has to restore the mixture, the streams' positions before the prefetched draws and the weights they used."""

import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from ckf_dist.testing.jobs import TINY, kill_group, last_train_loss, run_job, start_job, wait_for

STEPS = 24


def _adapters(run):
    return {f"{t}/{k}": v for t in ("ctr", "topk", "rating", "exp")
            for k, v in load_file(run / "adapters" / t / "adapter_model.safetensors").items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run; its data, CF tables and base model are reused by the runs below."""
    root = tmp_path_factory.mktemp("ref")
    run = root / "run"
    res = run_job([f"log.run_dir={run}", f"data.prepared_dir={root / 'data'}", f"train.max_steps={STEPS}",
                   "train.ckpt_every=4", "train.ckpt_keep=10", "train.sampler=grad_balanced", *TINY], timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return root, run


def _shared(root, run):
    return [f"data.prepared_dir={root / 'data'}", f"cf.embeddings_path={run / 'cf' / 'embeddings.safetensors'}",
            f"model.base_model={run / 'base_model'}", f"train.max_steps={STEPS}", "train.ckpt_every=4",
            "train.sampler=grad_balanced", *TINY]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("how", ["sigkill_all", "sigterm_rank1"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(reference, tmp_path, how):
    """SIGKILL of the whole job mid-epoch (resume from the last periodic checkpoint), or SIGTERM to one rank
    (every rank stops at the same step and checkpoints it)."""
    root, ref = reference
    run = tmp_path / "run"
    proc = start_job([f"log.run_dir={run}", *_shared(root, ref)], log=tmp_path / "first.log")
    try:
        wait_for(lambda: (run / "checkpoints" / "step-000004" / "COMPLETE").is_file(), 600, "checkpoint 4", proc)
        if how == "sigkill_all":
            kill_group(proc)  # the launcher and both ranks, mid-epoch
        else:
            os.kill(int((run / "pids" / "rank-1.pid").read_text()), signal.SIGTERM)
            assert proc.wait(timeout=300) == 75, (tmp_path / "first.log").read_text()[-3000:]  # STOPPED_EXIT
            assert "stop requested" in (tmp_path / "first.log").read_text()
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert not (run / "checkpoints" / f"step-{STEPS:06d}").exists(), "stopped too late to test a resume"
    res = run_job([f"log.run_dir={run}", *_shared(root, ref)], timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout
    # Same seed, same data order, same RNG: fp32 on CPU is reproducible up to reduction order (tolerance 1e-5).
    assert abs(last_train_loss(run) - last_train_loss(ref)) < 1e-5
    a, b = _adapters(run), _adapters(ref)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dead", "hung"])
def test_rank_killed_or_hung_mid_step_fails_the_job_within_timeout(reference, tmp_path, sig):
    root, ref = reference
    run = tmp_path / "run"
    timeout_s = 20
    proc = start_job([f"log.run_dir={run}", *_shared(root, ref), "train.max_steps=1000",
                      f"train.collective_timeout_s={timeout_s}"], log=tmp_path / "job.log")
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2,
                 600, "two logged steps", proc)
        pid = int((run / "pids" / "rank-1.pid").read_text())
        os.kill(pid, sig)
        t0 = time.monotonic()
        proc.wait(timeout=timeout_s + 90)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            kill_group(proc)
            pytest.fail("the job did not stop after rank 1 stopped")
    log = (tmp_path / "job.log").read_text()
    assert proc.returncode != 0, log[-3000:]
    assert elapsed < timeout_s + 90
    if sig == signal.SIGSTOP:
        assert "rank 1" in log and "Stopped peer" in log, log[-3000:]
