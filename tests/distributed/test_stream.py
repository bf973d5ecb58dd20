"""2 gloo ranks stream the prompt shards: disjoint samples, union == the split, equal counts, exact resume."""

from __future__ import annotations

import pytest

from ckf_dist.config import DataConfig, SyntheticConfig
from ckf_dist.testing.ranks import run_ranks


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    from ckf_dist.data.preprocess import prepare_data

    d = tmp_path_factory.mktemp("stream") / "data"
    cfg = DataConfig(prepared_dir=str(d), synthetic=SyntheticConfig(num_users=30, num_items=40, max_interactions=12),
                     shard_size=25)
    prepare_data(cfg, engine="local")
    return str(d)


def _stream_two_epochs(rank: int, world: int, prepared_dir: str, tasks: list[str]) -> dict:
    import torch.distributed as dist

    from ckf_dist.data.stream import TaskStream

    out = {}
    for task in tasks:
        s = TaskStream(prepared_dir, "train", task, rank, world, seed=3)
        epochs = [[next(s)["key"] for _ in range(s.epoch_size)] for _ in range(2)]
        # Every rank must agree on the number of batches per epoch (no rank waits forever at an epoch end).
        n = [None] * world
        dist.all_gather_object(n, s.epoch_size)
        out[task] = {"epochs": epochs, "sizes": n, "num_samples": s.num_samples}
    return out


@pytest.mark.distributed
def test_two_ranks_disjoint_union_equal(prepared):
    tasks = ["ctr", "topk", "rating", "exp"]
    res0, res1 = run_ranks(_stream_two_epochs, world=2, args=(prepared, tasks), timeout=90)
    for task in tasks:
        _check(prepared, task, res0[task], res1[task])


def _check(prepared: str, task: str, r0: dict, r1: dict) -> None:
    from ckf_dist.data.prompts import load_samples

    all_keys = {s["key"] for s in load_samples(prepared, "train", [task])}
    n = len(all_keys)
    assert r0["num_samples"] == r1["num_samples"] == n
    assert r0["sizes"] == r1["sizes"] == [(n + 1) // 2] * 2
    for e in range(2):
        a, b = r0["epochs"][e], r1["epochs"][e]
        assert len(a) == len(b)
        assert set(a) | set(b) == all_keys  # union == the whole split
        # Disjoint up to the documented padding (n odd: exactly one sample repeats).
        assert len(a) + len(b) - len(set(a) | set(b)) == len(a) + len(b) - n == n % 2
    # A new permutation each epoch.
    assert r0["epochs"][0] != r0["epochs"][1]
