"""The 2-rank test helper itself: results come back in rank order, a hang fails fast, an error names its rank."""

import time

import pytest
import torch
import torch.distributed as dist

from ckf_dist.testing.ranks import run_ranks


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t)


def _rank1_hangs(rank, world):
    if rank == 1:
        time.sleep(600)
    return rank


def _rank1_raises(rank, world):
    if rank == 1:
        raise ValueError("boom on purpose")
    return rank


@pytest.mark.distributed
def test_results_in_rank_order():
    assert run_ranks(_sum_ranks, world=2, timeout=60) == [3.0, 3.0]


@pytest.mark.distributed
def test_hang_fails_fast():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish"):
        run_ranks(_rank1_hangs, world=2, timeout=25)
    assert time.monotonic() - t0 < 60


@pytest.mark.distributed
def test_error_names_rank():
    with pytest.raises(RuntimeError, match=r"rank 1 failed:[\s\S]*boom on purpose"):
        run_ranks(_rank1_raises, world=2, timeout=60)
