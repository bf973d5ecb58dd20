"""The distributed 'ray' data engine (data/ray_preprocess.py) against the single-process oracle: the same input,
config and seed give byte-identical files (and the same manifest), with the interaction table never built on the
driver."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ckf_dist.config import ColumnMap, DataConfig, SyntheticConfig


def _both(tmp_path, **cfg_kw) -> tuple[dict, dict]:
    from ckf_dist.data.preprocess import prepare_data

    a = prepare_data(DataConfig(prepared_dir=str(tmp_path / "ray"), **cfg_kw), engine="ray")
    b = prepare_data(DataConfig(prepared_dir=str(tmp_path / "local"), **cfg_kw), engine="local")
    return a, b


def _same(a: dict, b: dict) -> None:
    assert [(k, v["sha256"]) for k, v in a["files"].items()] == [(k, v["sha256"]) for k, v in b["files"].items()]
    a, b = ({k: v for k, v in m.items() if k != "build_seconds"} for m in (a, b))
    assert a == b


def _messy_table(path, rng: np.random.Generator) -> None:
    """A Parquet table in several row groups with what the protocol drops: re-ratings of a (user, item), users
    and items under the k-core, users with fewer than 3 rows, and rows the reader skips (with file:row examples)."""
    n_users, n_items = 220, 70
    users, items, ratings, stamps, reviews, titles = [], [], [], [], [], []
    for u in range(n_users):
        k = int(rng.integers(1, 14))
        for i in rng.choice(n_items, size=k, replace=False):
            for _ in range(1 + int(rng.random() < 0.15)):  # some (user, item) pairs rated twice
                users.append(f"user{u:04d}")
                items.append(f"it{i:03d}")
                ratings.append(float(rng.integers(1, 6)))
                stamps.append(int(1_600_000_000 + rng.integers(0, 5_000_000)))
                reviews.append("" if rng.random() < 0.1 else f"review {u} {i} good")
                titles.append(f"Title {i % 50}")  # repeated titles: made unique with the raw id
    order = rng.permutation(len(users))
    cols = {name: [col[j] for j in order] for name, col in
            (("uid", users), ("iid", items), ("stars", ratings), ("time", stamps), ("text", reviews),
             ("name", titles))}
    for j in (5, 300, 1700):  # one of each skip reason, in different row groups
        cols["uid"][j] = ""
        cols["stars"][j + 1] = 9.0
        cols["time"][j + 2] = -1
    pq.write_table(pa.table(cols), path, row_group_size=400)


@pytest.mark.slow
def test_synthetic_kcore_same_bytes(tmp_path, local_ray):
    syn = SyntheticConfig(num_users=300, num_items=80, min_interactions=3, max_interactions=25)
    a, b = _both(tmp_path, synthetic=syn, shard_size=50, k_core=3, tasks=["ctr", "rating", "topk"])
    _same(a, b)
    assert a["skips"]["counts"]["k_core_filtered"] > 0
    assert len(a["shards"]["train"]["ctr"]) > 5  # shard boundaries fall inside and across partitions


@pytest.mark.slow
def test_messy_table_same_bytes(tmp_path, local_ray, monkeypatch):
    from ckf_dist.data import ray_preprocess

    # Several read blocks and partitions at this size (the real sizes are 500k rows).
    monkeypatch.setattr(ray_preprocess, "ROWS_PER_READ", 700)
    monkeypatch.setattr(ray_preprocess, "ROWS_PER_PARTITION", 300)
    path = tmp_path / "inter.parquet"
    _messy_table(path, np.random.default_rng(3))
    cols = ColumnMap(user="uid", item="iid", rating="stars", timestamp="time", review="text", title="name")
    a, b = _both(tmp_path, source="table", path=str(path), columns=cols, k_core=2, shard_size=64, num_candidates=60,
                 max_skip_frac=0.01)
    _same(a, b)
    counts = a["skips"]["counts"]
    for reason in ("duplicate_interaction", "k_core_filtered", "user_fewer_than_3_interactions", "missing_field",
                   "rating_out_of_range", "bad_timestamp", "exp_no_review_text", "topk_not_enough_unseen_items"):
        assert counts.get(reason, 0) > 0, reason
    assert [e["line"] for e in a["skips"]["examples"]["missing_field"]] == [6, 301, 1701]


@pytest.mark.slow
def test_driver_never_builds_the_interaction_table(tmp_path, local_ray, monkeypatch):
    """Under engine 'ray' the driver calls none of the single-process table steps (the Ray workers import their own,
    unpatched copies): reading, dedup, k-core, ids/splits and the prompt build all run in workers."""
    from ckf_dist.data import preprocess, ray_preprocess, readers
    from ckf_dist.data.preprocess import prepare_data

    def refuse(*args, **kwargs):
        raise AssertionError("the driver built the interaction table")

    for mod, names in ((preprocess, ["read_raw", "dedup_latest", "k_core", "assign_ids_and_splits", "build_samples",
                                     "build_user_samples"]),
                       (ray_preprocess, ["dedup_latest", "assign_ids_and_splits", "build_user_samples",
                                         "_validate_records"]),
                       (readers, ["read_table", "read_tables", "_read_interactions"])):
        for name in names:
            monkeypatch.setattr(mod, name, refuse)
    syn = SyntheticConfig(num_users=150, num_items=60, max_interactions=15)
    m = prepare_data(DataConfig(prepared_dir=str(tmp_path / "ray"), synthetic=syn, k_core=2, shard_size=100),
                     engine="ray")
    assert m["counts"]["train"]["ctr"] > 0


def test_unsupported_inputs_are_named(tmp_path):
    from ckf_dist.data.ray_preprocess import distributed_unsupported

    assert distributed_unsupported(DataConfig()) is None
    assert distributed_unsupported(DataConfig(source="table", path=str(tmp_path / "t.parquet"))) is None
    assert "single-process reader" in distributed_unsupported(DataConfig(source="ml-100k", path=str(tmp_path)))
    assert "CSV" in distributed_unsupported(DataConfig(source="table", path=str(tmp_path / "t.csv")))
    label = DataConfig(source="table", path=str(tmp_path / "t.parquet"), columns=ColumnMap(label="click"),
                       tasks=["ctr"])
    assert "label" in distributed_unsupported(label)
