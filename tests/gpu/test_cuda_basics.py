"""One GPU, in this process: NCCL world-size-1 collectives through ckf_dist.comm (every tensor the training path
reduces comes back on its own device and dtype, CPU tensors included: plain NCCL refuses those), the optimizer that
train.optimizer=auto / fused picks on CUDA, and the attention kernel that model.attn_implementation resolves to."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist

from ckf_dist.netbind import free_port
from ckf_dist.testing.gpu import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.fixture
def nccl_group():
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    if dist.is_initialized():  # tests/conftest.py's autouse fixture would too; explicit for a reader
        dist.destroy_process_group()


def test_nccl_collectives_take_tensors_of_any_device(nccl_group):
    from ckf_dist import comm

    assert dist.get_backend() == "nccl"
    assert comm.device().type == "cuda"
    cases = [torch.arange(6, dtype=torch.float32, device="cuda"),       # loss / grad statistics on the GPU
             torch.arange(6, dtype=torch.float64),                      # float64 CPU statistics (the step-0 crash)
             torch.tensor([3, 1, 4], dtype=torch.int64),                # counts
             torch.tensor([1.5, -2.0], dtype=torch.bfloat16, device="cuda")]
    for t in cases:
        out = comm.all_reduce(t.clone(), op=dist.ReduceOp.SUM)
        assert out.device == t.device and out.dtype == t.dtype, (t.device, t.dtype, out.device, out.dtype)
        torch.testing.assert_close(out, t)  # world size 1: the sum is the tensor itself
    out = comm.all_reduce(torch.tensor([2.0, 7.0]), op=dist.ReduceOp.MAX)
    torch.testing.assert_close(out, torch.tensor([2.0, 7.0]))
    comm.barrier()
    obj = {"step": 3, "names": ["ctr", "topk"], "weights": [0.25, 0.75]}
    assert comm.broadcast_object(obj, src=0) == obj
    torch.cuda.synchronize()


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(64, device="cuda")), torch.nn.Parameter(torch.randn(8, 8, device="cuda"))]


@pytest.mark.parametrize("kind", ["auto", "fused"])
def test_cuda_optimizers_are_fused_and_step(kind):
    from ckf_dist.train.optim import deepspeed_fused_adam_status, describe_optimizer, make_optimizer

    params = _params()
    opt = make_optimizer([{"params": params}], lr=1e-2, weight_decay=0.1, kind=kind, device=torch.device("cuda", 0))
    ds_ok, why = deepspeed_fused_adam_status()
    what = describe_optimizer(opt)
    if ds_ok:
        assert what.startswith("deepspeed FusedAdam"), what
    else:  # a pure-Python DeepSpeed wheel (what gpu_check carries): torch's fused kernel, never a JIT build
        assert opt.defaults.get("fused") is True and what.startswith("torch fused AdamW"), (what, why)
    before = [p.detach().clone() for p in params]
    sum((p**2).sum() for p in params).backward()
    opt.step()
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert all(torch.isfinite(p).all() for p in params)


def test_auto_attention_on_cuda_and_a_bf16_forward(tiny_llm_dir, tiny_tokenizer):
    from ckf_dist.model.llm import load_llm

    flash = importlib.util.find_spec("flash_attn") is not None
    llm = load_llm(tiny_llm_dir, "bfloat16", tiny_tokenizer).cuda()
    assert llm.config._attn_implementation == ("flash_attention_2" if flash else "sdpa")
    ids = torch.randint(5, len(tiny_tokenizer), (2, 16), device="cuda")
    logits = llm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert load_llm(tiny_llm_dir, "float32", tiny_tokenizer).config._attn_implementation == "sdpa"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_matches_sdpa(tiny_llm_dir, tiny_tokenizer):
    from ckf_dist.model.llm import load_llm

    ids = torch.randint(5, len(tiny_tokenizer), (2, 16), device="cuda")
    out = {}
    for attn in ("sdpa", "flash_attention_2"):
        llm = load_llm(tiny_llm_dir, "bfloat16", tiny_tokenizer, attn_implementation=attn).cuda()
        out[attn] = llm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    torch.testing.assert_close(out["flash_attention_2"], out["sdpa"], atol=5e-2, rtol=5e-2)
