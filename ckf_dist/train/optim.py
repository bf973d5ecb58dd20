"""The AdamW the fine-tuning loop hands to deepspeed.initialize (train.optimizer): DeepSpeed's FusedAdam when its
prebuilt CUDA kernel loads, torch's fused AdamW on CUDA otherwise, plain torch AdamW on CPU.

A DeepSpeed installed from a pure-Python wheel (DS_BUILD_OPS=0, as carried to a bare GPU machine) has no prebuilt
FusedAdam: loading it would JIT-compile the kernel with nvcc and ninja (a minute or more, or a hang when no compiler
is found), so that case falls through to torch's fused kernel instead of compiling.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

CHOSEN_ATTR = "ckf_optimizer"
"""Attribute set on the returned optimizer: which implementation `make_optimizer` picked and why."""


def deepspeed_fused_adam_status() -> tuple[bool, str]:
    """Whether DeepSpeed's FusedAdam can run here without a JIT build: (usable, reason)."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import accelerator_name, installed_ops
        from deepspeed.ops.op_builder import FusedAdamBuilder
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable", with the reason kept
        return False, f"deepspeed's op builder does not import ({type(err).__name__}: {err})"
    # The same test OpBuilder.load makes before it falls back to jit_load.
    if not installed_ops.get("fused_adam", False):
        return False, ("deepspeed was installed without prebuilt ops (DS_BUILD_OPS=0 or a pure-Python wheel); "
                       "loading FusedAdam would JIT-compile it")
    if accelerator_name != get_accelerator()._name:
        return False, (f"deepspeed's ops were built for accelerator {accelerator_name!r}, this is "
                       f"{get_accelerator()._name!r}; loading FusedAdam would JIT-compile it")
    builder = FusedAdamBuilder()
    if not builder.is_compatible(verbose=False):
        return False, "deepspeed's FusedAdamBuilder is not compatible with this system"
    try:
        builder.load(verbose=False)
    except Exception as err:  # noqa: BLE001
        return False, f"deepspeed's prebuilt fused_adam op does not load ({type(err).__name__}: {err})"
    return True, "deepspeed FusedAdam (prebuilt op)"


def make_optimizer(param_groups: Iterable[Any], lr: float, weight_decay: float, kind: str,
                   device: torch.device) -> torch.optim.Optimizer:
    """Build AdamW (decoupled weight decay) over `param_groups` as train.optimizer asks.

    Args:
        param_groups: parameters or parameter-group dicts (CKFModel.parameter_groups).
        lr: default learning rate (groups may carry their own).
        weight_decay: decoupled weight decay.
        kind: 'auto' (DeepSpeed FusedAdam on CUDA when its prebuilt kernel loads, else torch's fused AdamW on CUDA,
            else torch's AdamW), 'torch' (torch.optim.AdamW, unfused) or 'fused' (a fused CUDA kernel or an error).
        device: the device the engine trains on (engine / accelerator device, not the parameters' current one:
            under ZeRO-3 the new modules are still on the CPU until deepspeed.initialize moves them).

    Returns:
        The optimizer; `describe_optimizer(opt)` says which implementation it is and why.

    Raises:
        ValueError: unknown `kind`, or 'fused' where no fused kernel can run (names why).
    """
    if kind not in ("auto", "torch", "fused"):
        raise ValueError(f"train.optimizer must be 'auto', 'torch' or 'fused', got {kind!r}")
    groups = list(param_groups)
    cuda = torch.device(device).type == "cuda"
    if kind == "torch":
        return _tag(torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay), "torch AdamW (train.optimizer=torch)")
    if not cuda:
        if kind == "fused":
            raise ValueError(f"train.optimizer=fused needs a CUDA device, the engine's device is {device}: use "
                             f"train.optimizer=auto or torch on CPU")
        return _tag(torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay), f"torch AdamW (device {device})")
    ok, why = deepspeed_fused_adam_status()
    if ok:
        from deepspeed.ops.adam import FusedAdam

        return _tag(FusedAdam(groups, lr=lr, weight_decay=weight_decay, adam_w_mode=True), why)
    # torch's fused AdamW: one multi-tensor CUDA kernel per step, no build needed.
    return _tag(torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True),
                f"torch fused AdamW (DeepSpeed FusedAdam skipped: {why})")


def describe_optimizer(opt: torch.optim.Optimizer) -> str:
    """One line for the training log: which AdamW make_optimizer picked and why (class name for any other)."""
    return getattr(opt, CHOSEN_ATTR, type(opt).__name__)


def _tag(opt: torch.optim.Optimizer, what: str) -> torch.optim.Optimizer:
    setattr(opt, CHOSEN_ATTR, what)
    return opt
