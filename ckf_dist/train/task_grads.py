"""Per-task statistics of the shared-LoRA gradient (MTM) at a cost that does not grow with the model: what the
gradient-balanced task sampler reads and what TensorBoard shows as train/grad_norm_<t> and train/grad_cos_<t>_<u>.

Each task's share of the shared-LoRA gradient is a vector of the shared adapters' size P (12.6M at 7B, 63M at 70B).
Reducing it over ranks every step cost T x P floats; here it never exists as a whole. Each shared layer's part of it
is projected by a fixed, seeded CountSketch R (P -> k, k <= 4096) as soon as the layer's backward produces it, and
only the (2T, k) sketches are all-reduced. R is linear, so the sketches of all ranks and micro-batches add up to the
sketch of the step's gradient, and inner products survive in expectation: E<Ra, Rb> = <a, b>, with
Var <= (|a|^2 |b|^2 + <a, b>^2) / k. From the sketches (`task_gradient_stats`):
- norms |g_t| with relative error ~ sqrt(1 / (2k)) (k = 1024: 2.2%), cosines with absolute error <~ 1 / sqrt(k);
- an UNBIASED squared norm of each task's mean per-sample gradient: each task's samples are dealt alternately into
  two halves (both variants of a prompt in the same half), and <mean of half a, mean of half b> estimates |mu_t|^2
  without the noise term sigma^2 / n_t that makes |sum| / n_t overstate tasks with few rows.

Where the per-task pieces come from: with h = x_d A^T and z = h B^T, dA = dh^T x_d and dB = dz^T h, so summing over
the rows of one (task, half) gives its share. A small autograd function on h (saving x_d) and one on z (saving h) see
dh and dz in the layer's own backward. They save what the LoRA matmuls save anyway (the same tensors) through
`ctx.save_for_backward`, so activation checkpointing drops and recomputes them like everything else: no layer input
stays alive past the layer's own backward (an earlier version held x_d and h in Python closures until backward,
which defeated checkpointing).

Training statistics, not model code: the tracker replaces the `forward` of each shared LoRAAdapter instance from
outside (module hooks, ZeRO-3's included, still wrap it); the model knows nothing of it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ckf_dist.model.ckf import CKFModel
from ckf_dist.model.multi_lora import LoRAAdapter

_PRIME = 2**31 - 1  # Mersenne prime of the 2-universal hash family


class CountSketch:
    """The seeded linear map R: R^P -> R^k, (R g)[b] = sum over i with bucket(i) = b of sign(i) g_i.

    bucket and sign come from degree-3 polynomial hashes of the coordinate's index i modulo 2^31 - 1 (4-wise
    independent: the variance bound needs that of the signs; 2-universal linear hashes gave consecutive indices
    regular sign patterns, and a gradient with a common offset came out 17% off at k = 1024), computed when needed,
    so nothing of size P is stored and every rank (and every resumed run) uses the same R.

    Args:
        dim: k.
        seed: selects the hash functions.

    Example:
        >>> cs = CountSketch(256, seed=0)
        >>> a = torch.randn(1, 10_000)
        >>> bool(abs(cs(a, 0).square().sum() / a.square().sum() - 1) < 0.3)   # |Ra|^2 ~ |a|^2
        True
    """

    CACHE_LIMIT = 1 << 22
    """Hashes of up to this many coordinates (12 bytes each: 48 MB) are kept between calls; beyond, recomputed (a
    few integer operations per coordinate, cheap next to the matmul that produced the gradient)."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        coef = torch.randint(1, _PRIME, (2, 4), generator=g).tolist()
        self.bucket_coef, self.sign_coef = coef[0], coef[1]
        self._cache: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached = 0

    def hashes(self, offset: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket, sign) of coordinates offset .. offset + n - 1."""
        key = (offset, n, device)
        if (hit := self._cache.get(key)) is not None:
            return hit
        if offset + n >= _PRIME:
            raise ValueError(f"CountSketch hashes indices below 2^31 - 1, got {offset + n} coordinates")
        i = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
        bucket = _poly_hash(i, self.bucket_coef) % self.dim
        sign = (_poly_hash(i, self.sign_coef) % 2).to(torch.float32) * 2 - 1
        if self._cached + n <= self.CACHE_LIMIT:
            self._cache[key] = (bucket, sign)
            self._cached += n
        return bucket, sign

    def __call__(self, values: torch.Tensor, offset: int) -> torch.Tensor:
        """(G, n) rows of coordinates offset .. offset + n - 1 -> (G, k) sketches."""
        out = torch.zeros(values.shape[0], self.dim, dtype=torch.float32, device=values.device)
        return self.add_(out, values, offset)

    def add_(self, out: torch.Tensor, values: torch.Tensor, offset: int) -> torch.Tensor:
        """out += sketch of `values` ((G, n) or (n,) against out (G, k) or (k,)); returns out."""
        bucket, sign = self.hashes(offset, values.shape[-1], values.device)
        return out.index_add_(out.dim() - 1, bucket, values.float() * sign)


def _poly_hash(i: torch.Tensor, coef: list[int]) -> torch.Tensor:
    """((c0 i + c1) i + c2) i + c3 mod 2^31 - 1 by Horner; every product stays below 2^62 (int64 never overflows)."""
    acc = torch.full_like(i, coef[0])
    for c in coef[1:]:
        acc = (acc * i + c) % _PRIME
    return acc


class _GradTap(torch.autograd.Function):
    """Identity on `out`; in backward hands (d out, saved input) to the tracker, which adds d(param) = d out^T input
    per (task, half) group to its sketch."""

    @staticmethod
    def forward(ctx, out, inp, tracker, offset, row_group):
        ctx.save_for_backward(inp)
        ctx.tracker, ctx.offset, ctx.row_group = tracker, offset, row_group
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (inp,) = ctx.saved_tensors
        ctx.tracker._add(ctx.offset, grad, inp, ctx.row_group)
        return grad, None, None, None, None


class TaskGradTracker:
    """Accumulates (2T, k) CountSketches of the shared-LoRA gradient, one per (task, half) group, and the number of
    samples of each group, over the backward passes since the last `reset`.

    Layout of the sketched vector: for each shared layer in module order, A (r x in) then B (out x r), row-major, i.e.
    the order of `CKFModel.shared_lora_parameters()`; group 2t + h is half h of task t (model.tasks order).

    Args:
        model: the CKFModel (its own layers get the taps).
        dim: k of the sketch.
        seed: the sketch's hash seed (the same on every rank).
        rank: this rank; the alternation of samples into halves starts at rank % 2, so a task with one sample per
            rank still fills both halves when there are two ranks or more.

    Example:
        >>> tracker = TaskGradTracker(model, dim=1024)
        >>> tracker.reset(); tracker.watch(batch)
        >>> model(batch).loss.backward()
        >>> tracker.sketch.sum(0)   # == CountSketch of the flattened shared-LoRA gradients
    """

    def __init__(self, model: CKFModel, dim: int = 1024, seed: int = 0, rank: int = 0) -> None:
        self.model = model
        self.num_tasks = len(model.tasks)
        self.num_groups = 2 * self.num_tasks
        self.cs = CountSketch(dim, seed)
        self.rank = rank
        self.enabled = True
        self.size = 0
        self.sketch = torch.zeros(self.num_groups, dim)
        self.samples = torch.zeros(self.num_groups, dtype=torch.float64)
        self._rows: torch.Tensor | None = None  # (B,) group of each row of the micro-batch
        self._half_of: dict[str, int] = {}
        self._dealt = [0] * self.num_tasks
        for layer in model.lora_layers.values():
            if layer.shared is not None:
                adapter = layer.shared
                adapter.forward = functools.partial(self._tracked_forward, adapter, self.size)
                self.size += adapter.num_params()

    def reset(self) -> None:
        """Start a new optimizer step: empty sketches and counts; samples are dealt into halves afresh."""
        self.sketch.zero_()
        self.samples.zero_()
        self._half_of.clear()
        self._dealt = [0] * self.num_tasks

    def watch(self, batch) -> None:
        """Assign the rows of the micro-batch about to run forward to their (task, half) groups. Rows with the same
        sample key (the text and CF variants of one prompt) share a half; each task's new samples alternate."""
        local = self.model.local_task_ids(batch.task_ids.cpu()).tolist()
        keys = batch.keys or [f"row-{sum(self._dealt)}-{i}" for i in range(len(local))]  # no keys: a row is a sample
        row_group = []
        for t, key in zip(local, keys):
            if key not in self._half_of:
                self._half_of[key] = (self._dealt[t] + self.rank) % 2
                self._dealt[t] += 1
                self.samples[2 * t + self._half_of[key]] += 1
            row_group.append(2 * t + self._half_of[key])
        # On the batch's device once per micro-batch, not per layer (no host sync inside backward).
        self._rows = torch.tensor(row_group, dtype=torch.long, device=batch.task_ids.device)

    def _tracked_forward(self, adapter: LoRAAdapter, offset: int, x: torch.Tensor):
        h = F.linear(x, adapter.lora_A)
        if not (self.enabled and torch.is_grad_enabled() and self._rows is not None):
            return h, F.linear(h, adapter.lora_B)
        if self._rows.shape[0] != x.shape[0]:
            raise ValueError(f"TaskGradTracker.watch got {self._rows.shape[0]} rows, the layer {x.shape[0]}: call "
                             f"watch(batch) with the batch of each forward")
        h = _GradTap.apply(h, x, self, offset, self._rows)
        z = F.linear(h, adapter.lora_B)
        z = _GradTap.apply(z, h, self, offset + adapter.rank * adapter.in_features, self._rows)
        return h, z

    @torch.no_grad()
    def _add(self, offset: int, grad: torch.Tensor, inp: torch.Tensor, row_group: torch.Tensor) -> None:
        """sketch[g] += R (sum over the rows of group g of grad_row^T inp_row) for the (out x in) parameter block at
        `offset`: one batched matmul over the rows (the FLOPs of the layer's own weight gradient, no row copies), one
        scatter into the groups, one sketch of the (groups x block) matrix."""
        B, o, k = grad.shape[0], grad.shape[-1], inp.shape[-1]
        per_row = torch.bmm(grad.reshape(B, -1, o).transpose(1, 2), inp.reshape(B, -1, k)).reshape(B, o * k)
        blocks = torch.zeros(self.num_groups, o * k, dtype=torch.float32, device=grad.device)
        blocks.index_add_(0, row_group, per_row.float())
        if self.sketch.device != grad.device:
            self.sketch = self.sketch.to(grad.device)
        self.cs.add_(self.sketch, blocks, offset)

