"""Shared fixtures: seeds, the tiny local Llama + tokenizer (built once, loaded via from_pretrained)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def seed() -> int:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(autouse=True)
def _destroy_process_group():
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_TINY_TEXTS = [
    ("User <|user_cf|> watched Blue River <|item_cf|>, Red Stone <|item_cf|>. Will the user like Green Hill "
     "<|item_cf|>? Answer: Yes"),
    "Rate Green Hill for the user. Answer: 4",
    "Which of these will the user pick next: Blue River, Red Stone, Green Hill? Answer: Red Stone",
    "Why would the user like Blue River? Answer: great sound and solid build, worth the price",
] * 20


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> str:
    """A saved tiny Llama (hidden 32, 2 layers) + BPE tokenizer folder; load it with from_pretrained."""
    from ckf_dist.config import TinyLLMConfig
    from ckf_dist.model.llm import build_tiny_llm

    out = tmp_path_factory.mktemp("tiny_llm")
    cfg = TinyLLMConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        vocab_size=400)
    return str(build_tiny_llm(cfg, _TINY_TEXTS, out, seed=0))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llm_dir):
    from ckf_dist.model.llm import load_tokenizer

    return load_tokenizer(tiny_llm_dir)


@pytest.fixture
def tiny_llm(tiny_llm_dir, tiny_tokenizer):
    """A fresh (frozen) copy of the tiny model, loaded through AutoModelForCausalLM.from_pretrained."""
    from ckf_dist.model.llm import load_llm

    return load_llm(tiny_llm_dir, "float32", tiny_tokenizer)


@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray for one test module (Ray Data preprocessing and streams), shut down after it."""
    import ray

    from ckf_dist.data.preprocess import init_local_ray

    started = init_local_ray(num_cpus=4, object_store_mb=300)
    yield
    if started:
        ray.shutdown()
