"""DeepSpeed's CPU comm creates one shared-memory all-reduce buffer per rank in /dev/shm (67 MB each) and never
removes it; init_distributed unlinks each rank's buffer once every rank has mapped it, so neither a finished nor a
killed run leaves RAM behind in the tmpfs."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from ckf_dist.train.deepspeed_utils import free_port

pytestmark = pytest.mark.distributed


def _buffers(port: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def _worker(rank: int, world: int, port: int, queue) -> None:
    # As under the `deepspeed` launcher: the env names the group, init_distributed creates it (and DeepSpeed's comm).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist

    from ckf_dist.config import RunConfig
    from ckf_dist.train.deepspeed_utils import init_distributed

    init_distributed(RunConfig())
    dist.barrier()
    left = _buffers(port)
    t = torch.full((8,), float(rank + 1))
    dist.all_reduce(t)
    queue.put((rank, left, float(t[0])))
    dist.destroy_process_group()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_no_shm_buffer_is_left_once_the_group_is_up():
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert [g[1] for g in got] == [[], []], "a rank's /dev/shm buffer is still there while the run goes on"
    assert [g[2] for g in got] == [3.0, 3.0]
    assert _buffers(port) == []
