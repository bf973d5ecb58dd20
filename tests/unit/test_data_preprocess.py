"""prepare_data: byte-identical output per seed, idempotence, atomic writes, errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ckf_dist.config import ColumnMap, DataConfig, SyntheticConfig


def cfg_for(d: Path, **kw) -> DataConfig:
    kw.setdefault("synthetic", SyntheticConfig(num_users=20, num_items=30, max_interactions=10))
    return DataConfig(prepared_dir=str(d), **kw)


def _files(m: dict) -> dict[str, str]:
    return {k: v["sha256"] for k, v in m["files"].items()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    from ckf_dist.data.preprocess import prepare_data
    from ckf_dist.data.schema import manifest_sha256

    a = prepare_data(cfg_for(tmp_path / "a"), engine="local")
    b = prepare_data(cfg_for(tmp_path / "b"), engine="local")
    c = prepare_data(cfg_for(tmp_path / "c", seed=1), engine="local")
    assert _files(a) == _files(b)
    assert manifest_sha256(tmp_path / "a") == manifest_sha256(tmp_path / "b") != manifest_sha256(tmp_path / "c")
    assert _files(a)["prompts/train/ctr-shard-000000.tar"] != _files(c)["prompts/train/ctr-shard-000000.tar"]
    # The manifest's checksums are those of the files on disk.
    import hashlib

    for rel, sha in _files(a).items():
        assert hashlib.sha256((tmp_path / "a" / rel).read_bytes()).hexdigest() == sha


def test_idempotent_force_and_config_change(tmp_path):
    from ckf_dist.data.preprocess import prepare_data

    d = tmp_path / "d"
    m1 = prepare_data(cfg_for(d), engine="local")
    stamp = (d / "manifest.json").stat().st_mtime_ns
    m2 = prepare_data(cfg_for(d, ray_num_cpus=3), engine="local")  # Ray sizing does not change the data
    assert (d / "manifest.json").stat().st_mtime_ns == stamp and m2["counts"] == m1["counts"]
    prepare_data(cfg_for(d), force=True, engine="local")
    assert (d / "manifest.json").stat().st_mtime_ns != stamp
    m3 = prepare_data(cfg_for(d, tasks=["ctr"]), engine="local")
    assert list(m3["counts"]["train"]) == ["ctr"] and not (d / "prompts/train/rating-shard-000000.tar").exists()
    # A damaged dataset (a file gone) is rebuilt, not returned.
    (d / "users.parquet").unlink()
    prepare_data(cfg_for(d, tasks=["ctr"]), engine="local")
    assert (d / "users.parquet").is_file()


def test_crash_leaves_previous_dataset_intact(tmp_path, monkeypatch):
    import ckf_dist.data.preprocess as pre

    d = tmp_path / "d"
    pre.prepare_data(cfg_for(d), engine="local")
    before = (d / "manifest.json").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pre, "write_task_shards", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        pre.prepare_data(cfg_for(d, seed=5), engine="local")
    assert (d / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp folder left behind


def _table_file(tmp_path: Path, rows: list[tuple]) -> Path:
    p = tmp_path / "t.parquet"
    u, i, r, t = zip(*rows)
    pq.write_table(pa.table({"u": list(u), "i": list(i), "r": list(r), "t": list(t)}), p)
    return p


def test_duplicates_kcore_and_short_users_are_reported(tmp_path):
    from ckf_dist.data.preprocess import prepare_data

    rows = [("a", "x", 5.0, 1), ("a", "y", 4.0, 2), ("a", "z", 3.0, 3), ("a", "x", 1.0, 4),  # x re-rated later
            ("b", "x", 2.0, 1), ("b", "y", 4.0, 2), ("b", "z", 5.0, 3), ("b", "w", 5.0, 4),
            ("c", "x", 4.0, 1), ("c", "y", 4.0, 2)]                                              # only 2 -> dropped
    cols = ColumnMap(user="u", item="i", rating="r", timestamp="t")
    m = prepare_data(DataConfig(source="table", path=str(_table_file(tmp_path, rows)), columns=cols,
                                prepared_dir=str(tmp_path / "out"), tasks=["ctr", "rating"], num_candidates=2),
                     engine="local")
    # b interacted with every item: its 3 CTR targets (1 train window, valid, test) get no sampled negative.
    assert m["skips"]["counts"] == {"duplicate_interaction": 1, "user_fewer_than_3_interactions": 2,
                                    "ctr_not_enough_unseen_items": 3}
    assert m["num_users"] == 2 and m["num_items"] == 4
    test = pq.read_table(tmp_path / "out/interactions/test.parquet").to_pylist()
    assert [(r["uid"], r["iid"], r["rating"]) for r in test] == [(0, 1, 1.0), (1, 0, 5.0)]  # latest x rating kept
    assert m["interactions"] == {"train": 3, "valid": 2, "test": 2}


def test_errors_name_the_problem(tmp_path):
    from ckf_dist.data.preprocess import prepare_data

    rows = [("a", "x", 5.0, 1), ("a", "y", 4.0, 2), ("a", "z", 3.0, 3)]
    path = str(_table_file(tmp_path, rows))
    cols = ColumnMap(user="u", item="i", rating="r", timestamp="t")
    with pytest.raises(ValueError, match="after 2-core"):
        prepare_data(DataConfig(source="table", path=path, columns=cols, k_core=2, tasks=["ctr"],
                                prepared_dir=str(tmp_path / "o1")), engine="local")
    with pytest.raises(ValueError, match="data.columns.rating='stars'"):
        prepare_data(DataConfig(source="table", path=path, columns=ColumnMap(user="u", item="i", rating="stars",
                                                                             timestamp="t"),
                                tasks=["ctr"], prepared_dir=str(tmp_path / "o2")), engine="local")
    with pytest.raises(ValueError, match="no review text"):
        prepare_data(DataConfig(source="table", path=path, columns=cols, prepared_dir=str(tmp_path / "o3")),
                     engine="local")
    with pytest.raises(ValueError, match="data.path is required"):
        prepare_data(DataConfig(source="amazon", prepared_dir=str(tmp_path / "o4")), engine="local")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"u": ["a"], "i": ["x"], "r": [9.0], "t": [1]}), bad)
    with pytest.raises(ValueError, match=r"(?s)1 of 1 records of bad.parquet \(100.00%\) could not be read.*"
                                         r"skipped 1 \[rating_out_of_range\], e.g. bad.parquet:1 rating 9.0 outside"):
        prepare_data(DataConfig(source="table", path=str(bad), columns=cols, tasks=["ctr"],
                                prepared_dir=str(tmp_path / "o5")), engine="local")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_synthetic_signal_ratings_follow_factors(tmp_path):
    """The generator's ratings and choices come from its factors (a CF model has something to learn)."""
    from ckf_dist.data.synthetic import FACTORS_FILES, INTERACTIONS_FILE, ITEMS_FILE, generate_synthetic

    cfg = SyntheticConfig(num_users=150, num_items=80, max_interactions=30, noise=0.3)
    out = generate_synthetic(cfg, tmp_path / "raw", seed=3)
    t = pq.read_table(out / INTERACTIONS_FILE).to_pandas()
    P, Q = (np.load(out / f) for f in FACTORS_FILES)
    u = t.user_id.str[1:].astype(int) - 1
    i = t.item_id.str[1:].astype(int) - 1
    dot = (P[u] * Q[i]).sum(1)
    assert np.corrcoef(dot, t.rating)[0, 1] > 0.4
    assert set(t.rating.unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    # Review sentiment tracks the rating; titles are unique.
    assert t[t.rating == 5].review.str.contains("recommend").all() and t[t.rating <= 2].review.str.contains(
        "skip").all()
    titles = pq.read_table(out / ITEMS_FILE)["title"].to_pylist()
    assert len(set(titles)) == len(titles) == 80
    sizes = t.groupby("user_id").size()
    assert sizes.min() >= cfg.min_interactions and sizes.max() <= cfg.max_interactions and (sizes <= 7).any()
    # Deterministic by seed.
    again = generate_synthetic(cfg, tmp_path / "raw2", seed=3)
    assert (again / INTERACTIONS_FILE).read_bytes() == (out / INTERACTIONS_FILE).read_bytes()
