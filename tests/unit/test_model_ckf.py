"""CKFModel oracles on the tiny Llama: mixed-task routing, peft equivalence, curriculum loss, gradients, generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ckf_dist.config import ModelConfig, MultiLoRAConfig
from ckf_dist.data.batch import Batch
from ckf_dist.model.ckf import CKFModel, build_ckf_model
from ckf_dist.tasks import TASK_ID
from ckf_dist.testing.model_samples import (
    cf_tables,
    collate,
    make_model,
    mixed_samples,
)
from ckf_dist.train.task_grads import TaskGradTracker


def real_lengths(batch: Batch) -> list[int]:
    return batch.attention_mask.sum(1).tolist()


# ----------------------------------------------------------------------------------------------------------------


def test_mixed_batch_equals_each_task_alone(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer)
    samples = mixed_samples()
    mixed = collate(tiny_tokenizer, samples)
    with torch.no_grad():
        logits_mixed = model.logits(mixed)
        rows_mixed = model(mixed).row_loss
    lengths = real_lengths(mixed)
    for task in ("ctr", "topk", "rating", "exp"):
        idx = [i for i, s in enumerate(samples) if s["task"] == task]
        alone = collate(tiny_tokenizer, [samples[i] for i in idx])
        with torch.no_grad():
            logits_alone = model.logits(alone)
            rows_alone = model(alone).row_loss
        for j, i in enumerate(idx):
            n = lengths[i]
            torch.testing.assert_close(logits_mixed[i, :n], logits_alone[j, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rows_mixed[idx], rows_alone, atol=1e-5, rtol=1e-5)


def test_logits_at_positions_equal_the_full_logits_there(tiny_llm, tiny_tokenizer):
    from ckf_dist.eval.evaluate import scored_positions

    model = make_model(tiny_llm, tiny_tokenizer)
    batch = collate(tiny_tokenizer, mixed_samples())
    rows, cols = scored_positions(batch.labels)
    with torch.no_grad():
        full, part = model.logits(batch), model.logits(batch, at=(rows, cols))
    assert part.shape == (rows.numel(), full.shape[-1]) and rows.numel() < full.shape[0] * full.shape[1] / 2
    torch.testing.assert_close(part, full[rows, cols], atol=1e-6, rtol=1e-6)


def test_routing_uses_the_rows_task(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer)
    batch = collate(tiny_tokenizer, mixed_samples())
    swapped = collate(tiny_tokenizer, mixed_samples())
    swapped.task_ids = swapped.task_ids.clone()
    swapped.task_ids[0] = TASK_ID["rating"]  # row 0 was ctr
    with torch.no_grad():
        a, b = model.logits(batch), model.logits(swapped)
    assert (a[0] - b[0]).abs().max() > 1e-3, "the row's task LoRA must change its output"
    torch.testing.assert_close(a[1:], b[1:], atol=1e-6, rtol=0)


def test_zeroed_task_loras_equal_plain_peft_lora(tiny_llm, tiny_tokenizer, tiny_llm_dir):
    from peft import LoraConfig, get_peft_model

    from ckf_dist.model.llm import load_llm

    model = make_model(tiny_llm, tiny_tokenizer)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            for ad in layer.task_loras.values():
                ad.lora_B.zero_()
    cfg = MultiLoRAConfig()
    peft_model = get_peft_model(load_llm(tiny_llm_dir, "float32", tiny_tokenizer),
                                LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=cfg.shared_targets))
    n_copied = 0
    with torch.no_grad():
        for name, layer in model.lora_layers.items():
            if layer.shared is None:
                continue
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.shared.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.shared.lora_B)
            n_copied += 1
    assert n_copied == 2 * len(cfg.shared_targets)  # 2 layers
    peft_model.eval()
    batch = collate(tiny_tokenizer, mixed_samples(), variants=("text", "cf"))
    with torch.no_grad():
        ours = model.logits(batch)
        embeds, _ = model.fuse_embeddings(batch)
        theirs = peft_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
        theirs_ids = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    text = real & ~batch.is_cf[:, None]  # text rows have no slot: plain token ids give the same logits
    torch.testing.assert_close(ours[text], theirs_ids[text], atol=1e-5, rtol=0)


def _manual_token_losses(model: CKFModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) CE of every answer token from the full logits, and (N,) its row index."""
    with torch.no_grad():
        logits = model.logits(batch)[:, :-1]
    labels = batch.labels[:, 1:]
    rows, cols = (labels != -100).nonzero(as_tuple=True)
    return F.cross_entropy(logits[rows, cols], labels[rows, cols], reduction="none"), rows


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_curriculum_loss_and_task_stats_match_manual(tiny_llm, tiny_tokenizer, w):
    model = make_model(tiny_llm, tiny_tokenizer)
    batch = collate(tiny_tokenizer, mixed_samples(), variants=("text", "cf"))
    tok, rows = _manual_token_losses(model, batch)
    cf = batch.is_cf[rows]
    expected = w * tok[~cf].mean() + (1 - w) * tok[cf].mean()
    with torch.no_grad():
        out = model(batch, text_weight=w)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    for tid in TASK_ID.values():
        sel = batch.task_ids[rows] == tid
        assert out.task_tokens[tid] == sel.sum()
        torch.testing.assert_close(out.task_loss[tid], tok[sel].mean(), atol=1e-5, rtol=1e-5)
    for b in range(len(batch)):
        torch.testing.assert_close(out.row_loss[b], tok[rows == b].mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("w", [0.0, 0.3])
def test_row_loss_norm_weighs_every_sample_equally(tiny_llm, tiny_tokenizer, w):
    model = make_model(tiny_llm, tiny_tokenizer)
    batch = collate(tiny_tokenizer, mixed_samples(), variants=("text", "cf"))
    tok, rows = _manual_token_losses(model, batch)
    row_mean = torch.stack([tok[rows == b].mean() for b in range(len(batch))])  # every row has answer tokens
    cf = batch.is_cf
    expected = w * row_mean[~cf].mean() + (1 - w) * row_mean[cf].mean()
    with torch.no_grad():
        out = model(batch, text_weight=w, loss_norm="row")
        token = model(batch, text_weight=w)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.loss, token.loss), "explanations are longer: the two norms must differ here"
    with pytest.raises(ValueError, match="loss_norm must be 'token' or 'row'"):
        model(batch, loss_norm="tokens")


