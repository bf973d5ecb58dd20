"""RayTaskStream without Ray (its rank-local reader reads the same chunks): the split of an epoch into ranks and
windows, disjoint equal shares, exact resume across window and epoch ends, bounded reading, wrong-state errors."""

from __future__ import annotations

import numpy as np
import pytest

from ckf_dist.config import DataConfig, SyntheticConfig


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    from ckf_dist.data.preprocess import prepare_data

    d = tmp_path_factory.mktemp("rstream") / "data"
    # shard_size 7: many shards and a short last one, so chunks cross shard ends and the padding wraps round.
    prepare_data(DataConfig(prepared_dir=str(d), tasks=["ctr", "rating"], shard_size=7,
                            synthetic=SyntheticConfig(num_users=20, num_items=30, max_interactions=10)), engine="local")
    return str(d)


@pytest.mark.parametrize("sizes,world,window", [((7, 7, 3), 2, 4), ((7, 7, 3), 4, 100), ((5,), 3, 1),
                                                ((2,), 5, 2), ((4, 4, 4, 1), 3, 3)])
def test_epoch_chunks_split_rows_into_equal_disjoint_windows(sizes, world, window):
    from ckf_dist.data.ray_stream import Chunk, ShardLayout, epoch_chunks

    layout = ShardLayout(tuple(f"s{i}" for i in range(len(sizes))), sizes)  # type: ignore[arg-type]
    order = np.random.default_rng(0).permutation(len(sizes))
    n, size = sum(sizes), -(-sum(sizes) // world)
    rows = []
    for r in range(world):
        chunks = epoch_chunks(layout, r, world, window, order)
        assert sum(c.hi - c.lo for c in chunks) == size
        assert all(0 <= c.lo < c.hi <= sizes[c.shard] for c in chunks)
        per_window: dict[int, int] = {}
        for c in chunks:
            per_window[c.window] = per_window.get(c.window, 0) + c.hi - c.lo
        assert list(per_window) == list(range(len(per_window)))
        assert all(v == window for v in list(per_window.values())[:-1]) and per_window[len(per_window) - 1] <= window
        rows += [(c.shard, k) for c in chunks for k in range(c.lo, c.hi)]
    assert set(rows) == {(s, k) for s, m in enumerate(sizes) for k in range(m)}  # every row, once...
    assert len(rows) - n == (-n) % world  # ...plus the padding repeats
    assert isinstance(chunks[0], Chunk)


@pytest.mark.parametrize("world,window", [(1, 5), (3, 4), (4, 1000)])
def test_ranks_cover_the_split_and_reshuffle_each_epoch(prepared, world, window):
    from ckf_dist.data.prompts import load_samples
    from ckf_dist.data.ray_stream import RayTaskStream

    streams = [RayTaskStream(prepared, "train", "rating", r, world, seed=1, window=window, reader="local")
               for r in range(world)]
    n = streams[0].num_samples
    assert n == len(load_samples(prepared, "train", ["rating"]))
    epochs = [[[next(s)["key"] for _ in range(s.epoch_size)] for s in streams] for _ in range(2)]
    for keys in epochs:
        assert {len(k) for k in keys} == {-(-n // world)}
        flat = [k for ks in keys for k in ks]
        assert len(set(flat)) == n and len(flat) - n == (-n) % world
    assert epochs[0] != epochs[1] and all(s.epoch == 1 for s in streams)


def test_resume_is_exact_across_window_and_epoch_ends(prepared):
    from ckf_dist.data.ray_stream import RayTaskStream

    def make():
        return RayTaskStream(prepared, "train", "ctr", 1, 2, seed=5, window=6, reader="local")

    ref = make()
    want = [next(ref)["key"] for _ in range(3 * ref.epoch_size)]
    for stop in (0, 5, 6, 7, ref.epoch_size - 1, ref.epoch_size, ref.epoch_size + 13):
        a = make()
        head = [next(a)["key"] for _ in range(stop)]
        b = make()
        b.load_state_dict(a.state_dict())
        assert head + [next(b)["key"] for _ in range(len(want) - stop)] == want, stop
        a.close()
        b.close()


def test_a_rank_reads_at_most_a_window_ahead(prepared):
    from ckf_dist.data.ray_stream import RayTaskStream

    lazy = RayTaskStream(prepared, "train", "ctr", 0, 1, seed=0, window=8, reader="local", read_ahead=False)
    ahead = RayTaskStream(prepared, "train", "ctr", 0, 1, seed=0, window=8, reader="local")
    assert lazy.epoch_size > 48
    for k in range(1, 41):
        assert next(lazy) == next(ahead)
        assert lazy.rows_read == -(-k // 8) * 8  # exactly the windows begun, nothing of the next
        ahead._ahead[1].result()
        assert ahead.rows_read == (-(-k // 8) + 1) * 8  # ...and, reading ahead, the next window
    assert len(ahead._current[2]) <= 8
    ahead.close()


def test_states_of_the_other_stream_kind_or_shape_are_refused(prepared):
    from ckf_dist.data.ray_stream import RayTaskStream
    from ckf_dist.data.stream import TaskStream

    ray_state = RayTaskStream(prepared, "train", "ctr", 0, 2, seed=5, window=6, reader="local").state_dict()
    local_state = TaskStream(prepared, "train", "ctr", 0, 2, seed=5).state_dict()
    with pytest.raises(ValueError, match="data.stream=local"):
        RayTaskStream(prepared, "train", "ctr", 0, 2, seed=5, window=6, reader="local").load_state_dict(local_state)
    with pytest.raises(ValueError, match="data.stream=ray"):
        TaskStream(prepared, "train", "ctr", 0, 2, seed=5).load_state_dict(ray_state)
    with pytest.raises(ValueError, match="data.stream_window=6"):
        RayTaskStream(prepared, "train", "ctr", 0, 2, seed=5, window=7, reader="local").load_state_dict(ray_state)
    with pytest.raises(ValueError, match="world"):
        RayTaskStream(prepared, "train", "ctr", 0, 3, seed=5, window=6, reader="local").load_state_dict(ray_state)


def test_stream_choice_and_manifest_errors(prepared, tmp_path, monkeypatch):
    import json
    import shutil

    from ckf_dist.data.ray_stream import RayTaskStream, resolve_stream
    from ckf_dist.data.stream import TaskStream, task_streams

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_stream("local") == "local" and resolve_stream("ray") == "ray"
    kind, streams = task_streams(DataConfig(prepared_dir=prepared, tasks=["ctr"], stream="auto"), "train", 0, 1)
    assert kind == "local" and isinstance(streams["ctr"], TaskStream)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a node of a Ray cluster (Ray Train workers: test_data_ray_train)
    assert resolve_stream("auto") == "ray"

    broken = tmp_path / "data"
    shutil.copytree(prepared, broken)
    man = json.loads((broken / "manifest.json").read_text())
    (broken / man["shards"]["train"]["ctr"][1]).unlink()
    with pytest.raises(FileNotFoundError, match="ctr-shard-000001.tar"):
        RayTaskStream(broken, "train", "ctr", reader="local")
    man["counts"]["train"]["rating"] += 7
    (broken / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="do not fill"):
        RayTaskStream(broken, "train", "rating", reader="local")
    with pytest.raises(ValueError, match="no shards for split='train' task='exp'"):
        RayTaskStream(broken, "train", "exp", reader="local")