def task_gradient_stats(sketch: torch.Tensor, samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-task statistics from the all-reduced (2T, k) half sketches and (2T,) sample counts.

    Returns (all (T,) unless noted; NaN where a task, or one of its halves, had no sample):
        norm: |g_t| / share_t, the norm of task t's share of the step gradient divided by its share of the step's
            samples: what one more sample of the task adds (biased upward by sigma / sqrt(n_t) for small tasks).
        signal_sq: an unbiased estimate of the squared norm of the same quantity without the noise term:
            N^2 <S_a / n_a, S_b / n_b> (N samples in the step). Can be negative for a task whose true mean gradient is
            smaller than the noise; the sampler averages it over steps before taking the root.
        cos: (T, T) cosines between the task gradients.
    """
    T = sketch.shape[0] // 2
    s = sketch.double().view(T, 2, -1)
    n = samples.double().view(T, 2)
    n_task = n.sum(1)
    N = n_task.sum().clamp_min(1)
    total = s.sum(1)  # (T, k)
    norm = total.norm(dim=1) / (n_task / N).clamp_min(1e-12)
    norm[n_task == 0] = math.nan
    means = s / n.clamp_min(1)[..., None]
    signal_sq = (means[:, 0] * means[:, 1]).sum(1) * N * N
    signal_sq[(n == 0).any(1)] = math.nan
    unit = total / total.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return {"norm": norm, "signal_sq": signal_sq, "cos": unit @ unit.T}
