"""Readers for the raw formats users have: MovieLens 100K / 1M, Amazon 5-core JSON lines, generic Parquet/CSV.

Each reader returns a `RawData` (one interactions table with raw string ids + item titles + a skip report);
everything after that (k-core, ids, splits, prompts) is format-independent (data protocol of CKF_METHOD.md).
Malformed lines are skipped and counted per reason with file:line examples, and the records read are counted per
file (the input-loss budget, data.max_skip_frac, is checked against them in preprocess.py); a missing file, a wrong
column mapping, a rating column on another scale than 1-5 or (unless data.allow_truncated) a truncated or corrupt
compressed file raises a ValueError/FileNotFoundError that names it.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import math
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ckf_dist.config import ColumnMap, DataConfig
from ckf_dist.data.skips import InputLossError, SkipReport

RAW_SCHEMA = pa.schema([("user", pa.string()), ("item", pa.string()), ("rating", pa.float64()),
                        ("ts", pa.int64()), ("review", pa.string()), ("seq", pa.int64())])
"""Reader output: raw ids as strings, rating in [1, 5], unix seconds, review ('' if none), seq = input order."""

RATING_MIN, RATING_MAX = 1.0, 5.0

LABEL_RATING = {1: RATING_MAX, 0: RATING_MIN}
"""data.columns.label: a 0/1 label is stored as the ends of the rating scale, so that every rating rule reads it
the least surprising way (1 = the top rating, "liked" at any data.like_threshold; 0 = the bottom, "not liked").
The raw table then also carries `label` (int8), `split` (int8, predefined splits only) after RAW_SCHEMA's columns."""


@dataclass
class RawData:
    """What a reader produced: interactions (RAW_SCHEMA), titles by raw item id, skipped lines, input files."""

    interactions: pa.Table
    titles: dict[str, str]
    skips: SkipReport
    inputs: list[Path] = field(default_factory=list)
    has_reviews: bool = False


class _Rows:
    """Accumulates validated rows column-wise (cheaper than a list of dicts)."""

    def __init__(self) -> None:
        self.user: list[str] = []
        self.item: list[str] = []
        self.rating: list[float] = []
        self.ts: list[int] = []
        self.review: list[str] = []

    def add(self, user: str, item: str, rating: float, ts: int, review: str = "") -> None:
        self.user.append(user)
        self.item.append(item)
        self.rating.append(rating)
        self.ts.append(ts)
        self.review.append(review)

    def table(self, with_label: bool = False) -> pa.Table:
        t = pa.table({"user": pa.array(self.user, pa.string()), "item": pa.array(self.item, pa.string()),
                      "rating": pa.array(self.rating, pa.float64()), "ts": pa.array(self.ts, pa.int64()),
                      "review": pa.array(self.review, pa.string()),
                      "seq": pa.array(np.arange(len(self.user), dtype=np.int64))}, schema=RAW_SCHEMA)
        if with_label:  # one label per kept row: the row's rating is LABEL_RATING[label]
            t = t.append_column("label", pa.array([1 if r == RATING_MAX else 0 for r in self.rating], pa.int8()))
        return t


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (check data.path / data.metadata_path)")
    return path


def _parse_rating(value: object) -> float | None | str:
    """The rating as a float in [1, 5]; 'bad' if not a number, 'range' if out of [1, 5]."""
    if isinstance(value, bool):
        return "bad"
    try:
        r = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "bad"
    if not math.isfinite(r):
        return "bad"
    if not RATING_MIN <= r <= RATING_MAX:
        return "range"
    return r


def _parse_ts(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f) or f < 0 or f != int(f):
        return None
    return int(f)


def _check_row(rows: _Rows, skips: SkipReport, file: str, lineno: int, text: str, user: object, item: object,
               rating: object, ts: object, review: str = "") -> None:
    """Validate one parsed row and either add it or count it under its reason."""
    if user is None or item is None or str(user).strip() == "" or str(item).strip() == "":
        skips.add("missing_field", file, lineno, "empty user or item id", text)
        return
    r = _parse_rating(rating)
    if r == "bad":
        skips.add("bad_rating", file, lineno, f"rating {rating!r} is not a number", text)
        return
    if r == "range":
        skips.add("rating_out_of_range", file, lineno, f"rating {rating!r} outside [1, 5]", text)
        return
    t = _parse_ts(ts)
    if t is None:
        skips.add("bad_timestamp", file, lineno, f"timestamp {ts!r} is not a non-negative integer", text)
        return
    rows.add(str(user).strip(), str(item).strip(), float(r), t, review)  # type: ignore[arg-type]


