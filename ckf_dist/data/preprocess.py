"""Raw interactions -> the prepared layout of schema.py, on Ray Data (the data protocol of CKF_METHOD.md).

Vectorised pyarrow/numpy steps (dedup, k-core, contiguous ids, chronological leave-last-out split, warm/cold
flags) feed one Ray Data `map_batches` over blocks of whole users that builds every prompt sample (history
windows, CTR labels + sampled negatives, top-K candidates, rating and explanation targets). Per-user seeded
generators make the output independent of how Ray partitions the work: same input + seed -> same bytes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ckf_dist.config import DataConfig
from ckf_dist.data.prompts import display_title
from ckf_dist.data.readers import RawData, read_raw
from ckf_dist.data.samples import BUILDERS, BuildContext, negative_targets, task_rng, user_targets
from ckf_dist.data.schema import (
    ITEMS,
    MANIFEST,
    NEGATIVES,
    SCHEMA_VERSION,
    SPLITS,
    USERS,
    file_sha256,
    interactions_path,
)
from ckf_dist.data.shards import dumps_sample, write_task_shards
from ckf_dist.data.skips import SkipReport, budget_error, summary_lines

SAMPLE_SCHEMA = pa.schema([("split", pa.string()), ("task", pa.string()), ("uid", pa.int32()), ("n", pa.int32()),
                           ("key", pa.string()), ("json", pa.binary())])


# --------------------------------------------------------------------------------------------------
# Vectorised table steps
# --------------------------------------------------------------------------------------------------


def dedup_latest(table: pa.Table, skips: SkipReport) -> pa.Table:
    """Keep only the latest interaction of each (user, item) pair (a re-rating must not leak the test item
    into training); the earlier ones are counted as 'duplicate_interaction'."""
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, [("user", "ascending"), ("item", "ascending"), ("ts", "descending"),
                                    ("seq", "descending")])
    t = table.take(order)
    u, i = t["user"].to_numpy(zero_copy_only=False), t["item"].to_numpy(zero_copy_only=False)
    first = np.ones(t.num_rows, dtype=bool)
    first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    if (n := int((~first).sum())) > 0:
        idx = int(np.flatnonzero(~first)[0])
        skips.add("duplicate_interaction", "interactions", None, "earlier rating of the same (user, item) dropped",
                  f"user={u[idx]} item={i[idx]}", n=n)
    return t.filter(pa.array(first)).sort_by("seq")


def k_core(table: pa.Table, k: int, skips: SkipReport) -> pa.Table:
    """Iteratively drop users and items with fewer than k interactions (counted as 'k_core_filtered')."""
    if k <= 1:
        return table
    before = table.num_rows
    while True:
        uc = table.group_by("user").aggregate([("item", "count")])
        ic = table.group_by("item").aggregate([("user", "count")])
        bad_u = uc.filter(pc.less(uc["item_count"], k))["user"]
        bad_i = ic.filter(pc.less(ic["user_count"], k))["item"]
        if len(bad_u) == 0 and len(bad_i) == 0:
            break
        keep = pc.and_(pc.invert(pc.is_in(table["user"], bad_u)), pc.invert(pc.is_in(table["item"], bad_i)))
        table = table.filter(keep)
    if before > table.num_rows:
        skips.add("k_core_filtered", "interactions", None, f"{k}-core filtering", n=before - table.num_rows)
    return table


def unique_titles(raw_ids: list[str], titles: dict[str, str]) -> list[str]:
    """Display titles, made unique (top-K answers are titles): a repeated title gets its raw id appended."""
    shown = [display_title(titles.get(r) or f"item {r}") for r in raw_ids]
    seen: dict[str, int] = {}
    for t in shown:
        seen[t] = seen.get(t, 0) + 1
    return [f"{t} [{r}]" if seen[t] > 1 else t for t, r in zip(shown, raw_ids)]


def assign_ids_and_splits(table: pa.Table, min_per_user: int, skips: SkipReport) -> tuple[pa.Table, list[str],
                                                                                         list[str]]:
    """Contiguous ids (sorted raw ids) and the chronological leave-last-out split.

    Returns the table sorted by (uid, ts, seq) with columns uid, iid, rating, ts, review, split (0/1/2),
    pos (0-based position in the user's timeline), and the raw user / item id lists (index = new id).
    """
    uc = table.group_by("user").aggregate([("item", "count")])
    few = uc.filter(pc.less(uc["item_count"], min_per_user))
    if few.num_rows:
        n = int(pc.sum(few["item_count"]).as_py())
        skips.add("user_fewer_than_3_interactions", "interactions", None,
                  f"{few.num_rows} users cannot be split into train/valid/test", f"user={few['user'][0].as_py()}",
                  n=n)
        table = table.filter(pc.invert(pc.is_in(table["user"], few["user"])))
    users = sorted(pc.unique(table["user"]).to_pylist())
    items = sorted(pc.unique(table["item"]).to_pylist())
    uid = pc.index_in(table["user"], pa.array(users, pa.string())).cast(pa.int32())
    iid = pc.index_in(table["item"], pa.array(items, pa.string())).cast(pa.int32())
    t = pa.table({"uid": uid, "iid": iid, "rating": table["rating"].cast(pa.float32()), "ts": table["ts"],
                  "review": table["review"], "seq": table["seq"]})
    t = t.sort_by([("uid", "ascending"), ("ts", "ascending"), ("seq", "ascending")])
    u = t["uid"].to_numpy()
    n = len(u)
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], n]
    pos = np.arange(n) - np.repeat(starts, ends - starts)
    from_end = np.repeat(ends, ends - starts) - np.arange(n)  # 1 = last
    split = np.where(from_end == 1, 2, np.where(from_end == 2, 1, 0)).astype(np.int8)
    t = t.append_column("split", pa.array(split)).append_column("pos", pa.array(pos.astype(np.int32)))
    return t.drop_columns(["seq"]), users, items


def _check_known_users(table: pa.Table, users: pa.Array, files: list[str]) -> None:
    """Raise if a valid/test row (split 1/2) belongs to a user without a row in the training file."""
    held = table.filter(pc.not_equal(table["split"], 0))
    unknown = held.filter(pc.invert(pc.is_in(held["user"], users)))
    if unknown.num_rows:
        sp = int(unknown["split"][0].as_py())
        raise ValueError(f"{files[sp]}: {unknown.num_rows} valid/test rows of {len(pc.unique(unknown['user']))} "
                         f"users that have no positive row in the training file {files[0]} (e.g. user "
                         f"{unknown['user'][0].as_py()!r}); the CF model and every prompt history know a user only "
                         f"from the training file: add those users' earlier interactions to it, or drop their rows")


def assign_given_splits(table: pa.Table, files: list[str], skips: SkipReport) -> tuple[pa.Table, list[str],
                                                                                      list[str]]:
    """Contiguous ids from the training file's rows, and the split each row's file gives (data.valid_path/test_path).

    The id maps hold exactly the users and items of the training file, the only rows the CF model trains on. A
    valid/test row of an item the training file lacks (a cold item: no trained CF vector) is dropped and counted
    as 'cold_item_not_in_train'.

    Args:
        table: rows with a `split` column (0/1/2 = the train/valid/test file).
        files: the train, valid and test file names (for error messages).
        skips: the skip report.

    Returns:
        As assign_ids_and_splits, the table sorted by (uid, split, ts, seq) instead.

    Raises:
        ValueError: valid/test rows of users the training file lacks (naming the file, the count and an example).
    """
    train = table.filter(pc.equal(table["split"], 0))
    users = sorted(pc.unique(train["user"]).to_pylist())
    items = sorted(pc.unique(train["item"]).to_pylist())
    ua, ia = pa.array(users, pa.string()), pa.array(items, pa.string())
    _check_known_users(table, ua, files)
    cold = pc.invert(pc.is_in(table["item"], ia))
    if (n := int(pc.sum(cold.cast(pa.int64())).as_py() or 0)) > 0:
        first = table.filter(cold).slice(0, 1).to_pylist()[0]
        skips.add("cold_item_not_in_train", files[int(first["split"])], None,
                  f"{n} valid/test rows of items the training file lacks (no trained CF vector)",
                  f"user={first['user']} item={first['item']}", n=n)
        table = table.filter(pc.invert(cold))
    t = pa.table({"uid": pc.index_in(table["user"], ua).cast(pa.int32()),
                  "iid": pc.index_in(table["item"], ia).cast(pa.int32()),
                  "rating": table["rating"].cast(pa.float32()), "ts": table["ts"], "review": table["review"],
                  "split": table["split"].cast(pa.int8()), "seq": table["seq"]})
    t = t.sort_by([("uid", "ascending"), ("split", "ascending"), ("ts", "ascending"), ("seq", "ascending")])
    u = t["uid"].to_numpy()
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], len(u)]
    pos = np.arange(len(u)) - np.repeat(starts, ends - starts)
    t = t.append_column("pos", pa.array(pos.astype(np.int32)))
    return t.drop_columns(["seq"]), users, items


def place_negatives(neg: pa.Table, pos: pa.Table, users: list[str], items: list[str], files: list[str] | None,
                    skips: SkipReport) -> pa.Table:
    """The 0-labelled rows in the id space of the positives, each with a split, as builder rows (neg=True).

    A negative needs a known user (a history, a CF vector) and a known item; the others are dropped and counted
    ('negative_user_without_positive', 'negative_item_without_positive', with predefined files
    'negative_item_not_in_train'). Under leave-last-out a negative takes the
    split of the user's first positive at or after its time (what was shown up to a click belongs with that
    click): train up to the last training positive, then valid up to the valid positive, test after it. With
    predefined files (`files` given) it stays in its file's split.

    Args:
        neg: the raw 0-labelled rows (after dedup).
        pos: the positives as assign_ids_and_splits / assign_given_splits returned them.
        users, items: their raw id lists.
        files: the train/valid/test file names with predefined splits, else None.
        skips: the skip report.

    Raises:
        ValueError: with predefined files, valid/test negatives of users the training file lacks.
    """
    ua, ia = pa.array(users, pa.string()), pa.array(items, pa.string())
    if files is not None:
        _check_known_users(neg, ua, files)
    item_reason = "negative_item_without_positive" if files is None else "negative_item_not_in_train"
    for reason, col, known in (("negative_user_without_positive", "user", ua), (item_reason, "item", ia)):
        bad = pc.invert(pc.is_in(neg[col], known))
        if (n := int(pc.sum(bad.cast(pa.int64())).as_py() or 0)) > 0:
            first = neg.filter(bad).slice(0, 1).to_pylist()[0]
            skips.add(reason, "interactions", None, f"0-labelled rows whose {col} has no kept positive row",
                      f"user={first['user']} item={first['item']}", n=n)
            neg = neg.filter(pc.invert(bad))
    uid = pc.index_in(neg["user"], ua).cast(pa.int32())
    ts = neg["ts"].to_numpy()
    if files is not None:
        split = neg["split"].to_numpy().astype(np.int8)
    else:  # by time against the user's positives (each user has one valid and one test positive here)
        last_train, valid_ts = np.zeros(len(users), dtype=np.int64), np.zeros(len(users), dtype=np.int64)
        train = pos.filter(pc.equal(pos["split"], 0))
        np.maximum.at(last_train, train["uid"].to_numpy(), train["ts"].to_numpy())
        valid = pos.filter(pc.equal(pos["split"], 1))
        valid_ts[valid["uid"].to_numpy()] = valid["ts"].to_numpy()
        u = uid.to_numpy()
        split = np.where(ts <= last_train[u], 0, np.where(ts <= valid_ts[u], 1, 2)).astype(np.int8)
    return pa.table({"uid": uid, "iid": pc.index_in(neg["item"], ia).cast(pa.int32()),
                     "rating": pa.array(np.zeros(neg.num_rows, dtype=np.float32)), "ts": neg["ts"],
                     "review": neg["review"], "split": pa.array(split, pa.int8()),
                     "pos": pa.array(np.full(neg.num_rows, -1, dtype=np.int32)),
                     "neg": pa.array(np.ones(neg.num_rows, dtype=bool))})


# --------------------------------------------------------------------------------------------------
# The per-user sample builder (runs inside Ray Data map_batches; a plain function, testable alone)
# --------------------------------------------------------------------------------------------------


def build_user_samples(batch: pa.Table, ctx: BuildContext) -> pa.Table:
    """All prompt samples of the users in `batch` (whole users, sorted by uid then time).

    Returns a table of SAMPLE_SCHEMA rows plus notes rows, kinds told apart by `split == ""`: a note row
    counts samples that could not be built (reason in `task`, count in `n`).
    """
    uids, iids, ratings, stamps, splits = (batch[c].to_numpy() for c in ("uid", "iid", "rating", "ts", "split"))
    reviews = batch["review"].to_pylist() if "exp" in ctx.tasks else None
    negs = batch["neg"].to_numpy(zero_copy_only=False) if "neg" in batch.column_names else None
    out: dict[str, list] = {name: [] for name in SAMPLE_SCHEMA.names}
    notes: Counter[tuple[str, int]] = Counter()
    starts = np.flatnonzero(np.r_[True, uids[1:] != uids[:-1]])
    unseen = np.ones(ctx.num_items, dtype=bool)
    for s, e in zip(starts, np.r_[starts[1:], len(uids)]):
        uid = int(uids[s])
        # The user's positive rows (all of them unless the table has explicit negatives, data.columns.label).
        sel: slice | np.ndarray = slice(s, e) if negs is None else s + np.flatnonzero(~negs[s:e])
        is_cold = bool(int((splits[sel] == 0).sum()) <= ctx.cold_threshold)
        unseen[iids[sel]] = False
        pool = np.flatnonzero(unseen)  # items this user never interacted with (any split)
        unseen[iids[sel]] = True
        user_reviews = None if reviews is None else reviews[s:e] if negs is None else [reviews[k] for k in sel]
        targets = user_targets(iids[sel], ratings[sel], stamps[sel], splits[sel], user_reviews, uid, ctx)
        if negs is not None:
            nsel = s + np.flatnonzero(negs[s:e])
            targets += negative_targets(iids[sel], ratings[sel], stamps[sel], splits[sel], iids[nsel], stamps[nsel],
                                        splits[nsel], uid, ctx)
        for task in ctx.tasks:
            # The generator is drawn from in target order; counts[split] numbers the user's samples (the key's n).
            rng, counts = task_rng(ctx.seed, uid, task), dict.fromkeys(SPLITS, 0)
            for t in targets:
                if t.negative and task != "ctr":  # an explicit negative is only ever a CTR "No"
                    continue
                built = BUILDERS[task](t, pool, rng, ctx)
                if built.note:
                    notes[(built.note, uid)] += 1
                for fields in built.samples:
                    n, counts[t.split] = counts[t.split], counts[t.split] + 1
                    key = f"{t.split}/{task}/{uid}/{n}"
                    sample = {"key": key, "task": task, "split": t.split, "uid": uid, **fields, "is_cold": is_cold}
                    _append_row(out, t.split, task, uid, n, key, dumps_sample(sample))  # type: ignore[arg-type]
    for (reason, uid), c in sorted(notes.items()):
        _append_row(out, "", reason, uid, c, "", b"")
    return pa.table(out, schema=SAMPLE_SCHEMA)


def _append_row(out: dict[str, list], *row: Any) -> None:
    for name, value in zip(SAMPLE_SCHEMA.names, row, strict=True):
        out[name].append(value)


def _user_blocks(table: pa.Table, num_blocks: int) -> list[pa.Table]:
    """Cut a (uid, time)-sorted table into about num_blocks slices, each holding whole users."""
    u = table["uid"].to_numpy()
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    cuts = sorted({int(starts[int(k)]) for k in np.linspace(0, len(starts), num_blocks, endpoint=False)} | {0})
    bounds = cuts + [table.num_rows]
    return [table.slice(a, b - a) for a, b in itertools.pairwise(bounds) if b > a]


def build_samples(table: pa.Table, ctx: BuildContext, engine: str = "ray", num_blocks: int = 8,
                  ray_num_cpus: int = 8, ray_object_store_mb: int = 512) -> pa.Table:
    """Run build_user_samples over all users: on Ray Data (`engine='ray'`) or in this process ('local').

    Both give the same rows in the same canonical order (sorted by split, task, uid, n).
    """
    cols = table.select(["uid", "iid", "rating", "ts", "review", "split"] + (["neg"] if "neg" in table.column_names
                                                                            else []))
    blocks = _user_blocks(cols, num_blocks)
    if engine == "local":
        parts = [build_user_samples(b, ctx) for b in blocks]
    elif engine == "ray":
        import ray

        started = init_local_ray(ray_num_cpus, ray_object_store_mb)
        try:
            ds = ray.data.from_arrow(blocks)
            # batch_size=None: one batch = one input block = whole users (the builder needs a user's full timeline).
            # concurrency = physical cores: more Ray workers than cores only adds start-up (imports) on small
            # machines, while ray_num_cpus stays larger so Ray Data's own operators never starve.
            ds = ds.map_batches(build_user_samples, fn_kwargs={"ctx": ctx}, batch_size=None,
                                batch_format="pyarrow", zero_copy_batch=True,
                                concurrency=max(1, min(os.cpu_count() or 1, ray_num_cpus, len(blocks))))
            parts = [pa.table(t) if not isinstance(t, pa.Table) else t for t in ray.get(ds.to_arrow_refs())]
        finally:
            if started:
                ray.shutdown()
    else:
        raise ValueError(f"unknown engine {engine!r}; expected 'ray' or 'local'")
    parts = [p.cast(SAMPLE_SCHEMA) for p in parts if p.num_rows]
    out = pa.concat_tables(parts) if parts else SAMPLE_SCHEMA.empty_table()
    split_rank = pc.index_in(out["split"], pa.array(["", *SPLITS]))
    out = out.append_column("_s", split_rank)
    out = out.sort_by([("_s", "ascending"), ("task", "ascending"), ("uid", "ascending"), ("n", "ascending")])
    return out.drop_columns(["_s"])


def init_local_ray(num_cpus: int, object_store_mb: int) -> bool:
    """Join the Ray cluster of RAY_ADDRESS (resources are the cluster's), or start a small local Ray, unless Ray is
    running already; True if this call started it (the caller shuts it down). netbind.connect_ray."""
    from ckf_dist.netbind import connect_ray

    return connect_ray(num_cpus, object_store_mb, worker_logs=False)


# --------------------------------------------------------------------------------------------------
# prepare_data
# --------------------------------------------------------------------------------------------------




def config_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """The config fields that change the prepared bytes (Ray sizing and the output folder do not)."""
    d = dataclasses.asdict(cfg)
    # max_skip_frac only decides whether a preparation may finish (a reused one is checked again, prepare_data);
    # allow_truncated changes bytes only when a file is damaged, and is then recorded in the manifest's skips.
    # stream / stream_window decide how training reads the shards, not what they hold.
    for k in ("prepared_dir", "ray_num_cpus", "ray_object_store_mb", "max_skip_frac", "allow_truncated", "stream",
              "stream_window"):
        d.pop(k)
    for k in ("valid_path", "test_path"):  # newer fields: left out while unset, so older manifests stay current
        if d[k] is None:
            d.pop(k)
    if d["columns"]["label"] is None:
        d["columns"].pop("label")
    if cfg.source != "synthetic":
        d.pop("synthetic")
    return d


def _input_fingerprint(cfg: DataConfig) -> dict[str, str]:
    if cfg.source == "synthetic":
        return {}
    paths = [Path(p) for p in (cfg.path, cfg.metadata_path) if p]
    out = {f"{sp}:{Path(p).name}": file_sha256(Path(p)) for sp, p in (("valid", cfg.valid_path), ("test", cfg.test_path))
           if p and Path(p).is_file()}
    for p in paths:
        files = [p] if p.is_file() else sorted(x for x in p.glob("*") if x.is_file()) if p.is_dir() else []
        for f in files:
            if cfg.source in ("ml-100k", "ml-1m") and f.name not in ("u.data", "u.item", "ratings.dat", "movies.dat"):
                continue
            out[f.name] = file_sha256(f)
    return out


DAMAGED_FILE_REASONS = ("truncated_or_corrupt_file", "corrupt_file_rows_lost")
"""Skip reasons of a damaged file kept under data.allow_truncated (readers._damaged)."""


PROTOCOL_REASONS = ("duplicate_interaction", "k_core_filtered", "user_fewer_than_3_interactions",
                    "cold_item_not_in_train", "negative_user_without_positive", "negative_item_without_positive",
                    "negative_item_not_in_train")
"""Drops by the data protocol (after reading), reported but never charged to the input-loss budget."""


def _still_acceptable(cfg: DataConfig, manifest: dict[str, Any]) -> bool:
    """Whether a reused manifest also passes this config's input checks: the input-loss budget on its per-file
    counts and, without data.allow_truncated, no damaged file. A manifest from before per-file counts is judged on
    its reader skips over all files (protocol drops and prompt notes left out); failing, it is rebuilt, and the
    rebuild checks per file."""
    skips = manifest.get("skips", {})
    if not cfg.allow_truncated and any(r in skips.get("counts", {}) for r in DAMAGED_FILE_REASONS):
        return False
    if "files" not in skips:
        lost = sum(n for r, n in skips.get("counts", {}).items() if r not in PROTOCOL_REASONS
                   and any(e.get("file") not in ("interactions", "prompts") for e in skips["examples"].get(r, [])))
        return lost <= cfg.max_skip_frac * (manifest.get("raw_rows_read", 0) + lost)
    return budget_error(skips, skips["files"], cfg.max_skip_frac, "") is None


def print_skip_summary(manifest: dict[str, Any], where: str, reused: bool = False) -> None:
    """The skip summary of a preparation on the console (prepare_data runs on rank 0 only)."""
    skips = manifest.get("skips", {})
    head = (f"[ckf] prepare {where}{' (up to date, reused)' if reused else ''}: {manifest.get('raw_rows_read', 0)} "
            f"input rows kept, {skips.get('total', 0)} lines / interactions skipped")
    print("\n    ".join([head, *summary_lines(skips, skips.get("files"))]), flush=True)


def _complete(prepared_dir: Path, manifest: dict[str, Any]) -> bool:
    return all((prepared_dir / rel).is_file() and (prepared_dir / rel).stat().st_size == meta["bytes"]
               for rel, meta in manifest.get("files", {}).items())


def stale_reasons(cfg: DataConfig, out_dir: Path, old: dict[str, Any], fingerprint: dict[str, Any],
                  inputs: dict[str, str]) -> list[str]:
    """Why the prepared dataset at `out_dir` with manifest `old` cannot be reused for `cfg` (empty: reuse it).
    The input-loss budget is judged only on an otherwise current manifest."""
    config = old.get("config", {})
    changed = sorted(k for k in fingerprint.keys() | config.keys() if fingerprint.get(k) != config.get(k))
    why = [reason for reason, bad in (
        (f"schema version {old.get('schema_version')} != {SCHEMA_VERSION}", old.get("schema_version") != SCHEMA_VERSION),
        (f"config fields changed: {', '.join(f'data.{k}' for k in changed)}", old.get("config") != fingerprint),
        ("input files changed", old.get("inputs") != inputs),
        ("files missing or truncated", not _complete(out_dir, old)),
    ) if bad]
    if not why and not _still_acceptable(cfg, old):
        why.append("its skips exceed this config's input-loss budget (or a damaged file is not allowed)")
    return why


def prepare_data(cfg: DataConfig, force: bool = False, engine: str | None = None) -> dict[str, Any]:
    """Read, preprocess and write one prepared dataset under cfg.prepared_dir; returns its manifest.

    Idempotent: a complete manifest for the same config and input files is returned as is (unless `force`).
    Output is built in a temporary sibling folder and renamed into place, so a crash never leaves a half
    dataset behind.

    Args:
        cfg: the data section.
        force: rebuild even if an up-to-date dataset exists.
        engine: 'ray' (the distributed pipeline of data/ray_preprocess.py; for inputs it does not read, the
            steps below with prompts on Ray Data map_batches) or 'local' (everything in this process; byte-identical
            output); default: $CKF_DATA_ENGINE, else 'ray'.

    Raises:
        FileNotFoundError: an input file is missing.
        ValueError: bad config, wrong column mapping, or nothing left after filtering (naming the stage).
    """
    if probs := cfg.problems("data"):
        raise ValueError("invalid data config:\n" + "\n".join(probs))
    engine = engine or os.environ.get("CKF_DATA_ENGINE", "ray")
    if engine not in ("ray", "local"):
        raise ValueError(f"data engine {engine!r} (CKF_DATA_ENGINE) must be 'ray' or 'local'")
    out_dir = Path(cfg.prepared_dir)
    fingerprint = config_fingerprint(cfg)
    inputs = _input_fingerprint(cfg)
    mpath = out_dir / MANIFEST
    if not force and mpath.is_file():
        try:
            old = json.loads(mpath.read_text())
        except json.JSONDecodeError:
            old = {}
        if not stale_reasons(cfg, out_dir, old, fingerprint, inputs):
            print_skip_summary(old, str(out_dir), reused=True)
            return old

    t0 = time.perf_counter()
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        manifest = _prepare_into(cfg, tmp, fingerprint, inputs, engine)
        old_dir = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            out_dir.rename(old_dir)
        tmp.rename(out_dir)
        if old_dir.exists():
            shutil.rmtree(old_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["build_seconds"] = round(time.perf_counter() - t0, 2)  # returned, not stored
    print_skip_summary(manifest, str(out_dir))
    return manifest


def _file_list(root: Path) -> dict[str, dict[str, Any]]:
    return {str(f.relative_to(root)): {"sha256": file_sha256(f), "bytes": f.stat().st_size}
            for f in sorted(p for p in root.rglob("*") if p.is_file())}


def _prepare_instructions(cfg: DataConfig, root: Path, fingerprint: dict[str, Any],
                          inputs: dict[str, str]) -> dict[str, Any]:
    """data.source='alpaca': finished prompts, no users, items or interactions (data/instructions.py)."""
    from ckf_dist.data.instructions import prepare_instructions_into

    skips = SkipReport()
    got = prepare_instructions_into(cfg, root, skips)
    files_read = skips.file_stats()
    if err := budget_error(skips.to_dict(), files_read, cfg.max_skip_frac, str(cfg.path)):
        raise err
    manifest = {"schema_version": SCHEMA_VERSION, "source": cfg.source, "seed": cfg.seed, "tasks": list(cfg.tasks),
                **{k: got[k] for k in ("num_users", "num_items", "warm_users", "cold_users")},
                "cold_threshold": cfg.cold_threshold,
                **{k: got[k] for k in ("interactions", "raw_rows_read", "counts", "shards")},
                "skips": {**skips.to_dict(), "files": files_read}, "config": fingerprint, "inputs": inputs,
                "files": _file_list(root),
                "split": got["split"]}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return manifest


def _prepare_into(cfg: DataConfig, root: Path, fingerprint: dict[str, Any], inputs: dict[str, str],
                  engine: str) -> dict[str, Any]:
    if cfg.source == "alpaca":
        return _prepare_instructions(cfg, root, fingerprint, inputs)
    if engine == "ray":  # the distributed pipeline (data/ray_preprocess.py), where the input allows it
        from ckf_dist.data.ray_preprocess import distributed_unsupported, prepare_distributed

        if (why := distributed_unsupported(cfg)) is None:
            return prepare_distributed(cfg, root, fingerprint, inputs)
        print(f"[ckf] prepare: {why}: the interactions are preprocessed in this process, the prompts on Ray Data",
              flush=True)
    raw_dir = None
    if cfg.source == "synthetic":
        from ckf_dist.data.synthetic import generate_synthetic

        raw_dir = generate_synthetic(cfg.synthetic, root / "raw", cfg.seed)
    raw: RawData = read_raw(cfg, raw_dir)
    skips = raw.skips
    where = cfg.path or str(raw_dir)
    # The input-loss budget, on what the readers lost (protocol drops below -- duplicates, k-core, short users, cold
    # items -- are by design and only reported).
    files_read = skips.file_stats()
    if err := budget_error(skips.to_dict(), files_read, cfg.max_skip_frac, where):
        raise err
    if raw.interactions.num_rows == 0:
        raise ValueError(f"{where}: no valid interaction was read ({skips.summary()})")
    if "exp" in cfg.tasks and not raw.has_reviews:
        raise ValueError(f"data.tasks contains 'exp' but {where} has no review text (for source='table' set "
                         f"data.columns.review); drop 'exp' from data.tasks")
    table = dedup_latest(raw.interactions, skips)  # the latest of a (user, item) pair wins, whatever its label
    split_files = None
    if "split" in table.column_names:  # predefined train / valid / test files: every held-out user must be known
        split_files = [str(cfg.path), str(cfg.valid_path), str(cfg.test_path)]
        known = pc.equal(table["split"], 0)
        if "label" in table.column_names:
            known = pc.and_(known, pc.equal(table["label"], 1))
        _check_known_users(table, pc.unique(table.filter(known)["user"]), split_files)
    negatives = None
    if "label" in table.column_names:  # 0/1 feedback: positives are the interactions, 0s explicit CTR negatives
        is_pos = pc.equal(table["label"], 1)
        negatives, table = table.filter(pc.invert(is_pos)), table.filter(is_pos)
    table = k_core(table, cfg.k_core, skips)
    if table.num_rows == 0:
        raise ValueError(f"{where}: nothing left after {cfg.k_core}-core filtering; lower data.k_core")
    if split_files is not None:
        if not pc.any(pc.equal(table["split"], 0)).as_py():
            raise ValueError(f"{cfg.path}: the training file has no positive interaction left ({skips.summary()})")
        table, users, items = assign_given_splits(table, split_files, skips)
    else:
        table, users, items = assign_ids_and_splits(table, 3, skips)
        if table.num_rows == 0:
            raise ValueError(f"{where}: no user has the 3 interactions leave-last-out needs (train, valid, test)")
    build_table = table
    neg_table = None
    if negatives is not None:
        neg_table = place_negatives(negatives, table, users, items, split_files, skips)
        build_table = pa.concat_tables([table.append_column("neg", pa.array(np.zeros(table.num_rows, dtype=bool))),
                                        neg_table])
        build_table = build_table.sort_by([("uid", "ascending"), ("split", "ascending"), ("ts", "ascending")])

    titles = unique_titles(items, raw.titles)
    split = table["split"].to_numpy()
    uid = table["uid"].to_numpy()
    n_train = np.bincount(uid[split == 0], minlength=len(users)).astype(np.int32)
    is_cold = n_train <= cfg.cold_threshold

    # Id maps and interactions.
    pq.write_table(pa.table({"uid": pa.array(np.arange(len(users), dtype=np.int32)),
                             "raw_id": pa.array(users, pa.string()), "n_train": pa.array(n_train),
                             "is_cold": pa.array(is_cold)}), root / USERS)
    pq.write_table(pa.table({"iid": pa.array(np.arange(len(items), dtype=np.int32)),
                             "raw_id": pa.array(items, pa.string()), "title": pa.array(titles, pa.string())}),
                   root / ITEMS)
    inter_counts = {}
    for name, code in (("train", 0), ("valid", 1), ("test", 2)):
        part = table.filter(pc.equal(table["split"], code)).select(["uid", "iid", "rating", "ts", "review"])
        path = interactions_path(root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, path)
        inter_counts[name] = part.num_rows
    if neg_table is not None:
        pq.write_table(neg_table.select(["uid", "iid", "ts", "split"]), interactions_path(root, NEGATIVES))

    ctx = BuildContext(num_items=len(items), titles=titles, tasks=list(cfg.tasks), seed=cfg.seed,
                       history_len=cfg.history_len, like_threshold=cfg.like_threshold,
                       ctr_negatives=cfg.ctr_negatives, num_candidates=cfg.num_candidates,
                       max_explanation_words=cfg.max_explanation_words,
                       train_windows_per_user=cfg.train_windows_per_user, cold_threshold=cfg.cold_threshold,
                       explicit_negatives=neg_table is not None)
    num_blocks = max(2, min(4 * (os.cpu_count() or 1), len(users) // 50))
    samples = build_samples(build_table, ctx, engine, num_blocks=num_blocks,
                            ray_num_cpus=cfg.ray_num_cpus, ray_object_store_mb=cfg.ray_object_store_mb)
    is_note = pc.equal(samples["split"], "")
    notes = samples.filter(is_note)
    for reason, u, c in zip(notes["task"].to_pylist(), notes["uid"].to_pylist(), notes["n"].to_pylist()):
        skips.add(reason, "prompts", None, f"user {u} ({users[u]})", n=c)
    samples = samples.filter(pc.invert(is_note))
    keys = samples["key"]
    if len(pc.unique(keys)) != len(keys):
        raise AssertionError("duplicate sample keys: a user was split across Ray blocks")

    counts: dict[str, dict[str, int]] = {}
    shards: dict[str, dict[str, list[str]]] = {}
    for sp in SPLITS:
        counts[sp], shards[sp] = {}, {}
        for task in cfg.tasks:
            part = samples.filter(pc.and_(pc.equal(samples["split"], sp), pc.equal(samples["task"], task)))
            payloads = list(zip(part["key"].to_pylist(), part["json"].to_pylist()))
            files = write_task_shards(root, sp, task, payloads, cfg.shard_size)
            counts[sp][task] = len(payloads)
            shards[sp][task] = [str(f.relative_to(root)) for f in files]
        if sum(counts[sp].values()) == 0:
            raise ValueError(f"{where}: no {sp} prompt could be built for tasks {cfg.tasks} ({skips.summary()})")

    files = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(f.relative_to(root))
        files[rel] = {"sha256": file_sha256(f), "bytes": f.stat().st_size}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": cfg.source,
        "seed": cfg.seed,
        "tasks": list(cfg.tasks),
        "num_users": len(users),
        "num_items": len(items),
        "warm_users": int((~is_cold).sum()),
        "cold_users": int(is_cold.sum()),
        "cold_threshold": cfg.cold_threshold,
        "interactions": inter_counts,
        "raw_rows_read": raw.interactions.num_rows,
        "counts": counts,
        "shards": shards,
        "skips": {**skips.to_dict(), "files": files_read},
        "config": fingerprint,
        "inputs": inputs,
        "files": files,
    }
    if neg_table is not None:  # only for 0/1 tables, so that every other manifest keeps its bytes
        nsplit = neg_table["split"].to_numpy()
        manifest["explicit_negatives"] = {sp: int((nsplit == c).sum()) for c, sp in enumerate(SPLITS)}
    if split_files is not None:
        manifest["split"] = "predefined files"
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return manifest
