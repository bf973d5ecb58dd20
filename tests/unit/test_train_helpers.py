"""Curriculum weight and task-mixture rule of the training loop (pure functions)."""

import itertools
import math

import pytest
import torch

from ckf_dist.train.curriculum import curriculum_weight, variants_for
from ckf_dist.train.sampler import TaskMixture
from ckf_dist.train.task_grads import CountSketch, task_gradient_stats


def test_curriculum_moves_from_text_to_cf():
    T = 100
    w = [curriculum_weight(z, T) for z in range(T + 1)]
    assert w[0] > 0.999 and abs(w[50] - 0.5) < 1e-12 and w[100] < 0.001
    assert all(a >= b for a, b in itertools.pairwise(w))  # monotone
    assert math.isclose(w[25], 1 / (1 + math.exp(-4)))
    assert variants_for(w[0]) == ("text",) and variants_for(w[50]) == ("text", "cf") and variants_for(w[100]) == ("cf",)
    with pytest.raises(ValueError):
        curriculum_weight(0, 0)


def _run(mixture, grad_norms, losses, steps=30):
    for _ in range(steps):
        mixture.update(torch.tensor(grad_norms) ** 2, torch.tensor(losses))
    return mixture.weights


def test_tiny_gradient_task_gains_share():
    m = TaskMixture(["ctr", "topk", "rating", "exp"], "grad_balanced", temperature=1.0, floor=0.05)
    w = _run(m, [1.0, 1.0, 0.01, 1.0], [0.7, 0.7, 0.7, 0.7])
    assert w[2] > 0.25 + 0.2 and int(w.argmax()) == 2
    assert torch.all(w >= 0.05 - 1e-12) and math.isclose(float(w.sum()), 1.0)


def test_equal_tasks_stay_uniform():
    m = TaskMixture(["ctr", "topk", "rating", "exp"], "grad_balanced")
    w = _run(m, [0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0])
    assert torch.allclose(w, torch.full((4,), 0.25, dtype=torch.float64), atol=1e-9)


def test_uniform_mode_ignores_statistics_and_state_round_trips():
    m = TaskMixture(["ctr", "topk"], "uniform")
    w = _run(m, [1.0, 0.001], [1.0, 1.0], steps=5)
    assert torch.allclose(w, torch.tensor([0.5, 0.5], dtype=torch.float64))
    m2 = TaskMixture(["ctr", "topk"], "uniform")
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.g_ema, m.g_ema)


def test_still_learning_task_keeps_its_share_until_it_plateaus():
    # exp pulls the shared adapter 10x harder per sample (over-served by the GradNorm target) but its loss falls.
    m = TaskMixture(["ctr", "topk", "rating", "exp"], "grad_balanced", warmup=5)
    for step in range(60):
        m.update(torch.tensor([1.0, 1.0, 1.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 3.0 * 0.97 ** step]))
    assert m.weights[3] >= 0.25 - 1e-9
    for _ in range(400):  # its loss stops falling: now it gives share to the others
        m.update(torch.tensor([1.0, 1.0, 1.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.5]))
    assert m.weights[3] < 0.1 and torch.all(m.weights[:3] > 0.29)


def test_warmup_keeps_uniform_then_balances():
    m = TaskMixture(["ctr", "topk"], "grad_balanced", warmup=10)
    w = _run(m, [1.0, 0.01], [0.7, 0.7], steps=10)
    assert torch.allclose(w, torch.tensor([0.5, 0.5], dtype=torch.float64))
    w = _run(m, [1.0, 0.01], [0.7, 0.7], steps=1)
    assert w[1] > 0.6


def test_grad_balanced_state_round_trip_continues_identically():
    losses = [[2.0 * 0.99 ** s, 3.0, 1.0 + 0.1 * (s % 3), 4.0 * 0.98 ** s] for s in range(80)]
    grads = [[1.0 + 0.1 * (s % 5), 3.0, 0.5, 8.0] for s in range(80)]
    a = TaskMixture(["ctr", "topk", "rating", "exp"], "grad_balanced", warmup=5)
    for s in range(40):
        a.update(torch.tensor(grads[s]), torch.tensor(losses[s]), present=torch.tensor([True, s % 4 != 0, True, True]))
    b = TaskMixture(["ctr", "topk", "rating", "exp"], "grad_balanced", warmup=5)
    b.load_state_dict(a.state_dict())
    for s in range(40, 80):
        for m in (a, b):
            m.update(torch.tensor(grads[s]), torch.tensor(losses[s]))
    assert torch.equal(a.weights, b.weights) and not torch.allclose(a.weights, torch.full((4,), 0.25, dtype=torch.float64))
    assert set(a.state_dict()) >= {"weights", "g_ema", "l_ema", "l_slow", "l_init", "seen", "g_seen", "steps"}
    old = {k: v for k, v in a.state_dict().items() if k != "g_seen"}  # a checkpoint of the biased statistic
    with pytest.raises(ValueError, match=r"lacks \['g_seen'\].*train.resume=never"):
        b.load_state_dict(old)


