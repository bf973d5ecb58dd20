"""Local Ray: the Ray Data preprocessing gives the same bytes as the in-process path (the Ray Data training stream is
tested in test_ray_stream.py)."""

from __future__ import annotations

import pytest

from ckf_dist.config import DataConfig, SyntheticConfig


@pytest.mark.slow
def test_ray_engine_matches_local(tmp_path, local_ray):
    from ckf_dist.data.preprocess import prepare_data

    syn = SyntheticConfig(num_users=120, num_items=60, max_interactions=15)
    a = prepare_data(DataConfig(prepared_dir=str(tmp_path / "ray"), synthetic=syn, shard_size=100), engine="ray")
    b = prepare_data(DataConfig(prepared_dir=str(tmp_path / "loc"), synthetic=syn, shard_size=100), engine="local")
    assert a["files"] == b["files"] and len(a["files"]) > 10
