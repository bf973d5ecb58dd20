"""Chat-template prompts (model.chat_template): the row is exactly what the tokenizer's own template gives for
(user: prompt, assistant: answer), the loss mask covers exactly the answer and end-of-turn, and truncation never
cuts the template."""

from __future__ import annotations

import copy

import pytest
import torch

from ckf_dist.data.collate import Collator, chat_frame
from ckf_dist.tasks import CTR_ANSWERS, ITEM_SLOT, RATING_ANSWERS, USER_SLOT

# SmolLM2-Instruct's template (ChatML with a default system turn), as shipped in its tokenizer.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful recommender<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture
def chat_tok(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


def _sample(i: int, n_items: int = 2, answer: str = "Yes") -> dict:
    items = list(range(10 + i, 10 + i + n_items))
    hist = " ".join(f"Blue River {j} {ITEM_SLOT};" for j in items[:-1])
    return {"key": f"train/ctr/{i}/0", "task": "ctr", "split": "train", "uid": i, "history": items[:-1],
            "slot_items": items,
            "prompt_cf": f"User {i} {USER_SLOT} history: {hist} Will the user like Red Stone {ITEM_SLOT}? Answer:",
            "prompt_text": f"User {i} history: Blue River. Will the user like Red Stone? Answer:",
            "answer": answer, "label": 1.0, "candidates": [], "candidate_titles": [], "item": items[-1],
            "is_cold": False}


def _reference(tok, prompt: str, answer: str | None, system: str | None = None) -> list[int]:
    """The template rendered by transformers itself, then tokenised as one string."""
    msgs = ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": prompt}]
    if answer is None:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = tok.apply_chat_template([*msgs, {"role": "assistant", "content": answer}], tokenize=False)
        text = text[:text.rindex(tok.eos_token) + len(tok.eos_token)]  # the turn's trailing newline is not trained
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("system", [None, "Answer Yes or No."])
def test_rows_equal_the_templates_own_tokenisation_and_mask_only_the_answer(chat_tok, system):
    frame = chat_frame(chat_tok, "auto", system)
    samples = [_sample(0), _sample(1, n_items=4, answer="No")]
    batch = Collator(chat_tok, 256, 4, chat=frame)(samples, ("text", "cf"))
    for r, (s, v) in enumerate([(s, v) for v in ("text", "cf") for s in samples]):
        prompt = s["prompt_cf"] if v == "cf" else s["prompt_text"]
        row = batch.input_ids[r][batch.attention_mask[r].bool()].tolist()
        assert row == _reference(chat_tok, prompt, s["answer"], system)
        answer = chat_tok(s["answer"], add_special_tokens=False)["input_ids"] + [chat_tok.eos_token_id]
        labels = batch.labels[r]
        assert labels[labels != -100].tolist() == answer
        plen = int(batch.prompt_lengths[r])
        assert row[:plen] == _reference(chat_tok, prompt, None, system)  # prompt part == generation prompt
        assert (labels[:plen] == -100).all()
    assert int(batch.attention_mask[0].sum()) > 20  # the default system turn is really there


def test_generation_rows_end_with_the_assistant_header(chat_tok):
    frame = chat_frame(chat_tok)
    s = _sample(0)
    batch = Collator(chat_tok, 256, 4, padding_side="left", with_answer=False, chat=frame)([s], ("cf",))
    assert batch.input_ids[0].tolist() == _reference(chat_tok, s["prompt_cf"], None)
    assert (batch.labels == -100).all()


def test_truncation_cuts_the_history_never_the_template_or_a_slot(chat_tok):
    frame = chat_frame(chat_tok)
    s = _sample(0, n_items=30)
    full = Collator(chat_tok, 1024, 4, chat=frame)([s], ("cf",))
    assert int(full.attention_mask.sum()) > 120
    batch = Collator(chat_tok, 120, 4, chat=frame)([s], ("cf",))
    row = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert len(row) <= 120
    assert row[:len(frame.prefix)] == frame.prefix
    plen = int(batch.prompt_lengths[0])
    assert row[plen - len(frame.suffix):plen] == frame.suffix
    item_slot = chat_tok.convert_tokens_to_ids(ITEM_SLOT)
    assert row.count(item_slot) == 30
    assert batch.labels[0][batch.labels[0] != -100].tolist()[-1] == chat_tok.eos_token_id


def test_answer_options_have_no_leading_space_in_the_assistant_turn(chat_tok, tiny_tokenizer):
    chat = Collator(chat_tok, 256, 4, chat=chat_frame(chat_tok))
    plain = Collator(tiny_tokenizer, 256, 4)
    assert chat.option_ids(CTR_ANSWERS) == [chat_tok.convert_tokens_to_ids(a) for a in CTR_ANSWERS]
    assert len(set(chat.option_ids(RATING_ANSWERS))) == 5
    # Plain prompts keep " Yes" after "Answer:"; the scored token is the first label in both modes.
    for col in (chat, plain):
        b = col([_sample(0)], ("cf",))
        assert b.labels[0][b.labels[0] != -100][0] == col.option_ids(CTR_ANSWERS)[1]


def test_modes_and_bad_templates(chat_tok, tiny_tokenizer):
    assert chat_frame(tiny_tokenizer, "auto") is None  # no template: plain prompts
    assert chat_frame(chat_tok, "off") is None
    with pytest.raises(ValueError, match="has no chat template"):
        chat_frame(tiny_tokenizer, "on")
    with pytest.raises(ValueError, match="must be 'auto', 'on' or 'off'"):
        chat_frame(chat_tok, "yes")
    other = copy.deepcopy(chat_tok)
    other.eos_token = tiny_tokenizer.eos_token  # the template's turns end with <|im_end|>, generation would not stop
    with pytest.raises(ValueError, match="not the tokenizer's eos"):
        chat_frame(other)
    twice = copy.deepcopy(chat_tok)
    twice.chat_template = "{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="2 times"):
        chat_frame(twice)


def test_budget_error_counts_the_template(chat_tok):
    frame = chat_frame(chat_tok)
    n = len(frame.prefix) + len(frame.suffix)
    with pytest.raises(ValueError, match=f"chat template \\({n} tokens\\)"):
        Collator(chat_tok, n + 4, 4, chat=frame)([_sample(0)], ("cf",))
    assert torch.is_tensor(Collator(chat_tok, n + 40, 4, chat=frame)([_sample(0)], ("cf",)).input_ids)
