"""Per-task shares of the shared-LoRA gradient (MTM), the statistic the gradient-balanced task sampler reads.

Training statistics, not model code: the tracker attaches forward hooks to the shared adapters of a CKFModel's
MultiLoRALinear layers from outside, and the model knows nothing of it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ckf_dist.model.ckf import CKFModel
from ckf_dist.model.multi_lora import MultiLoRALinear


class TaskGradTracker:
    """Accumulates the shared-LoRA parameter gradient split by the task of each row, (T, P_shared).

    A forward hook on each shared adapter registers tensor hooks on its activations: with h = x_d A^T and
    z = h B^T, dB = sum_rows dz^T h and dA = sum_rows dh^T x_d, so summing over the rows of task t gives task t's
    share of the gradient in the same backward pass. The per-task pieces sum to the real `.grad` of the shared
    parameters (before any data-parallel averaging). Layout along P: for each shared layer in module order, A
    (r x in) then B (out x r), row-major, i.e. the order of `CKFModel.shared_lora_parameters()`.

    Args:
        model: the CKFModel (possibly wrapped by nothing else: the hooks go on its own layers).

    Example:
        >>> tracker = TaskGradTracker(model)
        >>> model(batch).loss.backward()
        >>> tracker.get().sum(0)   # == the flattened shared-LoRA gradients
    """

    def __init__(self, model: CKFModel) -> None:
        self.num_tasks = len(model.tasks)
        self.enabled = True
        self.size = 0
        self.buffer: torch.Tensor | None = None
        for layer in model.lora_layers.values():
            if layer.shared is not None:
                hook = functools.partial(self._on_shared_forward, layer, self.size)
                layer.shared.register_forward_hook(hook)
                self.size += layer.shared.num_params()

    def reset(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()

    def get(self) -> torch.Tensor:
        """(T, P_shared) per-task shared-LoRA gradients accumulated since the last reset (this rank's backward
        passes, scaled as the backward was, e.g. by 1/grad_accum under DeepSpeed; not averaged over ranks)."""
        if self.buffer is None:
            return torch.zeros(self.num_tasks, self.size)
        return self.buffer

    def _on_shared_forward(self, layer: MultiLoRALinear, offset: int, adapter: nn.Module,
                           args: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, torch.Tensor]) -> None:
        h, z = out
        if not (self.enabled and torch.is_grad_enabled() and z.requires_grad):
            return
        routing = layer.router.active()
        assert routing is not None, "the layer checks its routing before running the shared adapter"
        task_ids, x_d, h_saved = routing[0], args[0].detach(), h.detach()
        a_size = adapter.rank * adapter.in_features
        # dL/dz gives dB = dz^T h; dL/dh gives dA = dh^T x_d. Both hooks only read, never change, the gradient.
        z.register_hook(lambda g: self._add_rank_out(offset + a_size, task_ids, g, h_saved))
        h.register_hook(lambda g: self._add_rank_in(offset, task_ids, g, x_d))

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        if self.buffer is None or self.buffer.device != like.device:
            self.buffer = torch.zeros(self.num_tasks, self.size, dtype=torch.float32, device=like.device)
        return self.buffer

    def _split_by_task(self, t: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """(B, ..., k) -> (N, T k): each row's values moved into its task's block of k columns, zeros elsewhere."""
        one_hot = torch.nn.functional.one_hot(task_ids, self.num_tasks).to(torch.float32)  # (B, T)
        k = t.shape[-1]
        t = t.reshape(t.shape[0], -1, 1, k).float() * one_hot[:, None, :, None]  # (B, L, T, k)
        return t.reshape(-1, self.num_tasks * k)

    def _add_rank_out(self, offset: int, task_ids: torch.Tensor, grad_out: torch.Tensor, h: torch.Tensor) -> None:
        """B-gradient per task: buffer[t, B slot] += dz_t^T h_t, all tasks in one matmul, (out, r) per task."""
        buf = self._buffer(grad_out)
        o, k = grad_out.shape[-1], h.shape[-1]
        g = grad_out.reshape(-1, o).float().T @ self._split_by_task(h, task_ids)  # (out, T r)
        buf[:, offset:offset + o * k] += g.view(o, self.num_tasks, k).transpose(0, 1).reshape(self.num_tasks, -1)

    def _add_rank_in(self, offset: int, task_ids: torch.Tensor, grad_h: torch.Tensor, x: torch.Tensor) -> None:
        """A-gradient per task: buffer[t, A slot] += dh_t^T x_t, all tasks in one matmul, (r, in) per task."""
        buf = self._buffer(grad_h)
        k, i = grad_h.shape[-1], x.shape[-1]
        g = self._split_by_task(grad_h, task_ids).T @ x.reshape(-1, i).float()  # (T r, in)
        buf[:, offset:offset + k * i] += g.view(self.num_tasks, k * i)