def _damaged(path: Path, skips: SkipReport, lineno: int, nbytes: int, e: BaseException, allow: bool) -> None:
    """A (compressed) file that cannot be read past line `lineno` (`nbytes` uncompressed bytes read).

    Raises InputLossError naming the file unless `allow` (data.allow_truncated). Allowed, the readable prefix is kept
    and the lost rest reported, not charged to data.max_skip_frac (the opt-in accepts it): as 'corrupt_file_rows_lost'
    with the rows estimated from the gzip size field (the uncompressed size mod 2^32 in the last 4 bytes) when the
    file is complete but corrupt, else (a truncated file records nowhere how much is missing) as one
    'truncated_or_corrupt_file'.
    """
    what = f"{type(e).__name__}: {e}"
    if not allow:
        raise InputLossError(f"{path}: truncated or corrupt file ({what}) after line {lineno}; the rest "
                             f"of it cannot be read. Replace the file (`gzip -t {path}` checks one), or set "
                             f"data.allow_truncated=true to keep its first {lineno} lines") from None
    lost = size = 0
    if not isinstance(e, EOFError) and lineno and path.suffix == ".gz":
        with open(path, "rb") as f:
            f.seek(-4, 2)
            size = int.from_bytes(f.read(4), "little")
        if nbytes < size < 64 * max(path.stat().st_size, 1):  # a plausible size field: the file is whole
            lost = round((size - nbytes) / (nbytes / lineno))
    if lost:
        skips.add("corrupt_file_rows_lost", path.name, lineno + 1,
                  f"about {lost} rows lost after line {lineno} (estimated from the gzip size field: {nbytes} of "
                  f"{size} bytes read); {what}", n=lost, budget=False)
    else:
        why = ("the file ends early; how many rows are lost after it is not recorded in a truncated file"
               if isinstance(e, EOFError) else "the rest of the file is unreadable (rows lost: unknown)")
        skips.add("truncated_or_corrupt_file", path.name, lineno + 1, f"{why}; {what}", budget=False)


