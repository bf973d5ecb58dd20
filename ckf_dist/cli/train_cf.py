"""Train the CF model (CKEM) and export its tables: single process, torchrun/deepspeed, or a Ray Train job.

    python launchers/train_cf.py --config configs/ml100k.yaml cf.model=lightgcn       # one process
    ckf-dist train-cf --config configs/ml100k.yaml cf.model=lightgcn                   # the same
    torchrun --nproc_per_node 2 launchers/train_cf.py --config configs/ml100k.yaml    # 2 data-parallel ranks
    python launchers/train_cf.py --ray-workers 2 --config configs/ml100k.yaml         # Ray Train, 2 workers

Under torchrun/deepspeed the process group is started here (NCCL with CUDA, gloo otherwise) and every rank
trains on its shard of each global batch; rank 0 writes the tables to cf.embeddings_path (default
<log.run_dir>/cf/embeddings.safetensors) and prints the final metrics as JSON.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence

from ckf_dist.cli import config_from_args, run_parser


def main(argv: Sequence[str] | None = None, prog: str = "ckf-dist train-cf") -> None:
    p = run_parser(prog, __doc__)
    p.add_argument("--ray-workers", type=int, default=0, metavar="N",
                   help="run as a Ray Train job with N workers (default 0: this process, or the torchrun ranks)")
    args = p.parse_intermixed_args(argv)
    if args.ray_workers < 0:
        p.error(f"--ray-workers must be >= 0, got {args.ray_workers}")
    cfg = config_from_args(args)
    if args.ray_workers:
        from ckf_dist.cf.ray_runner import run_ray_train

        print(json.dumps(run_ray_train(cfg, args.ray_workers), indent=2))
        return
    import torch
    import torch.distributed as dist

    from ckf_dist.cf.train_cf import train_cf

    started = False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = cfg.train.backend if cfg.train.backend != "auto" else ("nccl" if torch.cuda.is_available()
                                                                       else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.train.collective_timeout_s))
        started = True
    try:
        metrics = train_cf(cfg)
        if not started or dist.get_rank() == 0:
            print(json.dumps(metrics, indent=2))
    finally:
        if started:
            dist.destroy_process_group()
