"""Export oracles: every per-task peft adapter (shared + task LoRA folded, gate included) reproduces the Multi-LoRA
logits of its task, and load_ckf_model rebuilds the same CKF model from the exported files."""

from __future__ import annotations

import json

import pytest
import torch

from ckf_dist.config import ModelConfig, MultiLoRAConfig
from ckf_dist.model.export import export_task_adapters, load_ckf_model
from ckf_dist.tasks import TASK_ID
from ckf_dist.testing.model_samples import cf_tables, collate, make_model, mixed_samples


def _export(model, tiny_llm_dir, tmp_path):
    with torch.no_grad():
        model.gate.logits.copy_(torch.tensor([0.7, -0.4, 0.2, -1.0]))  # the gate must be folded in too
    return export_task_adapters(model, tmp_path / "adapters", tiny_llm_dir)


@pytest.mark.parametrize("both", [False, True], ids=["disjoint_targets", "q_proj_shared_and_task"])
def test_each_exported_peft_adapter_reproduces_its_task(tiny_llm, tiny_tokenizer, tiny_llm_dir, tmp_path, both):
    from peft import PeftModel

    from ckf_dist.model.llm import load_llm

    shared = ["k_proj", "v_proj", "o_proj"] + (["self_attn.q_proj"] if both else [])
    model = make_model(tiny_llm, tiny_tokenizer, gate=True, shared_targets=shared)
    folders = _export(model, tiny_llm_dir, tmp_path)
    assert sorted(folders) == sorted(TASK_ID)
    conf = json.loads((folders["ctr"] / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and len(conf["target_modules"]) == 8
    # q_proj holds shared + task parts when it is in both target sets: rank 4 + 4.
    assert conf["rank_pattern"] == ({f"model.layers.{i}.self_attn.q_proj": 8 for i in range(2)} if both else {})
    batch = collate(tiny_tokenizer, mixed_samples(), variants=("text", "cf"))
    with torch.no_grad():
        ours = model.logits(batch)
        embeds, _ = model.fuse_embeddings(batch)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    real = batch.attention_mask.bool()
    peft_model = PeftModel.from_pretrained(load_llm(tiny_llm_dir, "float32", tiny_tokenizer), folders["ctr"],
                                           adapter_name="ctr").eval()
    for task, folder in folders.items():
        if task != "ctr":
            peft_model.load_adapter(folder, adapter_name=task)
        peft_model.set_adapter(task)
        rows = batch.task_ids == TASK_ID[task]
        with torch.no_grad():
            theirs = peft_model(inputs_embeds=embeds[rows], attention_mask=batch.attention_mask[rows],
                                position_ids=position_ids[rows]).logits
        # fp32: folding scalings/gate into B rounds differently; measured max |diff| ~9e-6 at |logit| up to ~7, so a
        # relative term (1e-5) keeps the check robust across BLAS builds.
        torch.testing.assert_close(theirs[real[rows]], ours[rows][real[rows]], atol=1e-5, rtol=1e-5)
        if task == "rating":  # a wrong task's adapter must NOT reproduce other rows (the test can fail)
            other = batch.task_ids == TASK_ID["ctr"]
            with torch.no_grad():
                wrong = peft_model(inputs_embeds=embeds[other], attention_mask=batch.attention_mask[other],
                                   position_ids=position_ids[other]).logits
            assert (wrong[real[other]] - ours[other][real[other]]).abs().max() > 1e-3


def test_load_ckf_model_rebuilds_the_same_model(tiny_llm, tiny_tokenizer, tiny_llm_dir, tmp_path):
    model = make_model(tiny_llm, tiny_tokenizer, gate=True, pooling="attention")
    _export(model, tiny_llm_dir, tmp_path)
    user_emb, item_emb = cf_tables()
    lora_cfg = MultiLoRAConfig(rank=4, alpha=8.0, dropout=0.0, task_rank=4, task_alpha=16.0, task_dropout=0.0,
                               gate=True)
    model_cfg = ModelConfig(meta_hidden=16, pooling="attention")
    loaded = load_ckf_model(tiny_llm_dir, tmp_path / "adapters", user_emb, item_emb, model_cfg, lora_cfg).eval()
    batch = collate(tiny_tokenizer, mixed_samples(), variants=("text", "cf"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(batch), model.logits(batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        load_ckf_model(tiny_llm_dir, tmp_path / "adapters", user_emb, item_emb, ModelConfig(meta_hidden=16),
                       lora_cfg)
    with pytest.raises(ValueError, match="ranks"):
        load_ckf_model(tiny_llm_dir, tmp_path / "adapters", user_emb, item_emb, model_cfg,
                       MultiLoRAConfig(rank=8, task_rank=4, gate=True))
