"""TaskGradTracker: CountSketches of the per-task shared-LoRA gradient.

Oracles: the sketch is linear, so the groups' sketches must add up to the sketch of the real .grad, and each task's
to the sketch of that task's own backward; estimates of norms and cosines from sketches must match the exact values
within the error the module states; with activation checkpointing the sketches are the same and no shared layer's
input outlives the forward (the taps save through autograd, which checkpointing manages).
"""

from __future__ import annotations

import gc
import math
import weakref

import torch

from ckf_dist.testing.model_samples import collate, make_model, mixed_samples
from ckf_dist.train.task_grads import CountSketch, TaskGradTracker, task_gradient_stats


def _shared_grad_vector(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.shared_lora_parameters()])


def _per_task(tracker) -> torch.Tensor:
    return tracker.sketch.view(tracker.num_tasks, 2, -1).sum(1)


def test_sketches_sum_to_the_sketch_of_grad_and_of_each_tasks_own_backward(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer, gate=True).train()
    with torch.no_grad():
        model.gate.logits.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))  # the gate scales the shared part per task
    samples = mixed_samples()
    batch = collate(tiny_tokenizer, samples)  # CF rows only: loss = mean token CE over the batch
    tracker = TaskGradTracker(model, dim=64)
    tracker.reset()
    tracker.watch(batch)
    out = model(batch)
    out.loss.backward()
    full = _shared_grad_vector(model)
    assert tracker.size == full.numel()
    torch.testing.assert_close(tracker.sketch.sum(0), tracker.cs(full[None], 0)[0], atol=1e-6, rtol=1e-5)
    per_task = _per_task(tracker).clone()
    assert (per_task.abs().sum(1) > 0).all(), "every task present contributes"
    counts = {t: sum(s["task"] == t for s in samples) for t in model.tasks}
    for t, task in enumerate(model.tasks):  # samples alternate between the halves of their task
        assert tracker.samples[2 * t] == math.ceil(counts[task] / 2)
        assert tracker.samples[2 * t + 1] == counts[task] // 2

    # Each task's piece = gradient of (its rows' summed token losses / all answer tokens of the batch).
    n_total = float(out.task_tokens.sum())
    tracker.enabled = False
    for tid, task in enumerate(model.tasks):
        sub = collate(tiny_tokenizer, [s for s in samples if s["task"] == task])
        model.zero_grad()
        o = model(sub)
        (o.loss * float(o.task_tokens.sum()) / n_total).backward()
        torch.testing.assert_close(per_task[tid], tracker.cs(_shared_grad_vector(model)[None], 0)[0],
                                   atol=1e-6, rtol=1e-4)
    tracker.reset()
    assert tracker.sketch.abs().sum() == 0 and tracker.samples.sum() == 0


def test_sketches_accumulate_over_backwards_and_variants_share_a_half(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer).train()
    tracker = TaskGradTracker(model, dim=64, rank=1)
    batch = collate(tiny_tokenizer, mixed_samples()[:4], variants=("text", "cf"))
    for _ in range(2):  # .grad accumulates over micro-batches; so must the sketches
        tracker.watch(batch)
        model(batch, text_weight=0.5).loss.backward()
    want = tracker.cs(_shared_grad_vector(model)[None], 0)[0]
    torch.testing.assert_close(tracker.sketch.sum(0), want, atol=1e-6, rtol=1e-5)
    assert tracker.samples.sum() == 4, "the text and CF variants of a prompt are one sample, counted once per step"
    with torch.no_grad():  # no backward, no tracking
        model(batch)
    torch.testing.assert_close(tracker.sketch.sum(0), want, atol=1e-6, rtol=1e-5)


def test_sketch_estimates_match_exact_norms_and_cosines_within_the_stated_error():
    """The stated error (task_grads.py): relative error of a norm ~ sqrt(1 / (2k)), of a cosine <~ 1 / sqrt(k).
    Checked over 30 sketch seeds on gradient-like vectors (P = 20,000, uneven scales, offsets, correlated pairs)."""
    g = torch.Generator().manual_seed(0)
    P, k = 20_000, 1024
    # Heavy-tailed coordinates with a common offset (gradient coordinates are not zero-mean: a sketch without its
    # random signs would add up the offsets bucket by bucket and fail here).
    base = torch.randn(P, generator=g) * torch.rand(P, generator=g) ** 3 + 0.2
    vecs = torch.stack([base + 0.5 * torch.randn(P, generator=g), 3 * base + 2 * torch.randn(P, generator=g),
                        torch.randn(P, generator=g) * 0.01, -base + torch.randn(P, generator=g)])
    exact_norm = vecs.norm(dim=1)
    unit = vecs / exact_norm[:, None]
    exact_cos = unit @ unit.T
    norm_err, cos_err = [], []
    for seed in range(30):
        sk = CountSketch(k, seed)(vecs, 0)
        est = task_gradient_stats(torch.stack([sk, torch.zeros_like(sk)], 1).flatten(0, 1),
                                  torch.tensor([1.0, 0.0] * 4))
        norm_err.append(est["norm"] / 4 / exact_norm - 1)  # each task 1 of 4 samples: norm = |g| / (1/4)
        cos_err.append(est["cos"] - exact_cos)
    norm_err, cos_err = torch.stack(norm_err), torch.stack(cos_err)
    assert norm_err.std() < 1.5 * math.sqrt(1 / (2 * k)), norm_err.std()
    assert norm_err.abs().max() < 5 * math.sqrt(1 / (2 * k))
    assert cos_err.std() < 1.5 / math.sqrt(k), cos_err.std()
    assert cos_err.abs().max() < 5 / math.sqrt(k)
    assert abs(float(norm_err.mean())) < 3 * math.sqrt(1 / (2 * k)) / math.sqrt(30) * 2  # no bias beyond the noise


def test_activation_checkpointing_gives_the_same_sketches_and_frees_layer_inputs(tiny_llm_dir, tiny_tokenizer):
    """With checkpointing the shared layers' inputs must be gone once the forward has returned (recomputed in
    backward): a tracker that kept them (e.g. in a closure or on ctx instead of save_for_backward) fails here."""
    from ckf_dist.model.llm import load_llm

    sketches = []
    batch = collate(tiny_tokenizer, mixed_samples(), variants=("text", "cf"))
    for ckpt in (False, True):
        llm = load_llm(tiny_llm_dir, "float32", tiny_tokenizer)
        torch.manual_seed(0)
        model = make_model(llm, tiny_tokenizer, gate=True).train()
        if ckpt:
            model.enable_gradient_checkpointing()
        tracker = TaskGradTracker(model, dim=128)
        inputs: list[weakref.ref] = []
        hooks = [layer.shared.register_forward_pre_hook(lambda m, args, box=inputs: box.append(weakref.ref(args[0])))
                 for layer in model.lora_layers.values() if layer.shared is not None]
        tracker.watch(batch)
        out = model(batch, text_weight=0.5)
        first_forward = inputs[:len(hooks)]
        gc.collect()
        alive = sum(r() is not None for r in first_forward)
        if ckpt:
            assert alive == 0, f"{alive} of {len(first_forward)} shared-layer inputs outlived a checkpointed forward"
        out.loss.backward()
        for h in hooks:
            h.remove()
        sketches.append(tracker.sketch.clone())
        torch.testing.assert_close(tracker.sketch.sum(0), tracker.cs(_shared_grad_vector(model)[None], 0)[0],
                                   atol=1e-6, rtol=1e-5)
    assert model.llm.is_gradient_checkpointing
    torch.testing.assert_close(sketches[1], sketches[0], atol=1e-6, rtol=1e-5)
