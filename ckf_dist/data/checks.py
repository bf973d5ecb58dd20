"""Invariants of a prepared dataset that must hold for an honest evaluation (data protocol of CKF_METHOD.md).

`leakage_problems` recomputes, from the written interactions, what every prompt may see and lists every
violation: a history item not strictly earlier than its target, a validation/test item in a training prompt,
a split that is not the chronological leave-last-out, a sampled negative the user actually interacted with,
or a CF-slot prompt whose slots do not line up with `slot_items`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ckf_dist.data.prompts import load_samples, to_text_variant
from ckf_dist.data.schema import MANIFEST, NEGATIVES, SPLITS, PromptSample, interactions_path
from ckf_dist.tasks import ITEM_SLOT, USER_SLOT


def _interactions(prepared_dir: Path) -> dict[str, dict[int, dict[int, int]]]:
    """split -> uid -> {iid: ts}; with explicit negatives (data.columns.label) also 'neg/<split>' -> the same."""
    out: dict[str, dict[int, dict[int, int]]] = {}
    for sp in SPLITS:
        t = pq.read_table(interactions_path(prepared_dir, sp), columns=["uid", "iid", "ts"])
        d: dict[int, dict[int, int]] = {}
        for u, i, ts in zip(t["uid"].to_numpy(), t["iid"].to_numpy(), t["ts"].to_numpy()):
            d.setdefault(int(u), {})[int(i)] = int(ts)
        out[sp] = d
    neg_path = interactions_path(prepared_dir, NEGATIVES)
    if neg_path.is_file():
        t = pq.read_table(neg_path)
        for sp in SPLITS:
            out[f"neg/{sp}"] = {}
        for u, i, ts, c in zip(*(t[k].to_numpy() for k in ("uid", "iid", "ts", "split"))):
            out[f"neg/{SPLITS[int(c)]}"].setdefault(int(u), {})[int(i)] = int(ts)
    return out


def _manifest(prepared_dir: Path) -> dict:
    m = prepared_dir / MANIFEST
    return json.loads(m.read_text()) if m.is_file() else {}


def _predefined(prepared_dir: Path) -> bool:
    """Whether the dataset came from predefined train/valid/test files (data.valid_path / data.test_path)."""
    return _manifest(prepared_dir).get("split") == "predefined files"


def instruction_problems(prepared_dir: Path, max_problems: int = 20) -> list[str]:
    """data.source='alpaca': format of every sample (text only, no slots, 'Answer:' last, CTR answer = label) and
    no valid/test prompt that is also a training prompt (the same instruction + input in both is a leak)."""
    out = []
    train_prompts = {s["prompt_text"] for s in load_samples(prepared_dir, "train")}
    for sp in SPLITS:
        for s in load_samples(prepared_dir, sp):
            k, p = s["key"], s["prompt_text"]
            if s["prompt_cf"] != p or USER_SLOT in p or ITEM_SLOT in p or s["slot_items"] or s["history"]:
                out.append(f"{k}: an instruction sample must be text only (no slots, history or slot_items)")
            if not p.endswith("Answer:"):
                out.append(f"{k}: prompt does not end with 'Answer:'")
            if not s["answer"] or s["answer"] != s["answer"].strip():
                out.append(f"{k}: answer {s['answer']!r} is empty or has surrounding spaces")
            if s["task"] == "ctr" and s["answer"] != ("Yes" if s["label"] == 1.0 else "No"):
                out.append(f"{k}: CTR answer {s['answer']!r} disagrees with label {s['label']}")
            if sp != "train" and p in train_prompts:
                out.append(f"{k}: the same prompt is also a training prompt")
            if len(out) >= max_problems:
                return out[:max_problems]
    return out


def split_problems(prepared_dir: str | Path) -> list[str]:
    """The split is leave-last-out: one valid and one test item per user, both later than every train item,
    test not earlier than valid, and the three splits disjoint. With predefined split files only the last holds:
    the splits are whatever the files say, but no held-out item of a user is also one of their training items."""
    inter = _interactions(Path(prepared_dir))
    out = []
    if _predefined(Path(prepared_dir)):
        for u, tr in inter["train"].items():
            va, te = inter["valid"].get(u, {}), inter["test"].get(u, {})
            if (set(va) | set(te)) & set(tr) or set(va) & set(te):
                out.append(f"user {u}: a held-out item also appears in train (or in both valid and test)")
        return out
    for u, tr in inter["train"].items():
        va, te = inter["valid"].get(u, {}), inter["test"].get(u, {})
        if len(va) != 1 or len(te) != 1:
            out.append(f"user {u}: {len(va)} valid and {len(te)} test interactions (expected 1 and 1)")
            continue
        (vi, vts), (ti, tts) = next(iter(va.items())), next(iter(te.items()))
        if vi in tr or ti in tr or vi == ti:
            out.append(f"user {u}: a held-out item also appears in train (or valid == test)")
        if tr and max(tr.values()) > vts:
            out.append(f"user {u}: a training interaction is later than the validation one")
        if vts > tts:
            out.append(f"user {u}: validation is later than test")
    return out


def sample_problems(s: PromptSample, inter: dict[str, dict[int, dict[int, int]]]) -> list[str]:
    """Leakage and format problems of one sample."""
    out = []
    k, u = s["key"], s["uid"]
    train = inter["train"].get(u, {})
    held = set(inter["valid"].get(u, {})) | set(inter["test"].get(u, {}))
    everything = set(train) | held
    own = inter[s["split"]].get(u, {})
    # History: training items only, strictly before the target, chronological.
    if missing := [h for h in s["history"] if h not in train]:
        out.append(f"{k}: history items {missing} are not training interactions of user {u}")
    else:
        ts = [train[h] for h in s["history"]]
        if ts != sorted(ts):
            out.append(f"{k}: history is not chronological")
        target_item = s["item"]
        target_ts = own.get(target_item)
        if target_ts is not None and ts and max(ts) >= target_ts:
            out.append(f"{k}: history item at t={max(ts)} is not strictly before the target at t={target_ts}")
    if s["split"] == "train" and (leak := (set(s["history"]) | {s["item"]} | set(s["candidates"])) & held):
        out.append(f"{k}: validation/test item(s) {sorted(leak)} in a training prompt")
    # Target / negatives.
    positive = s["item"] in own
    if s["task"] == "ctr":
        if s["label"] == 0.0 and not positive and s["item"] in everything:
            out.append(f"{k}: sampled negative {s['item']} is an item user {u} interacted with")
        if (explicit := inter.get(f"neg/{s['split']}")) is not None and s["label"] == 0.0:
            neg_ts = explicit.get(u, {}).get(s["item"])
            if neg_ts is None:
                out.append(f"{k}: CTR 'No' about item {s['item']} that is not a 0-labelled {s['split']} row of user {u}")
            elif s["history"] and max(train.get(h, -1) for h in s["history"]) >= neg_ts:
                out.append(f"{k}: history is not strictly before the explicit negative at t={neg_ts}")
        if s["label"] == 1.0 and not positive:
            out.append(f"{k}: positive CTR sample about item {s['item']} the user did not interact with in "
                       f"{s['split']}")
        if s["answer"] != ("Yes" if s["label"] == 1.0 else "No"):
            out.append(f"{k}: CTR answer {s['answer']!r} disagrees with label {s['label']}")
    elif s["task"] == "topk":
        li = int(s["label"])
        if s["candidates"][li] != s["item"] or s["answer"] != s["candidate_titles"][li] or not positive:
            out.append(f"{k}: top-K label/answer/candidates disagree or target is not the user's {s['split']} item")
        if neg := [c for c in s["candidates"] if c != s["item"] and c in everything]:
            out.append(f"{k}: top-K negatives {neg} are items user {u} interacted with")
        if len(set(s["candidates"])) != len(s["candidates"]):
            out.append(f"{k}: duplicate top-K candidates")
    elif not positive:
        out.append(f"{k}: {s['task']} target {s['item']} is not user {u}'s {s['split']} interaction")
    # Format: slots line up with slot_items; text variant = CF variant without slots.
    p = s["prompt_cf"]
    if p.count(USER_SLOT) != 1 or p.count(ITEM_SLOT) != len(s["slot_items"]):
        out.append(f"{k}: {p.count(USER_SLOT)} user / {p.count(ITEM_SLOT)} item slots for "
                   f"{len(s['slot_items'])} slot_items")
    if s["slot_items"][: len(s["history"])] != s["history"]:
        out.append(f"{k}: slot_items do not start with the history")
    if s["prompt_text"] != to_text_variant(p) or USER_SLOT in s["prompt_text"] or ITEM_SLOT in s["prompt_text"]:
        out.append(f"{k}: text variant is not the CF prompt without slots")
    if not p.endswith("Answer:") or not s["prompt_text"].endswith("Answer:"):
        out.append(f"{k}: prompt does not end with 'Answer:'")
    if not s["answer"] or s["answer"] != s["answer"].strip():
        out.append(f"{k}: answer {s['answer']!r} is empty or has surrounding spaces")
    return out


def leakage_problems(prepared_dir: str | Path, max_problems: int = 20) -> list[str]:
    """Every violated invariant of the prepared dataset (empty list = clean), at most max_problems lines."""
    prepared_dir = Path(prepared_dir)
    if _manifest(prepared_dir).get("source") == "alpaca":
        return instruction_problems(prepared_dir, max_problems)
    inter = _interactions(prepared_dir)
    out = split_problems(prepared_dir)
    for sp in SPLITS:
        for s in load_samples(prepared_dir, sp):
            out += sample_problems(s, inter)
            if len(out) >= max_problems:
                return out[:max_problems]
    return out


def history_gap_days(prepared_dir: str | Path) -> float:
    """Smallest (target time - latest history time) over all positive samples, in days (> 0 when leak-free)."""
    prepared_dir = Path(prepared_dir)
    inter = _interactions(prepared_dir)
    gaps = []
    for sp in SPLITS:
        for s in load_samples(prepared_dir, sp):
            t = inter[sp].get(s["uid"], {}).get(s["item"])
            if t is not None and s["history"]:
                gaps.append(t - max(inter["train"][s["uid"]][h] for h in s["history"]))
    return float(np.min(gaps)) / 86400.0 if gaps else float("inf")
