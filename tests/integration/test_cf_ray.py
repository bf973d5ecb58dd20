"""The CF stage (CKEM) as a 2-worker Ray Train job equals a single-process run on the same data and seed."""

from __future__ import annotations

import pytest
import torch

from ckf_dist.cf.data import read_id_space, read_split
from ckf_dist.cf.export import load_cf_embeddings
from ckf_dist.cf.ray_runner import run_ray_train
from ckf_dist.cf.synthetic import write_lowrank_prepared
from ckf_dist.cf.train_cf import fit
from ckf_dist.config import load_config


@pytest.mark.slow
def test_ray_train_two_workers_matches_single_process(tmp_path):
    ray = pytest.importorskip("ray")
    prep = write_lowrank_prepared(tmp_path / "p", num_users=25, num_items=20, per_user=8, seed=4)
    cfg = load_config(None, [f"data.prepared_dir={prep}", f"log.run_dir={tmp_path / 'run'}", "cf.model=mf",
                             "cf.epochs=3", "cf.batch_size=50", "cf.lr=0.02", "cf.weight_decay=0.01",
                             "log.progress=False"])
    try:
        metrics = run_ray_train(cfg, num_workers=2)
    finally:
        ray.shutdown()
    assert {"test/rmse", "test/hr@5", "valid/rmse"} <= set(metrics)
    emb = load_cf_embeddings(cfg.cf_embeddings_path)
    assert emb.meta["world_size"] == 2
    ids = read_id_space(prep)
    res = fit(cfg.cf, read_split(prep, "train", ids), read_split(prep, "valid", ids), ids.num_users, ids.num_items,
              device=torch.device("cpu"))
    single = res.model.tables()
    torch.testing.assert_close(emb.user, single["user"], atol=1e-5, rtol=0)  # tolerance: see test_cf_dist.py
    torch.testing.assert_close(emb.item_bias, single["item_bias"], atol=1e-5, rtol=0)
    assert metrics["valid/rmse"] == pytest.approx(res.best_valid, abs=1e-5)
