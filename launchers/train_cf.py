"""Train the CF model (CKEM) and export its tables: single process, torchrun/deepspeed, or a Ray Train job.

    python launchers/train_cf.py --config configs/ml100k.yaml cf.model=lightgcn       # one process
    torchrun --nproc_per_node 2 launchers/train_cf.py --config configs/ml100k.yaml    # 2 data-parallel ranks
    python launchers/train_cf.py --ray-workers 2 --config configs/ml100k.yaml         # Ray Train, 2 workers

Under torchrun/deepspeed the process group is started here (NCCL with CUDA, gloo otherwise) and every rank
trains on its shard of each global batch; rank 0 writes the tables to cf.embeddings_path (default
<log.run_dir>/cf/embeddings.safetensors) and prints the final metrics as JSON.
"""

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckf_dist.cli import parse_run_args


def main() -> None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--ray-workers", type=int, default=0, help="run as a Ray Train job with this many workers")
    args, rest = p.parse_known_args()
    cfg = parse_run_args(rest, "launchers/train_cf.py", __doc__.splitlines()[0])
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


if __name__ == "__main__":
    main()
