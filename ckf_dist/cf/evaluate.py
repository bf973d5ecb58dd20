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
from ckf_dist.metrics import auc, hit_rate_at_k, mae, ndcg_at_k, rmse


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


class KnownItems:
    """Per-user sets of known items (CSR over sorted (user, item) keys), expanded to (B, V) masks per chunk of users.

    Args:
        known: interactions whose items are not ranking candidates (training, and validation when testing).
        num_users: U (at least 1 + the largest user id that will be queried).
        num_items: V.
    """

    def __init__(self, known: Sequence[Interactions], num_users: int, num_items: int) -> None:
        self.num_items = num_items
        uid = torch.cat([k.uid for k in known]) if known else torch.zeros(0, dtype=torch.long)
        iid = torch.cat([k.iid for k in known]) if known else torch.zeros(0, dtype=torch.long)
        keys = torch.unique(uid * num_items + iid)  # sorted by user, then item
        self.items = keys % num_items
        self.indptr = torch.zeros(num_users + 1, dtype=torch.long)
        self.indptr[1:] = torch.bincount(keys // num_items, minlength=num_users).cumsum(0)

    def mask(self, uid: torch.Tensor) -> torch.Tensor:
        """(B, V) bool, True where user uid[b] has a known interaction with the item."""
        starts, ends = self.indptr[uid], self.indptr[uid + 1]
        lens = ends - starts
        row = torch.repeat_interleave(torch.arange(len(uid)), lens)
        offset = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        out = torch.zeros(len(uid), self.num_items, dtype=torch.bool)
        out[row, self.items[torch.repeat_interleave(starts, lens) + offset]] = True
        return out


def all_item_ranks(full_scores: Callable[[torch.Tensor], torch.Tensor], uid: torch.Tensor, target: torch.Tensor,
                   known: Sequence[Interactions], num_items: int, chunk: int = 512, seed: int = 0,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank each target among all items the user has no known interaction with.

    Args:
        full_scores: uid (B,) -> (B, V) scores of every item.
        uid: (N,) users; target: (N,) their held-out items.
        known: interactions to exclude from the candidates (training, and validation when testing); the
            target itself always stays a candidate.
        num_items: V.
        seed: for the one sampled negative per row (pooled AUC).

    Returns:
        rank (N,) 1-based (1 + candidates scored strictly higher), auc_u (N,) the share of other candidates scored
        below the target (ties count one half), target_score (N,), and the score of one uniformly sampled other
        candidate (N,).

    Raises:
        ValueError: non-finite scores, or a user with no candidate besides the target.
    """
    num_users = int(max([int(uid.max()) + 1 if len(uid) else 0] + [int(k.uid.max()) + 1 for k in known if len(k)]))
    known_items = KnownItems(known, num_users, num_items)
    g = torch.Generator().manual_seed(seed)
    ranks, aucs, tscores, nscores = [], [], [], []
    for s in range(0, len(uid), chunk):
        u, t = uid[s:s + chunk], target[s:s + chunk]
        b = torch.arange(len(u))
        scores = full_scores(u).float().cpu()  # (B, V)
        if not torch.isfinite(scores).all():
            raise ValueError("the CF model produced non-finite scores; the training diverged (lower cf.lr)")
        cand = ~known_items.mask(u)
        cand[b, t] = False  # the target is not its own negative
        n_neg = cand.sum(1)
        if (n_neg == 0).any():
            raise ValueError(f"user {int(u[n_neg == 0][0])} has no candidate item besides the target")
        ts = scores[b, t][:, None]  # (B, 1)
        ranks.append(((scores > ts) & cand).sum(1) + 1)
        aucs.append((((scores < ts) & cand).sum(1) + 0.5 * ((scores == ts) & cand).sum(1)) / n_neg)
        tscores.append(ts.squeeze(1))
        neg = torch.randint(num_items, (len(u),), generator=g)
        for _ in range(10_000):  # rejection sampling; every row has at least one candidate (checked above)
            bad = ~cand[b, neg]
            if not bad.any():
                break
            neg[bad] = torch.randint(num_items, (int(bad.sum()),), generator=g)
        nscores.append(scores[b, neg])
    cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0))
    return cat(ranks).long(), cat(aucs).double(), cat(tscores), cat(nscores)


def ranking_metrics(full_scores: Callable[[torch.Tensor], torch.Tensor], rows: Interactions,
                    known: Sequence[Interactions], num_items: int, groups: dict[str, np.ndarray],
                    ks: Sequence[int] = (10,), seed: int = 0, prefix: str = "test/") -> dict[str, float | None]:
    """HR@K, NDCG@K (all-item ranking), UAUC and pooled AUC (vs one sampled candidate) of `rows`, per group."""
    rank, auc_u, pos_score, neg_score = all_item_ranks(full_scores, rows.uid, rows.iid, known, num_items, seed=seed)
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