def test_single_variant_batch_uses_its_loss_alone(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer)
    batch = collate(tiny_tokenizer, mixed_samples()[:4], variants=("text",))
    tok, _ = _manual_token_losses(model, batch)
    with torch.no_grad():
        out = model(batch, text_weight=0.0)  # weight 0 on text, but text is all there is
    torch.testing.assert_close(out.loss, tok.mean(), atol=1e-5, rtol=1e-5)
    absent = [TASK_ID["exp"]] if all(s["task"] != "exp" for s in mixed_samples()[:4]) else []
    for tid in absent:
        assert out.task_tokens[tid] == 0 and out.task_loss[tid] == 0


def test_gradients_reach_all_trainable_and_no_frozen(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer, gate=True, pooling="attention").train()
    batch = collate(tiny_tokenizer, mixed_samples(), variants=("text", "cf"))
    model(batch, text_weight=0.4).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("llm.") and "lora_" not in n for n in trainable), "LLM weights must be frozen"
    kinds = {"meta_net": 0, "proj_user": 0, "proj_item": 0, "unk_user": 0, "unk_item": 0, "gate": 0,
             "shared.lora_A": 0, "shared.lora_B": 0}
    kinds.update({f"task_loras.{t}.lora_{x}": 0 for t in TASK_ID for x in "AB"})
    for n, p in trainable.items():
        assert p.grad is not None, f"{n} got no gradient"
        for k in kinds:
            if k in n and p.grad.abs().sum() > 0:
                kinds[k] += 1
    assert all(v > 0 for v in kinds.values()), f"no non-zero gradient for {[k for k, v in kinds.items() if not v]}"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(model.get_parameter(n).grad is None for n in frozen)
    assert not model.fusion.user_table.requires_grad and not model.fusion.item_table.requires_grad
    assert "fusion.user_table" not in model.state_dict()  # CF tables: non-persistent frozen buffers
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in trainable.values()}