def _lines(path: Path, skips: SkipReport, allow_truncated: bool = False) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of a plain or gzip file; a truncated/corrupt gzip raises (see _damaged)."""
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = nbytes = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                nbytes += len(raw)
                yield lineno, raw
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        _damaged(path, skips, lineno, nbytes, e, allow_truncated)


# --------------------------------------------------------------------------------------------------
# MovieLens
# --------------------------------------------------------------------------------------------------


def _read_ml_titles(path: Path, sep: str, skips: SkipReport, allow_truncated: bool = False) -> dict[str, str]:
    titles: dict[str, str] = {}
    for lineno, raw in _lines(path, skips, allow_truncated):
        text = raw.decode("latin-1").rstrip("\r\n")  # GroupLens files are latin-1 (every byte decodes)
        if not text.strip():
            continue
        skips.seen(path.name)
        parts = text.split(sep)
        if len(parts) < 2 or not parts[0].strip():
            skips.add("bad_item_line", path.name, lineno, f"expected id{sep}title{sep}...", text)
            continue
        titles[parts[0].strip()] = parts[1].strip() or f"item {parts[0].strip()}"
    return titles


def read_movielens(root: str | Path, variant: str, allow_truncated: bool = False) -> RawData:
    """MovieLens 100K (`u.data` tab-separated + `u.item` '|'-separated) or 1M (`ratings.dat` + `movies.dat`, '::').

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
    """
    root = Path(root)
    if variant == "ml-100k":
        data, items, sep, isep = root / "u.data", root / "u.item", "\t", "|"
    elif variant == "ml-1m":
        data, items, sep, isep = root / "ratings.dat", root / "movies.dat", "::", "::"
    else:
        raise ValueError(f"unknown MovieLens variant {variant!r}; expected 'ml-100k' or 'ml-1m'")
    if not root.is_dir():
        raise FileNotFoundError(f"MovieLens folder not found: {root} (set data.path to the unpacked {variant} folder)")
    skips = SkipReport()
    titles = _read_ml_titles(_require_file(items, f"{variant} item file"), isep, skips, allow_truncated)
    rows = _Rows()
    for lineno, raw in _lines(_require_file(data, f"{variant} ratings file"), skips, allow_truncated):
        if not raw.strip():
            continue
        skips.seen(data.name)
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            skips.add("bad_encoding", data.name, lineno, str(e), raw.decode("latin-1"))
            continue
        parts = [p.strip() for p in (text.split(sep) if sep != "\t" else text.split())]
        if len(parts) != 4:
            skips.add("wrong_field_count", data.name, lineno, f"expected 4 fields, got {len(parts)}", text)
            continue
        u, i, r, t = parts
        if i not in titles and u and i:
            skips.add("unknown_item", data.name, lineno, f"item {i!r} is not in {items.name}", text)
            continue
        _check_row(rows, skips, data.name, lineno, text, u, i, r, t)
    return RawData(rows.table(), titles, skips, [data, items], has_reviews=False)


# --------------------------------------------------------------------------------------------------
# Amazon 5-core JSON lines
# --------------------------------------------------------------------------------------------------


def _json_line(text: str) -> dict | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        # The 2014 metadata dumps are Python dict literals (single quotes), not JSON.
        try:
            obj = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    return obj if isinstance(obj, dict) else None


def read_amazon_metadata(path: str | Path, skips: SkipReport, allow_truncated: bool = False) -> dict[str, str]:
    """asin -> title from a metadata file (JSON lines or Python-literal lines, plain or .gz)."""
    path = _require_file(Path(path), "Amazon metadata file")
    titles: dict[str, str] = {}
    for lineno, raw in _lines(path, skips, allow_truncated):
        if not raw.strip():
            continue
        skips.seen(path.name)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            skips.add("bad_encoding", path.name, lineno, str(e), raw.decode("latin-1"))
            continue
        if not text.strip():
            continue
        obj = _json_line(text)
        if obj is None:
            skips.add("bad_metadata_line", path.name, lineno, "not a JSON object", text)
            continue
        asin, title = obj.get("asin"), obj.get("title")
        if isinstance(asin, str) and asin and isinstance(title, str) and title.strip():
            titles[asin] = " ".join(title.split())
    return titles


def read_amazon(path: str | Path, metadata_path: str | Path | None = None, allow_truncated: bool = False) -> RawData:
    """Amazon reviews JSON lines (reviewerID, asin, overall, unixReviewTime, reviewText), plain or .gz.

    Titles come from `metadata_path` when given; items without one are named "item <asin>".

    Raises:
        FileNotFoundError: the reviews file (or the metadata file) is missing.
    """
    path = _require_file(Path(path), "Amazon reviews file")
    skips = SkipReport()
    rows = _Rows()
    for lineno, raw in _lines(path, skips, allow_truncated):
        if not raw.strip():
            continue
        skips.seen(path.name)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            skips.add("bad_encoding", path.name, lineno, f"not UTF-8: {e}", raw.decode("latin-1"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            skips.add("bad_json", path.name, lineno, str(e), text)
            continue
        if not isinstance(obj, dict):
            skips.add("bad_json", path.name, lineno, f"expected a JSON object, got {type(obj).__name__}", text)
            continue
        missing = [k for k in ("reviewerID", "asin", "overall", "unixReviewTime") if obj.get(k) is None]
        if missing:
            skips.add("missing_field", path.name, lineno, f"missing {missing}", text)
            continue
        review = obj.get("reviewText")
        if review is not None and not isinstance(review, str):
            skips.add("bad_review_type", path.name, lineno, f"reviewText is {type(review).__name__}", text)
            continue
        if not isinstance(obj["reviewerID"], str) or not isinstance(obj["asin"], str):
            skips.add("missing_field", path.name, lineno, "reviewerID/asin must be strings", text)
            continue
        _check_row(rows, skips, path.name, lineno, text, obj["reviewerID"], obj["asin"], obj["overall"],
                   obj["unixReviewTime"], review or "")
    titles: dict[str, str] = {}
    inputs = [path]
    if metadata_path:
        titles = read_amazon_metadata(metadata_path, skips, allow_truncated)
        inputs.append(Path(metadata_path))
    table = rows.table()
    for asin in pc.unique(table["item"]).to_pylist():
        titles.setdefault(asin, f"item {asin}")
    return RawData(table, titles, skips, inputs, has_reviews=True)


# --------------------------------------------------------------------------------------------------
# Generic Parquet / CSV tables (also the synthetic generator's output)
# --------------------------------------------------------------------------------------------------


def _records(path: Path, skips: SkipReport,
             allow_truncated: bool = False) -> tuple[list[str], Iterator[tuple[int, dict[str, object]]]]:
    """Column names and (line or row number, record) pairs of a Parquet / CSV / TSV (optionally .gz) table.

    CSV is parsed with the csv module so that every record keeps its true line number; a record with the wrong
    number of fields or with bytes that are not UTF-8 is skipped and counted. Every record is counted as read
    (`SkipReport.seen`). A Parquet file that cannot be read, or a truncated/corrupt .gz (unless `allow_truncated`,
    see _damaged), raises InputLossError naming the file.
    """
    if path.suffix == ".parquet":
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise InputLossError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        names = pf.schema_arrow.names

        def parquet_rows() -> Iterator[tuple[int, dict[str, object]]]:
            n = 0
            try:
                for batch in pf.iter_batches(batch_size=65536):
                    skips.seen(path.name, batch.num_rows)
                    for rec in batch.to_pylist():
                        n += 1
                        yield n, rec
            except (pa.ArrowException, OSError) as e:
                raise InputLossError(f"{path}: Parquet file damaged after row {n} ({type(e).__name__}: {e})") from None

        return names, parquet_rows()
    if not any(x in (".csv", ".tsv") for x in path.suffixes):
        raise ValueError(f"{path}: unsupported table format {''.join(path.suffixes)!r}; use .parquet, .csv or .tsv "
                         f"(optionally .gz)")
    delim = "\t" if ".tsv" in path.suffixes else ","
    opener = gzip.open if path.suffix == ".gz" else open
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row costs one row, not the file.
    f = opener(path, "rt", encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.reader(f, delimiter=delim)
    try:
        names = next(reader)
    except StopIteration:
        f.close()
        raise ValueError(f"{path}: empty file (no header line)") from None

    def csv_rows() -> Iterator[tuple[int, dict[str, object]]]:
        nbytes = 0
        with f:
            try:
                for row in reader:
                    line = reader.line_num
                    text = delim.join(row)
                    if not row:
                        continue
                    skips.seen(path.name)
                    nbytes += len(text.encode("utf-8", "surrogateescape")) + 1
                    if len(row) != len(names):
                        skips.add("wrong_field_count", path.name, line,
                                  f"expected {len(names)} fields, got {len(row)}",
                                  text.encode("utf-8", "surrogateescape").decode("latin-1"))
                        continue
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError as e:
                        skips.add("bad_encoding", path.name, line, f"not UTF-8: {e.reason} at column {e.start}",
                                  text.encode("utf-8", "surrogateescape").decode("latin-1"))
                        continue
                    yield line, dict(zip(names, row))
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError, csv.Error) as e:
                _damaged(path, skips, reader.line_num, nbytes, e, allow_truncated)

    return names, csv_rows()


def _parse_label(value: object) -> int | None:
    """0 or 1 from 0/1, '0'/'1', 0.0/1.0, '0.0'/'1.0' or a bool; None for anything else."""
    if isinstance(value, bool):
        return int(value)
    try:
        f = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return int(f) if f in (0.0, 1.0) else None


def _class_error(where: str, column: str, n0: int, n1: int) -> ValueError:
    return ValueError(f"{where}: column {column!r} (data.columns.label) holds one class only ({n1} rows labelled 1, "
                      f"{n0} labelled 0); 0/1 feedback needs positives (1) and explicit negatives (0). For "
                      f"positives only, map a rating column instead (data.columns.rating)")


@dataclass
class _TableRows:
    """What one interaction file gave: its rows, titles from its title column, and its label counts."""

    rows: _Rows
    titles: dict[str, str]
    labels: Counter[int]


def _scale_guess(lo: float, hi: float) -> tuple[float, float]:
    """The scale [a, b] a rating column with values from lo to hi > 5 most likely uses (0-10, 1-10, 0-100, ...)."""
    a = 0.0 if lo < RATING_MIN else RATING_MIN
    b = next((c for c in (10.0, 100.0) if hi <= c), hi)
    return a, b


def _wanted_columns(path: Path, names: list[str], columns: ColumnMap) -> dict[str, str]:
    """{field: the file's column} of the mapping; raises when a mapped column is absent."""
    score = ("label", columns.label) if columns.label else ("rating", columns.rating)
    wanted = {"user": columns.user, "item": columns.item, score[0]: score[1], "timestamp": columns.timestamp}
    if columns.review:
        wanted["review"] = columns.review
    if columns.title:
        wanted["title"] = columns.title
    if missing := {k: v for k, v in wanted.items() if v not in names}:
        raise ValueError(f"{path}: column mapping names columns that do not exist: "
                         + ", ".join(f"data.columns.{k}={v!r}" for k, v in missing.items())
                         + f"; the file has {names}")
    return wanted


@dataclass
class _Validated:
    """What the record loop of one interaction table (or one block of it) found; blocks merge in file order
    (`merge`), and `check_whole_file` then judges the file as a whole (ray_preprocess reads blocks in parallel)."""

    rows: _Rows = field(default_factory=_Rows)
    titles: dict[str, str] = field(default_factory=dict)
    labels: Counter[int] = field(default_factory=Counter)
    bad_labels: Counter[str] = field(default_factory=Counter)
    bad_example: str = ""
    zero_or_one: int = 0  # a 0/1 label column mapped as data.columns.rating (see check_whole_file)
    other_rating: int = 0
    numeric: int = 0  # a rating column on a larger scale than 1-5 (see check_whole_file)
    out_of_scale: int = 0
    lo: float = math.inf
    hi: float = -math.inf

    def merge(self, other: _Validated) -> None:
        """Add a later block's counters (its rows are not merged: they stay with the block)."""
        for k, v in other.titles.items():
            self.titles.setdefault(k, v)
        self.labels.update(other.labels)
        self.bad_labels.update(other.bad_labels)
        self.bad_example = self.bad_example or other.bad_example
        self.zero_or_one += other.zero_or_one
        self.other_rating += other.other_rating
        self.numeric += other.numeric
        self.out_of_scale += other.out_of_scale
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)


