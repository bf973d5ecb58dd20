"""evaluate_model against an independent per-sample computation, batch-size invariance, helpers, the CF
baseline, and one run through the real CKFModel on the tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from ckf_dist.data.collate import Collator, answer_token_ids
from ckf_dist.eval.baselines import evaluate_cf_baseline
from ckf_dist.eval.evaluate import (
    answer_loglik,
    answer_position,
    decode_new_tokens,
    evaluate_model,
    parse_rating,
    scored_positions,
)
from ckf_dist.metrics import ndcg_at_k, rank_of_target
from ckf_dist.tasks import CTR_ANSWERS, RATING_ANSWERS
from ckf_dist.testing.eval_samples import FakeCKF, eval_cfg, make_samples


def _one_row(tok, sample, answer: str | None = None):
    """A single-sample, unpadded batch: the oracle path shares no batching or padding with evaluate_model."""
    return Collator(tok, 128, 10, "right", with_answer=True)([sample], ("cf",), None if answer is None else [answer])


def test_answer_position_left_equals_right(tiny_tokenizer) -> None:
    model = FakeCKF(len(tiny_tokenizer))
    samples = [s for s in make_samples() if s["task"] == "ctr"][:5]
    right = Collator(tiny_tokenizer, 128, 10, "right", with_answer=True)(samples)
    left = Collator(tiny_tokenizer, 128, 10, "left", with_answer=False)(samples)
    a = model.logits(right, at=answer_position(right, "right"))
    b = model.logits(left, at=answer_position(left, "left"))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[0], a[1])
    # The answer's first token follows the prompt: right-padded, its label sits right after the scored position.
    rows, cols = answer_position(right, "right")
    assert (right.labels[rows, cols] == -100).all() and (right.labels[rows, cols + 1] != -100).all()


def test_answer_loglik_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.full((3, 6), -100)
    labels[0, 3:5] = torch.tensor([4, 2])
    labels[1, 1:6] = torch.tensor([1, 1, 7, 3, 0])
    labels[2, 5] = 9
    want = []
    for b in range(3):
        lp = [torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for t in range(1, 6) if labels[b, t] != -100]
        want.append(sum(lp) / len(lp))
    rows, cols = scored_positions(labels)
    torch.testing.assert_close(answer_loglik(logits[rows, cols], labels), torch.stack(want))
    with pytest.raises(ValueError, match="3 logit rows for 8 answer positions"):
        answer_loglik(logits[0, :3], labels)
    labels[2, 5] = -100
    with pytest.raises(ValueError, match="a row has no answer tokens"):
        scored_positions(labels)


def test_parse_and_decode(tiny_tokenizer) -> None:
    assert parse_rating(" 4") == 4.0 and parse_rating("4.5 stars") == 4.5 and parse_rating("9") == 5.0
    assert parse_rating("0") == 1.0 and parse_rating("great") is None
    ids = tiny_tokenizer(" Yes", add_special_tokens=False)["input_ids"]
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    assert decode_new_tokens(tiny_tokenizer, ids + [eos] + ids + [pad], eos) == "Yes"


@torch.no_grad()
def test_evaluate_model_equals_per_sample_oracle(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    model = FakeCKF(len(tok))
    samples = make_samples(5)
    got = evaluate_model(model, tok, samples, eval_cfg(batch_size=3), variant="cf")
    again = evaluate_model(model, tok, samples, eval_cfg(batch_size=5), variant="cf")
    assert got.keys() == again.keys()
    for k in got:
        assert got[k] == pytest.approx(again[k], rel=1e-6, abs=1e-9) if got[k] is not None else again[k] is None, k

    no_id, yes_id = answer_token_ids(tok, CTR_ANSWERS)
    ctr = [s for s in samples if s["task"] == "ctr"]
    p_yes = []
    for s in ctr:
        b = _one_row(tok, s)
        lg = model.logits(b)[0, int(b.prompt_lengths[0]) - 1]
        p_yes.append(float(torch.softmax(lg[[no_id, yes_id]], -1)[1]))
    assert got["auc_ctr"] == pytest.approx(roc_auc_score([s["label"] for s in ctr], p_yes))
    cold = [i for i, s in enumerate(ctr) if s["is_cold"]]
    assert got["auc_ctr/cold"] == pytest.approx(roc_auc_score([ctr[i]["label"] for i in cold],
                                                              [p_yes[i] for i in cold]))

    digit_ids = answer_token_ids(tok, RATING_ANSWERS)
    rating = [s for s in samples if s["task"] == "rating"]
    sq = []
    for s in rating:
        b = _one_row(tok, s)
        p = torch.softmax(model.logits(b)[0, int(b.prompt_lengths[0]) - 1][digit_ids], -1)
        sq.append((float(p @ torch.arange(1.0, 6.0)) - s["label"]) ** 2)
    assert got["rmse_rating"] == pytest.approx(math.sqrt(sum(sq) / len(sq)))

    ranks = []
    for s in (s for s in samples if s["task"] == "topk"):
        scores = []
        for title in s["candidate_titles"]:
            b = _one_row(tok, s, title)
            lp = torch.log_softmax(model.logits(b)[0], -1)
            pl, n = int(b.prompt_lengths[0]), b.input_ids.shape[1]
            scores.append(sum(float(lp[t - 1, b.input_ids[0, t]]) for t in range(pl, n)) / (n - pl))
        ranks.append(rank_of_target(scores, int(s["label"])))
    assert got["ndcg@3_topk"] == pytest.approx(ndcg_at_k(ranks, 3))  # eval.ks default; 4 candidates
    assert got["n_topk"] == len(ranks) and got["n_ctr/warm"] + got["n_ctr/cold"] == len(ctr)

    text = evaluate_model(model, tok, samples, eval_cfg(batch_size=3), variant="text")
    assert text["rmse_rating"] != got["rmse_rating"]  # the text variant reads other prompts (and no CF vectors)


def test_evaluate_model_rejects_bad_input(tiny_tokenizer) -> None:
    model = FakeCKF(len(tiny_tokenizer))
    with pytest.raises(ValueError, match="variant"):
        evaluate_model(model, tiny_tokenizer, make_samples(2), eval_cfg(), variant="both")
    bad = [s for s in make_samples(2) if s["task"] == "topk"]
    bad[0]["label"] = 9.0
    with pytest.raises(ValueError, match="not a candidate index"):
        evaluate_model(model, tiny_tokenizer, bad, eval_cfg())
    with pytest.raises(ValueError, match="process group"):
        evaluate_model(model, tiny_tokenizer, make_samples(2), eval_cfg(), rank=0, world=2)


class FakeCF:
    """score = -(uid - iid)^2 (closer ids rank higher); MF-style ratings unless `ranking_only`."""

    def __init__(self, ranking_only: bool = False) -> None:
        self.ranking_only = ranking_only

    def score(self, uids: torch.Tensor, iids: torch.Tensor) -> torch.Tensor:
        return -((uids - iids).float() ** 2)

    def predict_rating(self, uids: torch.Tensor, iids: torch.Tensor) -> torch.Tensor:
        if self.ranking_only:
            raise ValueError("BPR predicts no ratings")
        return torch.full(uids.shape, 3.0)


def test_cf_baseline_same_harness() -> None:
    samples = [s for s in make_samples() if s["task"] != "exp"]
    out = evaluate_cf_baseline(FakeCF(), samples, eval_cfg())
    ctr = [s for s in samples if s["task"] == "ctr"]
    want = roc_auc_score([s["label"] for s in ctr], [-((s["uid"] - s["item"]) ** 2) for s in ctr])
    assert out["auc_ctr"] == pytest.approx(want)
    rating = [s for s in samples if s["task"] == "rating"]
    assert out["mae_rating"] == pytest.approx(sum(abs(s["label"] - 3) for s in rating) / len(rating))
    assert out["rmse_gen_rating"] is None  # the CF model generates nothing
    topk = [s for s in samples if s["task"] == "topk"]
    ranks = [rank_of_target([-((s["uid"] - c) ** 2) for c in s["candidates"]], int(s["label"])) for s in topk]
    assert out["hr@5_topk"] == pytest.approx(sum(r <= 5 for r in ranks) / len(ranks))
    assert not any(k.endswith("_exp") for k in out)
    bpr = evaluate_cf_baseline(FakeCF(ranking_only=True), samples, eval_cfg())
    assert bpr["rmse_rating"] is None and bpr["rmse_rating/cold"] is None and bpr["auc_ctr"] == out["auc_ctr"]


@pytest.mark.slow
def test_real_ckf_model_runs_every_task(tiny_llm, tiny_tokenizer) -> None:
    from ckf_dist.config import ModelConfig, MultiLoRAConfig
    from ckf_dist.model.ckf import build_ckf_model

    g = torch.Generator().manual_seed(0)
    model = build_ckf_model(tiny_llm, tiny_tokenizer, torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g),
                            ModelConfig(meta_hidden=16), MultiLoRAConfig(rank=2, task_rank=2))
    samples = make_samples(4)
    cfg = eval_cfg(batch_size=4)
    cfg.eval.max_new_tokens = 3
    a = evaluate_model(model, tiny_tokenizer, samples, cfg, variant="cf")
    assert a["n_ctr"] == 7 and a["n_topk"] == 4 and a["auc_ctr"] is not None and 0 <= a["usr_exp"] <= 1
    assert a["rmse_rating"] is not None and 0 <= a["mae_rating"] <= 4
    cfg.eval.batch_size = 1  # right padding keeps each row's answer position: batching does not change scores
    b = evaluate_model(model, tiny_tokenizer, samples, cfg, variant="cf")
    for k in ("auc_ctr", "rmse_rating", "ndcg@3_topk", "bleu1_exp"):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
