"""Per-task prompt samples (MTM): one small builder per task turns a user's target item into PromptSample fields.

`user_targets` cuts one user's timeline into targets (training windows, then the valid and test items, each with
its strictly earlier training history); `BUILDERS[task]` renders a target into that task's samples. Adding a task
means adding one builder and its entry in BUILDERS. preprocess.build_user_samples runs them over every user.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ckf_dist.data.prompts import (
    clean_review,
    render_ctr,
    render_exp,
    render_rating,
    render_topk,
    to_text_variant,
)
from ckf_dist.tasks import TASK_ID, TASKS

SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}


@dataclass
class BuildContext:
    """Everything the per-user builder needs besides the user's rows (shipped to the Ray workers)."""

    num_items: int
    titles: list[str]
    """Display title per iid."""
    tasks: list[str]
    seed: int
    history_len: int
    like_threshold: float
    ctr_negatives: int
    num_candidates: int
    max_explanation_words: int
    train_windows_per_user: int
    cold_threshold: int
    explicit_negatives: bool = False
    """data.columns.label: CTR "No" samples are the table's 0-labelled rows, none are sampled."""


@dataclass
class Target:
    """One item of a user's timeline that every task turns into samples, with the history before it."""

    uid: int
    split: str
    item: int
    rating: float
    review: str | None
    """The review of the target interaction (None unless 'exp' is among the tasks)."""
    history: list[int]
    """Training items strictly earlier than the target, chronological (<= history_len)."""
    history_titles: list[str]
    history_ratings: list[float]
    negative: bool = False
    """An explicit negative (a 0-labelled row): only a CTR "No" sample is built from it."""


class Built(NamedTuple):
    """What a builder made of one target: the samples' task fields, and a note reason if something was missing."""

    samples: list[dict[str, Any]]
    note: str | None = None


SampleBuilder = Callable[[Target, np.ndarray, np.random.Generator, BuildContext], Built]
"""(target, the user's unseen items, the user's generator for this task, context) -> Built."""


def task_rng(seed: int, uid: int, task: str) -> np.random.Generator:
    # One generator per (user, task): the output depends neither on Ray's partitioning nor on which other
    # tasks are enabled.
    return np.random.default_rng([seed, uid, TASK_ID[task], 7])


def sample_negatives(rng: np.random.Generator, pool: np.ndarray, k: int) -> np.ndarray | None:
    """k distinct items of `pool` (None if it has fewer)."""
    if len(pool) < k:
        return None
    if k == 1:  # the common CTR case; much cheaper than choice(replace=False)
        return pool[rng.integers(len(pool), size=1)]
    return pool[rng.choice(len(pool), size=k, replace=False)]


def user_targets(items: np.ndarray, ratings: np.ndarray, stamps: np.ndarray, splits: np.ndarray,
                 reviews: list[str] | None, uid: int, ctx: BuildContext) -> list[Target]:
    """One user's targets: the last `train_windows_per_user` training items (all if 0) except the first, then the
    valid and the test item, each with the training items strictly earlier than it as history.

    Args:
        items, ratings, stamps, splits: the user's rows in chronological order (split codes 0/1/2, SPLIT_CODE).
        reviews: the rows' review texts, or None when no task needs them.
        uid: the user.
        ctx: the build settings.
    """
    assert (np.diff(splits) >= 0).all(), f"user {uid}: rows not in chronological split order"
    train_idx = np.flatnonzero(splits == 0)
    train_ts = stamps[train_idx]
    h = ctx.history_len
    # A history holds only training items STRICTLY earlier than the target (same-timestamp items, e.g. Amazon's
    # day-resolution times, are left out: their order is unknown).
    picked: list[tuple[str, int, np.ndarray]] = []
    train_targets = list(range(1, len(train_idx)))
    if ctx.train_windows_per_user > 0:
        train_targets = train_targets[-ctx.train_windows_per_user:]
    for j in train_targets:
        c = int(np.searchsorted(train_ts, train_ts[j], side="left"))
        picked.append(("train", int(train_idx[j]), train_idx[max(0, c - h):c]))
    for sp in ("valid", "test"):  # one each under leave-last-out; any number with predefined split files
        for where in np.flatnonzero(splits == SPLIT_CODE[sp]):
            c = int(np.searchsorted(train_ts, stamps[where], side="left"))
            picked.append((sp, int(where), train_idx[max(0, c - h):c]))
    targets = []
    for sp, t_idx, h_idx in picked:
        hist = [int(x) for x in items[h_idx]]
        targets.append(Target(uid=uid, split=sp, item=int(items[t_idx]), rating=float(ratings[t_idx]),
                              review=reviews[t_idx] if reviews is not None else None, history=hist,
                              history_titles=[ctx.titles[x] for x in hist],
                              history_ratings=[float(x) for x in ratings[h_idx]]))
    return targets