def _validate_records(records: Iterator[tuple[int, dict[str, object]]], file: str, wanted: dict[str, str],
                      columns: ColumnMap, skips: SkipReport) -> _Validated:
    """Validate (line number, record) pairs of one interaction table: kept rows, titles and the counters."""
    got = _Validated()
    rows, titles, labels, bad_labels = got.rows, got.titles, got.labels, got.bad_labels
    for lineno, rec in records:
        vals = {k: rec[v] for k, v in wanted.items()}
        text = ",".join(str(v) for v in vals.values())
        review = vals.get("review")
        if review is not None and not isinstance(review, str):
            skips.add("bad_review_type", file, lineno, f"review is {type(review).__name__}", text)
            continue
        if columns.label:
            lab = _parse_label(vals["label"])
            if lab is None:
                bad_labels[str(vals["label"])[:20]] += 1
                got.bad_example = got.bad_example or f"line {lineno}: {vals['label']!r}"
                continue
            labels[lab] += 1
            rating: object = LABEL_RATING[lab]
        else:
            rating = vals["rating"]
            lab = _parse_label(rating)
            if lab is not None and not isinstance(rating, bool):
                got.zero_or_one += 1
            elif _parse_rating(rating) != "bad":
                got.other_rating += 1
            if _parse_rating(rating) != "bad":
                got.numeric += 1
                x = float(rating)  # type: ignore[arg-type]
                got.lo, got.hi = min(got.lo, x), max(got.hi, x)
                got.out_of_scale += x > RATING_MAX  # values below 1 (a 0 = "not rated") are left to the budget
        before = len(rows.user)
        _check_row(rows, skips, file, lineno, text, vals["user"], vals["item"], rating,
                   vals["timestamp"], review or "")
        if len(rows.user) > before and vals.get("title"):
            titles.setdefault(rows.item[-1], " ".join(str(vals["title"]).split()))
    return got


