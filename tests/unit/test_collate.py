"""Collator: answer-only labels, padding sides, slot-preserving truncation, batched == per-row tokenisation."""

import pytest
import torch

from ckf_dist.data.collate import Collator, answer_token_ids, encode_answer
from ckf_dist.tasks import CTR_ANSWERS, ITEM_SLOT, RATING_ANSWERS, USER_SLOT


def _sample(i, task="ctr", answer="Yes", n_items=2):
    items = list(range(10 + i, 10 + i + n_items))
    hist = " ".join(f"Blue River {j} {ITEM_SLOT};" for j in items[:-1])
    return {"key": f"train/{task}/{i}/0", "task": task, "split": "train", "uid": i, "history": items[:-1],
            "slot_items": items,
            "prompt_cf": f"User {i} {USER_SLOT} history: {hist} Will the user like Red Stone {ITEM_SLOT}? Answer:",
            "prompt_text": f"User {i} history: Blue River. Will the user like Red Stone? Answer:",
            "answer": answer, "label": 1.0, "candidates": [], "candidate_titles": [], "item": items[-1],
            "is_cold": i % 2 == 0}


def test_labels_cover_exactly_the_answer_and_eos(tiny_tokenizer):
    s = _sample(0, answer="Yes")
    batch = Collator(tiny_tokenizer, 256, 4)([s], ("cf",))
    ids, labels = batch.input_ids[0], batch.labels[0]
    answer = encode_answer(tiny_tokenizer, "Yes") + [tiny_tokenizer.eos_token_id]
    assert labels[labels != -100].tolist() == answer
    plen = int(batch.prompt_lengths[0])
    assert (labels[:plen] == -100).all() and ids[plen:plen + len(answer)].tolist() == answer


def test_batched_rows_equal_per_row_encoding_both_paddings(tiny_tokenizer):
    samples = [_sample(i, n_items=1 + i) for i in range(4)]
    for side in ("right", "left"):
        col = Collator(tiny_tokenizer, 256, 4, padding_side=side)
        batch = col(samples, ("text", "cf"))
        assert batch.is_cf.tolist() == [False] * 4 + [True] * 4
        for r, (s, v) in enumerate([(s, v) for v in ("text", "cf") for s in samples]):
            ids, plen = col.encode(s, v)
            row = batch.input_ids[r][batch.attention_mask[r].bool()].tolist()
            assert row == ids and int(batch.prompt_lengths[r]) == plen
            if side == "left":
                assert batch.attention_mask[r, -1] == 1


def test_truncation_drops_history_text_but_keeps_every_slot(tiny_tokenizer):
    s = _sample(0, n_items=30)
    col = Collator(tiny_tokenizer, 96, 4)
    batch = col([s], ("cf",))
    ids = batch.input_ids[0]
    assert batch.attention_mask[0].sum() <= 96
    item_slot = tiny_tokenizer.convert_tokens_to_ids(ITEM_SLOT)
    assert int((ids == item_slot).sum()) == 30 == int((batch.slot_items[0] >= 0).sum())
    assert batch.labels[0][batch.labels[0] != -100].tolist()[-1] == tiny_tokenizer.eos_token_id


def test_answer_options_are_single_tokens(tiny_tokenizer):
    assert len(set(answer_token_ids(tiny_tokenizer, CTR_ANSWERS))) == 2
    assert len(set(answer_token_ids(tiny_tokenizer, RATING_ANSWERS))) == 5
    with pytest.raises(ValueError, match="tokenises to"):
        answer_token_ids(tiny_tokenizer, ["Red Stone River"])


def test_answer_override_and_bad_input(tiny_tokenizer):
    col = Collator(tiny_tokenizer, 256, 4)
    samples = [_sample(0), _sample(1)]
    batch = col(samples, ("text", "cf"), answers=["No", "Yes"])
    no = encode_answer(tiny_tokenizer, "No")[0]
    assert batch.labels[0][batch.labels[0] != -100][0] == no and batch.labels[2][batch.labels[2] != -100][0] == no
    with pytest.raises(ValueError, match="unknown prompt variant"):
        col(samples, ("plain",))
    with pytest.raises(ValueError, match="empty list"):
        col([], ("cf",))
    assert torch.equal(batch.user_ids, torch.tensor([0, 1, 0, 1]))
