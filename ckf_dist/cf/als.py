"""Alternating least squares for biased MF (CKEM, cf.solver=als): each epoch solves [p_u, b_u], then [q_i, b_i],
in closed form. Data-parallel: each rank builds the normal equations of its contiguous shard of the ratings, one
all-reduce per half-sweep sums them, and every rank solves the same system (N ranks == 1 rank up to summation order).
"""

from __future__ import annotations

import math

import torch

from ckf_dist import comm
from ckf_dist.cf.data import Interactions
from ckf_dist.cf.mf import BiasedMF
from ckf_dist.cf.solver import NonFiniteLossError, dist_info
from ckf_dist.config import CFConfig


def _als_half(sel: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, resid: torch.Tensor,
              other: torch.Tensor, lam: float, world: int) -> torch.Tensor:
    """Ridge solution x_r = (sum_c o_c o_c^T + lam n_r I)^-1 sum_c resid o_c for every row r (batched); with lam = 0
    the minimum-norm least-squares solution (pseudo-inverse), so that rows with few or no ratings do not fail.

    `sel` is the sparse (R, C) rating pattern of this rank's rows, `other` the (C, k) fixed side. The normal
    equations are all-reduced over ranks before solving, so the result does not depend on the world size.
    """
    k = other.shape[1]
    A = torch.sparse.mm(sel, (other[:, :, None] * other[:, None, :]).reshape(-1, k * k))  # (R, k*k)
    b = torch.zeros(sel.shape[0], k, dtype=other.dtype, device=other.device)
    b.index_add_(0, rows, other[cols] * resid[:, None])
    n = torch.bincount(rows, minlength=sel.shape[0]).to(other.dtype)
    if world > 1:
        flat = torch.cat([A.reshape(-1), b.reshape(-1), n])
        flat = comm.all_reduce(flat)
        A, b, n = flat[:A.numel()].view_as(A), flat[A.numel():A.numel() + b.numel()].view_as(b), flat[-len(n):]
    A = A.view(-1, k, k) + (lam * n.clamp(min=1))[:, None, None] * torch.eye(k, dtype=other.dtype, device=other.device)
    if lam > 0:
        return torch.linalg.solve(A, b)  # rows without ratings: A = lam I, b = 0 -> x = 0
    # lam = 0 (cf.weight_decay=0): plain least squares. A row with fewer ratings than k (or none) has a singular A,
    # where solve fails; the pseudo-inverse gives the minimum-norm solution (x = 0 for a row without ratings).
    return (torch.linalg.pinv(A, hermitian=True) @ b[:, :, None])[:, :, 0]


class ALSSolver:
    """Biased MF by alternating least squares: [p_u, b_u] then [q_i, b_i] in closed form per epoch.

    The user step regresses r - mu - b_i on [q_i, 1], the item step r - mu - b_u on [p_u, 1], each with ridge
    lambda * (rating count) (weighted-lambda regularisation, Zhou et al. 2008); mu stays the training mean.

    Args:
        cfg: the cf section (weight_decay = lambda, dim, seed; lr and batch_size are unused).
        model: the model to train in place, identical on every rank.
        train: the training interactions.
        device: where the model lives.
    """

    @torch.no_grad()
    def __init__(self, cfg: CFConfig, model: BiasedMF, train: Interactions, device: torch.device) -> None:
        rank, self.world = dist_info()
        self.cfg, self.model, self.device = cfg, model, device
        mine = torch.arange(len(train)).tensor_split(self.world)[rank]
        self.uid, self.iid = train.uid[mine].to(device), train.iid[mine].to(device)
        self.r = train.rating[mine].to(device).float()
        U, V = model.user.weight.shape[0], model.item.weight.shape[0]
        ones = torch.ones(len(self.uid), device=device)
        by_user = torch.sparse_coo_tensor(torch.stack([self.uid, self.iid]), ones, (U, V))
        by_item = torch.sparse_coo_tensor(torch.stack([self.iid, self.uid]), ones, (V, U))
        self.by_user, self.by_item = by_user.coalesce().to_sparse_csr(), by_item.coalesce().to_sparse_csr()
        # from the SGD path's 0.01 init, heavy ridge shrinks the factors to the all-zero fixed point in one sweep
        model.item.weight.normal_(0.0, 1.0 / math.sqrt(cfg.dim), generator=torch.Generator().manual_seed(cfg.seed))
        self.col = torch.ones(max(U, V), 1, device=device)

    @torch.no_grad()
    def run_epoch(self, epoch: int) -> float:
        """One user sweep and one item sweep; returns the training MSE over all ranks."""
        m, uid, iid, r, lam, world = self.model, self.uid, self.iid, self.r, self.cfg.weight_decay, self.world
        mu, P, Q = m.global_bias, m.user.weight, m.item.weight
        bu, bi = m.user_bias.weight[:, 0], m.item_bias.weight[:, 0]
        U, V = P.shape[0], Q.shape[0]
        x = _als_half(self.by_user, uid, iid, r - mu - bi[iid], torch.cat([Q, self.col[:V]], 1), lam, world)
        P.copy_(x[:, :-1])
        bu.copy_(x[:, -1])
        x = _als_half(self.by_item, iid, uid, r - mu - bu[uid], torch.cat([P, self.col[:U]], 1), lam, world)
        Q.copy_(x[:, :-1])
        bi.copy_(x[:, -1])
        err = mu + bu[uid] + bi[iid] + (P[uid] * Q[iid]).sum(-1) - r
        loss = torch.stack([(err * err).sum(), torch.tensor(float(len(err)), device=self.device)])
        if world > 1:
            loss = comm.all_reduce(loss)
        train_mse = float(loss[0] / loss[1])
        if not math.isfinite(train_mse):
            raise NonFiniteLossError(f"cf.mf (als): the training loss became {train_mse} at epoch {epoch} "
                                     f"(weight_decay={self.cfg.weight_decay}); raise cf.weight_decay")
        return train_mse
