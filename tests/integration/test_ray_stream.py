"""RayTaskStream on a local Ray: Ray Data tasks read each rank's chunks and hand them back in order, so every rank
gets exactly what its rank-local oracle reads (disjoint, every sample once per epoch), and a resume through Ray
Data continues sample for sample."""

from __future__ import annotations

import pytest

from ckf_dist.config import DataConfig, SyntheticConfig


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    from ckf_dist.data.preprocess import prepare_data

    d = tmp_path_factory.mktemp("raystream") / "data"
    prepare_data(DataConfig(prepared_dir=str(d), tasks=["ctr"], shard_size=40,
                            synthetic=SyntheticConfig(num_users=60, num_items=40, max_interactions=12)), engine="local")
    return str(d)


@pytest.mark.slow
def test_ray_data_reads_match_the_local_oracle_and_resume_exactly(prepared, local_ray):
    from ckf_dist.data.prompts import load_samples
    from ckf_dist.data.ray_stream import RayTaskStream

    keys = {s["key"] for s in load_samples(prepared, "train", ["ctr"])}
    world, window = 3, 25

    def make(rank: int, reader: str) -> RayTaskStream:
        return RayTaskStream(prepared, "train", "ctr", rank, world, seed=2, window=window, reader=reader)

    got = {}
    for r in range(world):
        ray_s, local_s = make(r, "ray"), make(r, "local")
        n = 2 * ray_s.epoch_size + 3  # two epochs and into the third
        got[r] = [next(ray_s)["key"] for _ in range(n)]
        assert got[r] == [next(local_s)["key"] for _ in range(n)], r
        ray_s.close()
    size = -(-len(keys) // world)
    assert len(keys) > 4 * window and len(keys) > 3 * 40  # several windows and shards per rank
    for e in range(2):
        flat = [k for r in range(world) for k in got[r][e * size:(e + 1) * size]]
        assert set(flat) == keys and len(flat) - len(keys) == (-len(keys)) % world

    # Resume in the middle of a window of the second epoch: a new stream, a new Ray Data read from that window.
    a = make(1, "ray")
    head = [next(a)["key"] for _ in range(size + 37)]
    b = make(1, "ray")
    b.load_state_dict(a.state_dict())
    a.close()
    assert head + [next(b)["key"] for _ in range(len(got[1]) - len(head))] == got[1]
    b.close()
