"""Multi-LoRA (MTM): one LoRA shared by all tasks plus one LoRA per task, injected into the LLM's Linear layers; every
row of a mixed-task batch is routed to its own task's LoRA. Follows peft's config / layer / model split: the config is
`MultiLoRAConfig` (ckf_dist/config.py), the layer `MultiLoRALinear`, the model-level function `inject_multi_lora`.

Routing under ZeRO-3: every task's LoRA is computed for ALL rows and multiplied by a per-row task mask (peft's
`_mixed_batch_forward` instead slices rows per adapter). So every rank runs exactly the same modules and collectives
whatever tasks its micro-batch holds, and every LoRA parameter gets a gradient (zeros for absent tasks) on every rank:
ZeRO-3's gathers and reduce-scatters line up and cannot deadlock. Each MultiLoRALinear is flagged as a ZeRO-3 leaf
module (`_z3_leaf`), so its base weight and all its adapters are gathered in one fetch. Cost: the T task adapters run
as one low-rank product of rank T * r_task (concatenated A's and B's, rows masked in rank space), i.e. T * r_task *
(d_in + d_out) multiply-adds per token: 4 tasks x r16 on a 4096 x 4096 q_proj is ~3% of that layer's base cost; the
shared part costs what a plain LoRA costs (benchmarks/multi_lora_overhead.py measures the whole step).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ckf_dist.config import MultiLoRAConfig

__all__ = [
    "LoRAAdapter",
    "MultiLoRAConfig",
    "MultiLoRALinear",
    "TaskRouter",
    "inject_multi_lora",
    "multi_lora_layers",
]


class LoRAAdapter(nn.Module):
    """One low-rank pair: z = (x A^T) B^T (unscaled); returns the rank-space activation h = x A^T too.

    A and B are direct parameters of this module (not nested Linear modules) so ZeRO-3 gathers each adapter with a
    single fetch when its forward runs. A is initialised like peft (Kaiming-uniform), B with zeros, so a new adapter
    leaves the base model's output unchanged.

    Args:
        in_features: input size of the wrapped Linear.
        out_features: output size of the wrapped Linear.
        rank: r.
        dtype: parameter dtype (that of the base layer).

    Example:
        >>> ad = LoRAAdapter(16, 8, rank=4)
        >>> h, z = ad(torch.randn(2, 3, 16))
        >>> h.shape, z.shape, bool(z.abs().sum() == 0)
        (torch.Size([2, 3, 4]), torch.Size([2, 3, 8]), True)
    """

    def __init__(self, in_features: int, out_features: int, rank: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.linear(x, self.lora_A)  # (..., r)
        return h, F.linear(h, self.lora_B)  # (..., out)

    def num_params(self) -> int:
        # From the shapes, not .numel(): under ZeRO-3 a partitioned parameter's local tensor is empty.
        return self.rank * (self.in_features + self.out_features)


class TaskRouter:
    """The per-forward routing state shared by all MultiLoRALinear layers of one model.

    CKFModel sets it around each LLM call with `route(...)`; a layer called outside `route` raises, so a forgotten
    routing can never silently use the wrong adapter. Activation checkpointing re-runs the layers during backward,
    after `route` has exited: `checkpoint_contexts` (torch.utils.checkpoint's `context_fn`) captures the routing of
    each checkpointed forward and re-enters it for the recomputation (CKFModel.enable_gradient_checkpointing).

    Attributes:
        task_ids: (B,) local task index of each row (0..T-1).
        shared_weight: (B,) per-row multiplier of the shared part, or None (=1; no gate).
        task_weight: (B, T) per-row multiplier of each task part: one-hot of the row's task, times the gate if any.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        self.task_ids: torch.Tensor | None = None
        self.shared_weight: torch.Tensor | None = None
        self.task_weight: torch.Tensor | None = None

    def active(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        """(task_ids, shared_weight, task_weight) of the current `route` block, or None outside one."""
        if self.task_ids is None:
            return None
        return self.task_ids, self.shared_weight, self.task_weight

    def checkpoint_contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """`context_fn` for torch.utils.checkpoint (non-reentrant): nothing extra for the forward, and the routing
        active at that forward re-entered for its recomputation during backward."""
        routing = self.active()
        if routing is None:  # the layer itself raises the clear error
            return nullcontext(), nullcontext()
        return nullcontext(), self.route(*routing)

    @contextmanager
    def route(self, task_ids: torch.Tensor, shared_weight: torch.Tensor | None = None,
              task_weight: torch.Tensor | None = None) -> Iterator[None]:
        """Route rows to tasks for the duration of the block.

        Args:
            task_ids: (B,) local task indices.
            shared_weight: optional (B,) multiplier of the shared part.
            task_weight: optional (B, T) multipliers of the task parts; default one-hot(task_ids).
        """
        T = len(self.tasks)
        if task_ids.dim() != 1:
            raise ValueError(f"task_ids must be 1-D (B,), got shape {tuple(task_ids.shape)}")
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= T):
            raise ValueError(f"task_ids must lie in [0, {T}) for tasks {self.tasks}, got {task_ids.tolist()}")
        if task_weight is None:
            task_weight = F.one_hot(task_ids, T).float()
        if task_weight.shape != (task_ids.shape[0], T):
            raise ValueError(f"task_weight must be (B, T)=({task_ids.shape[0]}, {T}), got {tuple(task_weight.shape)}")
        if shared_weight is not None and shared_weight.shape != task_ids.shape:
            raise ValueError(f"shared_weight must be (B,)={tuple(task_ids.shape)}, got {tuple(shared_weight.shape)}")
        prev = (self.task_ids, self.shared_weight, self.task_weight)
        self.task_ids, self.shared_weight, self.task_weight = task_ids, shared_weight, task_weight
        try:
            yield
        finally:
            self.task_ids, self.shared_weight, self.task_weight = prev


def _rows(w: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against an activation with `ndim` dims."""
    return w.view(w.shape[0], *([1] * (ndim - 1)))


class MultiLoRALinear(nn.Module):
    """A frozen Linear plus a shared LoRA and/or one LoRA per task, routed per row.

    y = base(x) + s_sh * g_sh[row] * B_sh A_sh drop_sh(x) + sum_t s_t * w[row, t] * B_t A_t drop_t(x)
    with s = alpha / r, w[row, t] = one-hot(task of row) (times the gate), g_sh = 1 without gate.
    Every task part runs on every row (see the module docstring for why and what it costs); the task parts share one
    dropout mask (only one of them is non-zero per row, so each row still sees an independent dropout).

    Args:
        base_layer: the frozen nn.Linear being adapted (kept as `base_layer`, peft's name).
        router: the model's shared TaskRouter.
        shared_rank: rank of the shared part, 0 for none.
        shared_alpha / shared_dropout: its alpha and dropout.
        tasks: task names of the per-task parts, () for none.
        task_rank / task_alpha / task_dropout: rank, alpha and dropout of every task part.

    Example:
        >>> router = TaskRouter(["ctr", "rating"])
        >>> layer = MultiLoRALinear(nn.Linear(16, 8), router, 4, 8.0, 0.0, ["ctr", "rating"], 4, 8.0, 0.0)
        >>> with router.route(torch.tensor([0, 1])):
        ...     y = layer(torch.randn(2, 3, 16))
        >>> y.shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, base_layer: nn.Linear, router: TaskRouter, shared_rank: int, shared_alpha: float,
                 shared_dropout: float, tasks: Sequence[str], task_rank: int, task_alpha: float,
                 task_dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.router = router
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        dtype = base_layer.weight.dtype
        self.shared: LoRAAdapter | None = None
        self.shared_scaling = 0.0
        if shared_rank > 0:
            self.shared = LoRAAdapter(self.in_features, self.out_features, shared_rank, dtype)
            self.shared_scaling = shared_alpha / shared_rank
        self.shared_dropout = nn.Dropout(shared_dropout) if shared_dropout > 0 else nn.Identity()
        self.tasks = list(tasks)
        self.task_loras = nn.ModuleDict({t: LoRAAdapter(self.in_features, self.out_features, task_rank, dtype)
                                         for t in self.tasks})
        self.task_scaling = task_alpha / task_rank if self.tasks else 0.0
        self.task_dropout = nn.Dropout(task_dropout) if task_dropout > 0 else nn.Identity()
        # DeepSpeed ZeRO-3 "leaf module" flag (read by deepspeed.utils.z3_leaf_module; set here so model/ does not
        # import deepspeed): the base weight and ALL adapters of this layer are gathered in one fetch when the layer
        # runs and their gradients reduced after its backward, which the single concatenated task matmul needs.
        self._z3_leaf = True

    def _check_forward_args(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        routing = self.router.active()
        if routing is None:
            raise ValueError("MultiLoRALinear called without task routing; call the model through CKFModel (or "
                             "inside `router.route(task_ids)`) so every row knows its task; with activation "
                             "checkpointing, turn it on with CKFModel.enable_gradient_checkpointing()")
        if routing[0].shape[0] != x.shape[0]:
            raise ValueError(f"task_ids has {routing[0].shape[0]} rows, batch has {x.shape[0]}")
        return routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, shared_weight, task_weight = self._check_forward_args(x)
        out = self.base_layer(x)
        if self.shared is not None:
            x_d = self.shared_dropout(x)
            _, z = self.shared(x_d)  # (B, ..., r), (B, ..., out); per-task gradient hooks attach here from outside
            w = (self.shared_scaling if shared_weight is None
                 else _rows(shared_weight.to(z.dtype), z.dim()) * self.shared_scaling)
            out = out + z * w
        if self.tasks:
            # All task adapters as ONE low-rank product of rank T * r_task: h = x [A_1; ...; A_T]^T, each row keeps
            # only its task's r_task columns (times scaling and gate), then one matmul with [B_1, ..., B_T]. Same
            # result as sum_t w[:, t] B_t A_t x, but 2 matmuls instead of 2T.
            x_t = self.task_dropout(x)
            adapters = list(self.task_loras.values())
            A = torch.cat([ad.lora_A for ad in adapters], 0)  # (T r, in)
            B = torch.cat([ad.lora_B for ad in adapters], 1)  # (out, T r)
            h_t = F.linear(x_t, A)  # (B, ..., T r)
            w = (task_weight.to(h_t.dtype) * self.task_scaling).repeat_interleave(adapters[0].rank, dim=1)
            out = out + F.linear(h_t * w.view(w.shape[0], *([1] * (h_t.dim() - 2)), w.shape[1]), B)
        return out

    def extra_repr(self) -> str:
        r_sh = self.shared.rank if self.shared is not None else 0
        return f"in={self.in_features}, out={self.out_features}, shared_rank={r_sh}, tasks={self.tasks}"


def _matches(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def inject_multi_lora(model: nn.Module, cfg: MultiLoRAConfig, tasks: Sequence[str],
                      router: TaskRouter) -> dict[str, MultiLoRALinear]:
    """Replace every nn.Linear whose name ends with a shared or task target by a MultiLoRALinear (in place).

    A module matched by `shared_targets` gets the shared part, one matched by `task_targets` one part per task; a
    module matched by both (e.g. suffixes "proj" and "q_proj") gets both.

    Returns:
        {module name: layer}, in module order.

    Raises:
        ValueError: the config is invalid, or a target matches no Linear module of the model.
    """
    if problems := cfg.problems("multi_lora"):
        raise ValueError("invalid multi_lora config:\n" + "\n".join(problems))
    if not tasks:
        raise ValueError("inject_multi_lora needs at least one task")
    found: dict[str, MultiLoRALinear] = {}
    used: set[str] = set()
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in linear_names:
        shared = _matches(name, cfg.shared_targets)
        task = _matches(name, cfg.task_targets)
        if not (shared or task):
            continue
        used.update(s for s in (*cfg.shared_targets, *cfg.task_targets) if _matches(name, [s]))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = MultiLoRALinear(base, router, cfg.rank if shared else 0, cfg.alpha, cfg.dropout,
                                tasks if task else (), cfg.task_rank, cfg.task_alpha, cfg.task_dropout)
        setattr(parent, child, layer)
        found[name] = layer
    if missing := [s for s in (*cfg.shared_targets, *cfg.task_targets) if s not in used]:
        tails = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ValueError(f"multi_lora target(s) {missing} match no nn.Linear of {type(model).__name__}; its Linear "
                         f"names end with {tails}")
    return found


def multi_lora_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """{name: layer} of every MultiLoRALinear in `model`, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