def _check_whole_file(path: Path, columns: ColumnMap, skips: SkipReport, v: _Validated) -> None:
    """The checks on a whole interaction file's counters: bad labels, 0/1 in the rating column, another scale."""
    bad_labels, labels, bad_example = v.bad_labels, v.labels, v.bad_example
    zero_or_one, other_rating, numeric, out_of_scale, lo, hi = (v.zero_or_one, v.other_rating, v.numeric,
                                                                v.out_of_scale, v.lo, v.hi)
    if bad_labels:
        raise ValueError(f"{path}: column {columns.label!r} (data.columns.label) must hold 0/1 labels; "
                         f"{sum(bad_labels.values())} rows hold other values ({bad_example}; counts "
                         f"{dict(bad_labels.most_common(5))}), {labels[1]} rows are 1 and {labels[0]} are 0. "
                         f"Fix the file, or map a 1-5 rating column with data.columns.rating instead")
    if not columns.label and skips.counts["rating_out_of_range"] and zero_or_one and not other_rating:
        # Every value is 0 or 1: binary feedback. Read as ratings, every 0 would be dropped as out of [1, 5].
        raise ValueError(f"{path}: column {columns.rating!r} (data.columns.rating) holds only 0 and 1 "
                         f"({zero_or_one} rows): that is 0/1 feedback, not a 1-5 rating, and every 0 would be dropped "
                         f"as out of range; set data.columns.label={columns.rating!r} instead")
    if not columns.label and out_of_scale >= 2 and out_of_scale > 0.05 * numeric:
        # Not a few stray values above 5 (those are skipped and counted, the input-loss budget decides) but a larger
        # scale (0-10, 1-10, 0-100). Values below 1 alone are skipped too: a 0 often means "not rated".
        a, b = _scale_guess(lo, hi)
        raise InputLossError(
            f"{path}: column {columns.rating!r} (data.columns.rating) holds ratings from {lo:g} to {hi:g}: "
            f"{out_of_scale} of {numeric} rows ({100 * out_of_scale / numeric:.1f}%) are above the 1-5 scale the "
            f"pipeline reads and would be dropped as out of range (with every value below 1). It looks like a {a:g}-{b:g} scale: rescale the "
            f"column to 1-5 before preparing (r' = 1 + 4 * (r - {a:g}) / {b - a:g}); for 0/1 feedback map it as "
            f"data.columns.label instead")


