"""The CF model alone (CKEM's MF / BPR / LightGCN) as a baseline, measured on the same samples and by the same
metric code as CKF: CTR and top-K from the CF score, rating from MF's predicted rating (absent for ranking
models). The explanation task has no CF baseline (a CF model writes no text), so its keys are not emitted.
"""

from __future__ import annotations

from typing import Any

import torch

from ckf_dist.config import RunConfig
from ckf_dist.data.schema import PromptSample
from ckf_dist.eval.summary import check_topk_sample, task_metrics
from ckf_dist.metrics import rank_of_target


def evaluate_cf_baseline(cf: Any, samples: list[PromptSample], cfg: RunConfig) -> dict[str, float | None]:
    """Metrics of the CF model alone, overall and for warm / cold users.

    Args:
        cf: a CFEmbeddings (`score(uids, iids) -> (N,)`, `predict_rating(uids, iids) -> (N,)`, the latter
            raising ValueError for models without a rating scale).
        samples: the same samples the LLM models are evaluated on.
        cfg: the run configuration (eval.ks).

    Returns:
        Same keys as `evaluate_model` for ctr / topk / rating; rating keys are None when the CF model
        predicts no ratings (BPR, LightGCN).
    """
    out: dict[str, float | None] = {}
    by_task: dict[str, list[PromptSample]] = {}
    for s in samples:
        by_task.setdefault(s["task"], []).append(s)

    if ctr := by_task.get("ctr"):
        scores = _score(cf, [s["uid"] for s in ctr], [s["item"] for s in ctr])
        out.update(task_metrics("ctr", ctr, {"score": scores}, cfg.eval.ks))

    if topk := by_task.get("topk"):
        targets = [check_topk_sample(s) for s in topk]
        uids = [s["uid"] for s in topk for _ in s["candidates"]]
        iids = [i for s in topk for i in s["candidates"]]
        flat = _score(cf, uids, iids)  # every candidate of every sample in one call
        ranks, start = [], 0
        for s, t in zip(topk, targets):
            n = len(s["candidates"])
            ranks.append(rank_of_target(flat[start:start + n], t))
            start += n
        out.update(task_metrics("topk", topk, {"rank": ranks}, cfg.eval.ks))

    if rating := by_task.get("rating"):
        preds: dict[str, list[Any]] | None
        try:
            pred = cf.predict_rating(torch.tensor([s["uid"] for s in rating]), torch.tensor([s["item"] for s in rating]))
            preds = {"rating": pred.detach().float().cpu().tolist()}
        except ValueError:
            preds = None  # a ranking model (BPR/LightGCN) has no rating scale: reported as absent, not as 0
        out.update(task_metrics("rating", rating, preds, cfg.eval.ks))
    return out


def _score(cf: Any, uids: list[int], iids: list[int]) -> list[float]:
    s = cf.score(torch.tensor(uids, dtype=torch.long), torch.tensor(iids, dtype=torch.long))
    if s.shape[0] != len(uids):
        raise ValueError(f"cf.score returned {s.shape[0]} scores for {len(uids)} (user, item) pairs")
    return s.detach().float().cpu().tolist()
