"""Collectives of ckf-dist's own code (statistics, stop flags, barriers, broadcasts), the same on NCCL and gloo.

NCCL only reduces tensors on the GPU, gloo only tensors on the CPU. Every training-path collective goes through
this module, and one place decides where their tensors live: `device()`, from the backend of the default process
group (whoever created it: our launchers, DeepSpeed or Ray Train). A caller hands over any tensor; `all_reduce`
moves it to that device, reduces, and returns the result on the caller's device, so statistics built on the CPU work
under NCCL and nothing is sent to the GPU under gloo.

Why not a "cpu:gloo,cuda:nccl" group: Ray Train and DeepSpeed create or adopt the group themselves and compare the
backend name with "nccl" in places; a plain NCCL group is what every launcher gives, and the handful of small
tensors here cost a device copy each.

Developer check, `CKF_CHECK_COLLECTIVES=1` (every job the test suite launches sets it): a torch.distributed collective
called directly from ckf_dist code outside this module raises, naming the caller, and every tensor handed to a
collective here must be on `device()`. A CPU-only machine cannot hand NCCL a wrong tensor, but it can run code that
would, so this is how CI catches it. DeepSpeed's own collectives (ZeRO-3 gathers on the engine's device) are
DeepSpeed's affair and pass. The policy is swappable (`use_policy`) for tests.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Policy", "all_gather_object", "all_reduce", "barrier", "broadcast_", "broadcast_object", "device",
           "use_policy"]


class Policy:
    """Where collective tensors must live for the active backend (the current CUDA device under NCCL, else the CPU),
    and the one door every collective of this module goes through (`issue`)."""

    def device(self) -> torch.device:
        if dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend()).lower():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def issue(self, call: Callable[[], Any], *tensors: torch.Tensor) -> Any:
        """Run the collective `call`; `tensors` are the tensors it sends (already on `device()`)."""
        if _checks_installed:
            want = self.device()
            if bad := [str(t.device) for t in tensors if t.device != want]:
                raise RuntimeError(f"ckf_dist.comm: collective tensor(s) on {bad}, the backend needs {want}")
        return call()


_policy: Policy = Policy()


@contextlib.contextmanager
def use_policy(policy: Policy) -> Iterator[Policy]:
    """Install another policy for the duration of the block (tests)."""
    global _policy
    prev, _policy = _policy, policy
    try:
        yield policy
    finally:
        _policy = prev


def device() -> torch.device:
    """The device this process's collective tensors live on."""
    return _policy.device()


def all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    """All-reduce `t` (default: sum) over the default group; returns the result on t's own device.

    When `t` had to be moved, `t` itself is left unchanged: use the returned tensor.
    """
    op = dist.ReduceOp.SUM if op is None else op
    where = device()
    work = t if t.device == where else t.to(where)
    _policy.issue(lambda: dist.all_reduce(work, op=op), work)
    return work if work.device == t.device else work.to(t.device)


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast rank `src`'s `t` into `t`, in place, on every rank."""
    where = device()
    work = t if t.device == where else t.to(where)
    _policy.issue(lambda: dist.broadcast(work, src=src), work)
    if work is not t:
        t.copy_(work)
    return t


def barrier() -> None:
    """Wait for every rank (under NCCL torch reduces a tensor on the current CUDA device, which launchers set)."""
    _policy.issue(dist.barrier)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj`, on every rank (torch puts the byte tensors on the current CUDA device under
    NCCL)."""
    box = [obj]
    _policy.issue(lambda: dist.broadcast_object_list(box, src=src))
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    _policy.issue(lambda: dist.all_gather_object(out, obj))
    return out


_PATCHED = ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object", "broadcast_object_list",
            "reduce_scatter", "reduce", "gather", "scatter", "all_to_all", "all_gather_into_tensor",
            "reduce_scatter_tensor")
_checks_installed = False


def install_checks() -> None:
    """Make every torch.distributed collective called directly from ckf_dist code (outside this module) raise.
    Idempotent; `CKF_CHECK_COLLECTIVES=1` installs it when this module is first imported."""
    global _checks_installed
    if _checks_installed:
        return
    for name in _PATCHED:
        real = getattr(dist, name, None)
        if real is None:
            continue

        def checked(*args: Any, _real: Callable = real, _name: str = name, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("ckf_dist") and caller != __name__:
                raise RuntimeError(f"{caller} called torch.distributed.{_name} directly; use ckf_dist.comm, which "
                                   f"puts the tensors on the device the backend needs (NCCL: the GPU)")
            return _real(*args, **kwargs)

        setattr(dist, name, checked)
    _checks_installed = True


if os.environ.get("CKF_CHECK_COLLECTIVES") == "1":
    install_checks()
