"""Evaluation of a ZeRO-3-partitioned CKFModel (engine.module) on 2 gloo ranks with uneven shares per task:
no hang (every rank makes the same model calls; generation runs with synced_gpus) and the same metrics as
evaluating the unpartitioned model in one process."""

from __future__ import annotations

import pytest
import torch

from ckf_dist.testing.eval_samples import eval_cfg, make_samples
from ckf_dist.testing.ranks import run_ranks


def _samples() -> list[dict]:
    # 5 users: 8 CTR (4 + 4 per rank), 5 top-K / rating (3 + 2), and one explanation (rank 1: dummy rows only).
    return [s for s in make_samples(5) if s["task"] != "exp" or s["uid"] == 1]


def _build(llm_dir: str):
    from ckf_dist.config import ModelConfig, MultiLoRAConfig
    from ckf_dist.model.ckf import build_ckf_model
    from ckf_dist.model.llm import load_llm, load_tokenizer
    from ckf_dist.train.build import measure_token_norm

    tok = load_tokenizer(llm_dir)
    llm = load_llm(llm_dir, "float32", tok)
    g = torch.Generator().manual_seed(0)
    user, item = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    torch.manual_seed(0)
    model = build_ckf_model(llm, tok, user, item, ModelConfig(meta_hidden=16),
                            MultiLoRAConfig(rank=2, task_rank=2, dropout=0.0, task_dropout=0.0),
                            token_norm=measure_token_norm(llm))  # gathered when ZeRO-3 partitioned the table
    with torch.no_grad():  # non-zero LoRA B: the partitioned adapters must take part in the forward
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, tok


def _rank_eval(rank: int, world: int, llm_dir: str) -> dict:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from ckf_dist.eval.evaluate import evaluate_model

    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False,
                                       "stage3_prefetch_bucket_size": 0, "stage3_max_reuse_distance": 0},
                 "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
    keepalive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - from_pretrained partitions the LLM while loading
    model, tok = _build(llm_dir)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    assert all(p.numel() == 0 for p in engine.module.llm.parameters() if hasattr(p, "ds_id"))
    return evaluate_model(engine.module, tok, _samples(), eval_cfg(batch_size=2), "cf", rank, world)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_two_ranks_equal_plain_model(tiny_llm_dir: str) -> None:
    from ckf_dist.eval.evaluate import evaluate_model

    model, tok = _build(tiny_llm_dir)
    want = evaluate_model(model, tok, _samples(), eval_cfg(batch_size=2), "cf")
    m0, m1 = run_ranks(_rank_eval, 2, args=(tiny_llm_dir,), timeout=300)
    assert m0 == m1
    assert want["n_exp"] == 1 and want["n_ctr"] == 8
    for k, v in want.items():
        assert (v is None) == (m0[k] is None), k
        if v is not None:
            assert m0[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
