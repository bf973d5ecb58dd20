"""The fusion oracle: CTR data in which the label depends only on the CF vectors (like = e_u . e_v > 0; prompts and
titles carry nothing), or only on the text (the item title says "red" or "blue"). A CKF model that uses its injected
vectors learns the first; a text-only model cannot, but learns the second. Shared by
tests/integration/test_fusion_signal.py and benchmarks/fusion_oracle.py (the ablations of its knobs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckf_dist.config import ModelConfig, MultiLoRAConfig, RunConfig, TinyLLMConfig
from ckf_dist.data.collate import Collator
from ckf_dist.data.schema import PromptSample
from ckf_dist.eval.evaluate import evaluate_model
from ckf_dist.model.ckf import CKFModel, build_ckf_model
from ckf_dist.model.llm import build_tiny_llm, load_llm, load_tokenizer
from ckf_dist.tasks import ITEM_SLOT, USER_SLOT

NUM_USERS, NUM_ITEMS = 100, 80
PROMPT_CF = f"User {USER_SLOT} has a history. Will the user like the {{title}} item {ITEM_SLOT}? Answer:"
PROMPT_TEXT = "User has a history. Will the user like the {title} item? Answer:"


@dataclass
class OracleRun:
    """Knobs of one oracle run (defaults: the recipe the test uses)."""

    signal: str = "cf"
    """'cf': the label is e_u . e_v > 0 and every title is 'plain'; 'text': the label is the title ('red' = Yes)."""
    variant: str = "cf"
    """Prompts the model trains and is scored on: 'cf' (CF slots) or 'text' (text only, the LLM-without-CF)."""
    steps: int = 1500
    batch_size: int = 32
    lr: float = 0.003
    fusion_lr_scale: float = 10 / 3
    fusion_init: str = "match_tokens"
    dim: int = 8
    seed: int = 0


def cf_tables(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(NUM_USERS, dim, generator=g), torch.randn(NUM_ITEMS, dim, generator=g)


def oracle_sample(u: int, v: int, signal: str, user_emb: torch.Tensor, item_emb: torch.Tensor) -> PromptSample:
    if signal == "cf":
        title, like = "plain", bool(user_emb[u] @ item_emb[v] > 0)
    else:
        like = (u * 7 + v * 3) % 2 == 0  # uncorrelated with the CF vectors
        title = "red" if like else "blue"
    return {"key": f"test/ctr/{u:03d}/{v:03d}", "task": "ctr", "split": "test", "uid": u, "history": [],
            "slot_items": [v], "prompt_cf": PROMPT_CF.format(title=title), "prompt_text": PROMPT_TEXT.format(title=title),
            "answer": "Yes" if like else "No", "label": float(like), "candidates": [], "candidate_titles": [],
            "item": v, "is_cold": u % 4 == 0}


def tiny_llm_dir(root: Path) -> Path:
    """The tiny random Llama + tokenizer, built once under `root`."""
    out = root / "fusion_oracle_llm"
    if not (out / "config.json").is_file():
        texts = [PROMPT_CF.format(title=t) + " Yes" for t in ("plain", "red", "blue")]
        texts += [PROMPT_TEXT.format(title=t) + " No" for t in ("plain", "red", "blue")]
        build_tiny_llm(TinyLLMConfig(hidden_size=64, intermediate_size=128, num_layers=2, vocab_size=400), texts * 30,
                       out, seed=0)
    return out


def run_oracle(run: OracleRun, llm_dir: Path) -> dict[str, float]:
    """Train a fresh CKF model on the oracle's training pairs and score CTR on held-out pairs; returns AUC etc."""
    torch.manual_seed(run.seed)
    user_emb, item_emb = cf_tables(run.dim)
    tok = load_tokenizer(llm_dir)
    model: CKFModel = build_ckf_model(
        load_llm(llm_dir, "float32", tok), tok, user_emb, item_emb,
        ModelConfig(meta_hidden=32, fusion_init=run.fusion_init),
        MultiLoRAConfig(rank=8, task_rank=8, alpha=16, task_alpha=16, dropout=0.0, task_dropout=0.0), tasks=("ctr",))
    pairs = [(u, v) for u in range(NUM_USERS) for v in range(NUM_ITEMS)]
    np.random.default_rng(0).shuffle(pairs)
    test, train = pairs[:600], pairs[600:]
    collate = Collator(tok, max_length=64, history_len=1)
    opt = torch.optim.AdamW(model.parameter_groups(run.lr, run.lr * run.fusion_lr_scale), lr=run.lr,
                            weight_decay=1e-3)
    rng = np.random.default_rng(run.seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(run.steps):
        rows = [oracle_sample(*train[i], run.signal, user_emb, item_emb) for i in rng.integers(len(train),
                                                                                               size=run.batch_size)]
        loss = model(collate(rows, (run.variant,))).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    cfg = RunConfig()
    cfg.model.max_length, cfg.data.history_len = 64, 1
    samples = [oracle_sample(u, v, run.signal, user_emb, item_emb) for u, v in sorted(test)]
    model.eval()
    with torch.no_grad():
        metrics = evaluate_model(model, tok, samples, cfg, variant=run.variant, rank=0, world=1)
    return {"auc_ctr": metrics["auc_ctr"], "final_loss": float(loss.detach()), "seconds": time.perf_counter() - t0}
