"""SoftPromptFusion (KFM): frozen CF tables -> personal user vector h_u = Proj_U(E_U[u] W_u) and item vectors
h_v = Proj_V(E_V[v]) -> written into `inputs_embeds` at the USER_SLOT / ITEM_SLOT positions of every row of a batch
(vectorised: cumsum over the slot mask gives the k of each ITEM_SLOT, a gather gives its item), CKF_METHOD.md Module 2.
"""

from __future__ import annotations

import torch
from torch import nn

from ckf_dist.model.meta_net import MetaNet


class SoftPromptFusion(nn.Module):
    """Maps CF embeddings into the LLM's hidden space and injects them at the slot tokens.

    Fallbacks (never a crash):
      - a user without history (all -1 in `history`): h_u = Proj_U(E_U[u]) (W_u = I);
      - a user id of -1 or >= U (unknown to the CF model, cold start): the learned vector `unk_user` replaces E_U[u]
        (it is still mapped by W_u when the user has history: the history items describe the unknown user);
      - an item id >= V (or negative) in a slot or in the history: the learned vector `unk_item` replaces E_V[v].
        `unk_user` / `unk_item` start at the mean of their CF table (an "average" user / item).
    History entries equal to -1 are padding. The CF tables are non-persistent buffers: frozen, no gradient, not in
    checkpoints (they are their own artifact, rebuilt from the CF stage).

    Args:
        user_emb: (U, d) frozen CF user table E_U.
        item_emb: (V, d) frozen CF item table E_V.
        llm_hidden: hidden size of the LLM.
        meta_hidden: MetaNet MLP width.
        pooling: MetaNet history pooling, "mean" or "attention".
        user_slot_id: token id of USER_SLOT.
        item_slot_id: token id of ITEM_SLOT.

    Example:
        >>> fusion = SoftPromptFusion(torch.randn(5, 8), torch.randn(7, 8), 32, 16, "mean", 10, 11)
        >>> ids = torch.tensor([[3, 10, 4, 11, 11]])
        >>> out, anchor = fusion(torch.zeros(1, 5, 32), ids, torch.tensor([2]), torch.tensor([[1, -1]]),
        ...                      torch.tensor([[4, 6]]))
        >>> out.shape
        torch.Size([1, 5, 32])
    """

    def __init__(self, user_emb: torch.Tensor, item_emb: torch.Tensor, llm_hidden: int, meta_hidden: int,
                 pooling: str, user_slot_id: int, item_slot_id: int) -> None:
        super().__init__()
        if user_emb.dim() != 2 or item_emb.dim() != 2 or user_emb.shape[1] != item_emb.shape[1]:
            raise ValueError(f"CF tables must be (U, d) and (V, d) with the same d; got user_emb "
                             f"{tuple(user_emb.shape)} and item_emb {tuple(item_emb.shape)}")
        if user_emb.shape[0] == 0 or item_emb.shape[0] == 0:
            raise ValueError(f"CF tables must not be empty; got {tuple(user_emb.shape)}, {tuple(item_emb.shape)}")
        d = user_emb.shape[1]
        self.dim, self.user_slot_id, self.item_slot_id = d, int(user_slot_id), int(item_slot_id)
        self.register_buffer("user_table", user_emb.detach().float().clone(), persistent=False)
        self.register_buffer("item_table", item_emb.detach().float().clone(), persistent=False)
        self.unk_user = nn.Parameter(self.user_table.mean(0).clone())
        self.unk_item = nn.Parameter(self.item_table.mean(0).clone())
        self.meta_net = MetaNet(d, meta_hidden, pooling)
        self.proj_user = nn.Linear(d, llm_hidden)
        self.proj_item = nn.Linear(d, llm_hidden)

    @torch.no_grad()
    def match_norm(self, target: float) -> None:
        """Rescale Proj_U and Proj_V so that the mean norm of the projected CF vectors (user vectors without W_u, all
        item vectors) is `target`, e.g. the mean norm of the LLM's token embeddings: injected vectors far larger or
        smaller than the tokens around them are hard for the frozen LLM to use."""
        for proj, table in ((self.proj_user, self.user_table), (self.proj_item, self.item_table)):
            scale = target / proj(table.to(proj.weight.dtype)).norm(dim=-1).mean().clamp_min(1e-12)
            proj.weight.mul_(scale)
            proj.bias.mul_(scale)

    @property
    def num_users(self) -> int:
        return self.user_table.shape[0]

    @property
    def num_items(self) -> int:
        return self.item_table.shape[0]

    def _item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """E_V[ids] with `unk_item` for ids outside [0, V); (..., d)."""
        V = self.num_items
        known = (ids >= 0) & (ids < V)
        table = self.item_table.to(self.unk_item.dtype)
        return torch.where(known[..., None], table[ids.clamp(0, V - 1)], self.unk_item)

    def user_vectors(self, user_ids: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Personal user vectors E_U[u] @ W_u in CF space, (B, d)."""
        U = self.num_users
        known = (user_ids >= 0) & (user_ids < U)
        table = self.user_table.to(self.unk_user.dtype)
        e_u = torch.where(known[:, None], table[user_ids.clamp(0, U - 1)], self.unk_user)  # (B, d)
        hist_mask = history >= 0  # (B, H); -1 = padding
        W, _ = self.meta_net(self._item_vectors(history), hist_mask)  # (B, d, d)
        return (e_u[:, None, :] @ W).squeeze(1)  # (B, d)

    def forward(self, embeds: torch.Tensor, input_ids: torch.Tensor, user_ids: torch.Tensor, history: torch.Tensor,
                slot_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the slot-token embeddings with the projected CF vectors of each row.

        Args:
            embeds: (B, L, D) token embeddings of `input_ids`.
            input_ids: (B, L).
            user_ids: (B,) CF user ids (-1 = unknown).
            history: (B, H) history item ids, -1 padded.
            slot_items: (B, S) item of the k-th ITEM_SLOT token of the row, -1 padded.

        Returns:
            The fused embeddings (B, L, D) (a new tensor; `embeds` is not modified) and `anchor`, a zero scalar that
            depends on every fusion parameter: adding it to the loss keeps all of them in the autograd graph even for
            batches without any slot (text-only rows), which ZeRO-3 needs (all ranks must reduce the same gradients).

        Raises:
            ValueError: a row holds a different number of ITEM_SLOT tokens than items in its `slot_items`.
        """
        B = input_ids.shape[0]
        if user_ids.shape != (B,) or history.shape[0] != B or slot_items.shape[0] != B or embeds.shape[:2] != \
                input_ids.shape:
            raise ValueError(f"fusion inputs disagree on the batch: embeds {tuple(embeds.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}, user_ids {tuple(user_ids.shape)}, history "
                             f"{tuple(history.shape)}, slot_items {tuple(slot_items.shape)}")
        dtype = self.proj_user.weight.dtype
        h_u = self.proj_user(self.user_vectors(user_ids, history).to(dtype))  # (B, D)

        item_mask = input_ids == self.item_slot_id  # (B, L)
        n_slots = item_mask.sum(1)  # (B,)
        n_items = (slot_items >= 0).sum(1)  # (B,)
        bad = (n_slots > 0) & (n_slots != n_items)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"Batch.slot_items does not match the ITEM_SLOT tokens in rows {rows[:10]}: "
                             f"{n_slots[rows[:10]].tolist()} slot tokens vs {n_items[rows[:10]].tolist()} items; "
                             f"each ITEM_SLOT in prompt_cf needs its item in slot_items (in order)")
        k = item_mask.long().cumsum(1) - 1  # (B, L): index of each ITEM_SLOT among the row's slots
        b_i, l_i = item_mask.nonzero(as_tuple=True)  # (N,)
        ids = slot_items[b_i, k[b_i, l_i]]  # (N,)
        h_v = self.proj_item(self._item_vectors(ids).to(dtype))  # (N, D)

        b_u, l_u = (input_ids == self.user_slot_id).nonzero(as_tuple=True)
        out = embeds.index_put((b_u, l_u), h_u[b_u].to(embeds.dtype))
        out = out.index_put((b_i, l_i), h_v.to(embeds.dtype))
        anchor = (h_u.sum() + h_v.sum()) * 0.0
        return out, anchor
