"""Runs the CF training (CKEM, train_cf.py) as a Ray Train job: `TorchTrainer` starts the data-parallel workers
and their gloo/NCCL process group, and every worker calls `train_cf` as a torchrun rank would. The driver reads
rank 0's metrics back from the run directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ckf_dist.cf.train_cf import train_cf
from ckf_dist.config import RunConfig


def run_ray_train(cfg: RunConfig, num_workers: int) -> dict[str, float | None]:
    """Run `train_cf(cfg)` as a Ray Train TorchTrainer job with `num_workers` data-parallel workers.

    Connects to the cluster named by RAY_ADDRESS, else starts a small local Ray. Returns rank 0's metrics (read
    back from <log.run_dir>/cf/metrics.json, which must be on storage the driver sees).

    Raises:
        ValueError: num_workers < 1.
        RuntimeError: the Ray job failed (its error is chained).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from ckf_dist.netbind import connect_ray, ray_train_torch_config

    connect_ray(max(8, num_workers + 2), 512)  # RAY_ADDRESS: the cluster's own resources
    use_gpu = torch.cuda.is_available()
    cfg_dict = cfg.to_dict()
    # Ray workers may run in another working directory: hand them absolute paths.
    cfg_dict["data"]["prepared_dir"] = str(Path(cfg.data.prepared_dir).resolve())
    cfg_dict["log"]["run_dir"] = str(Path(cfg.log.run_dir).resolve())
    cfg_dict["cf"]["embeddings_path"] = str(cfg.cf_embeddings_path.resolve())
    cfg_dict["log"]["progress"] = False  # worker stdout is forwarded line by line; a bar would flood it
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg_dict},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        # On a local Ray the workers' group binds to 127.0.0.1 (Ray Train's default puts torch's store on every
        # interface); on a cluster Ray Train's own set-up, which the other nodes can reach.
        torch_config=ray_train_torch_config("nccl" if use_gpu else "gloo", cfg.train.collective_timeout_s,
                                            single_node=not os.environ.get("RAY_ADDRESS")),
        run_config=RayRunConfig(name="cf", storage_path=str(Path(cfg.log.run_dir, "ray").resolve())),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; keep the chain, name the job
        raise RuntimeError(f"Ray Train CF job ({num_workers} workers) failed: {e}") from e
    if getattr(result, "error", None):
        raise RuntimeError(f"Ray Train CF job ({num_workers} workers) failed: {result.error}")
    # Ray Train v2 keeps reported metrics only alongside checkpoints; rank 0's metrics.json is the record.
    return json.loads((Path(cfg_dict["log"]["run_dir"]) / "cf" / "metrics.json").read_text())


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train

    from ckf_dist.config import config_from_dict

    metrics = train_cf(config_from_dict(config["cfg"]))
    ray.train.report({k: v for k, v in metrics.items() if v is not None})