def _read_interactions(path: Path, columns: ColumnMap, skips: SkipReport, allow_truncated: bool = False) -> _TableRows:
    """The validated rows of one interaction table (see read_table); raises on a bad mapping, bad labels or a rating
    column on another scale."""
    names, records = _records(path, skips, allow_truncated)
    wanted = _wanted_columns(path, names, columns)
    v = _validate_records(records, path.name, wanted, columns, skips)
    _check_whole_file(path, columns, skips, v)
    return _TableRows(v.rows, v.titles, v.labels)


def _read_item_titles(ipath: Path, columns: ColumnMap, skips: SkipReport,
                      allow_truncated: bool = False) -> dict[str, str]:
    inames, irecords = _records(ipath, skips, allow_truncated)
    tcol = columns.title or "title"
    if missing_i := [c for c in (columns.item, tcol) if c not in inames]:
        raise ValueError(f"{ipath}: items table lacks column(s) {missing_i} (data.columns.item / "
                         f"data.columns.title); it has {inames}")
    titles: dict[str, str] = {}
    for _, rec in irecords:
        i, t = rec[columns.item], rec[tcol]
        if i is not None and str(i).strip() and isinstance(t, str) and t.strip():
            titles[str(i).strip()] = " ".join(t.split())
    return titles


def read_table(path: str | Path, columns: ColumnMap, items_path: str | Path | None = None,
               allow_truncated: bool = False) -> RawData:
    """A Parquet/CSV interaction table whose columns are named by `columns` (data.columns).

    `items_path` (data.metadata_path) may name a second table with columns `columns.item` and
    `columns.title or 'title'` giving item titles; else titles come from `columns.title` in the interaction
    table, else "item <id>". With `columns.label` the rows carry a 0/1 `label` column (LABEL_RATING).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a mapped column is absent (naming it and the columns that exist); a label other than 0/1, a
            label column with one class only, or a rating column holding only 0/1 (naming file, column, counts);
            (InputLossError) a rating column on another scale than 1-5 (naming the scale and the rescaling), an
            unreadable Parquet file, a truncated or corrupt .gz unless `allow_truncated` (data.allow_truncated).
    """
    return read_tables({"train": path}, columns, items_path, allow_truncated)


