"""Tokenise PromptSamples into a `Batch`: answer-only labels, left-truncated history, slot bookkeeping.

Prompts end with "Answer:"; the answer is appended as " <answer></s>". When a prompt is too long we
drop whole slot-free tokens from the left of the prompt body (the history), never the answer and
never a slot token, so the k-th ITEM_SLOT still lines up with slot_items[k].

With a chat model (`chat_frame`) the prompt is the user turn of the tokenizer's chat template and the answer the
assistant turn: [template prefix] prompt [end of user turn, assistant header] answer <eos>. The template's parts are
tokenised once and never truncated; the labels still cover exactly the answer and the end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ckf_dist.data.batch import Batch
from ckf_dist.data.schema import PromptSample
from ckf_dist.tasks import ITEM_SLOT, USER_SLOT, task_id

_CONTENT = "\x00ckf-content\x00"  # stands for the prompt (or answer) when a chat template is rendered once


@dataclass(frozen=True)
class ChatFrame:
    """A chat template cut around the user turn's content.

    Attributes:
        prefix: ids before the prompt (the system turn, the user header; the template's own bos).
        suffix: ids after it (end of the user turn, the assistant header): the answer follows directly.
    """

    prefix: list[int]
    suffix: list[int]


def chat_frame(tokenizer, mode: str = "auto", system_prompt: str | None = None) -> ChatFrame | None:
    """The tokenizer's chat template as a ChatFrame, or None for plain prompts (model.chat_template,
    model.system_prompt).

    The template is rendered once with a placeholder as the user's content and cut there, so the prompt itself is
    tokenised on its own (and can be truncated) while the template's parts stay whole.

    Raises:
        ValueError: mode 'on' and no template; a template that does not place the content exactly once; an assistant
            turn that does not end with the tokenizer's eos token (the answer terminator and generation's stop).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"chat_template mode must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off" or (mode == "auto" and not getattr(tokenizer, "chat_template", None)):
        return None
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("model.chat_template='on' but the tokenizer has no chat template (chat_template.jinja or "
                         "tokenizer_config.json's chat_template); use 'auto' or 'off'")
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    user = [*system, {"role": "user", "content": _CONTENT}]
    text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    if text.count(_CONTENT) != 1:
        raise ValueError(f"the chat template places the user's content {text.count(_CONTENT)} times, expected once")
    before, after = text.split(_CONTENT)
    turn = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": _CONTENT}], tokenize=False)
    closing = turn.split(_CONTENT)[-1].lstrip()
    if tokenizer.eos_token is None or not closing.startswith(tokenizer.eos_token):
        raise ValueError(f"the chat template ends an assistant turn with {closing[:20]!r}, not the tokenizer's eos "
                         f"token {tokenizer.eos_token!r} that ends every answer and stops generation; set "
                         f"model.chat_template='off' or give the tokenizer that eos token")
    ids = tokenizer([before, after], add_special_tokens=False)["input_ids"]
    return ChatFrame(prefix=ids[0], suffix=ids[1])


def encode_answer(tokenizer, answer: str, leading_space: bool = True) -> list[int]:
    """Token ids of an answer as it follows "Answer:" (with its leading space), or, in a chat template's assistant
    turn (leading_space=False), as the turn's content.

    Sentencepiece tokenizers may emit a lone "▁" piece for the space; it is dropped so that the first
    answer id is the answer's own first token (the one CTR/rating scoring reads).
    """
    ids = tokenizer((" " if leading_space else "") + answer, add_special_tokens=False)["input_ids"]
    if len(ids) > 1 and tokenizer.decode(ids[:1]).strip() == "":
        ids = ids[1:]
    return ids


def answer_token_ids(tokenizer, answers: Sequence[str], leading_space: bool = True) -> list[int]:
    """The single token id of each answer option (e.g. "No"/"Yes", "1".."5").

    Raises:
        ValueError: an option is not exactly one token, so its probability could not be read at one position.
    """
    out = []
    for a in answers:
        ids = encode_answer(tokenizer, a, leading_space)
        if len(ids) != 1:
            raise ValueError(f"answer option {a!r} tokenises to {len(ids)} tokens {ids}; the tokenizer must "
                             f"encode each of {list(answers)} as one token")
        out.append(ids[0])
    return out


