"""Gradient-balanced multi-task sampling (MTM): the task mixture of the coming micro-batches follows each
task's gradient on the shared LoRA and its loss progress.

Rule (documented; GradNorm's target, acting on the data mixture instead of loss weights, and taking share only
from tasks that have stopped learning). Once per optimizer step, from all-reduced statistics, so every rank computes
the same mixture; u = 1/T for T tasks:
  g_t  = sqrt(EMA (beta) of an unbiased estimate of |mu_t|^2), mu_t = the shared-LoRA gradient one SAMPLE of task t
         contributes in expectation (task t's share of the gradient divided by its share of the step's samples; the
         mixture hands out samples, so this is the quantity it controls; per token instead would starve short-answer
         tasks, e.g. CTR). The estimate is <mean of half a, mean of half b> of the task's samples, from the sketches
         of ckf_dist/train/task_grads.py: the norm of the plain sum would add sigma_t^2 / n_t, so a task with few rows
         would look as if it pulled harder and drift to the floor for a reason that has nothing to do with learning.
         The average is taken before the root (the per-step estimate is noisy, even negative); g_t / mean_j g_j is
         clamped to [1e-2, 1e2] (a task whose mean gradient is lost in noise must not take everything).
  L_t  = EMA (beta) of task t's answer-token loss, S_t = slower EMA (slow_beta) of it, L0_t = mean of its first 5.
  r_t  = (L_t / L0_t) / mean_j (L_j / L0_j)          GradNorm's inverse training rate (> 1: behind the others)
  b_t  = softmax_t((alpha * log r_t - log(g_t / mean_j g_j)) / temperature)
         GradNorm's target: at temperature 1, b_t * g_t (the pull of task t on the shared LoRA) is proportional to
         r_t^alpha; alpha = 0 equalises the pulls.
  q_t  = clamp((S_t - L_t) / S_t / progress, 0, 1)   1 = still learning: the fast loss average is `progress` (relative)
         or more below the slow one; 0 = plateaued
  give_t = (1 - q_t) * max(u - b_t, 0)              over-served tasks give share only as far as they have plateaued
  p_t  = u - give_t + sum_j give_j * max(b_t - u, 0) / sum_j max(b_j - u, 0)   (under-served tasks receive, by deficit)
  weights = floor + (1 - T * floor) * p             (every task keeps at least `floor`)
The first `warmup` steps stay uniform while the statistics are collected. So a task whose gradient on the shared
adapter is small relative to its remaining loss gains share, taken from plateaued tasks that pull it hard; a task
whose loss is still falling never loses share; equal tasks stay uniform. The whole state (EMAs, references, counts,
step, weights) is in state_dict, so a resumed run continues with exactly the same mixture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

_STATE = ("weights", "g_ema", "l_ema", "l_slow", "l_init", "seen", "g_seen", "steps")


class TaskMixture:
    """Task mixture for micro-batch rows: uniform, or updated from gradient statistics.

    Args:
        tasks: task names (order = task ids).
        mode: "uniform" or "grad_balanced".
        temperature: softmax temperature of the balanced target (higher = flatter).
        floor: minimum share of every task.
        beta: EMA factor of the gradient and (fast) loss statistics.
        slow_beta: EMA factor of the slow loss average the learning progress is measured against.
        progress: relative loss drop (fast vs slow EMA) at which a task counts as fully still learning.
        alpha: exponent of GradNorm's inverse training rate in the target. Default 0: a task's loss ratio says little
            about how far it is from learnt (CTR's loss drops fastest, to the label entropy, while its AUC is at chance),
            so the target only equalises the pulls on the shared LoRA; with alpha = 1 the mixture stayed uniform on the
            synthetic demo (replayed on the logged statistics of uniform runs).
        warmup: optimizer steps at the uniform mixture before balancing starts (the slow loss EMA needs some history
            before "plateaued" means anything).

    Example:
        >>> m = TaskMixture(["ctr", "topk"], "grad_balanced", warmup=0)
        >>> for _ in range(30):
        ...     m.update(grad_sq=torch.tensor([1.0, 1e-4]), losses=torch.tensor([0.7, 0.7]))
        >>> m.weights  # losses flat (plateaued); ctr pulls the shared adapter hard -> topk's share rises
    """

    def __init__(self, tasks: Sequence[str], mode: str = "uniform", temperature: float = 1.0, floor: float = 0.05,
                 beta: float = 0.9, slow_beta: float = 0.98, progress: float = 0.2, alpha: float = 0.0,
                 warmup: int = 20) -> None:
        if mode not in ("uniform", "grad_balanced"):
            raise ValueError(f"train.sampler must be 'uniform' or 'grad_balanced', got {mode!r}")
        if floor * len(tasks) >= 1:
            raise ValueError(f"train.sampler_floor={floor} x {len(tasks)} tasks >= 1 leaves nothing to balance")
        self.tasks = list(tasks)
        self.mode, self.temperature, self.floor, self.beta = mode, temperature, floor, beta
        self.slow_beta, self.progress, self.alpha, self.warmup = slow_beta, progress, alpha, warmup
        T = len(tasks)
        self.weights = torch.full((T,), 1.0 / T, dtype=torch.float64)
        self.g_ema = torch.zeros(T, dtype=torch.float64)
        self.l_ema = torch.zeros(T, dtype=torch.float64)
        self.l_slow = torch.zeros(T, dtype=torch.float64)
        self.l_init = torch.zeros(T, dtype=torch.float64)
        self.seen = torch.zeros(T, dtype=torch.long)
        self.g_seen = torch.zeros(T, dtype=torch.long)
        self.steps = torch.zeros((), dtype=torch.long)

    def update(self, grad_sq: torch.Tensor, losses: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Fold in one step's per-task statistics (already all-reduced) and recompute the mixture.

        Args:
            grad_sq: (T,) unbiased estimate of the squared per-sample gradient norm of each task on the shared LoRA
                (task_grads.task_gradient_stats' signal_sq); NaN where it could not be estimated this step.
            losses: (T,) each task's mean answer-token loss.
            present: (T,) bool, tasks that had rows this step (others keep their statistics).
        """
        g, l = grad_sq.double().cpu(), losses.double().cpu()
        present = torch.ones_like(g, dtype=torch.bool) if present is None else present.cpu().bool()
        b, bs = self.beta, self.slow_beta
        g_new = present & torch.isfinite(g)
        g_first = g_new & (self.g_seen == 0)
        self.g_ema[g_first] = g[g_first]
        g_later = g_new & ~g_first
        self.g_ema[g_later] = b * self.g_ema[g_later] + (1 - b) * g[g_later]
        self.g_seen[g_new] += 1
        present &= torch.isfinite(l)
        first = present & (self.seen == 0)
        self.l_ema[first], self.l_init[first] = l[first], l[first]
        self.l_slow[first] = l[first]
        later = present & ~first
        self.l_ema[later] = b * self.l_ema[later] + (1 - b) * l[later]
        self.l_slow[later] = bs * self.l_slow[later] + (1 - bs) * l[later]
        # The reference loss is the mean of the first few observations (one step is noisy).
        early = later & (self.seen < 5)
        self.l_init[early] = (self.l_init[early] * self.seen[early] + l[early]) / (self.seen[early] + 1)
        self.seen[present] += 1
        self.steps += 1
        if (self.mode == "grad_balanced" and int(self.steps) > self.warmup and bool((self.seen > 0).all())
                and bool((self.g_seen > 0).all())):
            self.weights = self.balanced_weights()

    def learning(self) -> torch.Tensor:
        """(T,) in [0, 1]: 1 = the task's loss is still falling by `progress` (relative, fast vs slow EMA) or more."""
        drop = (self.l_slow - self.l_ema) / self.l_slow.clamp_min(1e-12)
        return (drop / self.progress).clamp(0.0, 1.0)

    def balanced_weights(self) -> torch.Tensor:
        eps = 1e-12
        T = len(self.tasks)
        u = 1.0 / T
        rate = self.l_ema / self.l_init.clamp_min(eps)
        rate = rate / rate.mean().clamp_min(eps)
        g = self.g_ema.clamp_min(0.0).sqrt()
        rel_grad = (g / g.mean().clamp_min(eps)).clamp(1e-2, 1e2)
        logit = (self.alpha * rate.clamp_min(eps).log() - rel_grad.log()) / self.temperature
        target = torch.softmax(logit, dim=0)
        # Plateaued tasks above their target give the excess away; tasks below it receive, by their deficit.
        give = (1.0 - self.learning()) * (u - target).clamp_min(0.0)
        need = (target - u).clamp_min(0.0)
        p = u - give
        if float(need.sum()) > 0:
            p = p + give.sum() * need / need.sum()
        return self.floor + (1 - T * self.floor) * p

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).clone() for k in _STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if missing := [k for k in _STATE if k not in state]:
            raise ValueError(f"task mixture state lacks {missing} (written by an older ckf-dist, whose gradient "
                             f"statistic was biased); resume with train.resume=never")
        for k, v in state.items():
            setattr(self, k, v.clone())

