"""Data as users have it: 0/1 label tables with explicit negatives, predefined train/valid/test files, and the
errors for labels that cannot be used. Every file is generated here, small."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ckf_dist.config import ColumnMap, DataConfig
from ckf_dist.testing.data_files import binary_rows, split_by_position, write_csv


def binary_cfg(tmp_path: Path, path: Path, **kw: object) -> DataConfig:
    return DataConfig(source="table", path=str(path), columns=ColumnMap(label="clicked", title="title"),
                      tasks=["ctr", "topk"], num_candidates=6, prepared_dir=str(tmp_path / "prep"), **kw)


def _samples(prep: Path, split: str, task: str) -> list[dict]:
    from ckf_dist.data.prompts import load_samples

    return [s for s in load_samples(prep, split) if s["task"] == task]


def _pairs(table_path: Path) -> set[tuple[int, int]]:
    t = pq.read_table(table_path, columns=["uid", "iid"])
    return set(zip(t["uid"].to_pylist(), t["iid"].to_pylist()))


# --------------------------------------------------------------------------------------------------
# 0/1 labels
# --------------------------------------------------------------------------------------------------


def test_binary_table_positives_train_cf_negatives_become_ctr_no(tmp_path):
    from ckf_dist.cf.data import read_id_space, read_split
    from ckf_dist.data.checks import leakage_problems
    from ckf_dist.data.preprocess import prepare_data
    from ckf_dist.data.schema import NEGATIVES, SPLITS, interactions_path

    rows = binary_rows()
    cfg = binary_cfg(tmp_path, write_csv(tmp_path / "clicks.csv", rows))
    m = prepare_data(cfg, engine="local")
    prep = Path(cfg.prepared_dir)
    assert leakage_problems(prep) == []
    # The CF stage reads positives only, at the top of the rating scale.
    train = read_split(prep, "train", read_id_space(prep))
    assert set(train.rating.tolist()) == {5.0}
    n_pos = sum(1 for r in rows if r[2] == 1)
    assert sum(m["interactions"].values()) + m["skips"]["counts"].get("duplicate_interaction", 0) == n_pos
    # Every CTR "No" is an explicit negative of that split (none sampled); every "Yes" a positive of it.
    neg = pq.read_table(interactions_path(prep, NEGATIVES)).to_pylist()
    for code, sp in enumerate(SPLITS):
        ctr = _samples(prep, sp, "ctr")
        no = {(s["uid"], s["item"]) for s in ctr if s["answer"] == "No"}
        assert no == {(r["uid"], r["iid"]) for r in neg if r["split"] == code}, sp
        assert {(s["uid"], s["item"]) for s in ctr if s["answer"] == "Yes"} <= _pairs(interactions_path(prep, sp))
        assert no and len(no) < len(ctr), f"{sp} needs both classes"
    assert m["explicit_negatives"] == {sp: sum(1 for r in neg if r["split"] == c) for c, sp in enumerate(SPLITS)}
    # No explicit negative is ever a history item or a top-K answer.
    negs = {(r["uid"], r["iid"]) for r in neg}
    for sp in SPLITS:
        for s in _samples(prep, sp, "topk"):
            assert (s["uid"], s["item"]) not in negs
            assert not {(s["uid"], h) for h in s["history"]} & negs
    # One dropped 0-row of this data has an item nobody clicked (no CF vector): counted, not silent.
    dropped = m["skips"]["counts"].get("negative_item_without_positive", 0)
    assert len(neg) + dropped == sum(1 for r in rows if r[2] == 0)


def test_latest_label_of_a_pair_wins(tmp_path):
    from ckf_dist.data.preprocess import prepare_data
    from ckf_dist.data.schema import NEGATIVES, interactions_path

    rows = binary_rows()
    first = rows[0]
    rows.append([first[0], first[1], 0, 5000, first[4]])  # the user's first click, later marked 0
    m = prepare_data(binary_cfg(tmp_path, write_csv(tmp_path / "c.csv", rows)), engine="local")
    prep = tmp_path / "prep"
    items = pq.read_table(prep / "items.parquet").to_pylist()
    users = pq.read_table(prep / "users.parquet").to_pylist()
    iid = next(r["iid"] for r in items if r["raw_id"] == first[1])
    uid = next(r["uid"] for r in users if r["raw_id"] == first[0])
    assert (uid, iid) in _pairs(interactions_path(prep, NEGATIVES))
    assert all((uid, iid) not in _pairs(interactions_path(prep, sp)) for sp in ("train", "valid", "test"))
    assert m["skips"]["counts"]["duplicate_interaction"] == 1


def test_labels_other_than_0_1_name_file_column_and_counts(tmp_path):
    from ckf_dist.data.readers import read_table

    rows = binary_rows(n_users=3)
    rows[4][2], rows[7][2], rows[8][2] = 2, "yes", 2
    path = write_csv(tmp_path / "clicks.csv", rows)
    with pytest.raises(ValueError, match=r"clicks\.csv: column 'clicked' \(data\.columns\.label\) must hold 0/1 "
                                         r"labels; 3 rows hold other values \(line 6: '2'; counts \{'2': 2, 'yes': 1\}\)"):
        read_table(path, ColumnMap(label="clicked"))


@pytest.mark.parametrize("only", [0, 1])
def test_one_class_only_is_an_error(tmp_path, only):
    from ckf_dist.data.readers import read_table

    rows = [[*r[:2], only, *r[3:]] for r in binary_rows(n_users=3)]
    path = write_csv(tmp_path / "clicks.csv", rows)
    n1, n0 = (len(rows), 0) if only else (0, len(rows))
    with pytest.raises(ValueError, match=rf"clicks\.csv: column 'clicked' \(data\.columns\.label\) holds one class "
                                         rf"only \({n1} rows labelled 1, {n0} labelled 0\)"):
        read_table(path, ColumnMap(label="clicked"))


def test_label_spellings_accepted(tmp_path):
    from ckf_dist.data.readers import read_table

    rows = binary_rows(n_users=2)
    for r, v in zip(rows, ["1", "0", "1.0", "0.0", 1, 0] * 10):
        r[2] = v
    raw = read_table(write_csv(tmp_path / "c.csv", rows), ColumnMap(label="clicked"))
    assert raw.interactions.num_rows == len(rows)
    assert raw.interactions["label"].to_pylist() == [1, 0] * (len(rows) // 2)
    assert set(raw.interactions["rating"].to_pylist()) == {1.0, 5.0}


def test_0_1_in_the_rating_column_names_the_fix(tmp_path):
    from ckf_dist.data.readers import read_table

    path = write_csv(tmp_path / "clicks.csv", binary_rows(n_users=3),
                     header=["user_id", "item_id", "rating", "timestamp", "title"])
    with pytest.raises(ValueError, match=r"clicks\.csv: column 'rating' \(data\.columns\.rating\) holds only 0 and 1 "
                                         r"\(36 rows\).*set data\.columns\.label='rating' instead"):
        read_table(path, ColumnMap())


def test_ratings_with_some_zeros_are_still_skipped_not_an_error(tmp_path):
    from ckf_dist.data.readers import read_table

    rows = [[r[0], r[1], 0 if r[2] == 0 else 4, r[3], r[4]] for r in binary_rows(n_users=3)]
    raw = read_table(write_csv(tmp_path / "r.csv", rows, header=["user_id", "item_id", "rating", "timestamp", "t"]),
                     ColumnMap())
    assert raw.skips.counts["rating_out_of_range"] == sum(1 for r in rows if r[2] == 0)


def test_config_problems_for_the_new_shapes():
    def probs(**kw: object) -> list[str]:
        return DataConfig(**kw).problems("data")  # type: ignore[arg-type]

    assert any("data.tasks contains 'rating' but data.columns.label='clicked'" in p
               for p in probs(source="table", path="x.csv", columns=ColumnMap(label="clicked")))
    assert any("data.valid_path and data.test_path must be set together" in p
               for p in probs(source="table", path="x.csv", valid_path="v.csv"))
    assert any("need data.source='table' or 'alpaca', got 'ml-100k'" in p
               for p in probs(source="ml-100k", path="d", tasks=["ctr"], test_path="t", valid_path="v"))
    assert probs(source="table", path="x.csv", valid_path="v.csv", test_path="t.csv", tasks=["ctr", "topk"],
                 columns=ColumnMap(label="clicked")) == []


def test_unset_new_fields_leave_the_fingerprint_as_before():
    from ckf_dist.data.preprocess import config_fingerprint

    fp = config_fingerprint(DataConfig(source="table", path="x.csv"))
    assert "valid_path" not in fp and "test_path" not in fp and "label" not in fp["columns"]
    fp = config_fingerprint(DataConfig(source="table", path="x.csv", valid_path="v", test_path="t",
                                       columns=ColumnMap(label="y")))
    assert fp["valid_path"] == "v" and fp["columns"]["label"] == "y"


def test_check_flags_a_ctr_no_that_is_not_an_explicit_negative(tmp_path):
    from ckf_dist.data.checks import _interactions, sample_problems
    from ckf_dist.data.preprocess import prepare_data

    prepare_data(binary_cfg(tmp_path, write_csv(tmp_path / "c.csv", binary_rows())), engine="local")
    prep = tmp_path / "prep"
    inter = _interactions(prep)
    s = next(s for s in _samples(prep, "test", "ctr") if s["answer"] == "No")
    assert sample_problems(s, inter) == []
    other = next(i for i in range(30) if i not in inter["neg/test"][s["uid"]]
                 and all(i not in inter[sp].get(s["uid"], {}) for sp in ("train", "valid", "test")))
    bad = {**s, "item": other}
    assert any("is not a 0-labelled test row" in p for p in sample_problems(bad, inter))


# --------------------------------------------------------------------------------------------------
# Predefined train / valid / test files
# --------------------------------------------------------------------------------------------------


def _split_cfg(tmp_path: Path, parts: tuple[list, list, list], **kw: object) -> DataConfig:
    paths = [write_csv(tmp_path / f"{n}.csv", p) for n, p in zip(("train", "valid", "test"), parts)]
    return binary_cfg(tmp_path, paths[0], valid_path=str(paths[1]), test_path=str(paths[2]), **kw)


def test_predefined_files_replace_the_split_cf_sees_train_only(tmp_path):
    from ckf_dist.data.checks import leakage_problems
    from ckf_dist.data.preprocess import prepare_data
    from ckf_dist.data.schema import interactions_path

    tr, va, te = split_by_position(binary_rows(), valid_from=7, test_from=9)
    te.append(["u3", "i999", 1, 5000, "Brand new"])  # an item the training file lacks: cold, counted
    te.append(["u4", "i998", 0, 5000, "Brand new 2"])
    cfg = _split_cfg(tmp_path, (tr, va, te))
    m = prepare_data(cfg, engine="local")
    prep = Path(cfg.prepared_dir)
    assert m["split"] == "predefined files"
    assert leakage_problems(prep) == []
    users = {r["uid"]: r["raw_id"] for r in pq.read_table(prep / "users.parquet").to_pylist()}
    items = {r["iid"]: r["raw_id"] for r in pq.read_table(prep / "items.parquet").to_pylist()}
    assert set(items.values()) == {r[1] for r in tr if r[2] == 1}  # the id map is the training file's
    for sp, part in zip(("train", "valid", "test"), (tr, va, te)):
        got = {(users[u], items[i]) for u, i in _pairs(interactions_path(prep, sp))}
        assert got == {(r[0], r[1]) for r in part if r[2] == 1 and r[1] not in ("i999", "i998")
                       and r[1] in set(items.values())}, sp
    assert m["skips"]["counts"]["cold_item_not_in_train"] >= 1
    assert m["skips"]["counts"]["negative_item_not_in_train"] >= 1
    # Several valid/test items per user: each is a target, with a training-file history.
    train_pairs = _pairs(interactions_path(prep, "train"))
    for s in _samples(prep, "test", "topk"):
        assert all((s["uid"], h) in train_pairs for h in s["history"])
    assert m["counts"]["test"]["topk"] == m["interactions"]["test"]
    assert max(sum(1 for s in _samples(prep, "valid", "topk") if s["uid"] == u) for u in users) == 2


def test_predefined_files_with_ratings(tmp_path):
    from ckf_dist.data.checks import leakage_problems
    from ckf_dist.data.preprocess import prepare_data

    rows = [[r[0], r[1], 1 + (int(r[3]) % 5), r[3], r[4]] for r in binary_rows()]
    header = ["user_id", "item_id", "rating", "timestamp", "title"]
    parts = split_by_position(rows)
    paths = [write_csv(tmp_path / f"{n}.tsv", p, header) for n, p in zip(("tr", "va", "te"), parts)]
    for p in paths:  # tab-separated, to exercise another format through the same reader
        p.write_text(p.read_text().replace(",", "\t"))
    cfg = DataConfig(source="table", path=str(paths[0]), valid_path=str(paths[1]), test_path=str(paths[2]),
                     tasks=["ctr", "topk", "rating"], num_candidates=6, prepared_dir=str(tmp_path / "prep"))
    m = prepare_data(cfg, engine="local")
    assert leakage_problems(tmp_path / "prep") == []
    assert m["interactions"]["train"] == len(parts[0])
    assert (m["interactions"]["valid"] + m["interactions"]["test"] + m["skips"]["counts"]["cold_item_not_in_train"]
            == len(parts[1]) + len(parts[2]))
    assert set(json.loads((tmp_path / "prep" / "manifest.json").read_text())["inputs"]) == {"tr.tsv", "valid:va.tsv",
                                                                                           "test:te.tsv"}


def test_valid_or_test_user_unseen_in_train_is_an_error(tmp_path):
    from ckf_dist.data.preprocess import prepare_data

    tr, va, te = split_by_position(binary_rows())
    te += [["stranger", "i1", 1, 9000, "x"], ["stranger", "i2", 0, 9001, "y"]]
    with pytest.raises(ValueError, match=r"test\.csv: 2 valid/test rows of 1 users that have no positive row in the "
                                         r"training file .*train\.csv \(e\.g\. user 'stranger'\)"):
        prepare_data(_split_cfg(tmp_path, (tr, va, te)), engine="local")


def test_one_class_is_counted_over_all_files(tmp_path):
    from ckf_dist.data.preprocess import prepare_data

    tr, va, te = split_by_position(binary_rows())
    te = [[*r[:2], 1, *r[3:]] for r in te]  # a test file of clicks only is fine ...
    prepare_data(_split_cfg(tmp_path, (tr, va, te)), engine="local")
    tr, va, te = ([[*r[:2], 1, *r[3:]] for r in p] for p in (tr, va, te))  # ... all three are not
    with pytest.raises(ValueError, match=r"train\.csv, .*valid\.csv, .*test\.csv: column 'clicked' .* one class"):
        prepare_data(_split_cfg(tmp_path, (tr, va, te)), engine="local", force=True)


# --------------------------------------------------------------------------------------------------
# Instruction-format (alpaca) prompt files
# --------------------------------------------------------------------------------------------------

INSTRUCTION = ('Given the user\'s preference and unpreference, identify whether the user will like the target movie '
               'by answering "Yes." or "No.".')


def alpaca_records(n: int, start: int = 0) -> list[dict[str, str]]:
    """TALLRec-style records: a fixed instruction, a per-record input, "Yes."/"No." outputs alternating."""
    return [{"instruction": INSTRUCTION,
             "input": f'User Preference: "Film {i}"\nUser Unpreference: "Film {i + 1}"\n'
                      f'Whether the user will like the target movie "Film {i + 2}"?',
             "output": "Yes." if i % 2 else "No."} for i in range(start, start + n)]


def alpaca_cfg(tmp_path: Path, train: list, valid: list, test: list, tasks: list[str] | None = None) -> DataConfig:
    paths = [tmp_path / "train.json", tmp_path / "valid.jsonl", tmp_path / "test.json"]
    paths[0].write_text(json.dumps(train, indent=1))  # a JSON list ...
    paths[1].write_text("".join(json.dumps(r) + "\n" if isinstance(r, dict) else f"{r}\n" for r in valid))  # JSONL
    paths[2].write_text(json.dumps(test))
    return DataConfig(source="alpaca", path=str(paths[0]), valid_path=str(paths[1]), test_path=str(paths[2]),
                      tasks=tasks or ["ctr"], prepared_dir=str(tmp_path / "prep"))


def test_alpaca_files_become_text_only_ctr_samples(tmp_path):
    from ckf_dist.data.checks import leakage_problems
    from ckf_dist.data.preprocess import prepare_data

    valid = [*alpaca_records(5, start=20), "{not json", json.dumps({"instruction": "x"}), json.dumps([1])]
    cfg = alpaca_cfg(tmp_path, alpaca_records(20), valid, alpaca_records(6, start=25))
    # 3 of the 8 valid records are bad: over the input-loss budget, the preparation stops, naming file and reasons.
    with pytest.raises(ValueError, match=r"(?s)3 of 8 records of valid.jsonl \(37.50%\) could not be read.*"
                                         r"skipped 2 \[bad_json\], e.g. valid.jsonl:6"):
        prepare_data(cfg, engine="local")
    cfg.max_skip_frac = 0.5
    m = prepare_data(cfg, engine="local")
    assert m["counts"] == {"train": {"ctr": 20}, "valid": {"ctr": 5}, "test": {"ctr": 6}}
    assert m["skips"]["counts"] == {"bad_json": 2, "missing_field": 1}
    assert leakage_problems(tmp_path / "prep") == []
    s = _samples(tmp_path / "prep", "test", "ctr")[0]
    assert s["prompt_text"] == s["prompt_cf"] == (f'{INSTRUCTION}\nUser Preference: "Film 25"\nUser Unpreference: '
                                                  f'"Film 26"\nWhether the user will like the target movie "Film 27"?'
                                                  f'\nAnswer:')
    assert (s["answer"], s["label"], s["slot_items"]) == ("Yes", 1.0, [])


def test_alpaca_exp_keeps_free_text_outputs(tmp_path):
    from ckf_dist.data.preprocess import prepare_data

    recs = [{**r, "output": f"Because it is like Film {k}."} for k, r in enumerate(alpaca_records(12))]
    prepare_data(alpaca_cfg(tmp_path, recs[:8], recs[8:10], recs[10:], tasks=["exp"]), engine="local")
    assert _samples(tmp_path / "prep", "valid", "exp")[0]["answer"] == "Because it is like Film 8."


def test_alpaca_outputs_that_are_not_yes_no_name_file_and_counts(tmp_path):
    from ckf_dist.data.preprocess import prepare_data

    train = alpaca_records(10)
    train[3]["output"] = "Maybe."
    train[4]["output"] = "Maybe."
    with pytest.raises(ValueError, match=r"train\.json: data\.tasks=\['ctr'\] needs every output to be Yes or No; 2 "
                                         r"records say something else \(record 4: 'Maybe\.'; counts \{'Maybe\.': 2\}\)"):
        prepare_data(alpaca_cfg(tmp_path, train, alpaca_records(2), alpaca_records(2)), engine="local")


def test_alpaca_one_class_is_an_error(tmp_path):
    from ckf_dist.data.preprocess import prepare_data

    yes = [{**r, "output": "Yes."} for r in alpaca_records(10)]
    with pytest.raises(ValueError, match=r"the outputs hold one class only \(10 Yes, 0 No\)"):
        prepare_data(alpaca_cfg(tmp_path, yes[:6], yes[6:8], yes[8:]), engine="local")


def test_alpaca_config_problems_and_leak_check(tmp_path):
    from ckf_dist.data.checks import leakage_problems
    from ckf_dist.data.preprocess import prepare_data

    probs = DataConfig(source="alpaca", path="t.json").problems("data")
    assert any("data.source='alpaca' needs data.valid_path and data.test_path" in p for p in probs)
    assert any("data.source='alpaca' needs data.tasks=['ctr']" in p for p in probs)
    recs = alpaca_records(10)
    prepare_data(alpaca_cfg(tmp_path, recs[:8], recs[8:], recs[7:8]), engine="local")  # a test prompt seen in train
    assert leakage_problems(tmp_path / "prep") == ["test/ctr/0/0: the same prompt is also a training prompt"]


def test_mf_on_binary_feedback_is_refused():
    from ckf_dist.config import ConfigError, load_config

    over = ["data.source=table", "data.path=x.csv", "data.columns.label=clicked", "data.tasks=[ctr,topk]"]
    with pytest.raises(ConfigError, match=r"cf.model='mf' regresses ratings.*use cf.model='bpr'"):
        load_config(None, over)
    assert load_config(None, [*over, "cf.model=bpr"]).cf.model == "bpr"
