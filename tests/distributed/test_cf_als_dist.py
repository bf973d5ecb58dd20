"""2 gloo ranks == 1 process for biased MF by ALS (cf.solver=als): all-reduced normal equations -> same tables."""

from __future__ import annotations

import pytest
import torch

from ckf_dist.cf.data import read_id_space, read_split
from ckf_dist.cf.synthetic import write_lowrank_prepared
from ckf_dist.cf.train_cf import fit
from ckf_dist.config import CFConfig
from ckf_dist.testing.ranks import run_ranks


def _als_tables(prep: str) -> dict[str, list]:
    ids = read_id_space(prep)
    train, valid = read_split(prep, "train", ids), read_split(prep, "valid", ids)
    cfg = CFConfig(model="mf", solver="als", dim=8, weight_decay=0.05, epochs=4, patience=0, seed=3)
    res = fit(cfg, train, valid, ids.num_users, ids.num_items, device=torch.device("cpu"))
    return {k: v.tolist() for k, v in res.model.tables().items()}


def _rank_fn(rank: int, world: int, prep: str) -> dict[str, list]:
    torch.set_num_threads(1)
    return _als_tables(prep)


@pytest.mark.distributed
def test_als_two_ranks_equal_one_process(tmp_path):
    prep = str(write_lowrank_prepared(tmp_path / "p", num_users=25, num_items=20, per_user=8, seed=2))
    one = {k: torch.tensor(v) for k, v in _als_tables(prep).items()}
    for r in run_ranks(_rank_fn, world=2, args=(prep,), timeout=300):
        for k, v in one.items():
            torch.testing.assert_close(torch.tensor(r[k]), v, atol=1e-4, rtol=1e-4, msg=k)
    # the tables are non-trivial (not the all-zero fixed point), so the equality above means something
    assert (one["user"]).abs().max() > 1e-2
