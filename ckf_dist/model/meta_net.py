"""MetaNet (KFM): pools a user's history item CF embeddings into p_u and maps it to a personal d x d matrix W_u,
so that the user CF vector is mapped into the LLM space in a user-specific way (CKF_METHOD.md, Module 2).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MetaNet(nn.Module):
    """History pooling + MLP producing the personal mapping W_u = I + reshape(MLP(p_u), d x d).

    The identity residual (with a down-scaled last layer) keeps W_u close to I at initialisation, so a freshly
    built model maps E_U[u] almost as the no-history fallback does; the MLP then learns the personal part.
    Rows without any history item get exactly W_u = I (the documented fallback: E_U[u] without W_u).

    Args:
        dim: CF embedding size d.
        hidden: width of the MLP (d -> hidden -> d*d).
        pooling: "mean" (masked mean over the history) or "attention" (a learned query scores every history item).

    Example:
        >>> net = MetaNet(dim=8, hidden=16)
        >>> W, has_hist = net(torch.randn(2, 5, 8), torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool))
        >>> W.shape, has_hist.tolist()
        (torch.Size([2, 8, 8]), [True, False])
    """

    def __init__(self, dim: int, hidden: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"model.pooling must be 'mean' or 'attention', got {pooling!r}")
        if dim <= 0 or hidden <= 0:
            raise ValueError(f"MetaNet needs dim > 0 and hidden > 0, got dim={dim}, hidden={hidden}")
        self.dim, self.pooling = dim, pooling
        self.query = nn.Parameter(torch.randn(dim) / math.sqrt(dim)) if pooling == "attention" else None
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim * dim))
        with torch.no_grad():
            # Small last layer: W_u starts near I (see the class docstring) but every MLP weight gets gradient.
            self.mlp[-1].weight.mul_(0.1)
            self.mlp[-1].bias.zero_()

    def pool(self, hist_emb: torch.Tensor, hist_mask: torch.Tensor) -> torch.Tensor:
        """p_u: (B, d) pooled history; rows without history give zeros (their W_u is replaced by I anyway)."""
        m = hist_mask.to(hist_emb.dtype)  # (B, H)
        if self.pooling == "mean":
            return (hist_emb * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
        scores = hist_emb @ self.query.to(hist_emb.dtype) / math.sqrt(self.dim)  # (B, H)
        # A finite fill (not -inf) keeps all-padding rows NaN-free; they are overridden by the fallback.
        scores = scores.masked_fill(~hist_mask, torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1) * m
        return (attn[..., None] * hist_emb).sum(1)

    def forward(self, hist_emb: torch.Tensor, hist_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Personal mappings.

        Args:
            hist_emb: (B, H, d) history item CF embeddings (padding rows may hold anything).
            hist_mask: (B, H) bool, True on real history items.

        Returns:
            W: (B, d, d) with W[b] = I for rows without history; has_hist: (B,) bool.
        """
        if hist_emb.dim() != 3 or hist_emb.shape[-1] != self.dim or hist_mask.shape != hist_emb.shape[:2]:
            raise ValueError(f"MetaNet expects hist_emb (B, H, {self.dim}) and hist_mask (B, H); got "
                             f"{tuple(hist_emb.shape)} and {tuple(hist_mask.shape)}")
        B, d = hist_emb.shape[0], self.dim
        p_u = self.pool(hist_emb, hist_mask)  # (B, d)
        delta = self.mlp(p_u).view(B, d, d)  # (B, d, d)
        has_hist = hist_mask.any(dim=1)  # (B,)
        eye = torch.eye(d, dtype=delta.dtype, device=delta.device).expand(B, d, d)
        # torch.where (not skipping the MLP) keeps the MetaNet in the autograd graph of every batch, which ZeRO-3
        # needs: every rank must produce a gradient for every trainable parameter.
        W = torch.where(has_hist[:, None, None], eye + delta, eye)
        return W, has_hist
