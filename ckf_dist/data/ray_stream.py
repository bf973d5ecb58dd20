"""Per-rank streams of prompt samples through Ray Data (data.stream=ray): bounded memory, exact resume.

Same contract as stream.py's `TaskStream` (an infinite iterator of one task's samples, `epoch_size` samples per rank
per epoch, ranks disjoint, every sample once per epoch across ranks up to the same <= world - 1 padding repeats,
`state_dict()` / `load_state_dict()` for exact resume), but a rank never holds more than a few windows of its share:

    epoch e:  shards in a seeded order  ->  their rows end to end (N rows, padded to world * E by wrapping round)
              rank r takes rows [r*E, (r+1)*E)  ->  cut into windows of data.stream_window rows
              each window shuffled with a seed of (seed, task, split, e, r, window)

Ray Data reads the rows: per window, one `from_items` dataset of its (shard, first row, end row) chunks, a
`map_batches` that opens the tar and returns the chunk's JSON payloads, consumed in order (`preserve_order` on this
dataset only). The next window is read in a background thread while the current one is used, so a rank holds at most
two windows per task (plus the one in transit) whatever the size of the split, and the step does not wait for reads.

Why not `streaming_split` / Ray Train's `get_dataset_shard` (which is `streaming_split` inside): (1) its epochs are
a barrier across all consumers, and our ranks draw their tasks from the mixture independently, so one rank reaches
the end of a task's epoch while another is still mid-epoch and waits in a collective for the first: a deadlock;
(2) it hands blocks to whichever consumer asks first, so which rank saw which sample depends on timing, and neither
a resume nor 2 ranks == 1 rank can be exact. The split here is a pure function of (manifest, seed, epoch, rank,
world), so the Ray Data path and a rank-local reader of the same chunks (`reader="local"`) give the same samples in
the same order (tests/integration/test_ray_stream.py checks it).

Order within an epoch: shard-level shuffling plus a window shuffle, not a full permutation: samples of one shard
(written in key order, i.e. by user) arrive within a window or two of each other. A window of >= shard_size samples
mixes whole shards; the demo's data fits one window, which is then a full shuffle of the rank's share.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tarfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ckf_dist.data.schema import MANIFEST, SPLITS, PromptSample
from ckf_dist.data.stream import check_stream_args
from ckf_dist.tasks import TASK_ID

ORDER = "shards+window"
"""Names the sample order of this stream in its state (TaskStream's is 'permutation'): a checkpoint of one cannot
resume the other."""


def ray_is_running() -> bool:
    """A Ray Train worker (or any process already in Ray), or a node told where its cluster is (RAY_ADDRESS)."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")  # not imported: this process is not in Ray (and importing it costs ~1 s)
    return ray is not None and ray.is_initialized()


def resolve_stream(choice: str) -> str:
    """data.stream -> 'local' or 'ray' ('auto': 'ray' where Ray is running)."""
    if choice not in ("auto", "local", "ray"):
        raise ValueError(f"data.stream={choice!r}; expected 'auto', 'local' or 'ray'")
    if choice == "auto":
        return "ray" if ray_is_running() else "local"
    return choice


_quiet = False


def _ensure_ray() -> None:
    global _quiet
    import ray

    from ckf_dist.netbind import quiet_ray_data

    if ray.is_initialized():
        if not _quiet:  # once per process: this rank's reads must not print a progress bar per window
            quiet_ray_data(sys.stdout.isatty())
            _quiet = True
        return
    if not os.environ.get("RAY_ADDRESS"):
        raise RuntimeError("data.stream=ray needs a running Ray: run under `ckf-dist ray-job` (Ray Train), or start "
                           "a cluster (`ray start --head`) and set RAY_ADDRESS for the launcher; data.stream=local "
                           "reads the shards without Ray")
    from ckf_dist.netbind import connect_ray

    connect_ray(1, 64, worker_logs=False)  # joins RAY_ADDRESS (the resources are the cluster's); quiets Ray Data
    _quiet = True