class Collator:
    """Turns a list of PromptSamples into a Batch.

    Args:
        tokenizer: a Hugging Face tokenizer holding USER_SLOT and ITEM_SLOT as special tokens.
        max_length: longest row in tokens (prompt + answer + eos).
        history_len: width of Batch.history.
        padding_side: "right" for training, "left" for generation.
        with_answer: False builds prompt-only rows (generation / candidate scoring adds its own).
        chat: the tokenizer's chat template around each prompt (`chat_frame`), or None for plain prompts.

    Example:
        >>> batch = Collator(tok, max_length=256, history_len=10)(samples, variants=("cf",))
    """

    def __init__(self, tokenizer, max_length: int, history_len: int, padding_side: str = "right",
                 with_answer: bool = True, chat: ChatFrame | None = None) -> None:
        for tokn in (USER_SLOT, ITEM_SLOT):
            if tokn not in tokenizer.get_vocab():
                raise ValueError(f"tokenizer lacks the slot token {tokn!r}; add it with "
                                 f"tokenizer.add_special_tokens({{'additional_special_tokens': [...]}})")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; set tokenizer.pad_token before collating")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tok = tokenizer
        self.max_length = max_length
        self.history_len = history_len
        self.padding_side = padding_side
        self.with_answer = with_answer
        self.chat = chat
        self.user_slot_id = tokenizer.convert_tokens_to_ids(USER_SLOT)
        self.item_slot_id = tokenizer.convert_tokens_to_ids(ITEM_SLOT)
        self._answer_cache: dict[str, list[int]] = {}

    def option_ids(self, answers: Sequence[str]) -> list[int]:
        """The single token id of each answer option as this collator encodes answers (see answer_token_ids)."""
        return answer_token_ids(self.tok, answers, leading_space=self.chat is None)

    def encode(self, sample: PromptSample, variant: str, answer: str | None = None) -> tuple[list[int], int]:
        """Ids of one row and the length of its prompt part. `answer` overrides sample["answer"]."""
        prompt = sample["prompt_cf"] if variant == "cf" else sample["prompt_text"]
        return self._assemble(self.tok(prompt, add_special_tokens=False)["input_ids"], sample, answer)

    def _assemble(self, p_ids: list[int], sample: PromptSample, answer: str | None) -> tuple[list[int], int]:
        if self.chat is not None:  # the template brings its own bos (or none)
            head, tail = self.chat.prefix, self.chat.suffix
        else:
            head, tail = ([self.tok.bos_token_id] if self.tok.bos_token_id is not None else []), []
        a_ids: list[int] = []
        if self.with_answer:
            ans = sample["answer"] if answer is None else answer
            if ans not in self._answer_cache:
                self._answer_cache[ans] = encode_answer(self.tok, ans, leading_space=self.chat is None)
            a_ids = self._answer_cache[ans] + [self.tok.eos_token_id]
        budget = self.max_length - len(head) - len(tail) - len(a_ids)
        if budget < 8:
            raise ValueError(f"sample {sample['key']}: answer ({len(a_ids)} tokens) and chat template ("
                             f"{len(head) + len(tail)} tokens) leave no room for the prompt within "
                             f"model.max_length={self.max_length}")
        if len(p_ids) > budget:
            p_ids = self._truncate_left(p_ids, budget)
        ids = head + p_ids + tail + a_ids
        return ids, len(ids) - len(a_ids)

    def _truncate_left(self, ids: list[int], budget: int) -> list[int]:
        # Drop plain tokens from the left; keep every slot so the slot -> id alignment survives.
        slots = {self.user_slot_id, self.item_slot_id}
        n_drop = len(ids) - budget
        out = []
        for t in ids:
            if n_drop > 0 and t not in slots:
                n_drop -= 1
                continue
            out.append(t)
        return out

    def __call__(self, samples: Sequence[PromptSample], variants: Sequence[str] = ("cf",),
                 answers: Sequence[str] | None = None) -> Batch:
        """Rows are ordered variant-major: all samples' first variant, then the second variant.

        Args:
            samples: the samples.
            variants: subset of ("text", "cf"); the curriculum uses both.
            answers: per-sample answer override (top-K candidate scoring), default each sample's answer.
        """
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        if bad := [v for v in variants if v not in ("text", "cf")]:
            raise ValueError(f"unknown prompt variant(s) {bad}; allowed: 'text', 'cf'")
        meta = [(s, variant == "cf") for variant in variants for s in samples]
        # One batched tokenizer call (the fast tokenizer parallelises it) instead of one call per row.
        prompts = [s["prompt_cf"] if cf else s["prompt_text"] for s, cf in meta]
        prompt_ids = self.tok(prompts, add_special_tokens=False)["input_ids"]
        rows, plens = [], []
        for r, ((s, _), p_ids) in enumerate(zip(meta, prompt_ids)):
            ids, plen = self._assemble(p_ids, s, None if answers is None else answers[r % len(samples)])
            rows.append(ids)
            plens.append(plen)
        B, L = len(rows), max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        input_ids = torch.full((B, L), pad, dtype=torch.long)
        attention = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        for b, (ids, plen) in enumerate(zip(rows, plens)):
            off = L - len(ids) if self.padding_side == "left" else 0
            input_ids[b, off:off + len(ids)] = torch.tensor(ids)
            attention[b, off:off + len(ids)] = 1
            if self.with_answer:
                labels[b, off + plen:off + len(ids)] = torch.tensor(ids[plen:])
        H = self.history_len
        S = max(1, max(len(s["slot_items"]) for s, _ in meta))
        history = torch.full((B, H), -1, dtype=torch.long)
        slot_items = torch.full((B, S), -1, dtype=torch.long)
        for b, (s, _) in enumerate(meta):
            h = s["history"][-H:]
            if h:
                history[b, :len(h)] = torch.tensor(h)
            if s["slot_items"]:
                slot_items[b, :len(s["slot_items"])] = torch.tensor(s["slot_items"])
        return Batch(
            input_ids=input_ids,
            attention_mask=attention,
            labels=labels,
            task_ids=torch.tensor([task_id(s["task"]) for s, _ in meta], dtype=torch.long),
            user_ids=torch.tensor([s["uid"] for s, _ in meta], dtype=torch.long),
            history=history,
            slot_items=slot_items,
            is_cf=torch.tensor([cf for _, cf in meta], dtype=torch.bool),
            is_cold=torch.tensor([bool(s["is_cold"]) for s, _ in meta], dtype=torch.bool),
            prompt_lengths=torch.tensor(plens, dtype=torch.long),
            keys=[s["key"] for s, _ in meta],
        )
