"""Prompt text of the four CKF tasks, in the CF-slot and the text-only variant, and readers of the prompt shards.

The CF variant carries USER_SLOT once after the user mention and ITEM_SLOT after every item mention whose CF
vector the KFM fuses, in the order of `slot_items` (history first, then the candidate(s)). The text variant
is the same string with the slots removed (the curriculum's text-only prompts, MTM). Every prompt ends with
"Answer:"; answers carry no leading space.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow.parquet as pq

from ckf_dist.data.schema import ITEMS, SPLITS, PromptSample, interactions_path
from ckf_dist.data.shards import read_task_payloads
from ckf_dist.tasks import ITEM_SLOT, TASKS, USER_SLOT

MAX_TITLE_CHARS = 60
"""Titles are cut to this many characters in prompts (and top-K answers), at a word boundary."""

_U = f" {USER_SLOT}"
_I = f" {ITEM_SLOT}"


def display_title(title: str) -> str:
    """A title as it appears in prompts: whitespace collapsed, at most MAX_TITLE_CHARS characters."""
    t = " ".join(title.split())
    if len(t) <= MAX_TITLE_CHARS:
        return t
    cut = t[:MAX_TITLE_CHARS].rsplit(" ", 1)[0]
    return (cut or t[:MAX_TITLE_CHARS]) + "..."


_TAGS = re.compile(r"<[^>]{0,200}>")
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_review(text: str, max_words: int) -> str:
    """Review text as an explanation target: tags and control characters removed, whitespace collapsed,
    slot tokens neutralised, cut to `max_words` words."""
    t = _CTRL.sub(" ", _TAGS.sub(" ", text.replace(USER_SLOT, " ").replace(ITEM_SLOT, " ")))
    return " ".join(t.split()[:max_words])


def to_text_variant(prompt_cf: str) -> str:
    """The text-only prompt: the CF prompt without its slot tokens."""
    return prompt_cf.replace(_U, "").replace(_I, "")


def _user(uid: int) -> str:
    return f"User {uid}{_U}"


def _history(titles: Sequence[str], notes: Sequence[str] | None = None) -> str:
    if not titles:
        return "no history"
    parts = [f"{t}{_I}" + (f" {notes[k]}" if notes else "") for k, t in enumerate(titles)]
    return "; ".join(parts)


def render_ctr(uid: int, history_titles: Sequence[str], history_ratings: Sequence[float], target_title: str,
               like_threshold: float) -> str:
    """CF-variant CTR prompt; slots: history items, then the candidate."""
    notes = ["(liked)" if r >= like_threshold else "(not liked)" for r in history_ratings]
    return (f"{_user(uid)} history: {_history(history_titles, notes)}. "
            f"Will the user like {target_title}{_I}? Answer:")


def render_rating(uid: int, history_titles: Sequence[str], history_ratings: Sequence[float],
                  target_title: str) -> str:
    """CF-variant rating prompt; slots: history items, then the candidate."""
    notes = [f"{round(r)}/5" for r in history_ratings]
    return (f"{_user(uid)} rated: {_history(history_titles, notes)}. "
            f"Rating of {target_title}{_I} from 1 to 5? Answer:")


def render_topk(uid: int, history_titles: Sequence[str], candidate_titles: Sequence[str]) -> str:
    """CF-variant top-K prompt; slots: history items, then every candidate in order."""
    cands = "; ".join(f"{t}{_I}" for t in candidate_titles)
    return (f"{_user(uid)} history: {_history(history_titles)}. "
            f"Candidates: {cands}. Which one will the user choose next? Answer:")


def render_exp(uid: int, history_titles: Sequence[str], target_title: str) -> str:
    """CF-variant explanation prompt; slots: history items, then the item to explain."""
    return (f"{_user(uid)} history: {_history(history_titles)}. "
            f"Explain why the user would like {target_title}{_I}. Answer:")


# --------------------------------------------------------------------------------------------------
# Reading prepared prompts
# --------------------------------------------------------------------------------------------------


def load_samples(prepared_dir: str | Path, split: str, tasks: list[str] | None = None) -> list[PromptSample]:
    """Every sample of `split` for `tasks` (default all prepared tasks), sorted by key (evaluation; small splits).

    Raises:
        ValueError: unknown split or task.
        FileNotFoundError: the data is not prepared or a task was not built.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if tasks is None:
        manifest = json.loads((Path(prepared_dir) / "manifest.json").read_text())
        tasks = list(manifest["tasks"])
    if bad := [t for t in tasks if t not in TASKS]:
        raise ValueError(f"unknown task(s) {bad}; expected a subset of {list(TASKS)}")
    out: list[PromptSample] = []
    for t in tasks:
        out += [json.loads(b) for b in read_task_payloads(prepared_dir, split, t)]
    out.sort(key=lambda s: s["key"])
    return out


def corpus_texts(prepared_dir: str | Path) -> Iterator[str]:
    """Text for training the tiny model's tokenizer: every item title, the training reviews, and the training
    prompts in both variants with their answers (validation/test text stays unseen)."""
    prepared_dir = Path(prepared_dir)
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    yield from pq.read_table(prepared_dir / ITEMS, columns=["title"]).column("title").to_pylist()
    for r in pq.read_table(interactions_path(prepared_dir, "train"), columns=["review"]).column("review").to_pylist():
        if r:
            yield r
    for t in manifest["tasks"]:
        for b in read_task_payloads(prepared_dir, "train", t):
            s = json.loads(b)
            yield f"{s['prompt_cf']} {s['answer']}"
            yield f"{s['prompt_text']} {s['answer']}"
