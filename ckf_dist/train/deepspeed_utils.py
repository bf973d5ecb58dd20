"""DeepSpeed glue: process-group start-up with a collective timeout, and `make_ds_config`, which merges the
ZeRO-only JSON of `ds_configs/` with batch sizes, clipping and precision from TrainConfig (one place each).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import torch

from ckf_dist import comm
from ckf_dist.config import RunConfig, find_file, not_found
from ckf_dist.netbind import LOOPBACK, bind_single_node, free_port, is_loopback


def init_distributed(cfg: RunConfig) -> tuple[int, int]:
    """Start (or join) the process group and return (rank, world).

    Under `deepspeed`/`torchrun` the launcher's env vars (RANK, WORLD_SIZE, MASTER_ADDR...) are used; a plain
    `python launchers/train.py` runs as a 1-rank group so the same code path serves both. A collective that waits
    longer than train.collective_timeout_s raises instead of hanging forever (a dead or stuck peer).

    Binding: a single-node run (MASTER_ADDR resolves to a loopback address: the default of the `deepspeed` launcher
    on one node and of a plain run) listens on 127.0.0.1 only (`bind_single_node`). Several nodes need MASTER_ADDR
    set to an address the other nodes reach (`deepspeed --hostfile`, `--master_addr`, Slurm): then nothing is
    changed, torch's rendezvous store listens on all interfaces, and gloo / NCCL pick their interface from the
    hostname or from GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, which the operator sets for the cluster network.
    """
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        # A group someone else created (Ray Train, a test harness): DeepSpeed's comm layer must still adopt it, or
        # its batch-size checks and ZeRO-3 partitioning see a world of 1.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=LOOPBACK)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = cfg.train.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=cfg.train.collective_timeout_s)
    if torch.cuda.is_available():
        # Before the group exists: NCCL's communicators, torch's barrier and object collectives (ckf_dist/comm.py)
        # use the current device, and every rank left on cuda:0 fails or hangs at the first collective.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if is_loopback(os.environ.get("MASTER_ADDR", "")):
        bind_single_node(backend, timeout)
    # With the group already created above, DeepSpeed adopts it (and still sets up its CPU shm all-reduce).
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    if not torch.cuda.is_available():
        release_shm_buffer()
    return dist.get_rank(), dist.get_world_size()


def release_shm_buffer() -> bool:
    """Unlink this rank's DeepSpeed CPU shared-memory all-reduce buffer from /dev/shm, once every rank has mapped it.

    DeepSpeed's CPU comm (csrc/cpu/comm/shm.cpp) creates one 67 MB file per rank,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never removes it: every run
    (and every killed run) leaves 67 MB x ranks of RAM behind in the tmpfs; 120 of them (8 GB) had piled up here and
    got a SmolLM2 rank OOM-killed. Every rank maps all the others' files inside deepspeed.init_distributed, so
    after a barrier each file can be unlinked: the mappings stay valid until the process exits (like an open, deleted
    file), and a rank killed later leaves nothing. Returns whether a file was removed.
    """
    import torch.distributed as dist

    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    comm.barrier()  # a rank still inside its shm set-up would spin forever on a file that is gone
    try:
        os.unlink(Path("/dev/shm") / name)
    except FileNotFoundError:  # no shm comm (several nodes, or DeepSpeed built without it)
        return False
    return True


def load_zero_json(path: str | Path) -> dict[str, Any]:
    """Read a ds_configs/*.json file; a relative path is looked up in the working directory, then in the installed
    package (config.find_file, as the config check does)."""
    p = find_file(path)
    if p is None:
        raise FileNotFoundError(not_found("train.ds_config", path))
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON: {e}") from e
    owned = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler"}
    if clash := sorted(owned & data.keys()):
        raise ValueError(f"{p}: keys {clash} are set from the train section of the config; remove them from the "
                         f"DeepSpeed JSON (ds_configs/ holds ZeRO settings only)")
    return data


def make_ds_config(cfg: RunConfig, world: int, hidden_size: int) -> dict[str, Any]:
    """The full DeepSpeed config: ZeRO settings from train.ds_config + everything else from TrainConfig.

    "auto" ZeRO-3 bucket sizes are resolved from the LLM hidden size (as the HF integration does).
    """
    ds = load_zero_json(cfg.train.ds_config)
    t = cfg.train
    ds.update(
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        train_batch_size=t.micro_batch_size * t.grad_accum * world,
        gradient_clipping=t.grad_clip,
        bf16={"enabled": t.precision == "bf16"},
        fp16={"enabled": t.precision == "fp16", "initial_scale_power": 16},
        steps_per_print=10**9,  # our own logger reports; DeepSpeed's console lines would interleave with tqdm
        wall_clock_breakdown=False,
    )
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    z = ds.setdefault("zero_optimization", {})
    auto = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for k, v in auto.items():
        if z.get(k) == "auto":
            z[k] = v
    if leftover := [k for k, v in z.items() if v == "auto"]:
        raise ValueError(f"{cfg.train.ds_config}: cannot resolve 'auto' for {leftover}")
    return ds


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
