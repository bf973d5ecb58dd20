"""Prepared synthetic data: prompt format, leave-last-out split, and leakage checks that can fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ckf_dist.config import DataConfig, SyntheticConfig
from ckf_dist.tasks import ITEM_SLOT, USER_SLOT


def small_cfg(d: Path, **kw) -> DataConfig:
    return DataConfig(prepared_dir=str(d), synthetic=SyntheticConfig(num_users=25, num_items=40, max_interactions=12),
                      history_len=4, num_candidates=5, shard_size=40, **kw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from ckf_dist.data.preprocess import prepare_data

    d = tmp_path_factory.mktemp("prompts") / "data"
    prepare_data(small_cfg(d), engine="local")
    return d


def test_no_leakage_and_valid_format(prepared):
    from ckf_dist.data.checks import history_gap_days, leakage_problems

    assert leakage_problems(prepared) == []
    assert history_gap_days(prepared) > 0


def _tamper(prepared: Path, tmp_path: Path, split: str, task: str, edit) -> Path:
    """Copy the dataset and rewrite the first sample that `edit(sample, held, train_by_time)` changes
    (held = the user's valid/test items, train_by_time = the user's training items, oldest first)."""
    from ckf_dist.data.shards import iter_shard_payloads, member_name, write_tar

    d = tmp_path / "copy"
    shutil.copytree(prepared, d)
    shard = min((d / "prompts" / split).glob(f"{task}-shard-*.tar"))
    samples = [json.loads(b) for b in iter_shard_payloads(shard)]
    inter = {sp: pq.read_table(d / "interactions" / f"{sp}.parquet").to_pandas() for sp in ("train", "valid", "test")}
    for s in samples:
        held = {sp: int(inter[sp].iid[inter[sp].uid == s["uid"]].iloc[0]) for sp in ("valid", "test")}
        train = inter["train"][inter["train"].uid == s["uid"]].sort_values("ts").iid.tolist()
        if edit(s, held, train):
            break
    else:
        raise AssertionError("no sample to tamper with")
    write_tar(shard, [(member_name(x["key"]), json.dumps(x).encode()) for x in samples])
    return d


def _edit(what: str):
    def edit(s: dict, held: dict, train: list[int]) -> bool:
        if what == "test_in_history":
            s["history"] = s["history"] + [held["test"]]
        elif what == "valid_as_target":
            s["item"] = held["valid"]
        elif what == "later_history":  # a history item later than the target
            if s["item"] == train[-1]:
                return False
            s["history"] = s["history"] + [train[-1]]
        elif what == "slot_mismatch":
            s["prompt_cf"] = s["prompt_cf"].replace(ITEM_SLOT, "", 1)
        elif what == "trailing_space":
            s["prompt_cf"] += " "
        return True

    return edit


@pytest.mark.parametrize("what,match", [
    ("test_in_history", "validation/test item"),
    ("valid_as_target", "validation/test item"),
    ("later_history", "not strictly before"),
    ("slot_mismatch", "slots for"),
    ("trailing_space", "end with 'Answer:'"),
])
def test_checker_catches_planted_leak(prepared, tmp_path, what, match):
    from ckf_dist.data.checks import leakage_problems

    problems = leakage_problems(_tamper(prepared, tmp_path, "train", "rating", _edit(what)))
    assert any(match in p for p in problems), problems


def test_split_is_leave_last_out(prepared):
    inter = {sp: pq.read_table(prepared / "interactions" / f"{sp}.parquet").to_pandas() for sp in
             ("train", "valid", "test")}
    users = pq.read_table(prepared / "users.parquet").to_pandas()
    for sp in ("valid", "test"):
        assert inter[sp].uid.is_unique and len(inter[sp]) == len(users)
    # CF training interactions are exactly the training split: n_train in users.parquet, no held-out pair.
    assert (inter["train"].groupby("uid").size().reindex(users.uid, fill_value=0).values == users.n_train.values).all()
    pairs = set(zip(inter["train"].uid, inter["train"].iid))
    for sp in ("valid", "test"):
        assert not pairs & set(zip(inter[sp].uid, inter[sp].iid))
    last_train = inter["train"].groupby("uid").ts.max()
    assert (inter["valid"].set_index("uid").ts.reindex(last_train.index) >= last_train).all()
    assert (users.is_cold == (users.n_train <= 5)).all()


def test_prompt_format_per_task(prepared):
    from ckf_dist.data.prompts import load_samples

    samples = load_samples(prepared, "test")
    assert [s["key"] for s in samples] == sorted(s["key"] for s in samples)
    by_task = {t: [s for s in samples if s["task"] == t] for t in ("ctr", "topk", "rating", "exp")}
    n_users = len(pq.read_table(prepared / "users.parquet"))
    assert len(by_task["topk"]) == len(by_task["rating"]) == n_users
    assert len(by_task["ctr"]) == 2 * n_users  # one positive/negative target + 1 sampled negative
    for s in samples:
        assert s["prompt_cf"].count(USER_SLOT) == 1 and s["prompt_cf"].index(USER_SLOT) < s["prompt_cf"].index(
            ITEM_SLOT)
        assert s["prompt_cf"].endswith("Answer:") and not s["answer"].startswith(" ")
    assert {s["answer"] for s in by_task["ctr"]} == {"Yes", "No"}
    assert {s["answer"] for s in by_task["rating"]} <= {"1", "2", "3", "4", "5"}
    for s in by_task["rating"]:
        assert int(s["answer"]) == round(s["label"])
    for s in by_task["topk"]:
        assert len(s["candidates"]) == 5 and s["answer"] == s["candidate_titles"][int(s["label"])]
        assert s["slot_items"] == s["history"] + s["candidates"]
    labels = [int(s["label"]) for s in by_task["topk"]]
    assert len(set(labels)) > 2  # the target's position is randomised
    for s in by_task["exp"]:
        assert 0 < len(s["answer"].split()) <= 30


def test_corpus_has_titles_and_both_variants(prepared):
    from ckf_dist.data.prompts import corpus_texts

    texts = list(corpus_texts(prepared))
    assert any(USER_SLOT in t for t in texts) and any("Answer:" in t and USER_SLOT not in t for t in texts)
    titles = pq.read_table(prepared / "items.parquet")["title"].to_pylist()
    assert set(titles) <= set(texts)


def test_text_variant_is_cf_without_slots():
    from ckf_dist.data.prompts import render_topk, to_text_variant

    p = render_topk(3, ["A b", "C"], ["D", "E (1999)"])
    assert p.count(ITEM_SLOT) == 4 and p.startswith(f"User 3 {USER_SLOT}")
    assert to_text_variant(p) == "User 3 history: A b; C. Candidates: D; E (1999). Which one will the user choose next? " \
                                 "Answer:"


def test_clean_review_caps_and_strips():
    from ckf_dist.data.prompts import clean_review, display_title

    assert clean_review("Great <br/> sound\x07 and <|item_cf|> value  " + "x " * 50, 5) == "Great sound and value x"
    t = display_title("word " * 30)
    assert len(t) <= 63 and t.endswith("...")


def test_slots_are_single_special_tokens_aligned_with_slot_items(prepared, tiny_tokenizer):
    """Through the lead's Collator: each slot is one dedicated id (never <unk>), one per slot_items entry."""
    from ckf_dist.data.collate import Collator
    from ckf_dist.data.prompts import load_samples

    uid_tok = tiny_tokenizer.convert_tokens_to_ids(USER_SLOT)
    iid_tok = tiny_tokenizer.convert_tokens_to_ids(ITEM_SLOT)
    assert tiny_tokenizer.unk_token_id not in (uid_tok, iid_tok) and uid_tok != iid_tok
    samples = [s for s in load_samples(prepared, "valid") if s["uid"] < 3]
    batch = Collator(tiny_tokenizer, max_length=1024, history_len=4)(samples, variants=("text", "cf"))
    n = len(samples)
    for b, s in enumerate(samples):
        text_row, cf_row = batch.input_ids[b].tolist(), batch.input_ids[n + b].tolist()
        assert cf_row.count(uid_tok) == 1 and cf_row.count(iid_tok) == len(s["slot_items"])
        assert uid_tok not in text_row and iid_tok not in text_row
        assert batch.slot_items[n + b, : len(s["slot_items"])].tolist() == s["slot_items"]