def negative_targets(items: np.ndarray, ratings: np.ndarray, stamps: np.ndarray, splits: np.ndarray,
                     neg_items: np.ndarray, neg_stamps: np.ndarray, neg_splits: np.ndarray, uid: int,
                     ctx: BuildContext) -> list[Target]:
    """One user's explicit negatives as targets (negative=True), in (split, time) order, each with the training
    positives strictly earlier than it as history; of the training ones only the last `train_windows_per_user`
    (all if 0), as for the positives.

    Args:
        items, ratings, stamps, splits: the user's positive rows, as for user_targets.
        neg_items, neg_stamps, neg_splits: the user's 0-labelled rows in (split, time) order.
        uid, ctx: the user and the build settings.
    """
    train_idx = np.flatnonzero(splits == 0)
    train_ts = stamps[train_idx]
    rows = list(range(len(neg_items)))
    if ctx.train_windows_per_user > 0:
        tr = [k for k in rows if neg_splits[k] == 0]
        rows = tr[-ctx.train_windows_per_user:] + [k for k in rows if neg_splits[k] != 0]
    split_name = {v: k for k, v in SPLIT_CODE.items()}
    targets = []
    for k in rows:
        c = int(np.searchsorted(train_ts, neg_stamps[k], side="left"))
        h_idx = train_idx[max(0, c - ctx.history_len):c]
        hist = [int(x) for x in items[h_idx]]
        targets.append(Target(uid=uid, split=split_name[int(neg_splits[k])], item=int(neg_items[k]), rating=0.0,
                              review=None, history=hist, history_titles=[ctx.titles[x] for x in hist],
                              history_ratings=[float(x) for x in ratings[h_idx]], negative=True))
    return targets


def _fields(t: Target, prompt: str, answer: str, label: float, item: int, slot_items: list[int],
            candidates: list[int] | None = None, candidate_titles: list[str] | None = None) -> dict[str, Any]:
    # The key order is the JSON's: every task writes the same fields in the same order.
    return {"history": t.history, "candidates": candidates or [], "candidate_titles": candidate_titles or [],
            "slot_items": t.history + slot_items, "prompt_cf": prompt, "prompt_text": to_text_variant(prompt),
            "answer": answer, "label": label, "item": item}


def ctr_samples(t: Target, unseen: np.ndarray, rng: np.random.Generator, ctx: BuildContext) -> Built:
    """CTR: the target ("Yes" if rated >= like_threshold, else "No"), then `ctr_negatives` unseen items ("No").

    With explicit negatives (data.columns.label) nothing is sampled: a positive gives "Yes", a negative "No"."""
    if ctx.explicit_negatives:
        p = render_ctr(t.uid, t.history_titles, t.history_ratings, ctx.titles[t.item], ctx.like_threshold)
        like = not t.negative
        return Built([_fields(t, p, "Yes" if like else "No", 1.0 if like else 0.0, t.item, [t.item])])
    rows = [(t.item, t.rating >= ctx.like_threshold)]
    negs = sample_negatives(rng, unseen, ctx.ctr_negatives)
    note = None
    if negs is None:  # the positive is still worth a sample
        note, negs = "ctr_not_enough_unseen_items", np.empty(0, dtype=np.int64)
    rows += [(int(x), False) for x in negs]
    samples = []
    for it, like in rows:
        p = render_ctr(t.uid, t.history_titles, t.history_ratings, ctx.titles[it], ctx.like_threshold)
        samples.append(_fields(t, p, "Yes" if like else "No", 1.0 if like else 0.0, it, [it]))
    return Built(samples, note)


def rating_samples(t: Target, unseen: np.ndarray, rng: np.random.Generator, ctx: BuildContext) -> Built:
    """Rating: the target's rating, rounded to 1..5 as the answer."""
    p = render_rating(t.uid, t.history_titles, t.history_ratings, ctx.titles[t.item])
    answer = str(int(np.clip(np.rint(t.rating), 1, 5)))
    return Built([_fields(t, p, answer, t.rating, t.item, [t.item])])


def topk_samples(t: Target, unseen: np.ndarray, rng: np.random.Generator, ctx: BuildContext) -> Built:
    """Top-K: the target hidden among `num_candidates - 1` unseen items at a random position; answer = its title."""
    negs = sample_negatives(rng, unseen, ctx.num_candidates - 1)
    if negs is None:
        return Built([], "topk_not_enough_unseen_items")
    pos = int(rng.integers(ctx.num_candidates))
    cands = [int(x) for x in negs]
    cands.insert(pos, t.item)
    c_titles = [ctx.titles[x] for x in cands]
    p = render_topk(t.uid, t.history_titles, c_titles)
    return Built([_fields(t, p, c_titles[pos], float(pos), t.item, cands, cands, c_titles)])


def exp_samples(t: Target, unseen: np.ndarray, rng: np.random.Generator, ctx: BuildContext) -> Built:
    """Explanation: the target's cleaned review text (no sample if nothing is left of it)."""
    assert t.review is not None, "user_targets needs the reviews when 'exp' is among the tasks"
    text = clean_review(t.review, ctx.max_explanation_words)
    if not text:
        return Built([], "exp_no_review_text")
    p = render_exp(t.uid, t.history_titles, ctx.titles[t.item])
    return Built([_fields(t, p, text, t.rating, t.item, [t.item])])


BUILDERS: dict[str, SampleBuilder] = {"ctr": ctr_samples, "topk": topk_samples, "rating": rating_samples,
                                      "exp": exp_samples}
assert set(BUILDERS) == set(TASKS), "every task needs a sample builder"
