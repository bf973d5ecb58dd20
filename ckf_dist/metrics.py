"""Metric functions of the four CKF tasks (CTR, rating, top-K, explanation), pure and stateless; used by cf/ and eval/.

Every function takes tensors / arrays / lists and returns a float, or None when the metric does not exist
for its input (no samples, one class only): an absent metric is never reported as 0. Maintained libraries
do the work where they exist (scikit-learn AUC, sacrebleu BLEU, rouge-score ROUGE).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


def _np(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")


def auc(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Area under the ROC curve, tied scores counting one half (the Mann-Whitney U statistic).

    Computed from average ranks (scipy.stats.rankdata) rather than by calling scikit-learn per user: UAUC
    needs one AUC per user, and sklearn's input validation costs ~10 ms a call. Tests check it against
    sklearn.metrics.roc_auc_score.

    Args:
        labels: 0/1 per sample.
        scores: higher = more likely positive (any monotone score: P(Yes), a logit, a CF dot product).

    Returns:
        The AUC, or None when there are no samples or only one class (the AUC is undefined).

    Raises:
        ValueError: lengths differ, labels are not 0/1, or a score is not finite.
    """
    from scipy.stats import rankdata

    y, s = _np(labels), _np(scores)
    _same_length(labels=y, scores=s)
    if len(y) == 0:
        return None
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"auc: labels must be 0 or 1, got values {sorted(set(y.tolist()))[:10]}")
    if not np.isfinite(s).all():
        raise ValueError(f"auc: {int((~np.isfinite(s)).sum())} score(s) are not finite")
    pos = y == 1.0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)  # 1-based, ties get their average rank
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def uauc(user_ids: ArrayLike, labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Per-user AUC averaged over users (unweighted mean); users whose samples hold one class are skipped.

    Returns:
        The mean, or None when no user has both a positive and a negative sample.
    """
    u, y, s = _np(user_ids, np.int64), _np(labels), _np(scores)
    _same_length(user_ids=u, labels=y, scores=s)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, uid in enumerate(u.tolist()):
        groups[uid].append(i)
    per_user = [auc(y[idx], s[idx]) for idx in groups.values()]
    kept = [a for a in per_user if a is not None]
    return float(np.mean(kept)) if kept else None


def rank_of_target(scores: ArrayLike, target: int) -> int:
    """1-based rank of candidate `target` among `scores` (higher = better).

    Ties are broken pessimistically: every other candidate whose score equals the target's is ranked
    before it, so a model that gives all candidates the same score gets the worst rank, not the best.

    Raises:
        ValueError: target outside the candidates, or a score is NaN.
    """
    s = _np(scores)
    if not 0 <= target < len(s):
        raise ValueError(f"target index {target} outside the {len(s)} candidates")
    if np.isnan(s).any():
        raise ValueError("rank_of_target: a candidate score is NaN")
    t = s[target]
    return 1 + int((s > t).sum()) + int((s == t).sum()) - 1


def _checked_ranks(ranks: ArrayLike, k: int) -> np.ndarray | None:
    """1-based ranks as an array, None when there are none; ValueError for k <= 0 or a rank < 1."""
    r = _np(ranks)
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    if len(r) == 0:
        return None
    if (r < 1).any():
        raise ValueError("ranks are 1-based; got a rank < 1")
    return r


def hit_rate_at_k(ranks: ArrayLike, k: int) -> float | None:
    """Share of samples whose target (1-based `ranks`) is within the top k; None for no samples."""
    r = _checked_ranks(ranks, k)
    return None if r is None else float((r <= k).mean())


def ndcg_at_k(ranks: ArrayLike, k: int) -> float | None:
    """NDCG@k with one relevant item per sample: 1 / log2(rank + 1) if rank <= k else 0 (the ideal DCG is 1)."""
    r = _checked_ranks(ranks, k)
    if r is None:
        return None
    gains = np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)
    return float(gains.mean())


def rmse(targets: ArrayLike, preds: ArrayLike) -> float | None:
    """Root mean squared error; None for no samples."""
    t, p = _np(targets), _np(preds)
    _same_length(targets=t, preds=p)
    return float(np.sqrt(np.mean((t - p) ** 2))) if len(t) else None


def mae(targets: ArrayLike, preds: ArrayLike) -> float | None:
    """Mean absolute error; None for no samples."""
    t, p = _np(targets), _np(preds)
    _same_length(targets=t, preds=p)
    return float(np.mean(np.abs(t - p))) if len(t) else None


def bleu(refs: Sequence[str], hyps: Sequence[str], n: int = 4) -> float | None:
    """Corpus BLEU-n (sacrebleu, '13a' tokenisation, brevity penalty), on sacrebleu's 0-100 scale.

    Args:
        refs: one reference per sample.
        hyps: one generated text per sample.
        n: 1 (BLEU-1) or 4 (BLEU-4).
    """
    from sacrebleu.metrics import BLEU

    if n not in (1, 4):
        raise ValueError(f"bleu: n must be 1 or 4, got {n}")
    if len(refs) != len(hyps):
        raise ValueError(f"bleu: {len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return None
    # sacrebleu's default 'exp' smoothing keeps BLEU-4 of short texts above 0 when no 4-gram matches.
    metric = BLEU(max_ngram_order=n)
    return float(metric.corpus_score(list(hyps), [list(refs)]).score)


_ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def rouge(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float | None]:
    """Mean ROUGE-1/2/L F1 (rouge-score, Porter stemming) on a 0-100 scale, like BLEU.

    Returns:
        {"rouge1", "rouge2", "rougeL"} -> value, each None for no samples.
    """
    from rouge_score import rouge_scorer

    if len(refs) != len(hyps):
        raise ValueError(f"rouge: {len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return {k: None for k in _ROUGE_KEYS}
    scorer = rouge_scorer.RougeScorer(list(_ROUGE_KEYS), use_stemmer=True)
    sums = dict.fromkeys(_ROUGE_KEYS, 0.0)
    for r, h in zip(refs, hyps):
        scores = scorer.score(r, h)
        for k in _ROUGE_KEYS:
            sums[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(refs) for k, v in sums.items()}


def unique_sentence_ratio(hyps: Sequence[str]) -> float | None:
    """Distinct generated texts / all generated texts (PETER's USR; whitespace and case normalised).

    A model that writes the same explanation for everyone scores 1/N; None for no samples.
    """
    if not hyps:
        return None
    norm = {" ".join(h.lower().split()) for h in hyps}
    return len(norm) / len(hyps)
