"""CKFModel under DeepSpeed ZeRO-3 on 2 gloo CPU ranks whose micro-batches hold DIFFERENT tasks (rank 0: CTR, rank 1:
rating): several steps complete (no hang: run_ranks timeout) and match a 1-rank run on the same global batch (loss
and updated trainable weights), and the per-task shared-LoRA gradients agree with the 1-rank ones. The 1-rank run is
plain PyTorch in the test process (same model code, torch AdamW, clip_grad_norm_), an implementation of the update
independent of DeepSpeed, which also keeps the test to one spawn.

Equal answer-token counts per rank (every answer is 1 token + eos) make the 2-rank average of per-rank mean losses
equal to the 1-rank mean over the global batch, so the comparison is exact up to float32 reduction order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckf_dist.testing.ranks import run_ranks
from ckf_dist.train.task_grads import TaskGradTracker

ZERO_JSON = Path(__file__).resolve().parents[2] / "ds_configs" / "zero3_cpu.json"
STEPS = 3
LR, WD, CLIP, TEXT_WEIGHT = 1e-2, 1e-3, 1.0, 0.3
LOSS_RTOL = 1e-5
STATE_ATOL = 1e-5


def _samples() -> list[dict]:
    from ckf_dist.testing.model_samples import make_sample

    return [make_sample("0", "ctr", 1, [1, 2, 3], [4], "Yes"),
            make_sample("1", "ctr", 4, [7], [9], "No"),
            make_sample("2", "rating", 3, [], [9], "4"),
            make_sample("3", "rating", 5, [1, 4, 9, 11], [3], "2")]


def _build(llm_dir: str):
    from ckf_dist.config import ModelConfig, MultiLoRAConfig
    from ckf_dist.model.ckf import build_ckf_model
    from ckf_dist.model.llm import load_llm, load_tokenizer
    from ckf_dist.testing.model_samples import cf_tables
    from ckf_dist.train.build import measure_token_norm

    tokenizer = load_tokenizer(llm_dir)
    llm = load_llm(llm_dir, "float32", tokenizer)
    torch.manual_seed(0)
    # The same token norm with or without ZeRO-3 (gathered when partitioned), so both paths start from equal weights.
    model = build_ckf_model(llm, tokenizer, *cf_tables(), ModelConfig(meta_hidden=16),
                            MultiLoRAConfig(rank=4, alpha=8.0, dropout=0.0, task_rank=4, task_alpha=8.0,
                                            task_dropout=0.0, gate=True), token_norm=measure_token_norm(llm))
    return model, tokenizer


def _per_task(tracker) -> torch.Tensor:
    """(T, k) sketch of each task's shared-LoRA gradient (both halves: how samples are dealt depends on the rank)."""
    return tracker.sketch.view(tracker.num_tasks, 2, -1).sum(1).clone()


def _reference(llm_dir: str) -> dict:
    """1 process, no DeepSpeed, the global batch (all four samples) in one step."""
    from ckf_dist.testing.model_samples import collate

    model, tokenizer = _build(llm_dir)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    batch = collate(tokenizer, _samples(), variants=("text", "cf"))
    tracker = TaskGradTracker(model, dim=256)
    losses, first_task_grads = [], None
    for step in range(STEPS):
        tracker.reset()
        tracker.watch(batch)
        optimizer.zero_grad()
        out = model(batch, text_weight=TEXT_WEIGHT)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        losses.append(float(out.loss))
        if step == 0:
            first_task_grads = _per_task(tracker)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": losses, "state": state, "task_grads": first_task_grads}


def _train(rank: int, world: int, llm_dir: str) -> dict:
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from ckf_dist.testing.model_samples import collate

    torch.set_num_threads(1)  # 2 ranks on a small shared CPU: oversubscribed OpenMP threads crawl
    deepspeed.init_distributed(dist_backend="gloo")  # attaches deepspeed.comm to run_ranks' gloo group
    samples = _samples()
    mine = samples if world == 1 else samples[2 * rank:2 * rank + 2]  # rank 0: ctr only, rank 1: rating only
    ds_config = {
        "train_micro_batch_size_per_gpu": len(mine),
        "gradient_accumulation_steps": 1,
        "train_batch_size": len(samples),
        "gradient_clipping": CLIP,
        # The ZeRO section training uses (stage 3, persistence threshold 0: every tiny parameter is partitioned;
        # prefetching and parameter reuse on), plus torch AdamW.
        "zero_optimization": json.loads(ZERO_JSON.read_text())["zero_optimization"],
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    assert ds_config["zero_optimization"]["stage"] == 3
    assert ds_config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    keepalive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - from_pretrained partitions the LLM while loading
    model, tokenizer = _build(llm_dir)
    partitioned = [p for p in model.llm.parameters() if hasattr(p, "ds_id")]
    assert partitioned and all(p.numel() == 0 for p in partitioned), "the LLM must be ZeRO-3 partitioned"
    assert sum(p.ds_tensor.numel() for p in partitioned) < sum(p.ds_numel for p in partitioned)  # a shard each
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=LR, weight_decay=WD)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ckf = engine.module
    # Every Multi-LoRA layer is a ZeRO-3 leaf: its base weight and all adapters are fetched together.
    assert ckf.lora_layers and all(hasattr(p, "ds_z3_leaf_module") for lyr in ckf.lora_layers.values()
                                   for p in lyr.parameters())
    tracker = TaskGradTracker(ckf, dim=256)
    batch = collate(tokenizer, mine, variants=("text", "cf"))
    assert set(batch.task_ids.tolist()) == ({0, 2} if world == 1 else {2 * rank})  # ctr=0, rating=2
    losses, first_task_grads = [], None
    for step in range(STEPS):
        tracker.reset()
        tracker.watch(batch)
        out = engine(batch, text_weight=TEXT_WEIGHT)
        engine.backward(out.loss)
        engine.step()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / world)
        if step == 0:
            tg = _per_task(tracker)
            dist.all_reduce(tg)
            first_task_grads = tg / world  # DeepSpeed averages gradients over ranks; so do we
    names = [n for n, p in ckf.named_parameters() if p.requires_grad]
    params = [p for p in ckf.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        state = {n: p.detach().clone().numpy() for n, p in zip(names, params)}
    # numpy, not torch tensors: torch shares tensors through file descriptors that die with the worker process.
    return {"losses": losses, "state": state, "task_grads": first_task_grads.numpy()}


@pytest.mark.distributed
def test_zero3_two_ranks_different_tasks_match_one_rank(tiny_llm_dir):
    r0, r1 = run_ranks(_train, world=2, args=(tiny_llm_dir,), timeout=300)
    one = _reference(tiny_llm_dir)
    assert r0["losses"] == r1["losses"]
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(one["losses"]), rtol=LOSS_RTOL, atol=0)
    assert one["losses"][-1] < one["losses"][0], "training must reduce the loss"
    # Each rank's loss is the mean over ITS tokens, so the rank average of task gradients is the 1-rank gradient.
    torch.testing.assert_close(torch.from_numpy(r0["task_grads"]), one["task_grads"], atol=1e-6, rtol=1e-4)
    assert set(one["state"]) == set(r0["state"]) == set(r1["state"])
    moved = 0
    for name, w in one["state"].items():
        for r in (r0, r1):
            torch.testing.assert_close(torch.from_numpy(r["state"][name]), w, atol=STATE_ATOL, rtol=0,
                                       msg=lambda m, name=name: f"{name}: {m}")
        moved += "lora_B" in name and bool(w.abs().sum() > 0)
    assert moved > 0, "LoRA B weights (zero at init) must have been updated"
