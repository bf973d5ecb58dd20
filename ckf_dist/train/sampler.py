"""Gradient-balanced multi-task sampling (MTM): the task mixture of the coming micro-batches follows each
task's gradient on the shared LoRA and its loss progress.

Rule (documented, GradNorm-flavoured but acting on the data mixture instead of loss weights):
  g_t  = EMA of the shared-LoRA gradient one SAMPLE of task t contributes (measured in the normal backward pass:
         task t's share of the gradient divided by its share of the step's samples; the mixture hands out samples,
         so this is the quantity it controls. Per token instead would starve short-answer tasks such as CTR.)
  r_t  = EMA(L_t) / L_t(first steps)                  (relative loss: 1 = no progress yet, small = learnt)
  s_t  = r_t / (g_t / mean_t g)                       (tasks that still have loss to lose but pull the shared
                                                       adapter weakly are under-served)
  p    = floor + (1 - T * floor) * softmax(log s / temperature)
So a task whose gradient is tiny relative to the others gains share; equal tasks stay uniform; the floor keeps
every task alive. Every rank computes p from all-reduced statistics, so all ranks use the same mixture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class TaskMixture:
    """Task mixture for micro-batch rows: uniform, or updated from gradient statistics.

    Args:
        tasks: task names (order = task ids).
        mode: "uniform" or "grad_balanced".
        temperature: softmax temperature of the update (higher = flatter).
        floor: minimum share of every task.
        beta: EMA factor of the statistics.

    Example:
        >>> m = TaskMixture(["ctr", "topk"], "grad_balanced")
        >>> m.update(grad_norms=torch.tensor([1.0, 0.01]), losses=torch.tensor([0.7, 0.7]))
        >>> m.weights  # topk's share rises
    """

    def __init__(self, tasks: Sequence[str], mode: str = "uniform", temperature: float = 1.0, floor: float = 0.05,
                 beta: float = 0.9) -> None:
        if mode not in ("uniform", "grad_balanced"):
            raise ValueError(f"train.sampler must be 'uniform' or 'grad_balanced', got {mode!r}")
        if floor * len(tasks) >= 1:
            raise ValueError(f"train.sampler_floor={floor} x {len(tasks)} tasks >= 1 leaves nothing to balance")
        self.tasks = list(tasks)
        self.mode, self.temperature, self.floor, self.beta = mode, temperature, floor, beta
        T = len(tasks)
        self.weights = torch.full((T,), 1.0 / T, dtype=torch.float64)
        self.g_ema = torch.zeros(T, dtype=torch.float64)
        self.l_ema = torch.zeros(T, dtype=torch.float64)
        self.l_init = torch.zeros(T, dtype=torch.float64)
        self.seen = torch.zeros(T, dtype=torch.long)

    def update(self, grad_norms: torch.Tensor, losses: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Fold in one step's per-task statistics (already all-reduced) and recompute the mixture.

        Args:
            grad_norms: (T,) norm of each task's mean-loss gradient on the shared LoRA.
            losses: (T,) each task's mean answer-token loss.
            present: (T,) bool, tasks that had rows this step (others keep their statistics).
        """
        g, l = grad_norms.double().cpu(), losses.double().cpu()
        present = torch.ones_like(g, dtype=torch.bool) if present is None else present.cpu().bool()
        present &= torch.isfinite(g) & torch.isfinite(l)
        first = present & (self.seen == 0)
        self.g_ema[first], self.l_ema[first], self.l_init[first] = g[first], l[first], l[first]
        later = present & ~first
        b = self.beta
        self.g_ema[later] = b * self.g_ema[later] + (1 - b) * g[later]
        self.l_ema[later] = b * self.l_ema[later] + (1 - b) * l[later]
        # The reference loss is the mean of the first few observations (one step is noisy).
        early = later & (self.seen < 5)
        self.l_init[early] = (self.l_init[early] * self.seen[early] + l[early]) / (self.seen[early] + 1)
        self.seen[present] += 1
        if self.mode == "grad_balanced" and bool((self.seen > 0).all()):
            self.weights = self.balanced_weights()

    def balanced_weights(self) -> torch.Tensor:
        eps = 1e-12
        rel_loss = self.l_ema / self.l_init.clamp_min(eps)
        rel_grad = self.g_ema / self.g_ema.mean().clamp_min(eps)
        score = rel_loss.clamp_min(eps) / rel_grad.clamp_min(eps)
        soft = torch.softmax(score.log() / self.temperature, dim=0)
        return self.floor + (1 - len(self.tasks) * self.floor) * soft

    def draw(self, n: int, generator: torch.Generator) -> list[str]:
        """n task names drawn from the mixture (same generator state -> same draws on every call)."""
        idx = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        return [self.tasks[i] for i in idx.tolist()]

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).clone() for k in ("weights", "g_ema", "l_ema", "l_init", "seen")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v.clone())


def task_gradient_stats(task_grads: torch.Tensor, task_samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradient norm of each task, and the (T, T) cosine matrix between task gradients.

    Args:
        task_grads: (T, P) each task's share of the (all-reduced) shared-LoRA gradient of the total loss.
        task_samples: (T,) rows of each task in the step (all ranks).

    Dividing a task's share of the gradient by its share of the samples gives what one more sample of that task
    adds, independent of how many rows the mixture gave it; tasks absent from the step get NaN.
    """
    n = task_samples.double()
    share = n / n.sum().clamp_min(1)
    g = task_grads.double()
    norms = g.norm(dim=1) / share.clamp_min(1e-12)
    norms[n == 0] = float("nan")
    unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cos = unit @ unit.T
    return norms, cos
