"""A deterministic fake CKF model and hand-built samples of all four tasks, shared by the evaluation tests."""

from __future__ import annotations

import torch
from torch import nn

from ckf_dist.data.batch import Batch
from ckf_dist.data.schema import PromptSample
from ckf_dist.tasks import ITEM_SLOT, USER_SLOT

TITLES = ["Blue River", "Red Stone", "Green Hill", "Gold Sky", "Dark Sea", "Old Town", "Night Train", "Sun Road"]
REVIEWS = ["great sound and solid build", "worth the price", "too quiet for me", "solid build, great value"]


class FakeCKF(nn.Module):
    """A deterministic stand-in for CKFModel with its evaluation interface.

    Position t's logits depend only on the real tokens 0..t of its row (a masked running sum of embeddings),
    so padding side and batch composition do not change them; CF rows add a per-user vector, so the 'cf'
    and 'text' variants differ. `calls` counts model calls (each would be a set of ZeRO-3 gathers).

    Args:
        vocab_size: logits width (len(tokenizer)).
        dim: embedding width.
        seed: weight seed (same seed -> same model on every rank).

    Example:
        >>> m = FakeCKF(400); logits = m.logits(batch)  # (B, L, 400)
    """

    def __init__(self, vocab_size: int, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab_size, dim, generator=g))
        self.user = nn.Parameter(torch.randn(64, dim, generator=g))
        self.out = nn.Parameter(torch.randn(dim, vocab_size, generator=g) / dim**0.5)
        self.calls = 0
        self.gen_calls: list[tuple[int, bool]] = []

    def _base(self, batch: Batch) -> torch.Tensor:
        x = self.emb[batch.input_ids] * batch.attention_mask[..., None]  # (B, L, d)
        cf = (self.user[batch.user_ids.clamp(min=0) % 64] * batch.is_cf[:, None])[:, None]  # (B, 1, d)
        return x.cumsum(dim=1) + cf

    def logits(self, batch: Batch, at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        self.calls += 1
        h = self._base(batch)
        return torch.tanh(h if at is None else h[at[0], at[1]]) @ self.out  # (B, L, V), or (N, V) at (rows, cols)

    def generate(self, batch: Batch, max_new_tokens: int, num_beams: int = 1, synced_gpus: bool = False) -> torch.Tensor:
        self.calls += 1
        self.gen_calls.append((num_beams, synced_gpus))
        h = self._base(batch)[:, -1]  # (B, d): left-padded, so the last column is every row's last prompt token
        out = []
        for _ in range(max_new_tokens):
            nxt = (torch.tanh(h) @ self.out).argmax(dim=-1)  # (B,)
            out.append(nxt)
            h = h + self.emb[nxt]
        return torch.stack(out, dim=1)  # (B, new)


def _sample(task: str, n: int, uid: int, **kw) -> PromptSample:
    hist = [(uid + j) % len(TITLES) for j in range(2 + uid % 3)]
    item = (uid * 3 + n) % len(TITLES)
    seen = ", ".join(f"{TITLES[h]}" for h in hist)
    seen_cf = ", ".join(f"{TITLES[h]} {ITEM_SLOT}" for h in hist)
    ask = {"ctr": f"Will the user like {TITLES[item]}", "rating": f"Rate {TITLES[item]} for the user",
           "topk": "Which of these will the user pick next", "exp": f"Why would the user like {TITLES[item]}"}[task]
    base: PromptSample = {
        "key": f"test/{task}/{uid}/{n}", "task": task, "split": "test", "uid": uid, "history": hist,
        "slot_items": hist + ([item] if task != "topk" else []),
        "prompt_cf": f"User {USER_SLOT} watched {seen_cf}. {ask}{'' if task == 'topk' else ' ' + ITEM_SLOT}? Answer:",
        "prompt_text": f"User watched {seen}. {ask}? Answer:",
        "answer": "", "label": 0.0, "candidates": [], "candidate_titles": [], "item": item,
        "is_cold": uid % 3 == 0,
    }
    base.update(kw)
    return base


def make_samples(n_users: int = 7, cold: bool = True) -> list[PromptSample]:
    """Hand-built samples of all four tasks: both CTR classes per user, ratings 1-5, 4 top-K candidates."""
    out: list[PromptSample] = []
    for u in range(n_users):
        for n, lab in enumerate((1.0, 0.0) if u % 4 else (0.0,)):
            out.append(_sample("ctr", n, u, answer="Yes" if lab else "No", label=lab))
        r = float(1 + u % 5)
        out.append(_sample("rating", 0, u, answer=str(int(r)), label=r))
        cands = [(u + j) % len(TITLES) for j in (0, 2, 3, 5)]
        target = u % 4
        out.append(_sample("topk", 0, u, candidates=cands, candidate_titles=[TITLES[c] for c in cands],
                           label=float(target), answer=TITLES[cands[target]], item=cands[target]))
        out.append(_sample("exp", 0, u, answer=REVIEWS[u % len(REVIEWS)], label=5.0))
    if not cold:
        for s in out:
            s["is_cold"] = False
    return sorted(out, key=lambda s: s["key"])


def eval_cfg(batch_size: int = 3):
    from ckf_dist.config import RunConfig

    cfg = RunConfig()
    cfg.eval.batch_size = batch_size
    cfg.eval.max_new_tokens = 6
    cfg.model.max_length = 128
    return cfg
