"""2 gloo ranks == 1 process for the CF stage (CKEM): same global batches, same seed -> same tables."""

from __future__ import annotations

import pytest
import torch

from ckf_dist.cf.data import read_id_space, read_split
from ckf_dist.cf.synthetic import write_lowrank_prepared
from ckf_dist.cf.train_cf import fit
from ckf_dist.config import CFConfig
from ckf_dist.testing.ranks import run_ranks

# Float sums are split into two partial sums per step instead of one: differences of a few ulps, which Adam's
# normalisation can amplify a little over the steps; 1e-5 is orders of magnitude below any real divergence
# (a wrong shard or a missing all-reduce changes the tables at the 1e-2 level, see the control below).
ATOL = 1e-5


def _fit_tables(prep: str, kind: str, batch_size: int) -> dict[str, torch.Tensor]:
    ids = read_id_space(prep)
    train, valid = read_split(prep, "train", ids), read_split(prep, "valid", ids)
    cfg = CFConfig(model=kind, dim=8, lr=0.02, weight_decay=0.01, batch_size=batch_size, epochs=3, patience=3,
                   num_layers=2, seed=3)
    res = fit(cfg, train, valid, ids.num_users, ids.num_items, device=torch.device("cpu"))
    return {**res.model.tables(), "best_epoch": torch.tensor(res.best_epoch)}


KINDS = ("mf", "bpr", "lightgcn")


def _rank_fn(rank: int, world: int, prep: str) -> dict[str, dict[str, list]]:
    torch.set_num_threads(1)
    # Plain lists: tensors sent through a multiprocessing queue live in the sender's shared memory, gone at exit.
    return {kind: {k: v.tolist() for k, v in _fit_tables(prep, kind, batch_size=50).items()} for kind in KINDS}


@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path):
    """MF, BPR-MF and LightGCN in one 2-rank launch (process start-up dominates the run time)."""
    prep = str(write_lowrank_prepared(tmp_path / "p", num_users=25, num_items=20, per_user=8, seed=2))
    # 25 users * 6 train rows = 150 rows, global batch 50 -> 3 steps/epoch; 50 splits into 25 + 25 rows.
    results = run_ranks(_rank_fn, world=2, args=(prep,), timeout=300)
    for kind in KINDS:
        _check_kind(prep, kind, [{k: torch.tensor(v) for k, v in r[kind].items()} for r in results])


def _check_kind(prep: str, kind: str, two: list[dict[str, torch.Tensor]]) -> None:
    one = _fit_tables(prep, kind, batch_size=50)
    for k in one:
        torch.testing.assert_close(two[0][k], two[1][k], atol=0, rtol=0)  # ranks hold identical replicas
        torch.testing.assert_close(two[0][k], one[k], atol=ATOL, rtol=0)
    # Control: other global batches give clearly different tables, so the tolerance above is meaningful.
    other = _fit_tables(prep, kind, batch_size=30)
    assert (other["item"] - one["item"]).abs().max() > 100 * ATOL
