"""Per-rank stream of one task's prompt samples for training (MTM): disjoint per rank, reshuffled every epoch.
`TaskStream` reads its task's WebDataset shards directly into the rank's memory (no driver, no Ray, start-up in
milliseconds): the single-process path (data.stream=local), under `deepspeed` / `torchrun` / Slurm without Ray. The
Ray Data route to the same shards, with bounded memory, is ray_stream.py (data.stream=ray, the default where Ray
runs); `task_streams` picks one. Building batches ahead of the step, with exact resume, is train/batches.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ckf_dist.config import DataConfig
from ckf_dist.data.schema import SPLITS, PromptSample
from ckf_dist.data.shards import read_task_payloads
from ckf_dist.tasks import TASK_ID


def check_stream_args(split: str, task: str, rank: int, world: int) -> None:
    """The arguments every task stream (TaskStream, ray_stream.RayTaskStream) takes, checked alike."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if task not in TASK_ID:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASK_ID)}")
    if world <= 0 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world of size {world}")


class TaskStream:
    """Infinite iterator of one task's samples for one rank, epoch after epoch.

    Each epoch draws a permutation of the whole split from (seed, task, split, epoch). When the split size N is
    not a multiple of `world`, the permutation is PADDED (not truncated) to world * ceil(N / world) by wrapping
    around to its start, so every sample is seen every epoch and every rank gets exactly `epoch_size` samples
    (the world * ceil(N / world) - N padded positions repeat the epoch's first samples). Rank r takes positions
    r, r + world, r + 2 world, ... of the padded order: ranks are disjoint except for those <= world - 1 repeats.

    Args:
        prepared_dir: the prepared dataset (schema.py layout).
        split: "train", "valid" or "test".
        task: one of TASKS.
        rank: this process's rank.
        world: number of ranks.
        seed: shuffle seed (data.seed).

    Example:
        >>> s = TaskStream("runs/demo/data", "train", "ctr", rank=0, world=2, seed=0)
        >>> sample = next(s); state = s.state_dict()   # {"epoch": 0, "position": 1, ...}
    """

    def __init__(self, prepared_dir: str | Path, split: str, task: str, rank: int = 0, world: int = 1,
                 seed: int = 0) -> None:
        check_stream_args(split, task, rank, world)
        self.prepared_dir, self.split, self.task = Path(prepared_dir), split, task
        self.rank, self.world, self.seed = rank, world, seed
        self._payloads = read_task_payloads(prepared_dir, split, task)  # canonical (key) order on every rank
        self.num_samples = len(self._payloads)
        if self.num_samples == 0:
            raise ValueError(f"{prepared_dir}: split {split!r} has no {task!r} samples (see the manifest's counts "
                             f"and skip report); drop {task!r} from data.tasks")
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def epoch_size(self) -> int:
        """Samples per rank per epoch (the same on every rank)."""
        return math.ceil(self.num_samples / self.world)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices (into the canonical sample order) that this rank reads in `epoch`, in reading order."""
        rng = np.random.default_rng([self.seed, TASK_ID[self.task], SPLITS.index(self.split), epoch, 11])
        perm = rng.permutation(self.num_samples)
        padded = np.resize(perm, self.epoch_size * self.world)  # wraps around: the padding repeats perm's start
        return padded[self.rank::self.world]

    def __iter__(self) -> TaskStream:
        return self

    def __next__(self) -> PromptSample:
        if self.position >= self.epoch_size:
            self.epoch += 1
            self.position = 0
        if self._order_epoch != self.epoch:
            self._order = self.epoch_order(self.epoch)
            self._order_epoch = self.epoch
        idx = int(self._order[self.position])
        self.position += 1
        return json.loads(self._payloads[idx])

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: next() after load_state_dict(state) returns what next() would return now."""
        return {"epoch": self.epoch, "position": self.position, "task": self.task, "split": self.split,
                "num_samples": self.num_samples, "world": self.world, "seed": self.seed, "order": "permutation"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`.

        Raises:
            ValueError: the state belongs to other data (sample count, task or split differ) or another world
                size / seed, where (epoch, position) would point at different samples.
        """
        if state.get("order", "permutation") != "permutation":  # checkpoints before data.stream have no 'order'
            raise ValueError(f"the checkpoint's {state.get('task')!r} stream was written with data.stream=ray "
                             f"({state['order']!r} order), this run reads with data.stream=local: the positions "
                             f"name other samples; resume with data.stream=ray")
        for k in ("task", "split", "num_samples", "world", "seed"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"stream state for {k}={state[k]!r} cannot resume a stream with {k}="
                                 f"{getattr(self, k)!r} (the data or the job shape changed); start the stream "
                                 f"fresh or resume with the same data and world size")
        if not 0 <= int(state["position"]) <= self.epoch_size or int(state["epoch"]) < 0:
            raise ValueError(f"stream state {state} is out of range (epoch_size {self.epoch_size})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def task_streams(cfg: DataConfig, split: str, rank: int, world: int) -> tuple[str, dict[str, Any]]:
    """This rank's stream of every task in cfg.tasks, as data.stream chooses; returns ('local' | 'ray', streams)."""
    from ckf_dist.data.ray_stream import RayTaskStream, resolve_stream

    kind = resolve_stream(cfg.stream)
    if kind == "ray":
        return kind, {t: RayTaskStream(cfg.prepared_dir, split, t, rank, world, cfg.seed, cfg.stream_window)
                      for t in cfg.tasks}
    return kind, {t: TaskStream(cfg.prepared_dir, split, t, rank, world, cfg.seed) for t in cfg.tasks}
