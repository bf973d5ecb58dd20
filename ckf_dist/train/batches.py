"""One optimizer step's micro-batches: task draws from the mixture -> samples from the task streams -> collated
batches, optionally built one step ahead in a background thread so the step never waits for tokenisation.

Why a builder of its own: prefetching must not break exact resume. A batch built ahead is drawn with the mixture
as it stood when the build started, i.e. one update older than a synchronous draw would see ("lag one"), and the
streams have already advanced past it when a checkpoint is written. So the builder snapshots the streams BEFORE
each ahead-of-time draw and remembers the weights it drew with; `state_dict()` hands out that snapshot, and after
`load_state_dict()` the first step is rebuilt from it with the same weights -- the same rows, the same batches,
as the uninterrupted run.

Every draw is a pure function of (seed, step, micro-batch, rank, mixture weights, stream positions): the task
choices use a generator seeded from the first four, so prefetching changes nothing but the weights' lag.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ckf_dist.data.batch import Batch
from ckf_dist.data.collate import Collator


def draw_tasks(weights: torch.Tensor, tasks: Sequence[str], n: int, seed: int, step: int, micro: int,
               rank: int) -> list[str]:
    """n task names for one micro-batch. Every rank uses the same weights; the rank enters the seed so ranks draw
    different rows (their streams are disjoint anyway)."""
    gen = torch.Generator().manual_seed(hash((seed, step, micro, rank)) % 2**62)
    idx = torch.multinomial(weights.float(), n, replacement=True, generator=gen)
    return [tasks[i] for i in idx.tolist()]


class StepBatches:
    """Builds the micro-batches of each optimizer step, in step order.

    Args:
        streams: task -> TaskStream of this rank (anything with __next__, state_dict, load_state_dict).
        collator: turns samples into a Batch.
        tasks: task names in mixture-weight order.
        micro_batch_size, grad_accum: rows per micro-batch and micro-batches per step.
        seed, rank: enter the draws' seed.
        variants: step -> prompt variants of that step (the curriculum).
        prefetch: build step k+1 in a background thread while step k runs (lag-one mixture weights).

    Example:
        >>> batches = StepBatches(streams, collator, ["ctr", "topk"], 8, 1, seed=0, rank=0,
        ...                       variants=lambda step: ("cf",), prefetch=True)
        >>> for step in range(100):
        ...     micro_batches = batches.take(step, mixture.weights, last_step=99)
        ...     ...; mixture.update(...)
        >>> batches.close()
    """

    def __init__(self, streams: Mapping[str, Any], collator: Collator, tasks: Sequence[str], micro_batch_size: int,
                 grad_accum: int, seed: int, rank: int, variants: Callable[[int], tuple[str, ...]],
                 prefetch: bool = True) -> None:
        self.streams, self.collator, self.tasks = streams, collator, list(tasks)
        self.micro_batch_size, self.grad_accum, self.seed, self.rank = micro_batch_size, grad_accum, seed, rank
        self.variants = variants
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckf-batches") if prefetch else None
        # The step being built ahead: (step, future, stream states before its draws, weights it draws with).
        self._pending: tuple[int, Future, dict[str, Any], torch.Tensor] | None = None
        # After a resume: the weights the first step must be drawn with (those of the interrupted run).
        self._resume: tuple[int, torch.Tensor] | None = None
        self.wait_s = 0.0  # time the caller spent blocked in take() (the loop's data wait)

    def build(self, step: int, weights: torch.Tensor) -> list[Batch]:
        """The micro-batches of `step`, drawn with `weights` from the streams' current positions."""
        out = []
        for micro in range(self.grad_accum):
            names = draw_tasks(weights, self.tasks, self.micro_batch_size, self.seed, step, micro, self.rank)
            out.append(self.collator([next(self.streams[t]) for t in names], self.variants(step)))
        return out

    def take(self, step: int, weights: torch.Tensor, last_step: int) -> list[Batch]:
        """Micro-batches of `step`; `weights` = the mixture now (before this step's update).

        Synchronously that is what the step draws with. With prefetch, step `step` was started during the
        previous step (with the weights then), and `weights` go to step + 1, which starts building now.
        """
        t0 = time.perf_counter()
        if self._pending is not None and self._pending[0] == step:
            batches = self._pending[1].result()
            self._pending = None
        else:
            if self._pending is not None:
                raise RuntimeError(f"batches for step {self._pending[0]} were built ahead but step {step} was asked")
            use = weights
            if self._resume is not None and self._resume[0] == step:
                use = self._resume[1]
            self._resume = None
            batches = self.build(step, use)
        self.wait_s += time.perf_counter() - t0
        if self._pool is not None and step + 1 <= last_step:
            ahead = weights.detach().clone()
            before = {t: s.state_dict() for t, s in self.streams.items()}
            self._pending = (step + 1, self._pool.submit(self.build, step + 1, ahead), before, ahead)
        return batches

    def wait(self) -> None:
        """Finish the build in flight (e.g. before evaluation uses the tokenizer from this thread)."""
        if self._pending is not None:
            t0 = time.perf_counter()
            self._pending[1].result()
            self.wait_s += time.perf_counter() - t0

    def state_dict(self) -> dict[str, Any]:
        """Where the data of the NEXT step starts: stream positions before its draws, and its draw weights
        (None = draw with the mixture as it will be)."""
        if self._pending is not None:
            self.wait()  # its draws must not move the streams under a later load
            step, _, before, ahead = self._pending
            return {"streams": before, "draw_step": step, "draw_weights": ahead.clone()}
        return {"streams": {t: s.state_dict() for t, s in self.streams.items()}, "draw_step": None,
                "draw_weights": None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._pending is not None:
            raise RuntimeError("load_state_dict() on a StepBatches that is building ahead")
        missing = set(self.streams) - set(state["streams"])
        if missing:
            raise ValueError(f"checkpoint has no stream state for task(s) {sorted(missing)}; the checkpoint was "
                             f"written with data.tasks={sorted(state['streams'])}")
        for t, s in self.streams.items():
            s.load_state_dict(state["streams"][t])
        if state.get("draw_weights") is not None:
            self._resume = (int(state["draw_step"]), state["draw_weights"].clone())

    def close(self) -> None:
        if self._pool is not None:
            if self._pending is not None:
                self._pending[1].cancel()
                self._pending = None
            self._pool.shutdown(wait=True)
            self._pool = None
        for stream in self.streams.values():  # a Ray Data stream stops its reads
            if hasattr(stream, "close"):
                stream.close()
