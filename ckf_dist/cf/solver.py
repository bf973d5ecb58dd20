"""What a CF solver (CKEM) is to the training loop of train_cf.py: an object whose `run_epoch` trains one epoch
in place and returns the epoch's global training loss, the same on every rank. The solvers are sgd.py
(mini-batch Adam, all CF models) and als.py (closed-form alternating least squares, biased MF).
"""

from __future__ import annotations

from typing import Protocol

import torch.distributed as dist


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite (diverged); raised on every rank at the same step."""


class Solver(Protocol):
    def run_epoch(self, epoch: int) -> float:
        """Train epoch `epoch` (1-based) in place; return its training loss over all ranks.

        Raises:
            NonFiniteLossError: the loss diverged (on every rank alike).
        """
        ...


def dist_info() -> tuple[int, int]:
    """(rank, world) of the running process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