def test_draws_are_deterministic_and_follow_the_weights():
    from ckf_dist.train.batches import draw_tasks

    tasks, w = ["ctr", "topk", "rating"], torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)
    a = draw_tasks(w, tasks, 200, seed=3, step=7, micro=0, rank=1)
    assert a == draw_tasks(w, tasks, 200, seed=3, step=7, micro=0, rank=1)
    assert a != draw_tasks(w, tasks, 200, seed=3, step=7, micro=0, rank=0)  # ranks draw different rows
    assert "topk" not in a and 70 < a.count("ctr") < 130


def _halves(sketch_a: list[list[float]], sketch_b: list[list[float]]) -> torch.Tensor:
    """(2T, k) rows in task-major order: task t's half a, then half b."""
    return torch.tensor([row for pair in zip(sketch_a, sketch_b) for row in pair])


def test_task_gradient_stats_normalises_by_sample_share():
    # Task 0: 30 of 40 samples (15 + 15), sketch sum (3, 4); task 1: 10 samples, (0, 1).
    sk = _halves([[1.0, 2.0], [0.0, 0.5]], [[2.0, 2.0], [0.0, 0.5]])
    stats = task_gradient_stats(sk, torch.tensor([15.0, 15.0, 5.0, 5.0]))
    assert torch.allclose(stats["norm"], torch.tensor([5.0 / 0.75, 1.0 / 0.25], dtype=torch.float64))
    assert math.isclose(float(stats["cos"][0, 1]), 0.8)
    # N^2 <S_a / n_a, S_b / n_b>: task 0: 1600 * (1*2 + 2*2) / 225
    assert math.isclose(float(stats["signal_sq"][0]), 1600 * 6 / 225)


def test_absent_task_or_half_has_no_estimate():
    sk = _halves([[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]])
    stats = task_gradient_stats(sk, torch.tensor([4.0, 0.0, 0.0, 0.0]))
    assert stats["norm"][0] == 1.0 and torch.isnan(stats["norm"][1])
    assert torch.isnan(stats["signal_sq"]).all(), "one half empty: no unbiased estimate"


def _simulated_steps(rows: tuple[int, int], steps: int, seed: int = 0):
    """Per-step sketch statistics of two tasks with the SAME true per-sample gradient mu (|mu| = 1) and per-row noise
    of norm ~6, task 0 with 4x the rows of task 1, as the training loop produces them: each row's gradient scaled
    1/N like a mean loss, dealt alternately into halves, CountSketch k = 512 of P = 2,000 coordinates."""
    g = torch.Generator().manual_seed(seed)
    P = 2000
    mu = torch.randn(P, generator=g)
    mu /= mu.norm()
    cs = CountSketch(512, seed=seed)
    N = sum(rows)
    for _ in range(steps):
        halves, counts = [], []
        for n in rows:
            r = mu + 6 * torch.randn(n, P, generator=g) / math.sqrt(P)
            for h in (0, 1):
                part = r[h::2]
                halves.append(cs(part.sum(0, keepdim=True) / N, 0)[0])
                counts.append(float(part.shape[0]))
        yield task_gradient_stats(torch.stack(halves), torch.tensor(counts))


def test_unbiased_signal_keeps_the_mixture_put_when_only_row_counts_differ():
    """Two tasks, same true gradient, 4x different row counts, both plateaued: the mixture must stay uniform. The
    norm of the plain sum (the statistic before this fix) overstates the small task by sigma^2 / n and pushes it to
    the floor; the same run fed that statistic is the contrast."""
    unbiased = TaskMixture(["ctr", "topk"], "grad_balanced", warmup=20)
    biased = TaskMixture(["ctr", "topk"], "grad_balanced", warmup=20)
    flat = torch.tensor([0.7, 0.7])
    late_u, late_b = [], []
    for step, stats in enumerate(_simulated_steps(rows=(32, 8), steps=300)):
        unbiased.update(stats["signal_sq"], flat)
        biased.update(stats["norm"] ** 2, flat)
        if step >= 150:
            late_u.append(unbiased.weights[1])
            late_b.append(biased.weights[1])
    small_u, small_b = float(torch.stack(late_u).mean()), float(torch.stack(late_b).mean())
    assert abs(small_u - 0.5) < 0.03 and float(torch.stack(late_u).min()) > 0.4, small_u
    # E|mean|^2 = 1 + 36 / n: 5.5 for the small task vs 2.1: the GradNorm target at temperature 1 gives it ~0.38.
    assert small_b < 0.42, f"the biased statistic should have moved the small task: {small_b}"
    g = unbiased.g_ema.sqrt()
    assert abs(float(g[0] / g[1]) - 1) < 0.15, "both tasks' signal estimates |mu| = 1 per sample"
