"""Matrix factorisation models of the CF stage (CKEM): biased MF for explicit ratings, BPR-MF for implicit feedback.

The trainer uses `forward(uid, iid) -> (B,)` scores, the per-sample squared norm of the parameters a sample
touches (SGD-style L2: `mse_terms` for MF, `bpr_terms` for BPR), and `tables()`, the exported user/item tables
(and biases for MF). MF trains through `add_mse_grads`, the same loss with its gradient written out by hand.
"""

from __future__ import annotations

import torch
from torch import nn


class BiasedMF(nn.Module):
    """r_hat(u, i) = mu + b_u + b_i + <p_u, q_i> (Koren et al. 2009), trained with MSE on explicit ratings.

    Args:
        num_users: U.
        num_items: V.
        dim: factor size d.
        global_mean: mu, usually the training-set mean rating (kept as a trainable scalar).
        init_std: std of the Gaussian factor initialisation (small init + L2 converges to a low-norm solution).

    Example:
        >>> m = BiasedMF(10, 20, dim=8, global_mean=3.5)
        >>> m(torch.tensor([0, 1]), torch.tensor([3, 4])).shape
        torch.Size([2])
    """

    def __init__(self, num_users: int, num_items: int, dim: int, global_mean: float = 0.0,
                 init_std: float = 0.01) -> None:
        super().__init__()
        if num_users <= 0 or num_items <= 0 or dim <= 0:
            raise ValueError(f"BiasedMF needs num_users, num_items, dim > 0, got {num_users}, {num_items}, {dim}")
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_bias = nn.Embedding(num_items, 1)
        self.global_bias = nn.Parameter(torch.tensor(float(global_mean)))
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, uid: torch.Tensor, iid: torch.Tensor) -> torch.Tensor:
        dot = (self.user(uid) * self.item(iid)).sum(-1)  # (B,)
        return self.global_bias + self.user_bias(uid).squeeze(-1) + self.item_bias(iid).squeeze(-1) + dot

    def mse_terms(self, uid: torch.Tensor, iid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, per-sample L2 of p_u, q_i, b_u, b_i), each (B,), from one lookup per table."""
        p, q = self.user(uid), self.item(iid)  # (B, d)
        bu, bi = self.user_bias(uid).squeeze(-1), self.item_bias(iid).squeeze(-1)  # (B,)
        pred = self.global_bias + bu + bi + (p * q).sum(-1)
        return pred, (p * p).sum(-1) + (q * q).sum(-1) + bu * bu + bi * bi

    @torch.no_grad()
    def add_mse_grads(self, uid: torch.Tensor, iid: torch.Tensor, target: torch.Tensor, weight_decay: float,
                      denom: float, bias_weight_decay: float | None = None) -> torch.Tensor:
        """Add the gradient of `(sum (pred - target)^2 + weight_decay * sum l2) / denom` to every `.grad`.

        `bias_weight_decay` (default `weight_decay`) replaces weight_decay on the b_u^2 + b_i^2 part of l2; with
        both equal this is the gradient autograd gives through `mse_terms`. Written out by hand because a CF step
        is a few dozen small ops: each table's gradient is one `index_add_` of B rows (autograd's embedding
        backward cost 5x that on CPU and dominated the step). The `.grad` tensors must exist (dense).

        Returns:
            the data term `sum (pred - target)^2 / denom`, 0-dim (the regulariser's value is not computed:
            the trainer only logs the loss and checks it is finite).
        """
        P, Q, BU, BI = self.user.weight, self.item.weight, self.user_bias.weight[:, 0], self.item_bias.weight[:, 0]
        p, q, bu, bi = P.index_select(0, uid), Q.index_select(0, iid), BU.index_select(0, uid), BI.index_select(0, iid)
        err = (p * q).sum(-1).add_(bu).add_(bi).add_(self.global_bias).sub_(target)  # pred - target, (B,)
        wb = weight_decay if bias_weight_decay is None else bias_weight_decay
        e, w, wb = err * (2.0 / denom), 2.0 * weight_decay / denom, 2.0 * wb / denom  # d loss / d (pred, l2 terms)
        P.grad.index_add_(0, uid, torch.addcmul(p * w, e[:, None], q))
        Q.grad.index_add_(0, iid, torch.addcmul(q * w, e[:, None], p))
        self.user_bias.weight.grad[:, 0].index_add_(0, uid, torch.add(e, bu, alpha=wb) if wb else e)
        self.item_bias.weight.grad[:, 0].index_add_(0, iid, torch.add(e, bi, alpha=wb) if wb else e)
        self.global_bias.grad += e.sum()
        return err.dot(err) / denom

    @torch.no_grad()
    def tables(self) -> dict[str, torch.Tensor]:
        return {"user": self.user.weight.detach().clone(), "item": self.item.weight.detach().clone(),
                "user_bias": self.user_bias.weight.detach().squeeze(-1).clone(),
                "item_bias": self.item_bias.weight.detach().squeeze(-1).clone(),
                "global_bias": self.global_bias.detach().reshape(1).clone()}


class BPRMF(nn.Module):
    """s(u, i) = <p_u, q_i>, trained with the BPR pairwise loss -log sigmoid(s(u, i+) - s(u, i-)) (Rendle et al. 2009).

    Args:
        num_users: U.
        num_items: V.
        dim: factor size d.
        init_std: std of the Gaussian initialisation (LightGCN's code uses 0.1).

    Example:
        >>> m = BPRMF(10, 20, dim=8)
        >>> m(torch.tensor([0]), torch.tensor([5])).shape
        torch.Size([1])
    """

    def __init__(self, num_users: int, num_items: int, dim: int, init_std: float = 0.1) -> None:
        super().__init__()
        if num_users <= 0 or num_items <= 0 or dim <= 0:
            raise ValueError(f"BPRMF needs num_users, num_items, dim > 0, got {num_users}, {num_items}, {dim}")
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)

    def forward(self, uid: torch.Tensor, iid: torch.Tensor) -> torch.Tensor:
        return (self.user(uid) * self.item(iid)).sum(-1)

    def bpr_terms(self, uid: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(s(u, pos), s(u, neg), per-sample L2 of p_u, q_pos, q_neg), each (B,)."""
        p, qp, qn = self.user(uid), self.item(pos), self.item(neg)
        l2 = (p * p).sum(-1) + (qp * qp).sum(-1) + (qn * qn).sum(-1)
        return (p * qp).sum(-1), (p * qn).sum(-1), l2

    @torch.no_grad()
    def full_scores(self, uid: torch.Tensor) -> torch.Tensor:
        """(len(uid), V) scores of every item, for all-item ranking."""
        return self.user(uid) @ self.item.weight.T

    @torch.no_grad()
    def tables(self) -> dict[str, torch.Tensor]:
        return {"user": self.user.weight.detach().clone(), "item": self.item.weight.detach().clone()}
