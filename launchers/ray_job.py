"""Run the main job as a Ray Train job: one worker per GPU (or CPU process), the same `run_pipeline(cfg)` on each.

    python launchers/ray_job.py --num-workers 8 --gpu --config configs/ml100k.yaml       # on the cluster head
    ray job submit --working-dir . -- python launchers/ray_job.py --num-workers 8 --gpu --config ...

Ray Train creates the torch process group (NCCL on GPUs, gloo on CPUs); `run_pipeline` joins it instead of creating one.
Prepared data, checkpoints and reports go to log.run_dir / data.prepared_dir, which must be on storage every node
sees (NFS, Lustre) in a multi-node cluster.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckf_dist.cli import parse_run_args
from ckf_dist.netbind import loopback_interface, ray_train_torch_config


def _worker(config: dict) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config["gpu"] else "cpu")
    from ckf_dist.config import config_from_dict
    from ckf_dist.pipeline import RunStopped, run_pipeline

    try:
        run_pipeline(config_from_dict(config["cfg"]))
    except RunStopped as e:  # a checkpoint is written; the worker ends cleanly and a rerun resumes
        print(f"[ckf] {e}; rerun the same command to resume", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: connect or start local)")
    args, rest = p.parse_known_args()
    cfg = parse_run_args(rest, "launchers/ray_job.py")
    import ray
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    local = not (ray.is_initialized() or args.address or os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():
        if not local:
            # A cluster: its nodes bind as `ray start` set them up (cluster/ray/cluster.yaml); nothing changes here.
            ray.init(address=args.address)
        else:
            # One machine: every Ray process on 127.0.0.1. Ray binds its servers to the node IP, loopback only in its
            # single-machine mode (read at `import ray`, hence the constant too); the Ray Train workers inherit this
            # env, so their gloo sockets are on the loopback interface too.
            from ray._private import ray_constants

            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            ray_constants.ENABLE_RAY_CLUSTER = False
            if (lo := loopback_interface()) is not None:
                os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
            ray.init(num_cpus=max(cfg.data.ray_num_cpus, args.num_workers + 2),
                     object_store_memory=cfg.data.ray_object_store_mb * 2**20, include_dashboard=False)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.to_dict(), "gpu": args.gpu},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.gpu),
        # Local Ray: the workers' process group on 127.0.0.1 too (store and gloo); a cluster keeps Ray Train's own.
        torch_config=ray_train_torch_config("nccl" if args.gpu else "gloo", cfg.train.collective_timeout_s,
                                            single_node=local),
        run_config=RayRunConfig(name="ckf", storage_path=os.path.abspath(os.path.join(cfg.log.run_dir, "ray"))),
    )
    result = trainer.fit()
    if result.error:
        raise SystemExit(f"Ray Train job failed: {result.error}")


if __name__ == "__main__":
    main()
