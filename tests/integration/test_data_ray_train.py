"""Under Ray Train (2 CPU workers): both ways in -- TaskStream on the shared prepared_dir and the Ray Train dataset
shard (get_dataset_shard via RayShardStream) -- give each worker a disjoint, equal share of the split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckf_dist.config import DataConfig, SyntheticConfig


def _worker(config: dict) -> None:
    import ray.train

    from ckf_dist.data.ray_stream import RayShardStream
    from ckf_dist.data.stream import TaskStream

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ts = TaskStream(config["prepared"], "train", "rating", rank, world, seed=0)
    own = [next(ts)["key"] for _ in range(ts.epoch_size)]
    shard = RayShardStream("rating")  # ray.train.get_dataset_shard("train_rating")
    ray_keys = []
    while shard.epoch == 0:
        ray_keys.append(next(shard)["key"])
    ray_keys.pop()  # first sample of the next epoch
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"task_stream": own, "ray": ray_keys}))


@pytest.mark.slow
def test_ray_train_workers_get_disjoint_equal_shares(tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ckf_dist.data.preprocess import init_local_ray, prepare_data
    from ckf_dist.data.prompts import load_samples
    from ckf_dist.data.ray_stream import dataset_name, ray_dataset

    prepared = tmp_path / "data"
    prepare_data(DataConfig(prepared_dir=str(prepared), tasks=["rating"],
                            synthetic=SyntheticConfig(num_users=40, num_items=30, max_interactions=10)), engine="local")
    keys = {s["key"] for s in load_samples(prepared, "train", ["rating"])}
    started = init_local_ray(num_cpus=4, object_store_mb=200)
    try:
        trainer = TorchTrainer(
            _worker, train_loop_config={"prepared": str(prepared), "out": str(tmp_path)},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            torch_config=TorchConfig(backend="gloo"),
            datasets={dataset_name("train", "rating"): ray_dataset(prepared, "train", "rating")},
            run_config=RunConfig(name="stream", storage_path=str(tmp_path / "ray")))
        result = trainer.fit()
        assert result.error is None
    finally:
        if started:
            ray.shutdown()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    # TaskStream: equal shares, union == the split, overlap only the documented padding.
    a, b = r0["task_stream"], r1["task_stream"]
    assert len(a) == len(b) == -(-len(keys) // 2) and set(a) | set(b) == keys
    assert len(set(a) & set(b)) == len(keys) % 2
    # Ray Train shard (streaming_split(equal=True)): equal shares, disjoint, at most world - 1 rows dropped.
    a, b = r0["ray"], r1["ray"]
    assert len(a) == len(b) > 0 and not set(a) & set(b)
    assert len(keys) - 1 <= len(set(a) | set(b)) and set(a) | set(b) <= keys
