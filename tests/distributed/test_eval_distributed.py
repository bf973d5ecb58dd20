"""Evaluation split over 2 gloo ranks gives the same metrics as 1 rank, with equal model-call counts per rank."""

from __future__ import annotations

import pytest

from ckf_dist.testing.eval_samples import FakeCKF, eval_cfg, make_samples
from ckf_dist.testing.ranks import run_ranks


def _rank_eval(rank: int, world: int, tok_dir: str) -> dict[str, tuple[dict, int, list]]:
    from ckf_dist.eval.evaluate import evaluate_model
    from ckf_dist.model.llm import load_tokenizer

    tok = load_tokenizer(tok_dir)
    # A single explanation sample: rank 1 has no real share of that task and must still make the same calls.
    samples = [s for s in make_samples() if s["task"] != "exp" or s["uid"] == 1]
    out = {}
    for variant in ("cf", "text"):
        model = FakeCKF(len(tok))
        metrics = evaluate_model(model, tok, samples, eval_cfg(), variant=variant, rank=rank, world=world)
        out[variant] = (metrics, model.calls, model.gen_calls)
    return out


@pytest.mark.distributed
def test_two_ranks_equal_one_rank(tiny_llm_dir: str) -> None:
    single = _rank_eval(0, 1, tiny_llm_dir)
    r0, r1 = run_ranks(_rank_eval, 2, args=(tiny_llm_dir,), timeout=180)
    assert single["cf"][0] != single["text"][0], "the fake model should tell the prompt variants apart"
    for variant in ("cf", "text"):
        one, _, gen1 = single[variant]
        (m0, calls0, gen0), (m1, calls1, _) = r0[variant], r1[variant]
        assert m0 == m1, "ranks disagree"
        assert calls0 == calls1, f"rank 0 made {calls0} model calls, rank 1 {calls1}: ZeRO-3 gathers would hang"
        assert all(synced for _, synced in gen0) and not any(synced for _, synced in gen1)
        assert set(one) == set(m0)
        for k, v in one.items():
            assert (v is None) == (m0[k] is None), k
            if v is not None:
                assert m0[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
        # 7 users: 12 CTR samples (6 + 6 per rank), 7 top-K / rating (4 + 3), 1 explanation (1 + 0 and a dummy).
        assert one["n_ctr"] == 12 and one["n_topk"] == 7 and one["n_rating"] == 7 and one["n_exp"] == 1
        assert one["n_exp/warm"] == 1 and one["bleu4_exp/cold"] is None
