"""The real datasets in ../shared/data (read by path, never copied): end-to-end preparation + leakage checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckf_dist.config import load_config

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
ML100K = SHARED / "ml-100k"
AMAZON = SHARED / "amazon-musical-instruments-5core" / "reviews_Musical_Instruments_5.json.gz"
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason=f"MovieLens-100K not found at {ML100K}")
def test_ml100k_end_to_end(tmp_path):
    from ckf_dist.data.checks import leakage_problems
    from ckf_dist.data.preprocess import prepare_data

    cfg = load_config(REPO / "configs/ml100k.yaml", [f"data.path={ML100K}", f"data.prepared_dir={tmp_path / 'd'}"])
    m = prepare_data(cfg.data, engine="local")
    assert (m["num_users"], m["num_items"], m["raw_rows_read"]) == (943, 1682, 100_000)
    assert m["interactions"] == {"train": 100_000 - 2 * 943, "valid": 943, "test": 943}
    assert m["skips"]["total"] == 0
    assert m["counts"]["test"] == {"ctr": 2 * 943, "topk": 943, "rating": 943}
    # Every ML-100K user has >= 20 ratings, so cold users exist only under the config's raised threshold (20):
    # exactly those with <= 20 training interactions.
    import pandas as pd

    users = pd.read_parquet(tmp_path / "d" / "users.parquet")
    assert cfg.data.cold_threshold == 20 and users.n_train.min() >= 18
    assert m["cold_users"] == int((users.n_train <= 20).sum()) == int(users.is_cold.sum()) > 0
    assert m["warm_users"] + m["cold_users"] == 943
    assert leakage_problems(tmp_path / "d") == []


@pytest.mark.slow
@pytest.mark.skipif(not AMAZON.is_file(), reason=f"Amazon Musical Instruments 5-core not found at {AMAZON}")
def test_amazon_end_to_end(tmp_path):
    from ckf_dist.data.checks import leakage_problems
    from ckf_dist.data.preprocess import prepare_data
    from ckf_dist.data.prompts import load_samples

    cfg = load_config(REPO / "configs/amazon_mi.yaml", [f"data.path={AMAZON}", f"data.prepared_dir={tmp_path / 'd'}"])
    m = prepare_data(cfg.data, engine="local")
    assert (m["num_users"], m["num_items"], m["raw_rows_read"]) == (1429, 900, 10_261)
    assert m["warm_users"] + m["cold_users"] == 1429 and m["cold_users"] > m["warm_users"]
    # The few reviews without text are reported, not silently dropped.
    assert m["counts"]["test"]["exp"] + m["skips"]["counts"].get("exp_no_review_text", 0) >= 1429 - 2
    assert leakage_problems(tmp_path / "d") == []
    exp = load_samples(tmp_path / "d", "test", ["exp"])
    assert all(0 < len(s["answer"].split()) <= cfg.data.max_explanation_words for s in exp)
