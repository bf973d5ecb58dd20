"""The base LLM: build a tiny random Llama + a BPE tokenizer trained on the dataset's own text, and
load any causal-LM checkpoint (tiny or 7B) through the same `from_pretrained` path.

Nothing is downloaded. This module knows nothing of DeepSpeed: the caller (train/build.py) sets up
ZeRO-3 sharded loading before calling `load_llm`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from ckf_dist.config import TinyLLMConfig
from ckf_dist.tasks import CTR_ANSWERS, RATING_ANSWERS, SLOT_TOKENS

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUILD_INFO = "ckf_tiny_llm.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (lossless decode) and wrap it as a PreTrainedTokenizerFast.

    The slot tokens are special tokens (one id each, never split, never <unk>); the CTR and rating
    answers are seeded into the corpus so that each is a single token, which the scoring code checks.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", *SLOT_TOKENS]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    seed = [f"Answer: {a}" for a in (*CTR_ANSWERS, *RATING_ANSWERS)] * 200
    tok.train_from_iterator(_chain(seed, texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=list(SLOT_TOKENS))


def _chain(*its: Iterable[str]) -> Iterable[str]:
    for it in its:
        yield from it


def build_tiny_llm(cfg: TinyLLMConfig, texts: Iterable[str], out_dir: str | Path, seed: int = 0) -> Path:
    """Build a random Llama-architecture causal LM and a tokenizer, save both with save_pretrained.

    Args:
        cfg: model sizes.
        texts: the dataset's own text (titles, reviews, rendered prompts) to train the tokenizer on.
        out_dir: a folder that afterwards loads with AutoModelForCausalLM/AutoTokenizer.from_pretrained.
        seed: weight initialisation seed.

    Returns:
        out_dir as a Path.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=cfg.initializer_range or 1.6 / cfg.hidden_size**0.5,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / BUILD_INFO).write_text(json.dumps({"tiny": cfg.__dict__, "seed": seed}, indent=1))
    return out


def ensure_slot_tokens(tokenizer) -> int:
    """Add the CF slot tokens (and a pad token) to a tokenizer that lacks them, e.g. a stock Llama one.

    Returns:
        How many tokens were added; the caller must then resize the model's embeddings.
    """
    added = tokenizer.add_special_tokens({"additional_special_tokens": [t for t in SLOT_TOKENS
                                                                        if t not in tokenizer.get_vocab()]})
    if tokenizer.pad_token is None:
        # Llama tokenizers have no pad token; eos works because labels mask padding by attention.
        tokenizer.pad_token = tokenizer.eos_token
    return added


def load_tokenizer(path: str | Path):
    """AutoTokenizer.from_pretrained with the slot tokens guaranteed present."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json / tokenizer_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_slot_tokens(tokenizer)
    return tokenizer


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "eager")


def flash_attention_problem(dtype: str) -> str | None:
    """Why flash_attention_2 cannot run here (None when it can): it needs CUDA, the flash-attn package and a 16-bit
    dtype."""
    import importlib.util

    why = []
    if not torch.cuda.is_available():
        why.append("CUDA is not available")
    if importlib.util.find_spec("flash_attn") is None:
        why.append("the flash-attn package is not installed (pip install flash-attn)")
    if dtype not in ("bfloat16", "float16"):
        why.append(f"model.dtype is {dtype!r}; flash-attention runs in bfloat16 or float16 only")
    return "; ".join(why) or None


def resolve_attn_implementation(requested: str, dtype: str) -> str:
    """The attention kernel transformers is asked for (model.attn_implementation).

    'auto' -> 'flash_attention_2' when it can run (CUDA, flash-attn installed, bf16/fp16), else 'sdpa'.

    Raises:
        ValueError: an unknown name, or 'flash_attention_2' where it cannot run (says why).
    """
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"model.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {requested!r}")
    problem = flash_attention_problem(dtype)
    if requested == "auto":
        return "sdpa" if problem else "flash_attention_2"
    if requested == "flash_attention_2" and problem:
        raise ValueError(f"model.attn_implementation=flash_attention_2 cannot run here: {problem}. Use "
                         f"model.attn_implementation=auto or sdpa")
    return requested


def load_llm(path: str | Path, dtype: str = "float32", tokenizer=None, attn_implementation: str = "auto"):
    """Load a causal LM through AutoModelForCausalLM.from_pretrained -- the path a 7B checkpoint takes.

    When ZeRO-3 sharded loading is wanted the caller creates `HfDeepSpeedConfig` first (train/build.py);
    transformers then partitions the weights while loading. The LLM comes back frozen.

    Args:
        path: the model folder.
        dtype: "float32", "bfloat16" or "float16".
        tokenizer: if given and larger than the embedding table (slot tokens added), embeddings are resized.
        attn_implementation: model.attn_implementation ('auto', 'sdpa', 'flash_attention_2', 'eager'); the resolved
            name is what `model.config._attn_implementation` reports afterwards.

    Raises:
        ValueError: attn_implementation names a kernel that cannot run here (resolve_attn_implementation).
    """
    from transformers import AutoModelForCausalLM

    attn = resolve_attn_implementation(attn_implementation, dtype)
    model = AutoModelForCausalLM.from_pretrained(Path(path), dtype=_DTYPES[dtype], attn_implementation=attn)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.requires_grad_(False)
    return model
