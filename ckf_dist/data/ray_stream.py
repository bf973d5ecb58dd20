"""Per-rank streams of prompt samples through Ray Data (MTM): the shards of stream.py's `TaskStream`, read with
`read_webdataset` -> `random_shuffle(seed)` -> `streaming_split(world, equal=True)` or Ray Train's
`get_dataset_shard`, for jobs whose data should flow through the Ray object store. Same contract as `TaskStream`:
every rank gets the same number of samples per epoch and ranks are disjoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckf_dist.data.schema import PromptSample
from ckf_dist.data.shards import task_shards


def dataset_name(split: str, task: str) -> str:
    """Name of a (split, task) dataset in Ray Train's `datasets={...}` and `get_dataset_shard(name)`."""
    return f"{split}_{task}"


def ray_dataset(prepared_dir: str | Path, split: str, task: str):
    """The shards of one split and task as a Ray Dataset (one row per sample, column 'json' = the sample dict).

    Needs `ray.init()` (or a Ray Train worker). Pass it to `TorchTrainer(datasets={dataset_name(split, task): ds})`.
    """
    import ray

    files = [str(p) for p in task_shards(prepared_dir, split, task)]
    return ray.data.read_webdataset(files).select_columns(["json"])


def streaming_split_iterators(prepared_dir: str | Path, split: str, task: str, world: int, seed: int,
                              epoch: int = 0) -> list:
    """`world` DataIterators over one epoch: a seeded shuffle, then `streaming_split(world, equal=True)`, so each
    consumer gets the same number of rows (Ray drops at most world - 1 rows to equalise) and they are disjoint."""
    ds = ray_dataset(prepared_dir, split, task).random_shuffle(seed=seed * 1_000_003 + epoch)
    return ds.streaming_split(world, equal=True)


class RayShardStream:
    """Infinite sample iterator over a Ray Train dataset shard (`ray.train.get_dataset_shard(name)`).

    Each pass over the shard is one epoch; Ray Train's DataConfig decides the split and the shuffling. Use it
    inside a Ray Train worker with `TorchTrainer(datasets={dataset_name("train", t): ray_dataset(...)})`.

    Args:
        task: the task whose dataset to read.
        split: the split (part of the dataset name).
        iterator: a DataIterator to read instead of `get_dataset_shard` (tests, streaming_split consumers).

    Example:
        >>> stream = RayShardStream("ctr")  # inside a Ray Train worker
        >>> sample = next(stream)
    """

    def __init__(self, task: str, split: str = "train", iterator: Any | None = None) -> None:
        if iterator is None:
            import ray.train

            iterator = ray.train.get_dataset_shard(dataset_name(split, task))
            if iterator is None:
                raise ValueError(f"Ray Train has no dataset {dataset_name(split, task)!r}; pass "
                                 f"datasets={{{dataset_name(split, task)!r}: ray_dataset(...)}} to the trainer")
        self.task, self.split, self._it = task, split, iterator
        self.epoch, self.position = 0, 0
        self._rows: Iterator[dict] | None = None

    def __iter__(self) -> RayShardStream:
        return self

    def __next__(self) -> PromptSample:
        for _ in range(2):
            if self._rows is None:
                self._rows = iter(self._it.iter_rows())
            try:
                row = next(self._rows)
                self.position += 1
                return row["json"]
            except StopIteration:
                self._rows, self.epoch, self.position = None, self.epoch + 1, 0
        raise ValueError(f"Ray dataset shard for {self.task!r} is empty")
