"""Knowledge fusion (KFM) oracles: slot injection vs a per-row Python reference, fallbacks, MetaNet pooling."""

from __future__ import annotations

import pytest
import torch

from ckf_dist.model.meta_net import MetaNet
from ckf_dist.testing.model_samples import NUM_ITEMS, NUM_USERS, collate, make_model, make_sample, mixed_samples


def _reference_fused(model, batch) -> torch.Tensor:
    """Slot injection row by row, slot by slot, with explicit fallbacks (the slow obvious way)."""
    f = model.fusion
    embeds = model.llm.get_input_embeddings()(batch.input_ids).clone()
    for b in range(len(batch)):
        u = int(batch.user_ids[b])
        e_u = f.user_table[u] if 0 <= u < f.num_users else f.unk_user
        hist = [int(h) for h in batch.history[b] if h >= 0]
        if hist:
            e_h = torch.stack([f.item_table[h] if h < f.num_items else f.unk_item for h in hist])[None]
            W, _ = f.meta_net(e_h, torch.ones(1, len(hist), dtype=torch.bool))
            e_u = e_u @ W[0]
        k = 0
        for pos, tok in enumerate(batch.input_ids[b].tolist()):
            if tok == f.user_slot_id:
                embeds[b, pos] = f.proj_user(e_u)
            elif tok == f.item_slot_id:
                v = int(batch.slot_items[b, k])
                embeds[b, pos] = f.proj_item(f.item_table[v] if 0 <= v < f.num_items else f.unk_item)
                k += 1
    return embeds


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_slots_carry_exactly_the_projected_vectors(tiny_llm, tiny_tokenizer, padding_side):
    model = make_model(tiny_llm, tiny_tokenizer, pooling="attention")
    batch = collate(tiny_tokenizer, mixed_samples(), variants=("text", "cf"), padding_side=padding_side)
    assert int((batch.input_ids == model.fusion.item_slot_id).sum(1).max()) == 12  # a top-K-sized row
    with torch.no_grad():
        fused, _ = model.fuse_embeddings(batch)
        expected = _reference_fused(model, batch)
        plain = model.llm.get_input_embeddings()(batch.input_ids)
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=1e-6)
    slots = (batch.input_ids == model.fusion.user_slot_id) | (batch.input_ids == model.fusion.item_slot_id)
    assert torch.equal(fused[~slots], plain[~slots]), "non-slot positions must be untouched"
    assert not torch.allclose(fused[slots], plain[slots])


def test_left_and_right_padding_give_the_same_slot_vectors(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer)
    right = collate(tiny_tokenizer, mixed_samples(), padding_side="right")
    left = collate(tiny_tokenizer, mixed_samples(), padding_side="left")
    with torch.no_grad():
        fr, _ = model.fuse_embeddings(right)
        fl, _ = model.fuse_embeddings(left)
        lr, ll = model.logits(right), model.logits(left)
    for b, n in enumerate(right.attention_mask.sum(1).tolist()):
        torch.testing.assert_close(fr[b, :n], fl[b, -n:], atol=0, rtol=0)
        # Positions come from the attention mask, so padding side does not change the logits either.
        torch.testing.assert_close(lr[b, :n], ll[b, -n:], atol=1e-5, rtol=1e-5)


def test_changing_one_users_id_changes_only_that_row(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer)
    batch = collate(tiny_tokenizer, mixed_samples())
    other = collate(tiny_tokenizer, mixed_samples())
    other.user_ids = other.user_ids.clone()
    other.user_ids[2] = 7  # was 3
    with torch.no_grad():
        a, b = model.logits(batch), model.logits(other)
    assert (a[2] - b[2]).abs().max() > 1e-4
    keep = [i for i in range(len(batch)) if i != 2]
    torch.testing.assert_close(a[keep], b[keep], atol=0, rtol=0)


def test_fallbacks_for_missing_history_and_unknown_ids(tiny_llm, tiny_tokenizer):
    model = make_model(tiny_llm, tiny_tokenizer)
    f = model.fusion
    samples = [make_sample("a", "ctr", 3, [], [NUM_ITEMS + 5], "Yes"),  # no history, unknown item
               make_sample("b", "ctr", -1, [], [2], "No"),  # unknown user (-1), no history
               make_sample("c", "ctr", NUM_USERS, [NUM_ITEMS + 1, 4], [2], "No")]  # unknown user and history item
    batch = collate(tiny_tokenizer, samples)
    with torch.no_grad():
        fused, _ = model.fuse_embeddings(batch)
        out = model(batch)
        u_pos = (batch.input_ids == f.user_slot_id).float().argmax(1)
        i_pos = (batch.input_ids == f.item_slot_id).float().argmax(1)
        torch.testing.assert_close(fused[0, u_pos[0]], f.proj_user(f.user_table[3]), atol=1e-6, rtol=0)  # W_u = I
        torch.testing.assert_close(fused[0, i_pos[0]], f.proj_item(f.unk_item), atol=1e-6, rtol=0)
        torch.testing.assert_close(fused[1, u_pos[1]], f.proj_user(f.unk_user), atol=1e-6, rtol=0)
        e_h = torch.stack([f.unk_item, f.item_table[4]])[None]
        W, _ = f.meta_net(e_h, torch.ones(1, 2, dtype=torch.bool))
        torch.testing.assert_close(fused[2, u_pos[2]], f.proj_user(f.unk_user @ W[0]), atol=1e-6, rtol=0)
    assert torch.isfinite(out.loss)


def test_meta_net_pooling_and_identity_fallback():
    torch.manual_seed(0)
    hist = torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    for pooling in ("mean", "attention"):
        net = MetaNet(8, 16, pooling)
        W, has_hist = net(hist, mask)
        assert has_hist.tolist() == [True, True, False]
        assert torch.equal(W[2], torch.eye(8)), "no history: W_u = I"
        noisy = hist.clone()
        noisy[~mask] = 1e3  # padding values must not matter
        torch.testing.assert_close(net(noisy, mask)[0], W)
        assert torch.isfinite(W).all()
    net = MetaNet(8, 16, "mean")
    torch.testing.assert_close(net.pool(hist, mask)[0], hist[0, :2].mean(0))
    with pytest.raises(ValueError, match="pooling"):
        MetaNet(8, 16, "max")


def test_fusion_rejects_mismatched_tables(tiny_llm, tiny_tokenizer):
    from ckf_dist.model.fusion import SoftPromptFusion

    with pytest.raises(ValueError, match="same d"):
        SoftPromptFusion(torch.randn(4, 8), torch.randn(5, 16), 32, 16, "mean", 1, 2)