@dataclass(frozen=True)
class ShardLayout:
    """The shard files of one (split, task) and the number of samples in each, from the manifest alone (shards hold
    shard_size samples each but the last; nothing is opened)."""

    files: tuple[Path, ...]
    sizes: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    @classmethod
    def from_manifest(cls, prepared_dir: str | Path, split: str, task: str) -> ShardLayout:
        """Raises:
            FileNotFoundError: no manifest, or a shard it lists is missing.
            ValueError: the manifest has no shards for (split, task), or its counts do not fit its shard_size.
        """
        root = Path(prepared_dir)
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no {MANIFEST} in {root}; run prepare_data first")
        man = json.loads(path.read_text())
        try:
            names = man["shards"][split][task]
            count = int(man["counts"][split][task])
            shard_size = int(man["config"]["shard_size"])
        except KeyError as e:
            raise ValueError(f"{path}: no shards for split={split!r} task={task!r} (missing key {e}); run "
                             f"prepare_data with {task!r} in data.tasks") from None
        files = tuple(root / n for n in names)
        if missing := [str(f) for f in files if not f.is_file()]:
            raise FileNotFoundError(f"{path} lists shard(s) that do not exist: {missing[:3]}"
                                    f"{' ...' if len(missing) > 3 else ''}; prepare the data again")
        full = len(files) - 1
        last = count - full * shard_size
        if not files or not (0 < last <= shard_size or (count == 0 and len(files) == 1)):
            raise ValueError(f"{path}: {count} {split}/{task} samples do not fill {len(files)} shard(s) of "
                             f"shard_size {shard_size}; the manifest does not describe these shards")
        return cls(files, (shard_size,) * full + (last,) if count else (0,))


@dataclass(frozen=True)
class Chunk:
    """Rows [lo, hi) of one shard (file order), part of window `window` of a rank's epoch."""

    window: int
    shard: int
    lo: int
    hi: int


