"""Run the main job as a Ray Train job: one worker per GPU (or CPU process), the same pipeline on each.

    ckf-dist ray-job --num-workers 2 --config configs/demo.yaml                      # a local Ray on 127.0.0.1
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python launchers/ray_job.py --num-workers 16 --storage /shared/ckf --config configs/llama7b_ml1m.yaml

Joins the cluster of --address / RAY_ADDRESS (`ray job submit` sets it for the driver) without asking for resources,
else starts a small local Ray. Ray Train creates the torch process group (NCCL with GPUs, gloo without) and DeepSpeed
adopts it.

Storage root (--storage, else $CKF_STORAGE, else the working directory on a local Ray): relative log.run_dir,
data.prepared_dir and cf.embeddings_path are resolved under it on the driver, so every node and the driver read and
write the same files; on a cluster it must be a shared file system (NFS, Lustre, a mounted bucket), and a cluster
job with relative paths and no storage root is refused (each node would write its own copy inside Ray's session
folders). Ray Train's own files (reported checkpoints, results) go to <storage>/ray.

Failures: every complete checkpoint is reported to Ray Train, and a lost worker restarts the worker group (up to
--max-failures times); the restarted pipeline resumes from the newest complete checkpoint in log.run_dir, exactly as
a rerun of the deepspeed launcher does.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckf_dist.cli import config_from_args, run_parser
from ckf_dist.config import RunConfig

OUTPUT_PATHS = (("log", "run_dir"), ("data", "prepared_dir"), ("cf", "embeddings_path"))
"""Config fields written by the job: resolved under the storage root."""


def parser(prog: str) -> argparse.ArgumentParser:
    p = run_parser(prog, __doc__)
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers = ranks (default 2)")
    p.add_argument("--gpu", choices=("auto", "on", "off"), default="auto",
                   help="one GPU per worker: auto = when the cluster has GPUs (default), on = require, off = CPU")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray on 127.0.0.1)")
    p.add_argument("--storage", default=None,
                   help="storage root every node sees (default: $CKF_STORAGE; on a local Ray the working directory)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="worker-group restarts after a lost worker before the job fails (default 2; -1: no limit)")
    return p


def storage_root(storage: str | None, on_cluster: bool, cfg: RunConfig) -> Path:
    """The absolute storage root; refuses a cluster job whose outputs would land in per-node session folders."""
    storage = storage or os.environ.get("CKF_STORAGE")
    if storage:
        root = Path(storage).expanduser()
        if not root.is_absolute():
            raise SystemExit(f"error: --storage / CKF_STORAGE must be an absolute path, got {storage!r}")
        return root
    relative = [f"{s}.{k}={v}" for s, k in OUTPUT_PATHS if (v := getattr(getattr(cfg, s), k)) is not None
                and not Path(v).is_absolute()]
    if on_cluster and relative:
        raise SystemExit(f"error: a Ray cluster job with relative output paths ({', '.join(relative)}) and no "
                         f"storage root: each node would write its own copy inside Ray's session folder. Pass "
                         f"--storage /a/shared/path (or set CKF_STORAGE), or give absolute paths on shared storage")
    return Path.cwd()


def resolve_outputs(cfg: RunConfig, root: Path) -> dict[str, Any]:
    """The config as a dict with every relative output path made absolute under `root`, progress bars off (worker
    output reaches the job log line by line)."""
    d = cfg.to_dict()
    for section, key in OUTPUT_PATHS:
        v = d[section].get(key)
        if v is not None and not Path(v).is_absolute():
            d[section][key] = str(root / v)
    d["log"]["progress"] = False
    return d


def use_gpus(choice: str) -> bool:
    import ray

    have = ray.cluster_resources().get("GPU", 0) >= 1
    if choice == "on" and not have:
        raise SystemExit("error: --gpu on, but the Ray cluster has no GPU (ray.cluster_resources())")
    return have if choice == "auto" else choice == "on"


def _worker(config: dict[str, Any]) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config["gpu"] else "cpu")
    import ray.train

    from ckf_dist.config import config_from_dict
    from ckf_dist.netbind import quiet_ray_data
    from ckf_dist.pipeline import RunStopped, run_pipeline

    quiet_ray_data(False)
    ctx = ray.train.get_context()
    if (restored := ray.train.get_checkpoint()) is not None and ctx.get_world_rank() == 0:
        print(f"[ckf] Ray Train restarted the workers (last reported checkpoint {restored.path}); resuming from the "
              f"newest complete checkpoint in log.run_dir", flush=True)

    def report(path: Path, step: int, metrics: dict[str, float]) -> None:
        # Every worker reports (Ray Train expects it); rank 0 attaches the checkpoint, which Ray copies to its storage.
        ckpt = ray.train.Checkpoint.from_directory(str(path)) if ctx.get_world_rank() == 0 else None
        ray.train.report({"step": step, **{k.replace("/", "_"): v for k, v in metrics.items()}}, checkpoint=ckpt)

    try:
        run_pipeline(config_from_dict(config["cfg"]), on_checkpoint=report)
    except RunStopped as e:  # a checkpoint is written; the worker ends cleanly and a rerun resumes
        print(f"[ckf] {e}; rerun the same command to resume", flush=True)


def main(argv: Sequence[str] | None = None, prog: str = "ckf-dist ray-job") -> None:
    args = parser(prog).parse_intermixed_args(argv)
    if args.num_workers < 1:
        raise SystemExit(f"error: --num-workers must be >= 1, got {args.num_workers}")
    cfg = config_from_args(args)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    from ckf_dist.netbind import connect_ray, ray_train_torch_config

    on_cluster = bool(ray.is_initialized() or args.address or os.environ.get("RAY_ADDRESS"))
    root = storage_root(args.storage, on_cluster, cfg)
    connect_ray(max(cfg.data.ray_num_cpus, args.num_workers + 2), cfg.data.ray_object_store_mb, args.address)
    gpu = use_gpus(args.gpu)
    cfg_dict = resolve_outputs(cfg, root)
    print(f"[ckf] Ray job: {args.num_workers} workers ({'GPU' if gpu else 'CPU'}), run dir "
          f"{cfg_dict['log']['run_dir']}, Ray Train storage {root / 'ray'}", flush=True)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg_dict, "gpu": gpu},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=gpu),
        # Local Ray: the workers' process group on 127.0.0.1 too (store and gloo); a cluster keeps Ray Train's own.
        torch_config=ray_train_torch_config("nccl" if gpu else "gloo", cfg.train.collective_timeout_s,
                                            single_node=not on_cluster),
        run_config=RayRunConfig(name=Path(cfg_dict["log"]["run_dir"]).name or "ckf", storage_path=str(root / "ray"),
                                failure_config=FailureConfig(max_failures=args.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.ckpt_keep)),
    )
    result = trainer.fit()
    if result.error:
        print(f"error: Ray Train job failed: {result.error}", file=sys.stderr)
        raise SystemExit(1)
