"""TaskStream without processes: padding arithmetic, per-epoch reshuffle, exact resume, wrong-state errors."""

from __future__ import annotations

import pytest

from ckf_dist.config import DataConfig, SyntheticConfig


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    from ckf_dist.data.preprocess import prepare_data

    d = tmp_path_factory.mktemp("ustream") / "data"
    prepare_data(DataConfig(prepared_dir=str(d), tasks=["ctr", "rating"],
                            synthetic=SyntheticConfig(num_users=20, num_items=30, max_interactions=10)), engine="local")
    return str(d)


@pytest.mark.parametrize("world", [1, 3, 4])
def test_ranks_cover_split_with_equal_sizes(prepared, world):
    from ckf_dist.data.stream import TaskStream

    streams = [TaskStream(prepared, "train", "rating", r, world, seed=1) for r in range(world)]
    n = streams[0].num_samples
    keys = [[next(s)["key"] for _ in range(s.epoch_size)] for s in streams]
    assert {len(k) for k in keys} == {-(-n // world)}
    flat = [k for ks in keys for k in ks]
    assert len(set(flat)) == n
    assert len(flat) - n == (-n) % world  # padding only


def test_resume_continues_exactly(prepared):
    from ckf_dist.data.stream import TaskStream

    a = TaskStream(prepared, "train", "ctr", 1, 2, seed=5)
    for _ in range(a.epoch_size + 3):  # into the second epoch
        next(a)
    state = a.state_dict()
    expected = [next(a)["key"] for _ in range(a.epoch_size)]
    b = TaskStream(prepared, "train", "ctr", 1, 2, seed=5)
    b.load_state_dict(state)
    assert [next(b)["key"] for _ in range(b.epoch_size)] == expected
    assert state["epoch"] == 1 and state["position"] == 3


def test_resume_refuses_other_world(prepared):
    from ckf_dist.data.stream import TaskStream

    state = TaskStream(prepared, "train", "ctr", 0, 2, seed=5).state_dict()
    with pytest.raises(ValueError, match="world"):
        TaskStream(prepared, "train", "ctr", 0, 3, seed=5).load_state_dict(state)


def test_missing_task_names_it(prepared):
    from ckf_dist.data.stream import TaskStream

    with pytest.raises(FileNotFoundError, match="topk"):
        TaskStream(prepared, "train", "topk", 0, 1)
