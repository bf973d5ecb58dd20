"""`Batch`: the tensors one micro-batch carries from collate into CKFModel.forward.

Rows may mix tasks and prompt variants (text-only vs CF slots); every per-row field is aligned on dim 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor
    """(B, L) long: prompt + answer + eos, padded with the tokenizer's pad id."""
    attention_mask: torch.Tensor
    """(B, L) long: 1 on real tokens."""
    labels: torch.Tensor
    """(B, L) long: answer tokens (and eos), -100 on prompt and padding (answer-only loss)."""
    task_ids: torch.Tensor
    """(B,) long: TASK_ID of each row; routes the row to its task's LoRA."""
    user_ids: torch.Tensor
    """(B,) long: CF user id, -1 when unknown to the CF model (cold start)."""
    history: torch.Tensor
    """(B, H) long: history item ids (chronological), -1 padded on the right."""
    slot_items: torch.Tensor
    """(B, S) long: item id for the k-th ITEM_SLOT token of the row, -1 padded."""
    is_cf: torch.Tensor
    """(B,) bool: the row is the CF-slot variant of its prompt (False: text-only variant)."""
    is_cold: torch.Tensor
    """(B,) bool: the user is cold (few training interactions)."""
    prompt_lengths: torch.Tensor
    """(B,) long: tokens before the answer (position of the first answer token in an unpadded row)."""
    keys: list[str] = field(default_factory=list)
    """Sample keys (PromptSample.key) per row; not moved to devices."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to `device` (non-blocking where possible)."""
        moved = {
            f.name: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return Batch(**moved)

    def select(self, rows: torch.Tensor) -> Batch:
        """The sub-batch of `rows` (a bool mask or index tensor over dim 0)."""
        idx = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx.tolist()]
        return Batch(**out)
