"""Under Ray Train (2 CPU workers): both streams -- TaskStream on the shared prepared_dir and RayTaskStream, which
reads through Ray Data from inside the workers -- give each worker a disjoint, equal share of the split, and the
Ray Data stream gives each worker exactly the samples of its rank-local oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckf_dist.config import DataConfig, SyntheticConfig


def _worker(config: dict) -> None:
    import ray.train

    from ckf_dist.data.ray_stream import RayTaskStream, resolve_stream
    from ckf_dist.data.stream import TaskStream

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ts = TaskStream(config["prepared"], "train", "rating", rank, world, seed=0)
    own = [next(ts)["key"] for _ in range(ts.epoch_size)]
    out = {"auto": resolve_stream("auto"), "task_stream": own}
    for reader in ("ray", "local"):
        s = RayTaskStream(config["prepared"], "train", "rating", rank, world, seed=0, window=16, reader=reader)
        out[reader] = [next(s)["key"] for _ in range(2 * s.epoch_size)]
        s.close()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_ray_train_workers_get_disjoint_equal_shares(tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ckf_dist.data.preprocess import init_local_ray, prepare_data
    from ckf_dist.data.prompts import load_samples

    prepared = tmp_path / "data"
    prepare_data(DataConfig(prepared_dir=str(prepared), tasks=["rating"], shard_size=20,
                            synthetic=SyntheticConfig(num_users=40, num_items=30, max_interactions=10)), engine="local")
    keys = {s["key"] for s in load_samples(prepared, "train", ["rating"])}
    started = init_local_ray(num_cpus=4, object_store_mb=200)
    try:
        trainer = TorchTrainer(
            _worker, train_loop_config={"prepared": str(prepared), "out": str(tmp_path)},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name="stream", storage_path=str(tmp_path / "ray")))
        result = trainer.fit()
        assert result.error is None
    finally:
        if started:
            ray.shutdown()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["auto"] == r1["auto"] == "ray"  # data.stream=auto inside a Ray Train worker
    for name in ("task_stream", "ray"):  # equal shares, union == the split, overlap only the documented padding
        size = -(-len(keys) // 2)
        a, b = r0[name][:size], r1[name][:size]
        assert len(a) == len(b) == size and set(a) | set(b) == keys, name
        assert len(set(a) & set(b)) == len(keys) % 2, name
    assert r0["ray"] == r0["local"] and r1["ray"] == r1["local"]  # two epochs, sample for sample
    assert r0["ray"][:size] != r0["ray"][size:]  # reshuffled per epoch
