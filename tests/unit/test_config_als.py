"""cf.solver=als with cf.weight_decay=0 (a valid config value: no ridge) trains instead of crashing in
torch.linalg.solve on the singular normal equations of rows with few or no ratings."""

from __future__ import annotations

import torch

from ckf_dist.config import load_config


def test_als_without_ridge_fits_sparse_rows(tmp_path):
    from ckf_dist.cf.data import read_id_space, read_split
    from ckf_dist.cf.synthetic import write_lowrank_prepared
    from ckf_dist.cf.train_cf import fit

    cfg = load_config(None, ["cf.solver=als", "cf.weight_decay=0", "cf.dim=16", "cf.epochs=3", "cf.patience=0"]).cf
    # 120 items for 30 users x 6 ratings: many items have fewer ratings than dim + 1, some none.
    prep = write_lowrank_prepared(tmp_path / "prep", num_users=30, num_items=120, per_user=6, seed=1)
    ids = read_id_space(prep)
    train, valid = (read_split(prep, sp, ids, allow_empty=True) for sp in ("train", "valid"))
    got = fit(cfg, train, valid, 30, 120)
    item = got.model.item.weight.detach()
    assert torch.isfinite(item).all() and torch.isfinite(torch.tensor(got.best_valid))
    unrated = torch.ones(120, dtype=torch.bool)
    unrated[train.iid] = False
    assert unrated.any() and (item[unrated] == 0).all()  # minimum-norm: an item without ratings stays at 0
