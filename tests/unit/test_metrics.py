"""Metric functions vs scikit-learn and hand-computed cases: ties, one class, empty groups (absent = None)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score, roc_auc_score

from ckf_dist import metrics as M
from ckf_dist.eval.summary import task_metrics


def test_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 50)
        s = np.round(rng.normal(size=50), 1)  # rounding makes many ties
        assert M.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.auc(torch.tensor([0, 0, 1, 1]), torch.tensor([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert M.auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half


def test_auc_absent_not_zero() -> None:
    assert M.auc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert M.auc([], []) is None
    with pytest.raises(ValueError, match="0 or 1"):
        M.auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        M.auc([0, 1], [0.1])


def test_uauc_hand_computed() -> None:
    users = [7, 7, 8, 8, 9, 9]
    labels = [1, 0, 1, 0, 1, 1]  # user 9 has one class: skipped
    scores = [0.9, 0.1, 0.2, 0.8, 0.5, 0.6]
    assert M.uauc(users, labels, scores) == pytest.approx((1.0 + 0.0) / 2)
    assert M.uauc([1, 2], [1, 0], [0.3, 0.2]) is None  # nobody has both classes


def test_rank_ties_are_pessimistic() -> None:
    assert M.rank_of_target([0.5, 0.5, 0.5], 0) == 3
    assert M.rank_of_target([0.9, 0.5, 0.1], 1) == 2
    assert M.rank_of_target([0.9, 0.5, 0.5, 0.1], 2) == 3
    assert M.rank_of_target(torch.tensor([0.1, 0.9]), 1) == 1
    with pytest.raises(ValueError, match="outside"):
        M.rank_of_target([0.1, 0.2], 2)


def test_hr_ndcg_match_sklearn_without_ties() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(30, 10))
    targets = rng.integers(0, 10, 30)
    ranks = [M.rank_of_target(s, t) for s, t in zip(scores, targets)]
    onehot = np.eye(10)[targets]
    for k in (1, 5, 10):
        assert M.ndcg_at_k(ranks, k) == pytest.approx(ndcg_score(onehot, scores, k=k), abs=1e-12)
        top = np.argsort(-scores, axis=1)[:, :k]
        assert M.hit_rate_at_k(ranks, k) == pytest.approx(np.mean([t in row for t, row in zip(targets, top)]))


def test_hr_ndcg_hand_computed_and_ties() -> None:
    assert M.ndcg_at_k([1, 2, 11], 10) == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert M.hit_rate_at_k([1, 2, 11], 1) == pytest.approx(1 / 3)
    # All 10 candidates tied: the target is ranked last (sklearn would average over the tie instead).
    r = M.rank_of_target(np.zeros(10), 4)
    assert r == 10 and M.hit_rate_at_k([r], 5) == 0.0
    assert M.ndcg_at_k([r], 10) == pytest.approx(1 / math.log2(11))
    assert M.ndcg_at_k([r], 10) < ndcg_score(np.eye(10)[[4]], np.zeros((1, 10)), k=10)
    assert M.hit_rate_at_k([], 5) is None and M.ndcg_at_k([], 5) is None


def test_rmse_mae() -> None:
    assert M.rmse([1, 5], [2, 3]) == pytest.approx(math.sqrt((1 + 4) / 2))
    assert M.mae(torch.tensor([1.0, 5.0]), torch.tensor([2.0, 3.0])) == pytest.approx(1.5)
    assert M.rmse([], []) is None and M.mae([], []) is None


def test_bleu_rouge_usr_hand_computed() -> None:
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"], 4) == pytest.approx(100.0)
    # BLEU-1 of "the cat" vs "the cat sat": unigram precision 1, brevity penalty exp(1 - 3/2).
    assert M.bleu(["the cat sat"], ["the cat"], 1) == pytest.approx(100 * math.exp(1 - 1.5), rel=1e-4)
    r = M.rouge(["the cat sat"], ["the cat"])  # P = 1, R = 2/3 -> F1 = 0.8
    assert r["rouge1"] == pytest.approx(80.0) and r["rougeL"] == pytest.approx(80.0)
    assert r["rouge2"] == pytest.approx(100 * 2 * (1 * 0.5) / 1.5)  # P = 1/1, R = 1/2
    assert M.unique_sentence_ratio(["Good  sound", "good sound", "bad"]) == pytest.approx(2 / 3)
    assert M.bleu([], [], 1) is None and M.unique_sentence_ratio([]) is None
    assert M.rouge([], []) == {"rouge1": None, "rouge2": None, "rougeL": None}


def _s(uid: int, label: float, cold: bool) -> dict:
    return {"key": f"k{uid}{label}", "task": "ctr", "uid": uid, "label": label, "is_cold": cold, "answer": ""}


def test_task_metrics_empty_group_is_absent() -> None:
    samples = [_s(1, 1.0, False), _s(1, 0.0, False), _s(2, 1.0, False)]
    out = task_metrics("ctr", samples, {"score": [0.9, 0.2, 0.4]}, ks=[1])
    assert out["auc_ctr"] == pytest.approx(1.0) and out["auc_ctr/warm"] == out["auc_ctr"]
    assert out["auc_ctr/cold"] is None and out["uauc_ctr/cold"] is None and out["n_ctr/cold"] == 0.0
    absent = task_metrics("rating", samples, None, ks=[1])
    assert absent["rmse_rating"] is None and absent["n_rating"] == 3.0
