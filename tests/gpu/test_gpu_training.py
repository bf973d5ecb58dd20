"""The main job on one GPU (NCCL, world size 1, ZeRO-3 with the production ds_configs/zero3.json), tiny model:
bf16 training steps, its evaluation pass, fp32 vs bf16 losses, and exact resume after SIGKILL.

One fp32 reference run (gradient-balanced sampler, batches prefetched: the resume has to restore the mixture and the
streams) provides the data, CF tables and base model the other runs reuse, so every run starts from the same
weights and sees the same batches.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from ckf_dist.testing.gpu import (
    BF16,
    GPU_TINY,
    failed,
    kill_group,
    requires_cuda,
    run_train,
    start_train,
    train_losses,
    wait_for_file,
)

pytestmark = [pytest.mark.gpu, requires_cuda]

STEPS = 40  # a GPU step of the tiny model takes milliseconds: enough steps that a kill lands mid-run
CKPT_EVERY = 4

# bf16 keeps 8 significant bits (relative rounding 2^-9, about 0.2%, per stored weight and activation). The first
# step's loss comes from the same weights and the same batch in both precisions, so it differs only by those roundings
# through two layers and the head: a few tenths of a percent. 2% leaves margin and still catches a broken bf16 path
# (fusion or loss in the wrong dtype, an unscaled update), which moves it by far more or makes it non-finite. The
# mean over the first 10 steps also carries the updates' divergence: 5%.
BF16_FIRST_LOSS_RTOL = 0.02
BF16_MEAN10_RTOL = 0.05
# Same GPU, same code, same seed: resume is exact up to the order of atomic additions in scatter / index_add kernels
# (float32), which 40 steps can grow to ~1e-6 .. 1e-5.
RESUME_ATOL = 1e-4


def _adapters(run):
    return {f"{t}/{k}": v for t in ("ctr", "topk", "rating", "exp")
            for k, v in load_file(run / "adapters" / t / "adapter_model.safetensors").items()}


def _common(root, ref) -> list[str]:
    return [f"data.prepared_dir={root / 'data'}", f"cf.embeddings_path={ref / 'cf' / 'embeddings.safetensors'}",
            f"model.base_model={ref / 'base_model'}", f"train.max_steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}",
            "train.sampler=grad_balanced", *GPU_TINY]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_ref")
    run = root / "run"
    res = run_train([f"log.run_dir={run}", f"data.prepared_dir={root / 'data'}", f"train.max_steps={STEPS}",
                     f"train.ckpt_every={CKPT_EVERY}", "train.ckpt_keep=20", "train.sampler=grad_balanced",
                     *GPU_TINY], timeout=420)
    assert res.returncode == 0, failed(res)
    return root, run


@pytest.fixture(scope="module")
def bf16_run(reference, tmp_path_factory):
    root, ref = reference
    run = tmp_path_factory.mktemp("gpu_bf16") / "run"
    res = run_train([f"log.run_dir={run}", *_common(root, ref), *BF16], timeout=420)
    assert res.returncode == 0, failed(res)
    return run, res


def test_bf16_zero3_training_steps_on_one_gpu(bf16_run):
    run, _ = bf16_run
    losses = train_losses(run)
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), losses
    assert (run / "checkpoints" / f"step-{STEPS:06d}" / "COMPLETE").is_file()
    for task in ("ctr", "topk", "rating", "exp"):
        assert (run / "adapters" / task / "adapter_model.safetensors").is_file()
    # The fine-tuned weights are finite bf16 / fp32 values (the exported adapters).
    assert all(torch.isfinite(v.float()).all() for v in _adapters(run).values())


def test_evaluation_pass_on_gpu(bf16_run):
    import json

    run, _ = bf16_run
    ckf = json.loads((run / "metrics.json").read_text())["CKF"]
    for key in ("auc_ctr", "rmse_rating", "hr@1_topk", "rougeL_exp"):
        assert ckf.get(key) is not None and math.isfinite(ckf[key]), (key, ckf.get(key))
    assert 0.0 <= ckf["auc_ctr"] <= 1.0 and 0.0 <= ckf["hr@1_topk"] <= 1.0
    assert (run / "report.md").is_file()


def test_fp32_and_bf16_losses_agree_within_tolerance(reference, bf16_run):
    _, ref = reference
    run, _ = bf16_run
    f32, b16 = train_losses(ref), train_losses(run)
    assert abs(b16[0] - f32[0]) <= BF16_FIRST_LOSS_RTOL * abs(f32[0]), (f32[0], b16[0])
    m32, m16 = sum(f32[:10]) / 10, sum(b16[:10]) / 10
    assert abs(m16 - m32) <= BF16_MEAN10_RTOL * abs(m32), (m32, m16)


def test_sigkill_resume_is_exact_on_gpu(reference, tmp_path):
    root, ref = reference
    run = tmp_path / "run"
    proc = start_train([f"log.run_dir={run}", *_common(root, ref)], log=tmp_path / "first.log")
    try:
        wait_for_file(run / "checkpoints" / f"step-{CKPT_EVERY:06d}" / "COMPLETE", 300, proc)
        kill_group(proc)  # the whole process group, mid-run
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert not (run / "checkpoints" / f"step-{STEPS:06d}").exists(), "stopped too late to test a resume"
    res = run_train([f"log.run_dir={run}", *_common(root, ref)], timeout=420)
    assert res.returncode == 0, failed(res)
    assert "resumed from" in res.stdout
    assert abs(train_losses(run)[-1] - train_losses(ref)[-1]) < RESUME_ATOL
    a, b = _adapters(run), _adapters(ref)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=RESUME_ATOL, rtol=1e-3, msg=k)
