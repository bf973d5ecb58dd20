"""WebDataset tar shards of PromptSamples, written byte-identically (fixed mtime/owner, sorted members).

Layout (see schema.py): `<prepared_dir>/prompts/<split>/<task>-shard-000000.tar`; each sample is one
`<key with '/' -> '_'>.json` member, so `webdataset.WebDataset(...)` and `ray.data.read_webdataset(...)`
read the shards as they are. One task per shard file lets a task stream open only its own shards.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ckf_dist.data.schema import PromptSample, prompts_dir


def shard_name(task: str, index: int) -> str:
    return f"{task}-shard-{index:06d}.tar"


def member_name(key: str) -> str:
    """WebDataset member name of a sample: the key ('/' would make folders) + '.json'."""
    return key.replace("/", "_") + ".json"


def dumps_sample(sample: PromptSample) -> bytes:
    return json.dumps(sample, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write (name, payload) members with fixed metadata so the same input gives the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(payload))


def write_task_shards(prepared_dir: Path, split: str, task: str, payloads: list[tuple[str, bytes]],
                      shard_size: int) -> list[Path]:
    """Write the (key, json bytes) of one split and task, in the given order, into shards of `shard_size`.

    An empty list still writes one empty shard, so every (split, task) has at least one file to open.
    """
    out = []
    chunks = [payloads[i:i + shard_size] for i in range(0, len(payloads), shard_size)] or [[]]
    for n, chunk in enumerate(chunks):
        path = prompts_dir(prepared_dir, split) / shard_name(task, n)
        write_tar(path, ((member_name(k), b) for k, b in chunk))
        out.append(path)
    return out


def task_shards(prepared_dir: str | Path, split: str, task: str) -> list[Path]:
    """The shard files of one split and task, in order.

    Raises:
        FileNotFoundError: no shard exists (data not prepared, or the task was not in data.tasks).
    """
    d = prompts_dir(prepared_dir, split)
    found = sorted(d.glob(f"{task}-shard-*.tar"))
    if not found:
        raise FileNotFoundError(f"no prompt shards for split={split!r} task={task!r} under {d}; run prepare_data "
                                f"with {task!r} in data.tasks")
    return found


def iter_shard_payloads(path: Path) -> Iterator[bytes]:
    """The raw JSON bytes of every sample in a shard, in file order."""
    with tarfile.open(path, "r") as tar:
        for m in tar:
            if not m.isfile() or not m.name.endswith(".json"):
                raise ValueError(f"{path}: unexpected member {m.name!r}; prompt shards hold only <key>.json files")
            f = tar.extractfile(m)
            assert f is not None
            yield f.read()


def read_task_payloads(prepared_dir: str | Path, split: str, task: str) -> list[bytes]:
    return [b for p in task_shards(prepared_dir, split, task) for b in iter_shard_payloads(p)]