SPLIT_FILES = ("train", "valid", "test")
"""Predefined split files in the order of their split codes 0/1/2 (samples.SPLIT_CODE)."""


def read_tables(paths: dict[str, str | Path], columns: ColumnMap, items_path: str | Path | None = None,
                allow_truncated: bool = False) -> RawData:
    """read_table over predefined split files (keys of SPLIT_FILES; just 'train' = one table, no split column).

    With several files the rows carry `split` (int8 0/1/2, the file they came from) and `seq` runs on across the
    files in SPLIT_FILES order; titles from a title column are taken from the first file that names the item.

    Raises:
        FileNotFoundError, ValueError: as read_table, naming the file; the 0/1 label classes are counted over
            all files together (a test file of positives only is fine).
    """
    skips = SkipReport()
    files = {sp: _require_file(Path(paths[sp]), f"{sp} interaction table" if len(paths) > 1 else "interaction table")
             for sp in SPLIT_FILES if sp in paths}
    tables, titles, labels = [], {}, Counter()
    for code, (sp, path) in enumerate(files.items()):
        got = _read_interactions(path, columns, skips, allow_truncated)
        t = got.rows.table(with_label=columns.label is not None)
        if len(files) > 1:
            t = t.append_column("split", pa.array(np.full(t.num_rows, code, dtype=np.int8)))
        tables.append(t)
        for k, v in got.titles.items():
            titles.setdefault(k, v)
        labels.update(got.labels)
    if columns.label and (labels[0] == 0 or labels[1] == 0):
        raise _class_error(", ".join(str(p) for p in files.values()), columns.label, labels[0], labels[1])
    tab = pa.concat_tables(tables)
    tab = tab.set_column(tab.schema.get_field_index("seq"), "seq", pa.array(np.arange(tab.num_rows, dtype=np.int64)))
    inputs = list(files.values())
    if items_path:
        ipath = _require_file(Path(items_path), "items table")
        inputs.append(ipath)
        titles.update(_read_item_titles(ipath, columns, skips, allow_truncated))
    for i in pc.unique(tab["item"]).to_pylist():
        titles.setdefault(i, f"item {i}")
    return RawData(tab, titles, skips, inputs, has_reviews=columns.review is not None)


def read_raw(cfg: DataConfig, raw_dir: str | Path | None = None) -> RawData:
    """Dispatch on cfg.source. For 'synthetic', `raw_dir` holds the generator's interactions + items Parquet."""
    if cfg.source == "synthetic":
        if raw_dir is None:
            raise ValueError("source='synthetic' needs the folder the generator wrote (raw_dir)")
        from ckf_dist.data.synthetic import INTERACTIONS_FILE, ITEMS_FILE

        cols = ColumnMap(user="user_id", item="item_id", rating="rating", timestamp="timestamp", review="review")
        return read_table(Path(raw_dir) / INTERACTIONS_FILE, cols, Path(raw_dir) / ITEMS_FILE, cfg.allow_truncated)
    if cfg.path is None:
        raise ValueError(f"data.path is required for data.source={cfg.source!r}")
    if cfg.source in ("ml-100k", "ml-1m"):
        return read_movielens(cfg.path, cfg.source, cfg.allow_truncated)
    if cfg.source == "amazon":
        return read_amazon(cfg.path, cfg.metadata_path, cfg.allow_truncated)
    if cfg.source == "table":
        if cfg.valid_path and cfg.test_path:
            return read_tables({"train": cfg.path, "valid": cfg.valid_path, "test": cfg.test_path}, cfg.columns,
                               cfg.metadata_path, cfg.allow_truncated)
        return read_table(cfg.path, cfg.columns, cfg.metadata_path, cfg.allow_truncated)
    raise ValueError(f"unknown data.source {cfg.source!r}")
