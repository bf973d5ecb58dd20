"""The input-loss budget (data.max_skip_frac, per input file) and damaged files (data.allow_truncated) through
prepare_data: the run stops with the skip summary, the summary is printed on every preparation, a reused dataset
is checked again. Every file is generated here, small."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from ckf_dist.config import DataConfig
from ckf_dist.data.skips import InputLossError


def _ml100k(root: Path, semicolon_every: int = 0, bad_item_lines: int = 0) -> Path:
    """An ML-100K folder: 30 users x 10 ratings of 40 films; every `semicolon_every`-th line ';'-separated."""
    root.mkdir(parents=True)
    items = [f"{i}|Film {i} (1995)|01-Jan-1995||http://x|0|1" for i in range(1, 41)]
    (root / "u.item").write_text("\n".join(items + ["no separator here"] * bad_item_lines) + "\n")
    rng, lines = random.Random(0), []
    for u in range(1, 31):
        for k, i in enumerate(rng.sample(range(1, 41), 10)):
            sep = ";" if semicolon_every and len(lines) % semicolon_every == semicolon_every - 1 else "\t"
            lines.append(sep.join([str(u), str(i), str(rng.randint(1, 5)), str(880000000 + 100 * k + u)]))
    (root / "u.data").write_text("\n".join(lines) + "\n")
    return root


def _cfg(tmp_path: Path, root: Path, **kw: object) -> DataConfig:
    return DataConfig(source="ml-100k", path=str(root), tasks=["ctr", "topk"], num_candidates=5,
                      prepared_dir=str(tmp_path / "prep"), **kw)


def test_half_the_lines_dropped_stops_with_the_summary(tmp_path, capsys):
    """ML-100K with every second line ';'-separated: 50% of u.data lost. Before: exit 0, only manifest.json knew."""
    from ckf_dist.data.preprocess import prepare_data

    root = _ml100k(tmp_path / "ml", semicolon_every=2)
    with pytest.raises(InputLossError) as e:
        prepare_data(_cfg(tmp_path, root), engine="local")
    msg = str(e.value)
    assert "150 of 300 records of u.data (50.00%) could not be read, more than data.max_skip_frac=0.001" in msg
    assert "skipped 150 [wrong_field_count], e.g. u.data:2 expected 4 fields, got 1" in msg
    assert "u.data:4 " in msg and "u.item: 0 of 40 records skipped" in msg
    assert "raise data.max_skip_frac" in msg
    assert not (tmp_path / "prep").exists()  # nothing half-prepared is left to be reused

    # Accepting the loss explicitly: it runs, and the summary is on the console.
    m = prepare_data(_cfg(tmp_path, root, max_skip_frac=0.5), engine="local")
    out = capsys.readouterr().out
    assert "u.data: 150 of 300 records skipped (50.00%)" in out
    assert "skipped 150 [wrong_field_count], e.g. u.data:2" in out
    assert m["skips"]["files"]["u.data"] == {"read": 300, "skipped": 150}


def test_clean_input_passes_and_prints_its_summary_reused_too(tmp_path, capsys):
    from ckf_dist.data.preprocess import prepare_data

    root = _ml100k(tmp_path / "ml")
    prepare_data(_cfg(tmp_path, root), engine="local")
    first = capsys.readouterr().out
    assert "[ckf] prepare" in first and "u.data: 0 of 300 records skipped (0.00%)" in first
    prepare_data(_cfg(tmp_path, root), engine="local")
    assert "(up to date, reused)" in capsys.readouterr().out


def test_budget_is_per_file_so_a_small_damaged_file_is_not_hidden(tmp_path):
    """2 bad lines of 42 in u.item (4.8%) next to a clean u.data (0.6% of all records): stops, naming u.item."""
    from ckf_dist.data.preprocess import prepare_data

    root = _ml100k(tmp_path / "ml", bad_item_lines=2)
    with pytest.raises(InputLossError, match=r"(?s)2 of 42 records of u.item \(4.76%\) could not be read.*"
                                             r"skipped 2 \[bad_item_line\], e.g. u.item:41"):
        prepare_data(_cfg(tmp_path, root, max_skip_frac=0.01), engine="local")


def test_a_reused_dataset_is_checked_against_a_lower_budget(tmp_path):
    from ckf_dist.data.preprocess import prepare_data

    root = _ml100k(tmp_path / "ml", semicolon_every=10)  # 10% lost
    prepare_data(_cfg(tmp_path, root, max_skip_frac=0.2), engine="local")
    assert prepare_data(_cfg(tmp_path, root, max_skip_frac=0.15), engine="local")["skips"]["counts"] == {
        "wrong_field_count": 30}
    with pytest.raises(InputLossError, match=r"30 of 300 records of u.data \(10.00%\)"):
        prepare_data(_cfg(tmp_path, root, max_skip_frac=0.05), engine="local")


def test_protocol_drops_are_reported_not_charged(tmp_path):
    """Re-ratings (dedup) are the protocol, not lost input: a table full of them passes the default budget."""
    from ckf_dist.data.preprocess import prepare_data

    rows = [(f"u{u}", f"i{(u + k) % 30}", 1 + (u + k) % 5, 100 * rep + 10 * k + u)  # every pair rated twice
            for rep in range(2) for u in range(20) for k in range(8)]
    p = tmp_path / "t.csv"
    p.write_text("user_id,item_id,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    m = prepare_data(DataConfig(source="table", path=str(p), tasks=["ctr"], prepared_dir=str(tmp_path / "prep")),
                     engine="local")
    assert m["skips"]["counts"]["duplicate_interaction"] == 160
    assert m["skips"]["files"] == {"t.csv": {"read": 320, "skipped": 0}}


def test_truncated_gzip_stops_unless_allowed_and_a_reuse_rechecks(tmp_path, capsys):
    """A .gz cut at 50%: an error naming the file; data.allow_truncated=true keeps the prefix (the lost tail reported,
    not charged to the budget); a later run without the opt-in does not silently reuse that dataset."""
    from ckf_dist.data.preprocess import prepare_data

    rng = random.Random(1)
    lines = [json.dumps({"reviewerID": f"U{n % 25}", "asin": f"I{rng.randrange(60)}", "overall": 1 + n % 5,
                         "unixReviewTime": 1_400_000_000 + n, "reviewText": f"review {n} " + "fine " * 20})
             for n in range(1200)]
    blob = gzip.compress(("\n".join(lines) + "\n").encode())
    p = tmp_path / "reviews.json.gz"
    p.write_bytes(blob[: len(blob) // 2])

    def cfg(**kw: object) -> DataConfig:
        return DataConfig(source="amazon", path=str(p), tasks=["ctr"], prepared_dir=str(tmp_path / "prep"), **kw)

    with pytest.raises(InputLossError, match=r"reviews.json.gz: truncated or corrupt file \(EOFError"):
        prepare_data(cfg(), engine="local")
    # The cut last line is a bad_json skip: 1 of ~600 records, so a budget of 0.5% lets it through.
    m = prepare_data(cfg(allow_truncated=True, max_skip_frac=0.005), engine="local")
    assert m["skips"]["counts"]["truncated_or_corrupt_file"] == 1
    assert m["skips"]["files"]["reviews.json.gz"]["skipped"] == m["skips"]["counts"].get("bad_json", 0) <= 1
    assert "skipped 1 [truncated_or_corrupt_file], e.g. reviews.json.gz:" in capsys.readouterr().out
    with pytest.raises(InputLossError, match="data.allow_truncated=true"):
        prepare_data(cfg(max_skip_frac=0.005), engine="local")


def test_a_manifest_from_before_per_file_counts_is_reused_only_within_the_budget(tmp_path, capsys):
    """Datasets prepared before this check (no skips.files) stay current unless their reader skips break the budget."""
    from ckf_dist.data.preprocess import prepare_data

    root = _ml100k(tmp_path / "ml")
    cfg = _cfg(tmp_path, root)
    prepare_data(cfg, engine="local")
    mpath = tmp_path / "prep" / "manifest.json"

    def old_style(counts: dict[str, int], file: str) -> None:
        m = json.loads(mpath.read_text())
        m["skips"] = {"total": sum(counts.values()), "counts": counts,
                      "examples": {r: [{"file": file, "line": None, "detail": "", "text": ""}] for r in counts}}
        mpath.write_text(json.dumps(m))

    old_style({"duplicate_interaction": 40}, "interactions")  # a protocol drop: not lost input
    capsys.readouterr()
    assert prepare_data(cfg, engine="local")["skips"]["counts"] == {"duplicate_interaction": 40}
    assert "(up to date, reused)" in capsys.readouterr().out
    old_style({"wrong_field_count": 150}, "u.data")  # what the ';' probe left before: rebuilt, and checked
    m = prepare_data(cfg, engine="local")
    assert "(up to date, reused)" not in capsys.readouterr().out
    assert m["skips"]["counts"] == {} and m["skips"]["files"]["u.data"] == {"read": 300, "skipped": 0}