def epoch_chunks(layout: ShardLayout, rank: int, world: int, window: int, shard_order: np.ndarray) -> list[Chunk]:
    """The chunks a rank reads in one epoch, in reading order: rows [rank*E, (rank+1)*E) of the shards laid end to
    end in `shard_order` (wrapping round past the end: the padding), cut at shard ends and at window boundaries."""
    n = layout.num_samples
    size = math.ceil(n / world)
    sizes = np.asarray(layout.sizes, dtype=np.int64)[shard_order]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out: list[Chunk] = []
    pos, end = rank * size, (rank + 1) * size  # positions in the endless repetition of the epoch's rows
    own = 0  # position within the rank's share
    while pos < end:
        q = pos % n
        k = int(np.searchsorted(starts, q, side="right") - 1)  # index into shard_order
        take = min(end - pos, int(starts[k + 1]) - q, window - own % window)
        lo = q - int(starts[k])
        out.append(Chunk(own // window, int(shard_order[k]), lo, lo + take))
        pos, own = pos + take, own + take
    return out


def read_chunk_local(path: Path, lo: int, hi: int) -> list[bytes]:
    """The JSON payloads of rows [lo, hi) of a shard (tar members in file order)."""
    out: list[bytes] = []
    with tarfile.open(path, "r") as tar:
        for n, m in enumerate(tar):
            if n >= hi:
                break
            if not m.isfile() or not m.name.endswith(".json"):
                raise ValueError(f"{path}: unexpected member {m.name!r}; prompt shards hold only <key>.json files")
            if n >= lo:
                f = tar.extractfile(m)
                assert f is not None
                out.append(f.read())
    if len(out) != hi - lo:
        raise ValueError(f"{path}: has {lo + len(out)} samples, the manifest says at least {hi}; the shard is "
                         f"truncated or was rewritten: prepare the data again")
    return out


def _read_chunks_batch(batch: dict[str, np.ndarray]) -> Any:
    """map_batches body (one chunk per batch): the chunk's payloads, tagged with its index for the order check."""
    import pyarrow as pa

    idx, payloads = [], []
    for i, path, lo, hi in zip(batch["i"], batch["path"], batch["lo"], batch["hi"]):
        got = read_chunk_local(Path(str(path)), int(lo), int(hi))
        idx += [int(i)] * len(got)
        payloads += got
    return pa.table({"i": pa.array(idx, pa.int64()), "json": pa.array(payloads, pa.binary())})


Reader = Callable[[Sequence[Path], Sequence[Chunk]], list[bytes]]
"""(shard files, the chunks of one window) -> the window's payloads, in chunk order."""


def local_reader(files: Sequence[Path], chunks: Sequence[Chunk]) -> list[bytes]:
    """The window read in this process (the oracle for the Ray Data reader)."""
    return [b for c in chunks for b in read_chunk_local(files[c.shard], c.lo, c.hi)]


def ray_reader(files: Sequence[Path], chunks: Sequence[Chunk]) -> list[bytes]:
    """The window read by Ray Data tasks (one per chunk), returned in chunk order.

    One Ray Data execution per window, run to its end, so how far a rank reads ahead is the stream's decision (one
    window), not the executor's: one dataset over a whole epoch keeps an executor alive for the epoch and reads on
    under Ray's own backpressure, into the rank's memory as well as the object store.
    """
    import ray

    _ensure_ray()
    items = [{"i": i, "path": str(files[c.shard]), "lo": c.lo, "hi": c.hi} for i, c in enumerate(chunks)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds.context.execution_options.preserve_order = True  # this dataset's own context copy
    # A quarter CPU per read, so a cluster whose CPUs the training workers hold can still read; at most 2 reads of
    # this stream at once: with fractional CPUs Ray would otherwise start dozens of worker processes (26 on the
    # ML-100K benchmark: 69 s to the first sample, against 12 s with 2).
    ds = ds.map_batches(_read_chunks_batch, batch_size=1, batch_format="numpy", num_cpus=0.25,
                        compute=ray.data.TaskPoolStrategy(size=min(2, len(items))))
    idx: list[int] = []
    out: list[bytes] = []
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        idx += table["i"].to_pylist()
        out += table["json"].to_pylist()
    expect = [i for i, c in enumerate(chunks) for _ in range(c.hi - c.lo)]
    if idx != expect:
        raise RuntimeError(f"Ray Data returned {len(idx)} rows of chunks {sorted(set(idx))[:8]} for {len(expect)} "
                           f"rows of {len(chunks)} chunks, or out of order")
    return out


READERS: dict[str, Reader] = {"ray": ray_reader, "local": local_reader}


class RayTaskStream:
    """Infinite iterator of one task's samples for one rank, streamed through Ray Data (module docstring).

    Args:
        prepared_dir: the prepared dataset (schema.py layout).
        split: "train", "valid" or "test".
        task: one of TASKS.
        rank, world: this process's rank and the number of ranks.
        seed: shuffle seed (data.seed).
        window: samples per shuffle window (data.stream_window).
        reader: "ray" (Ray Data tasks) or "local" (this process; same samples, same order).
        read_ahead: read the next window in a background thread while this one is used (so the step does not wait
            for it); the stream then holds up to two windows, plus the one Ray Data is reading.

    Example:
        >>> s = RayTaskStream("runs/demo/data", "train", "ctr", rank=0, world=2, seed=0)
        >>> sample = next(s); state = s.state_dict()   # {"epoch": 0, "position": 1, ...}
    """

    def __init__(self, prepared_dir: str | Path, split: str, task: str, rank: int = 0, world: int = 1,
                 seed: int = 0, window: int = 4096, reader: str = "ray", read_ahead: bool = True) -> None:
        check_stream_args(split, task, rank, world)
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        if reader not in READERS:
            raise ValueError(f"unknown reader {reader!r}; expected one of {list(READERS)}")
        self.prepared_dir, self.split, self.task = Path(prepared_dir), split, task
        self.rank, self.world, self.seed, self.window = rank, world, seed, window
        self.layout = ShardLayout.from_manifest(prepared_dir, split, task)
        self.num_samples = self.layout.num_samples
        if self.num_samples == 0:
            raise ValueError(f"{prepared_dir}: split {split!r} has no {task!r} samples (see the manifest's counts "
                             f"and skip report); drop {task!r} from data.tasks")
        self._read = READERS[reader]
        if reader == "ray":
            _ensure_ray()  # here, on the caller's thread (the reads may run on the read-ahead thread)
        self.read_ahead = read_ahead
        self.epoch, self.position = 0, 0
        self._current: tuple[int, int, list[bytes], np.ndarray] | None = None  # epoch, window, payloads, order
        self._ahead: tuple[tuple[int, int], Future] | None = None  # (epoch, window) being read ahead
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.rows_read = 0  # payloads this stream's reads returned (the memory test reads it)

    @property
    def epoch_size(self) -> int:
        """Samples per rank per epoch (the same on every rank)."""
        return math.ceil(self.num_samples / self.world)

    def _rng(self, *more: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, TASK_ID[self.task], SPLITS.index(self.split), *more])

    def chunks(self, epoch: int) -> list[Chunk]:
        """What this rank reads in `epoch`, in order."""
        shard_order = self._rng(epoch, 13).permutation(len(self.layout.files))
        return epoch_chunks(self.layout, self.rank, self.world, self.window, shard_order)

    def _read_window(self, epoch: int, w: int) -> list[bytes]:
        payloads = self._read(self.layout.files, [c for c in self.chunks(epoch) if c.window == w])
        with self._lock:
            self.rows_read += len(payloads)
        return payloads

    def _following(self, epoch: int, w: int) -> tuple[int, int]:
        return (epoch, w + 1) if (w + 1) * self.window < self.epoch_size else (epoch + 1, 0)

    def _window(self, epoch: int, w: int) -> list[bytes]:
        """Window w of `epoch`: the one read ahead if it is that one, else read now; then start reading the next."""
        if self._ahead is not None and self._ahead[0] == (epoch, w):
            payloads = self._ahead[1].result()
        else:  # first window, or after a resume elsewhere (a stale read ahead finishes unused)
            payloads = self._read_window(epoch, w)
        self._ahead = None
        if self.read_ahead:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"ckf-read-{self.task}")
            nxt = self._following(epoch, w)
            self._ahead = (nxt, self._pool.submit(self._read_window, *nxt))
        return payloads

    def __iter__(self) -> RayTaskStream:
        return self

    def __next__(self) -> PromptSample:
        if self.position >= self.epoch_size:
            self.epoch, self.position = self.epoch + 1, 0
        w, offset = divmod(self.position, self.window)
        if self._current is None or self._current[:2] != (self.epoch, w):
            self._current = None  # let the old window go before the new one is held
            payloads = self._window(self.epoch, w)
            self._current = (self.epoch, w, payloads, self._rng(self.epoch, self.rank, w, 17).permutation(len(payloads)))
        payload = self._current[2][self._current[3][offset]]
        self.position += 1
        return json.loads(payload)

    def close(self) -> None:
        """Stop reading ahead and let the windows go (a closed stream reads again if used)."""
        if self._pool is not None:
            if self._ahead is not None:
                self._ahead[1].cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
        self._ahead, self._current = None, None

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: next() after load_state_dict(state) returns what next() would return now."""
        return {"epoch": self.epoch, "position": self.position, "task": self.task, "split": self.split,
                "num_samples": self.num_samples, "world": self.world, "seed": self.seed, "order": ORDER,
                "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`.

        Raises:
            ValueError: the state belongs to another stream kind (data.stream), other data, world size, seed or
                window, where (epoch, position) would point at different samples.
        """
        if state.get("order", "permutation") != ORDER:
            raise ValueError(f"the checkpoint's {state.get('task')!r} stream was written with data.stream=local "
                             f"(TaskStream's full permutation), this run reads with data.stream=ray: the positions "
                             f"name other samples; resume with data.stream=local")
        for k in ("task", "split", "num_samples", "world", "seed", "window"):
            if k in state and state[k] != getattr(self, k):
                name = "data.stream_window" if k == "window" else k
                raise ValueError(f"stream state for {name}={state[k]!r} cannot resume a stream with {name}="
                                 f"{getattr(self, k)!r} (the data or the job shape changed); start the stream "
                                 f"fresh or resume with the same data, world size and window")
        if not 0 <= int(state["position"]) <= self.epoch_size or int(state["epoch"]) < 0:
            raise ValueError(f"stream state {state} is out of range (epoch_size {self.epoch_size})")
        self._current = None  # a read ahead stays: it is used if it is the window the state points into
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
