"""TaskGradTracker: the per-task split of the shared-LoRA gradient sums to the real gradient and equals each task's
own backward."""

from __future__ import annotations

import torch

from ckf_dist.testing.model_samples import collate, make_model, mixed_samples
from ckf_dist.train.task_grads import TaskGradTracker


def _shared_grad_vector(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.shared_lora_parameters()])


def test_task_grads_sum_to_grad_and_match_each_tasks_own_backward(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer, gate=True).train()
    with torch.no_grad():
        model.gate.logits.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))  # the gate scales the shared part per task
    samples = mixed_samples()
    batch = collate(tiny_tokenizer, samples)  # CF rows only: loss = mean token CE over the batch
    tracker = TaskGradTracker(model)
    tracker.reset()
    out = model(batch)
    out.loss.backward()
    per_task = tracker.get().clone()
    full = _shared_grad_vector(model)
    assert per_task.shape == (4, full.numel())
    torch.testing.assert_close(per_task.sum(0), full, atol=1e-6, rtol=1e-5)
    assert (per_task.abs().sum(1) > 0).all(), "every task present contributes"

    # Each task's piece = gradient of (its rows' summed token losses / all answer tokens of the batch).
    n_total = float(out.task_tokens.sum())
    tracker.enabled = False
    for tid, task in enumerate(model.tasks):
        idx = [i for i, s in enumerate(samples) if s["task"] == task]
        sub = collate(tiny_tokenizer, [samples[i] for i in idx])
        model.zero_grad()
        o = model(sub)
        (o.loss * float(o.task_tokens.sum()) / n_total).backward()
        torch.testing.assert_close(per_task[tid], _shared_grad_vector(model), atol=1e-6, rtol=1e-4)

    tracker.reset()
    assert tracker.get().abs().sum() == 0


def test_task_grads_accumulate_over_backwards(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer).train()
    tracker = TaskGradTracker(model)
    batch = collate(tiny_tokenizer, mixed_samples()[:4], variants=("text", "cf"))
    model(batch, text_weight=0.5).loss.backward()
    model(batch, text_weight=0.5).loss.backward()  # .grad accumulates; so must the per-task buffer
    torch.testing.assert_close(tracker.get().sum(0), _shared_grad_vector(model), atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # no backward, no tracking
        model(batch)
    torch.testing.assert_close(tracker.get().sum(0), _shared_grad_vector(model), atol=1e-6, rtol=1e-5)
