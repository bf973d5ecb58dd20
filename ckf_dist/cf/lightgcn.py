"""LightGCN (He et al. 2020) for the CF stage (CKEM): BPR-trained embeddings smoothed over the user-item graph.

E^(k+1) = D^-1/2 A D^-1/2 E^(k) on the bipartite graph of the training interactions; the final tables are the mean
of E^(0..K). The graph is built from the training split only, so validation/test never leak into the tables.
"""

from __future__ import annotations

import torch
from torch import nn


def normalized_adjacency(uid: torch.Tensor, iid: torch.Tensor, num_users: int, num_items: int) -> torch.Tensor:
    """Sparse (U+V, U+V) symmetric-normalised adjacency D^-1/2 A D^-1/2 of the distinct (user, item) pairs.

    Users are nodes 0..U-1 and items U..U+V-1; an isolated node has degree 0 and an all-zero row.
    """
    key = torch.unique(uid.long() * num_items + iid.long())  # repeated interactions count once
    u, i = key // num_items, key % num_items + num_users
    rows, cols = torch.cat([u, i]), torch.cat([i, u])
    n = num_users + num_items
    deg = torch.bincount(rows, minlength=n).float()
    inv_sqrt = deg.clamp(min=1).rsqrt() * (deg > 0)
    vals = inv_sqrt[rows] * inv_sqrt[cols]
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n), check_invariants=False).coalesce()


class LightGCN(nn.Module):
    """LightGCN: layer-0 embeddings propagated `num_layers` times, layers averaged; BPR scores are dot products.

    Args:
        num_users: U.
        num_items: V.
        dim: embedding size d.
        adjacency: the (U+V, U+V) normalised adjacency from `normalized_adjacency` (training interactions).
        num_layers: propagation layers K (the paper uses 1-4; 3 on most datasets).
        init_std: std of the Gaussian layer-0 initialisation (0.1 as in the authors' code).

    Example:
        >>> adj = normalized_adjacency(torch.tensor([0, 1]), torch.tensor([2, 0]), 3, 4)
        >>> m = LightGCN(3, 4, dim=8, adjacency=adj, num_layers=2)
        >>> m.full_scores(torch.tensor([0, 2])).shape
        torch.Size([2, 4])
    """

    def __init__(self, num_users: int, num_items: int, dim: int, adjacency: torch.Tensor, num_layers: int = 3,
                 init_std: float = 0.1) -> None:
        super().__init__()
        n = num_users + num_items
        if tuple(adjacency.shape) != (n, n):
            raise ValueError(f"adjacency has shape {tuple(adjacency.shape)}, expected ({n}, {n}) for "
                             f"{num_users} users + {num_items} items")
        if num_layers <= 0:
            raise ValueError(f"LightGCN needs num_layers > 0, got {num_layers}")
        self.num_users, self.num_items, self.num_layers = num_users, num_items, num_layers
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        self.register_buffer("adjacency", adjacency, persistent=False)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (U, d) user and (V, d) item tables: the mean of layers 0..K."""
        e = torch.cat([self.user.weight, self.item.weight])  # (U+V, d)
        acc = e
        for _ in range(self.num_layers):
            e = self.adjacency @ e
            acc = acc + e
        acc = acc / (self.num_layers + 1)
        return acc[: self.num_users], acc[self.num_users:]

    def forward(self, uid: torch.Tensor, iid: torch.Tensor) -> torch.Tensor:
        users, items = self.propagate()
        return (users[uid] * items[iid]).sum(-1)

    def bpr_terms(self, uid: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(s(u, pos), s(u, neg), per-sample L2 of the layer-0 embeddings), each (B,); one propagation."""
        users, items = self.propagate()
        p = users[uid]
        p0, qp0, qn0 = self.user(uid), self.item(pos), self.item(neg)
        l2 = (p0 * p0).sum(-1) + (qp0 * qp0).sum(-1) + (qn0 * qn0).sum(-1)  # the paper regularises layer 0 only
        return (p * items[pos]).sum(-1), (p * items[neg]).sum(-1), l2

    @torch.no_grad()
    def full_scores(self, uid: torch.Tensor) -> torch.Tensor:
        users, items = self.propagate()
        return users[uid] @ items.T

    @torch.no_grad()
    def tables(self) -> dict[str, torch.Tensor]:
        users, items = self.propagate()
        return {"user": users.detach().clone(), "item": items.detach().clone()}
