"""Readers on corrupted inputs: every skipped line is counted under its reason, with file:line examples."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ckf_dist.config import ColumnMap


def _review(u: str, i: str, r: object = 5.0, t: object = 1_400_000_000, text: str = "nice") -> str:
    return json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t, "reviewText": text})


def test_amazon_bad_lines_counted(tmp_path):
    from ckf_dist.data.readers import read_amazon

    lines = [_review("U1", "I1").encode(),
             b'{"reviewerID": "U1", "asin": ',                                  # bad_json
             json.dumps({"reviewerID": "U2", "overall": 3.0, "unixReviewTime": 1}).encode(),  # missing_field (asin)
             _review("U2", "I2", r="five").encode(),                            # bad_rating
             _review("U2", "I3", r=7).encode(),                                 # rating_out_of_range
             _review("U2", "I3", r=0.5).encode(),                               # rating_out_of_range
             _review("U3", "I1", t="yesterday").encode(),                       # bad_timestamp
             _review("U3", "I2", text="caf\u00e9").encode("utf-8").replace(b"\\u00e9", "é".encode("latin-1")),  # latin-1
             _review("U3", "I4", text="caf\u00e9").encode("utf-8"),             # fine (escaped utf-8)
             b"[1, 2]",                                                          # bad_json (not an object)
             json.dumps({"reviewerID": "U4", "asin": "I1", "overall": 4, "unixReviewTime": 5,
                         "reviewText": 12}).encode(),                           # bad_review_type
             b"",                                                                # blank: ignored, not a record
             _review("U4", "I5", text="").encode()]
    p = tmp_path / "reviews.json"
    p.write_bytes(b"\n".join(lines) + b"\n")
    raw = read_amazon(p)
    assert raw.interactions.num_rows == 3
    assert dict(raw.skips.counts) == {"bad_json": 2, "missing_field": 1, "bad_rating": 1, "rating_out_of_range": 2,
                                      "bad_timestamp": 1, "bad_encoding": 1, "bad_review_type": 1}
    ex = raw.skips.to_dict()["examples"]
    assert ex["bad_json"][0]["line"] == 2 and ex["bad_json"][0]["file"] == "reviews.json"
    assert ex["bad_encoding"][0]["line"] == 8
    assert raw.titles["I1"] == "item I1"  # no metadata: a readable id


def test_amazon_truncated_gzip_is_an_error_unless_allowed(tmp_path):
    from ckf_dist.data.readers import read_amazon
    from ckf_dist.data.skips import InputLossError

    lines = [_review(f"U{n % 7}", f"I{n}", text="word " * 30) for n in range(400)]
    blob = gzip.compress(("\n".join(lines) + "\n").encode())
    p = tmp_path / "reviews.json.gz"
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputLossError, match=r"reviews.json.gz: truncated or corrupt file \(EOFError.*after line \d+"
                                             r".*data.allow_truncated=true"):
        read_amazon(p)
    raw = read_amazon(p, allow_truncated=True)
    got = raw.interactions.num_rows
    assert 0 < got < 400
    assert raw.skips.counts["truncated_or_corrupt_file"] == 1
    ex = raw.skips.to_dict()["examples"]["truncated_or_corrupt_file"][0]
    assert ex["file"] == "reviews.json.gz" and "the file ends early" in ex["detail"]
    assert got + raw.skips.counts.get("bad_json", 0) <= 400  # a cut last line may show up as bad JSON
    assert raw.interactions["item"].to_pylist() == [f"I{n}" for n in range(got)]  # an exact prefix
    # The accepted tail is reported, not charged to the input-loss budget; the cut last line is.
    assert raw.skips.file_stats()["reviews.json.gz"]["skipped"] == raw.skips.counts.get("bad_json", 0)


def test_corrupt_complete_gzip_counts_the_rows_lost(tmp_path):
    """A gzip that is whole but damaged inside: the rows after the damage are estimated from its size field."""
    import zlib

    from ckf_dist.data.readers import read_amazon
    from ckf_dist.data.skips import InputLossError

    lines = [_review(f"U{n % 7}", f"I{n}", text=f"review {n} " + "word " * 30) for n in range(2000)]
    body = ("\n".join(lines) + "\n").encode()
    co = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip framing, in two flushed halves
    first = co.compress(body[: len(body) // 4]) + co.flush(zlib.Z_FULL_FLUSH)
    blob = bytearray(first + co.compress(body[len(body) // 4:]) + co.flush())
    blob[len(first)] = 0x07  # the block after the first quarter: BFINAL=1, BTYPE=11 (invalid) -> zlib.error there
    p = tmp_path / "reviews.json.gz"
    p.write_bytes(bytes(blob))
    with pytest.raises(InputLossError, match="reviews.json.gz: truncated or corrupt file"):
        read_amazon(p)
    raw = read_amazon(p, allow_truncated=True)
    lost = raw.skips.counts["corrupt_file_rows_lost"]
    got = raw.interactions.num_rows
    assert got < 1000 and abs(got + lost - 2000) <= 20, (got, lost)  # counted in rows, not as 1 skip
    assert raw.interactions["item"].to_pylist() == [f"I{n}" for n in range(got)]
    assert "estimated from the gzip size field" in raw.skips.to_dict()["examples"]["corrupt_file_rows_lost"][0]["detail"]
    assert raw.skips.file_stats() == {"reviews.json.gz": {"read": got, "skipped": 0}}  # accepted: not charged


def test_amazon_metadata_titles(tmp_path):
    from ckf_dist.data.readers import read_amazon

    p = tmp_path / "r.json"
    p.write_text(_review("U1", "I1") + "\n" + _review("U1", "I2") + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"asin": "I1", "title": "Blue  Guitar"}) + "\n" + "{'asin': 'I9', 'title': 'Py'}\n"
                    + "garbage\n")
    raw = read_amazon(p, meta)
    assert raw.titles["I1"] == "Blue Guitar" and raw.titles["I2"] == "item I2" and raw.titles["I9"] == "Py"
    assert raw.skips.counts["bad_metadata_line"] == 1


def _ml100k(root: Path, data_lines: list[bytes]) -> Path:
    root.mkdir()
    (root / "u.item").write_bytes("1|Caf\u00e9 Society (1995)|01-Jan-1995||http://x|0|1\n".encode("latin-1")
                                  + b"2|Heat (1995)|01-Jan-1995||http://x|0|1\n")
    (root / "u.data").write_bytes(b"\n".join(data_lines) + b"\n")
    return root


def test_movielens_100k_bad_lines(tmp_path):
    from ckf_dist.data.readers import read_movielens

    root = _ml100k(tmp_path / "ml", [b"1\t1\t5\t881250949", b"1\t2\t3\t881250950", b"2\t1\t6\t881250949",
                                     b"2\t1\tx\t881250949", b"2\t3\t4\t881250949", b"2\t1\t4", b"2\t\xff\t4\t88",
                                     b"3\t2\t0\t881250949", b"3\t2\t2\t-5"])
    raw = read_movielens(root, "ml-100k")
    assert raw.interactions.num_rows == 2
    assert dict(raw.skips.counts) == {"rating_out_of_range": 2, "bad_rating": 1, "unknown_item": 1,
                                      "wrong_field_count": 1, "bad_encoding": 1, "bad_timestamp": 1}
    assert raw.titles["1"] == "Caf\u00e9 Society (1995)"  # latin-1 decoded


def test_movielens_1m_format(tmp_path):
    from ckf_dist.data.readers import read_movielens

    root = tmp_path / "ml1m"
    root.mkdir()
    (root / "movies.dat").write_bytes("1::Toy Story (1995)::Animation\n2::Am\u00e9lie (2001)::Comedy\n".encode("latin-1"))
    (root / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978302109\n2::1::4\n")
    raw = read_movielens(root, "ml-1m")
    assert raw.interactions.num_rows == 2 and raw.skips.counts["wrong_field_count"] == 1
    assert raw.titles["2"] == "Am\u00e9lie (2001)"


def test_missing_inputs_are_named(tmp_path):
    from ckf_dist.data.readers import read_amazon, read_movielens, read_table

    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_amazon(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="ml-100k"):
        read_movielens(tmp_path / "none", "ml-100k")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "u.item").write_text("1|A|\n")
    with pytest.raises(FileNotFoundError, match="u.data"):
        read_movielens(tmp_path / "only", "ml-100k")
    with pytest.raises(FileNotFoundError, match="t.csv"):
        read_table(tmp_path / "t.csv", ColumnMap())


def test_table_csv_mapping_types_and_encoding(tmp_path):
    from ckf_dist.data.readers import read_table

    p = tmp_path / "t.csv"
    p.write_bytes(b"uid,item,stars,time,title\n"
                  b"a,x,4,100,X Movie\n"
                  b"a,y,abc,101,Y\n"          # bad_rating
                  b"b,x,3.5,1e2,X Movie\n"   # float-looking integer time is accepted
                  b"b,z,2,-1,Z\n"            # bad_timestamp
                  b"c,\xe9t\xe9,5,100,E\n"   # latin-1 bytes: bad_encoding
                  b"c,w,5\n"                # wrong_field_count
                  b'd,"v, the second",4,7,"V, a title"\n'  # quoted delimiter: fine
                  b",x,5,100,X\n")           # missing_field
    cols = ColumnMap(user="uid", item="item", rating="stars", timestamp="time", title="title")
    raw = read_table(p, cols)
    assert raw.interactions.num_rows == 3
    assert dict(raw.skips.counts) == {"bad_rating": 1, "bad_timestamp": 1, "bad_encoding": 1, "missing_field": 1,
                                      "wrong_field_count": 1}
    ex = raw.skips.to_dict()["examples"]
    assert ex["bad_rating"][0]["line"] == 3 and ex["bad_encoding"][0]["line"] == 6  # header is line 1
    assert ex["missing_field"][0]["line"] == 9
    assert raw.titles == {"x": "X Movie", "v, the second": "V, a title"}
    with pytest.raises(ValueError, match=r"data.columns.rating='rating'.*\['uid', 'item', 'stars', 'time', 'title'\]"):
        read_table(p, ColumnMap(user="uid", item="item", timestamp="time"))


def test_table_truncated_csv_gz(tmp_path):
    from ckf_dist.data.readers import read_table
    from ckf_dist.data.skips import InputLossError

    body = "u,i,r,t\n" + "".join(f"u{n % 5},i{n},4,{n}\n" for n in range(3000))
    blob = gzip.compress(body.encode())
    p = tmp_path / "t.csv.gz"
    p.write_bytes(blob[: len(blob) // 2])
    cols = ColumnMap(user="u", item="i", rating="r", timestamp="t")
    with pytest.raises(InputLossError, match=r"t.csv.gz: truncated or corrupt file.*data.allow_truncated=true"):
        read_table(p, cols)
    raw = read_table(p, cols, allow_truncated=True)
    assert 0 < raw.interactions.num_rows < 3000
    assert raw.skips.counts["truncated_or_corrupt_file"] == 1
    assert raw.interactions["item"].to_pylist() == [f"i{n}" for n in range(raw.interactions.num_rows)]


def _scale_table(tmp_path: Path, fmt: str, scale: tuple[int, int], n: int = 300) -> Path:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    cols = {"user_id": [f"u{k % 30}" for k in range(n)], "item_id": [f"i{k % 50}" for k in range(n)],
            "rating": [float(rng.randint(*scale)) for _ in range(n)], "timestamp": list(range(n))}
    p = tmp_path / f"scale.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table(cols), p)
    else:
        p.write_text("user_id,item_id,rating,timestamp\n" + "".join(f"{u},{i},{r:g},{t}\n" for u, i, r, t in
                                                                     zip(*cols.values())))
    return p


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_rating_scale_other_than_1_to_5_is_named_with_the_fix(tmp_path, fmt):
    from ckf_dist.data.readers import read_table
    from ckf_dist.data.skips import InputLossError

    p = _scale_table(tmp_path, fmt, (0, 10))
    with pytest.raises(InputLossError, match=rf"scale.{fmt}: column 'rating' \(data.columns.rating\) holds ratings "
                                             r"from 0 to 10: \d+ of 300 rows .* above the 1-5 scale.* 0-10 scale: "
                                             r"rescale the column to 1-5 before preparing \(r' = 1 \+ 4 \* \(r - 0\) / 10\)"):
        read_table(p, ColumnMap())
    # A few stray values on a 1-5 table are skipped lines (the input-loss budget decides), not another scale.
    (tmp_path / "ok").mkdir()
    ok = _scale_table(tmp_path / "ok", "csv", (1, 5))
    ok.write_text(ok.read_text() + "u1,i1,7,999\nu2,i2,0,999\n")
    raw = read_table(ok, ColumnMap())
    assert raw.skips.counts["rating_out_of_range"] == 2 and raw.interactions.num_rows == 300


def test_zero_one_rating_column_still_points_to_the_label_mapping(tmp_path):
    from ckf_dist.data.readers import read_table

    p = tmp_path / "clicks.csv"
    p.write_text("user_id,item_id,rating,timestamp\n" + "".join(f"u{k % 4},i{k},{k % 2},{k}\n" for k in range(40)))
    with pytest.raises(ValueError, match=r"holds only 0 and 1 .*set data.columns.label='rating' instead"):
        read_table(p, ColumnMap())


def test_unreadable_parquet_is_named(tmp_path):
    from ckf_dist.data.readers import read_table
    from ckf_dist.data.skips import InputLossError

    p = _scale_table(tmp_path, "parquet", (1, 5))
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(InputLossError, match=r"scale.parquet: not a readable Parquet file"):
        read_table(p, ColumnMap())


def test_readers_count_records_per_file(tmp_path):
    """The input-loss budget's denominators: every non-blank record of every input file, kept or skipped."""
    from ckf_dist.data.readers import read_movielens

    root = _ml100k(tmp_path / "ml", [b"1\t1\t5\t881250949", b"", b"1\t2\t3\t881250950", b"2;1;4;881250949"])
    raw = read_movielens(root, "ml-100k")
    assert raw.skips.file_stats() == {"u.data": {"read": 3, "skipped": 1}, "u.item": {"read": 2, "skipped": 0}}
