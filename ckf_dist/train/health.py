"""Failure behaviour: every rank records a heartbeat (step, time) in the process group's key-value store, so
that when a collective fails or times out (a peer died or hangs), the surviving ranks name the rank(s) that
stopped instead of waiting forever or printing a bare gloo/NCCL error.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from ckf_dist import comm


class Heartbeat:
    """Per-rank progress in the default TCPStore (hosted by rank 0's process under env:// rendezvous).

    Args:
        rank: this rank.
        world: number of ranks.

    Example:
        >>> hb = Heartbeat(rank, world); hb.beat(step)         # each step
        >>> raise hb.explain(err)                              # on a failed collective
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except (RuntimeError, AttributeError, ValueError):  # e.g. a backend without a store
            self.store = None

    def beat(self, step: int) -> None:
        if self.store is not None:
            self.store.set(f"ckf/hb/{self.rank}", f"{step} {time.time():.3f}")

    def last_beats(self) -> dict[int, tuple[int, float] | None]:
        """rank -> (step, unix time) of its last beat, None where it never beat; {} if the store is gone."""
        out: dict[int, tuple[int, float] | None] = {}
        if self.store is None:
            return out
        try:
            for r in range(self.world):
                key = f"ckf/hb/{r}"
                if self.store.check([key]):
                    step, t = self.store.get(key).decode().split()
                    out[r] = (int(step), float(t))
                else:
                    out[r] = None
        except Exception:  # noqa: BLE001 - the store died with rank 0
            return {}
        return out

    def explain(self, err: BaseException) -> RuntimeError:
        """A RuntimeError naming the rank(s) behind a failed collective."""
        beats = self.last_beats()
        now = time.time()
        if not beats:
            who = "rank 0 (it hosts the rendezvous store, which is unreachable: it died)"
        else:
            mine = beats.get(self.rank)
            my_step = mine[0] if mine else -1
            behind = [r for r, b in beats.items() if r != self.rank and (b is None or b[0] < my_step)]
            if not behind:  # same step everywhere: the stuck one beat longest ago
                others = {r: b for r, b in beats.items() if r != self.rank and b is not None}
                behind = [min(others, key=lambda r: others[r][1])] if others else []
            who = ", ".join(
                f"rank {r} (" + ("never started the loop" if beats[r] is None else
                                 f"last seen at step {beats[r][0]}, {now - beats[r][1]:.0f}s ago") + ")"
                for r in behind) or "unknown"
        return RuntimeError(f"rank {self.rank}: a collective failed or timed out ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}). Stopped peer(s): {who}. "
                            f"The job exits instead of hanging; resume with train.resume=auto.")


_COLLECTIVE_WORDS = ("timed out", "timeout", "connection", "closed", "gloo", "nccl", "peer", "broken pipe",
                     "reset by", "socket")


def is_collective_failure(err: BaseException) -> bool:
    """True for errors a dead/hung peer produces (DistError, gloo/NCCL transport errors), not for our own bugs."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and any(w in msg for w in _COLLECTIVE_WORDS)


class StopRequest:
    """SIGTERM / SIGUSR1 (Slurm's time-limit signal, `scancel --signal`, a Kubernetes eviction) asks for a clean stop:
    the loop finishes the current step, writes a checkpoint and exits, and the next run resumes from it.

    The signals are caught from the first StopRequest on, for the rest of the process, and every instance reads the
    same flag: the pipeline makes one before its first stage, so a signal during data preparation, CF training or
    model loading (minutes at 7B, where Python's default action would kill the rank with status 138 and lose the
    requeue) stops the job at the next stage boundary instead.

    `requested()` is collective (a 1-element all-reduce), so every rank stops at the same step even when the
    signal reached only some of them.
    """

    _flag = False
    _installed = False

    def __init__(self) -> None:
        import signal

        if StopRequest._installed:
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, StopRequest._handler)
                StopRequest._installed = True
            except ValueError:  # not the main thread (e.g. inside some Ray workers): no signal-driven stop
                pass

    @staticmethod
    def _handler(signum, frame) -> None:
        StopRequest._flag = True

    @property
    def flag(self) -> bool:
        """This rank received a stop signal (not collective)."""
        return StopRequest._flag

    def requested(self) -> bool:
        import torch

        t = torch.tensor([1.0 if self.flag else 0.0])
        t = comm.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)