def test_text_only_batch_still_touches_every_trainable_parameter(tiny_llm, tiny_tokenizer):
    # ZeRO-3 needs every rank to produce a gradient (possibly zero) for every trainable parameter.
    model = make_model(tiny_llm, tiny_tokenizer, gate=True).train()
    batch = collate(tiny_tokenizer, mixed_samples()[:2], variants=("text",))  # ctr + topk only, no slots
    model(batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters outside the graph: {missing}"


def test_generate_keeps_fusion_and_routing(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer)
    samples = mixed_samples()[:4]
    batch = collate(tiny_tokenizer, samples, padding_side="left", with_answer=False)
    new = model.generate(batch, max_new_tokens=4)
    assert new.shape == (4, 4)
    # Oracle: greedy decoding by hand with the full fused + routed logits, one token at a time.
    cur = batch
    for step in range(4):
        with torch.no_grad():
            nxt = model.logits(cur)[:, -1].argmax(-1)
        assert torch.equal(nxt, new[:, step]), f"step {step}: {nxt.tolist()} vs {new[:, step].tolist()}"
        ones = torch.ones(len(cur), 1, dtype=torch.long)
        cur = Batch(**{**cur.__dict__, "input_ids": torch.cat([cur.input_ids, nxt[:, None]], 1),
                       "attention_mask": torch.cat([cur.attention_mask, ones], 1),
                       "labels": torch.full((len(cur), cur.input_ids.shape[1] + 1), -100)})
    beams = model.generate(batch, max_new_tokens=3, num_beams=2)
    assert beams.shape[0] == 4 and beams.shape[1] <= 3
    with pytest.raises(ValueError, match="LEFT-padded"):
        model.generate(collate(tiny_tokenizer, samples, with_answer=False), max_new_tokens=2)


def test_bad_inputs_raise(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer, randomize=False)
    batch = collate(tiny_tokenizer, mixed_samples()[:2])
    with pytest.raises(ValueError, match="text_weight"):
        model(batch, text_weight=1.5)
    bad = collate(tiny_tokenizer, mixed_samples()[:2])
    bad.slot_items = torch.full_like(bad.slot_items, -1)  # the slot tokens lose their items
    with pytest.raises(ValueError, match="slot_items"):
        model.logits(bad)
    bad = collate(tiny_tokenizer, mixed_samples()[:2])
    bad.task_ids = bad.task_ids[:1]
    with pytest.raises(ValueError, match="task_ids"):
        model.logits(bad)
    bad = collate(tiny_tokenizer, mixed_samples()[:2])
    bad.user_ids = bad.user_ids[:, None]
    with pytest.raises(ValueError, match="user_ids"):
        model.logits(bad)


def test_model_with_task_subset_rejects_other_tasks(tiny_llm_dir, tiny_tokenizer):
    from ckf_dist.model.llm import load_llm

    model = build_ckf_model(load_llm(tiny_llm_dir, "float32", tiny_tokenizer), tiny_tokenizer, *cf_tables(),
                            ModelConfig(meta_hidden=16), MultiLoRAConfig(rank=4, task_rank=4), tasks=("ctr", "exp"))
    ok = collate(tiny_tokenizer, [mixed_samples()[0], mixed_samples()[3]])
    assert model(ok).task_loss.shape == (2,)
    with pytest.raises(ValueError, match=r"adapters only for \['ctr', 'exp'\]"):
        model(collate(tiny_tokenizer, mixed_samples()[:2]))


def test_activation_checkpointing_keeps_routing_and_gradients(tiny_llm_dir, tiny_tokenizer):
    # Checkpointing recomputes the layers during backward, outside CKFModel's routing block.
    from ckf_dist.model.llm import load_llm

    grads, losses, tracked = [], [], []
    for ckpt in (False, True):
        llm = load_llm(tiny_llm_dir, "float32", tiny_tokenizer)
        torch.manual_seed(0)
        model = make_model(llm, tiny_tokenizer, gate=True).train()
        if ckpt:
            model.enable_gradient_checkpointing()
        tracker = TaskGradTracker(model, dim=64)
        batch = collate(tiny_tokenizer, mixed_samples(), variants=("text", "cf"))
        tracker.watch(batch)
        out = model(batch, text_weight=0.5)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        tracked.append(tracker.sketch.sum(0))
        shared = torch.cat([p.grad.flatten() for p in model.shared_lora_parameters()])
        torch.testing.assert_close(tracked[-1], tracker.cs(shared[None], 0)[0], atol=1e-6, rtol=1e-5)
    assert model.llm.is_gradient_checkpointing
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
