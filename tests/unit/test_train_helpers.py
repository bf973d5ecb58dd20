"""Curriculum weight and task-mixture rule of the training loop (pure functions)."""

import itertools
import math

import pytest
import torch

from ckf_dist.train.curriculum import curriculum_weight, variants_for
from ckf_dist.train.sampler import TaskMixture, task_gradient_stats


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
        mixture.update(torch.tensor(grad_norms), torch.tensor(losses))
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
        m.update(torch.tensor([1.0, 1.0, 1.0, 10.0]), torch.tensor([1.0, 1.0, 1.0, 3.0 * 0.97 ** step]))
    assert m.weights[3] >= 0.25 - 1e-9
    for _ in range(400):  # its loss stops falling: now it gives share to the others
        m.update(torch.tensor([1.0, 1.0, 1.0, 10.0]), torch.tensor([1.0, 1.0, 1.0, 0.5]))
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
    assert set(a.state_dict()) >= {"weights", "g_ema", "l_ema", "l_slow", "l_init", "seen", "steps"}


def test_draws_are_deterministic_and_follow_the_weights():
    from ckf_dist.train.batches import draw_tasks

    tasks, w = ["ctr", "topk", "rating"], torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)
    a = draw_tasks(w, tasks, 200, seed=3, step=7, micro=0, rank=1)
    assert a == draw_tasks(w, tasks, 200, seed=3, step=7, micro=0, rank=1)
    assert a != draw_tasks(w, tasks, 200, seed=3, step=7, micro=0, rank=0)  # ranks draw different rows
    assert "topk" not in a and 70 < a.count("ctr") < 130


def test_task_gradient_stats_normalises_by_sample_share():
    g = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # task 0 owns 3/4 of the samples
    norms, cos = task_gradient_stats(g, torch.tensor([30.0, 10.0]))
    assert torch.allclose(norms, torch.tensor([5.0 / 0.75, 1.0 / 0.25], dtype=torch.float64))
    assert math.isclose(float(cos[0, 1]), 0.8)


def test_absent_task_has_no_gradient_norm():
    norms, _ = task_gradient_stats(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([4.0, 0.0]))
    assert norms[0] == 1.0 and torch.isnan(norms[1])
