"""Evaluation of a trained CF model (CKEM) with the project's metric functions, overall and for warm / cold users.

Ratings: RMSE / MAE of clamped predictions. Ranking: all-item ranking of each held-out item against every item
the user has not interacted with (known interactions excluded), giving HR@K, NDCG@K and the per-user AUC (UAUC);
the pooled AUC compares each held-out item with one seeded random non-interacted item.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ckf_dist.cf.data import Interactions
from ckf_dist.eval.metrics import auc, hit_rate_at_k, mae, ndcg_at_k, rmse

GROUPS: tuple[str, ...] = ("", "/warm", "/cold")


def user_groups(uid: torch.Tensor, train_counts: torch.Tensor, cold_threshold: int) -> dict[str, np.ndarray]:
    """Masks of all / warm / cold rows; a user with <= cold_threshold training interactions is cold."""
    cold = (train_counts[uid] <= cold_threshold).numpy()
    return {"": np.ones(len(cold), dtype=bool), "/warm": ~cold, "/cold": cold}


def rating_metrics(pred: torch.Tensor, rows: Interactions, groups: dict[str, np.ndarray],
                   prefix: str = "test/") -> dict[str, float | None]:
    """RMSE and MAE of `pred` (already clamped) against rows.rating, per group."""
    y, p = rows.rating.double().numpy(), pred.double().numpy()
    out: dict[str, float | None] = {}
    for g, m in groups.items():
        out[f"{prefix}rmse{g}"] = rmse(y[m], p[m])
        out[f"{prefix}mae{g}"] = mae(y[m], p[m])
    return out


def all_item_ranks(full_scores: Callable[[torch.Tensor], torch.Tensor], uid: torch.Tensor, target: torch.Tensor,
                   known: Sequence[Interactions], num_items: int, chunk: int = 512,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank each target among all items the user has no known interaction with.

    Args:
        full_scores: uid (B,) -> (B, V) scores of every item.
        uid: (N,) users; target: (N,) their held-out items.
        known: interactions to exclude from the candidates (training, and validation when testing); the
            target itself always stays a candidate.
        num_items: V.

    Returns:
        rank (N,) 1-based (1 + candidates scored strictly higher), auc_u (N,) the share of candidates scored
        below the target (ties count one half), target_score (N,).
    """
    # (U, V) boolean mask of known interactions: 943 x 1682 bools on ML-100K, tiny.
    num_users = int(max([int(uid.max()) + 1] + [int(k.uid.max()) + 1 for k in known if len(k)]))
    mask = torch.zeros(num_users, num_items, dtype=torch.bool)
    for k in known:
        mask[k.uid, k.iid] = True
    ranks, aucs, tscores = [], [], []
    for s in range(0, len(uid), chunk):
        u, t = uid[s:s + chunk], target[s:s + chunk]
        scores = full_scores(u).float().cpu()  # (B, V)
        if not torch.isfinite(scores).all():
            raise ValueError("the CF model produced non-finite scores; the training diverged (lower cf.lr)")
        m = mask[u].clone()
        m[torch.arange(len(u)), t] = False
        ts = scores.gather(1, t[:, None])  # (B, 1)
        cand = ~m
        cand[torch.arange(len(u)), t] = False  # the target is not its own negative
        higher = ((scores > ts) & cand).sum(1)
        ties = ((scores == ts) & cand).sum(1)
        lower = ((scores < ts) & cand).sum(1)
        n_neg = cand.sum(1).clamp(min=1)
        ranks.append(higher + 1)
        aucs.append((lower + 0.5 * ties) / n_neg)
        tscores.append(ts.squeeze(1))
    return torch.cat(ranks), torch.cat(aucs).double(), torch.cat(tscores)


def ranking_metrics(full_scores: Callable[[torch.Tensor], torch.Tensor], rows: Interactions,
                    known: Sequence[Interactions], num_items: int, groups: dict[str, np.ndarray],
                    ks: Sequence[int] = (10,), seed: int = 0, prefix: str = "test/") -> dict[str, float | None]:
    """HR@K, NDCG@K (all-item ranking), UAUC and pooled AUC of the held-out `rows`, per group."""
    rank, auc_u, pos_score = all_item_ranks(full_scores, rows.uid, rows.iid, known, num_items)
    neg_score = _sampled_negative_scores(full_scores, rows, known, num_items, seed)
    r = rank.numpy()
    out: dict[str, float | None] = {}
    for g, m in groups.items():
        for k in ks:
            out[f"{prefix}hr@{k}{g}"] = hit_rate_at_k(r[m], k)
            out[f"{prefix}ndcg@{k}{g}"] = ndcg_at_k(r[m], k)
        # Leave-last-out holds one item per user, so the per-user AUC is that item against all candidates.
        out[f"{prefix}uauc{g}"] = float(auc_u.numpy()[m].mean()) if m.any() else None
        n = int(m.sum())
        labels = np.concatenate([np.ones(n), np.zeros(n)])
        out[f"{prefix}auc{g}"] = auc(labels, np.concatenate([pos_score.numpy()[m], neg_score.numpy()[m]]))
    return out


def _sampled_negative_scores(full_scores: Callable[[torch.Tensor], torch.Tensor], rows: Interactions,
                             known: Sequence[Interactions], num_items: int, seed: int) -> torch.Tensor:
    """Score of one uniformly drawn item per row that the user has no known interaction with (seeded)."""
    g = torch.Generator().manual_seed(seed)
    seen = {(int(u), int(i)) for k in known for u, i in zip(k.uid.tolist(), k.iid.tolist())}
    seen |= set(zip(rows.uid.tolist(), rows.iid.tolist()))
    negs = []
    for u in rows.uid.tolist():
        while True:
            j = int(torch.randint(num_items, (1,), generator=g))
            if (u, j) not in seen:
                negs.append(j)
                break
            if sum(1 for x in range(num_items) if (u, x) not in seen) == 0:
                raise ValueError(f"user {u} has interacted with every item; no negative can be sampled")
    neg = torch.tensor(negs, dtype=torch.long)
    out = []
    for s in range(0, len(neg), 512):
        sc = full_scores(rows.uid[s:s + 512]).float().cpu()
        out.append(sc.gather(1, neg[s:s + 512, None]).squeeze(1))
    return torch.cat(out) if out else torch.zeros(0)
