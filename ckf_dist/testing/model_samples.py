"""The hand-built prompt samples, CF tables and tiny CKF model factory shared by the model tests and benchmarks."""

from __future__ import annotations

import torch

from ckf_dist.config import ModelConfig, MultiLoRAConfig
from ckf_dist.data.batch import Batch
from ckf_dist.data.collate import Collator
from ckf_dist.model.ckf import CKFModel, build_ckf_model
from ckf_dist.tasks import ITEM_SLOT, USER_SLOT

NUM_USERS, NUM_ITEMS, CF_DIM = 12, 30, 8
TITLES = ["Blue River", "Red Stone", "Green Hill"]


def make_sample(key: str, task: str, uid: int, history: list[int], slot_items: list[int], answer: str) -> dict:
    """A PromptSample with one USER_SLOT and one ITEM_SLOT per slot item (the text variant without slots)."""
    names = [TITLES[i % 3] for i in range(len(slot_items))]
    prompt_cf = f"User {USER_SLOT} watched " + ", ".join(f"{n} {ITEM_SLOT}" for n in names) + ". Answer:"
    prompt_text = "User watched " + ", ".join(names) + ". Answer:"
    return {"key": f"train/{task}/{uid}/{key}", "task": task, "split": "train", "uid": uid, "history": history,
            "slot_items": slot_items, "prompt_cf": prompt_cf, "prompt_text": prompt_text, "answer": answer,
            "label": 1.0, "candidates": [], "candidate_titles": [], "item": slot_items[-1] if slot_items else 0,
            "is_cold": False}


def mixed_samples() -> list[dict]:
    """Eight samples, tasks interleaved, with a no-history user, an unknown user, an unknown item, 12 slots."""
    return [
        make_sample("0", "ctr", 1, [1, 2, 3], [4], "Yes"),
        make_sample("1", "topk", 2, [5, 6], list(range(7, 19)), "Red Stone"),
        make_sample("2", "rating", 3, [], [9], "4"),
        make_sample("3", "exp", -1, [2, 8], [10], "great sound and solid build"),
        make_sample("4", "ctr", 4, [7], [99], "No"),
        make_sample("5", "rating", 5, [1, 4, 9, 11], [3], "2"),
        make_sample("6", "topk", NUM_USERS + 3, [12], [1, 2, 3], "Green Hill"),
        make_sample("7", "exp", 6, [3], [5], "worth the price"),
    ]


def collate(tokenizer, samples: list[dict], variants=("cf",), padding_side: str = "right",
            with_answer: bool = True) -> Batch:
    return Collator(tokenizer, max_length=128, history_len=5, padding_side=padding_side,
                    with_answer=with_answer)(samples, variants)


def cf_tables(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_USERS, CF_DIM, generator=g), torch.randn(NUM_ITEMS, CF_DIM, generator=g)


def randomize_lora(model: CKFModel, seed: int = 1, scale: float = 0.1) -> None:
    """Give every LoRA B (zero at init) random values so that every adapter changes the output.

    scale 0.1 keeps the LoRA delta of trained-adapter size; much larger deltas (0.5) push the tiny model's fp32
    logits (|logit| up to ~8) to ~2e-5 rounding differences between mathematically equal computations.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            adapters = ([layer.shared] if layer.shared is not None else []) + list(layer.task_loras.values())
            for ad in adapters:
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * scale)


def make_model(llm, tokenizer, gate: bool = False, pooling: str = "mean", randomize: bool = True,
               **lora) -> CKFModel:
    """Tiny CKF model with dropout 0 (deterministic oracles) and random LoRA B's."""
    user_emb, item_emb = cf_tables()
    lora_cfg = MultiLoRAConfig(rank=4, alpha=8.0, dropout=0.0, task_rank=4, task_alpha=16.0, task_dropout=0.0,
                               gate=gate, **lora)
    model = build_ckf_model(llm, tokenizer, user_emb, item_emb, ModelConfig(meta_hidden=16, pooling=pooling),
                            lora_cfg)
    if randomize:
        randomize_lora(model)
    return model.eval()
