"""The 'ray' data engine: preprocessing as a distributed pipeline that never collects the interaction table on the
driver (issue #15 part 3; the data protocol of CKF_METHOD.md). preprocess.py's single-process path is the oracle:
for the same input, config and seed every written file has the same bytes (tests/integration/test_ray_preprocess.py).

Stages (every one runs in Ray workers; the interaction rows stay in Ray's object store as Arrow tables):

1. read: one task per group of Parquet row groups validates its rows with readers.py's own record loop
   (`_validate_records`, same skip reasons and file:line examples) and cuts its kept rows into P partitions by raw
   user id *range* (boundaries from a sample of the user column, so partition j holds users b_j <= u < b_{j+1});
2. dedup: one task per partition (all rows of a user are in one partition) runs preprocess.dedup_latest;
3. k-core: rounds of per-partition count + filter; each partition's user counts are complete, item counts are
   summed by one task, and only the *number* of items under k reaches the driver (the list stays in the store);
4. ids and splits: users with < 3 rows dropped per partition; the sorted user ids of partition j are a contiguous
   uid range (range partitioning), so uid = the partition's offset + its local rank; the item map is the union of
   the partitions' items (one task); each partition then runs preprocess.assign_ids_and_splits and maps its local
   iids to the global ones; n_train and warm/cold flags come with it;
5. prompts: one task per partition (whole users, in uid order) runs preprocess.build_user_samples and sorts its
   samples canonically (split, task, uid, n); a task per block counts its samples per (split, task) and collects
   its prompt notes;
6. writing: shard boundaries come from the per-block counts (global position // shard_size); writer tasks fetch
   the block slices of their shards and write them with shards.write_tar; the interactions and users Parquet files
   are each written by one task that streams the partitions in uid order in row groups of pyarrow's default
   length (1024 * 1024 rows), which gives pq.write_table's bytes; every writer returns its files' sha256 and size,
   and the driver assembles the manifest from them.

What the driver holds (sizes relative to I interactions, U users, V items, P partitions, B blocks): the item map
with titles (V strings, it also ships in the prompt build context), per-partition counters (O(P)), skip reports
(a few examples per reason) and the shard plan (O(I / shard_size) small tuples). Users (raw ids, n_train) are
written by a worker; the driver sees only their count.

Limits and deviations:
- Distributed input: source 'synthetic' and 'table' with one Parquet file (data.path), ratings (no
  data.columns.label), no predefined split files. Any other input (MovieLens, Amazon, CSV/TSV, 0/1 label tables,
  data.valid_path/test_path) is read by readers.py's single-process readers, so under engine 'ray' it runs
  preprocess.py's path (driver-side tables, prompts on Ray Data), as before; `distributed_unsupported` says why.
- The synthetic generator (data/synthetic.py) still runs on the driver: it is sized for tests (a dense users x
  items affinity matrix); large inputs are Parquet tables (benchmarks/preprocess_scale.py writes one).
- Read parallelism is per Parquet row group: a file written as one huge row group is read by one worker (not the
  driver). The item titles file (data.metadata_path) is read on the driver (O(V)).
- The stages are Ray tasks over Arrow tables in Ray's object store (the store Ray Data's blocks live in), not
  Ray Data Dataset operations. Ray Data's shuffles (groupby / repartition) do not give what the pipeline needs:
  whole users per block in uid-range order, a partition that stays put across the k-core rounds, and an exact row
  order (the byte-identical oracle). Prompt building was a Ray Data map_batches over the same partitions
  (`from_arrow_refs`, preserve_order): 16.2 s against 9.3 s as tasks for the 1M-interaction log of
  benchmarks/preprocess_scale.py on 2 cores (Ray Data's executor start and scheduling), so it is a task too.
- Workers write into the output folder: on a cluster it must be on a file system every node sees (the storage
  root of the Ray job).
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ckf_dist.config import ColumnMap, DataConfig
from ckf_dist.data.preprocess import (
    SAMPLE_SCHEMA,
    assign_ids_and_splits,
    build_user_samples,
    dedup_latest,
    init_local_ray,
    unique_titles,
)
from ckf_dist.data.readers import (
    RAW_SCHEMA,
    _check_whole_file,
    _read_item_titles,
    _require_file,
    _validate_records,
    _Validated,
    _wanted_columns,
)
from ckf_dist.data.samples import BuildContext
from ckf_dist.data.schema import (
    ITEMS,
    MANIFEST,
    SCHEMA_VERSION,
    SPLITS,
    USERS,
    file_sha256,
    interactions_path,
    prompts_dir,
)
from ckf_dist.data.shards import member_name, shard_name, write_tar
from ckf_dist.data.skips import InputLossError, SkipReport, budget_error

ROWS_PER_READ = 500_000
"""Rows (whole Parquet row groups) one read task validates."""
ROWS_PER_PARTITION = 500_000
"""Target interactions per user-range partition (at least two partitions per Ray CPU)."""
USER_SAMPLE_PER_READ = 2000
"""User ids each read block contributes to the partition-boundary sample."""
PARQUET_ROW_GROUP = 1024 * 1024
"""pq.write_table's default row group length; the streaming writers cut the same row groups."""
SHARDS_PER_WRITER = 32
"""Prompt shards one writer task writes."""
BUILD_COLUMNS = ["uid", "iid", "rating", "ts", "review", "split"]
SYNTHETIC_COLUMNS = ColumnMap(user="user_id", item="item_id", rating="rating", timestamp="timestamp", review="review")
"""readers.read_raw's column map of the synthetic generator's table."""


def distributed_unsupported(cfg: DataConfig) -> str | None:
    """Why `cfg`'s input cannot go through the distributed pipeline (None: it can; see the module docstring)."""
    if cfg.source not in ("synthetic", "table"):
        return f"data.source={cfg.source!r} is read by a single-process reader"
    if cfg.source == "table":
        if cfg.valid_path or cfg.test_path:
            return "predefined split files (data.valid_path / data.test_path)"
        if cfg.columns.label:
            return "0/1 label tables (data.columns.label)"
        if cfg.path is None or Path(cfg.path).suffix != ".parquet":
            return f"data.path {cfg.path} is not one .parquet file (CSV/TSV are read by a single-process reader)"
    return None


# --------------------------------------------------------------------------------------------------
# Worker functions (plain functions; `_remote` wraps them as Ray tasks)
# --------------------------------------------------------------------------------------------------


def _user_sample(path: str, row_groups: list[int], user_col: str, k: int) -> list[str]:
    """About k evenly spaced user ids (as the reader normalises them) of some row groups, for the range bounds."""
    col = pq.ParquetFile(path).read_row_groups(row_groups, columns=[user_col])[user_col]
    step = max(1, len(col) // k)
    return [str(u).strip() for u in col[::step].to_pylist() if u is not None]


def _parquet_records(pf: pq.ParquetFile, path: str, row_groups: list[int], first_row: int, columns: list[str],
                     skips: SkipReport) -> Iterator[tuple[int, dict[str, object]]]:
    """(row number, record) of some row groups, numbered as readers._records numbers the whole file."""
    n = first_row
    try:
        for batch in pf.iter_batches(batch_size=65536, row_groups=row_groups, columns=columns):
            skips.seen(Path(path).name, batch.num_rows)
            for rec in batch.to_pylist():
                n += 1
                yield n, rec
    except (pa.ArrowException, OSError) as e:
        raise InputLossError(f"{path}: Parquet file damaged after row {n} ({type(e).__name__}: {e})") from None


def _read_block(path: str, row_groups: list[int], first_row: int, wanted: dict[str, str], columns: ColumnMap,
                bounds: list[str]) -> tuple[Any, ...]:
    """Validate one block of the interaction table; returns (meta, partition 0 rows, ..., partition P-1 rows).

    seq = first_row + the rank of the row among the block's kept rows: increasing in input order across blocks,
    which is all the order the later stages (and the single-process path's seq) rely on."""
    skips = SkipReport()
    pf = pq.ParquetFile(path)
    cols = sorted(set(wanted.values()))
    got = _validate_records(_parquet_records(pf, path, row_groups, first_row, cols, skips), Path(path).name,
                            wanted, columns, skips)
    t = got.rows.table()
    t = t.set_column(t.schema.get_field_index("seq"), "seq",
                     pa.array(first_row + np.arange(t.num_rows, dtype=np.int64)))
    part = np.fromiter((bisect.bisect_right(bounds, u) for u in got.rows.user), dtype=np.int64, count=t.num_rows)
    got.rows = type(got.rows)()  # the counters travel to the driver, the rows in the partitions below
    order = np.argsort(part, kind="stable")
    ends = np.cumsum(np.bincount(part, minlength=len(bounds) + 1))
    t = t.take(order)
    parts = [t.slice(int(a), int(b - a)) for a, b in zip(np.r_[0, ends[:-1]], ends)]
    return ({"skips": skips, "validated": got, "kept": t.num_rows}, *parts)


def _dedup(*blocks: pa.Table) -> tuple[pa.Table, SkipReport]:
    """One partition's rows from every read block (in block order = input order), latest of each (user, item)."""
    skips = SkipReport()
    table = pa.concat_tables(blocks) if blocks else RAW_SCHEMA.empty_table()
    return dedup_latest(table.combine_chunks(), skips), skips


def _item_counts(table: pa.Table) -> pa.Table:
    return table.group_by("item").aggregate([("user", "count")]).rename_columns(["item", "n"])


def _kcore_round(table: pa.Table, k: int, bad_items: pa.Array | None, filter_users: bool) -> tuple[pa.Table,
                                                                                                    pa.Table, bool]:
    """One round of preprocess.k_core on a partition: drop its users under k (counts of the input, complete here)
    and the globally known `bad_items`; returns the rows left, their item counts and whether a user is under k."""
    drop = []
    if filter_users:
        uc = table.group_by("user").aggregate([("item", "count")])
        drop.append(pc.is_in(table["user"], uc.filter(pc.less(uc["item_count"], k))["user"]))
    if bad_items is not None and len(bad_items):
        drop.append(pc.is_in(table["item"], bad_items))
    if drop:
        table = table.filter(pc.invert(drop[0] if len(drop) == 1 else pc.or_(*drop)))
    uc = table.group_by("user").aggregate([("item", "count")])
    return table, _item_counts(table), bool(pc.any(pc.less(uc["item_count"], k)).as_py() or False)


def _items_under(k: int, *counts: pa.Table) -> tuple[pa.Array, int]:
    """The items with fewer than k rows over all partitions (and how many)."""
    total = pa.concat_tables(counts).group_by("item").aggregate([("n", "sum")])
    bad = total.filter(pc.less(total["n_sum"], k))["item"].combine_chunks()
    return bad, len(bad)


def _drop_short_users(table: pa.Table, min_per_user: int) -> tuple[pa.Table, dict[str, Any], list[str]]:
    """Drop users with fewer than min_per_user rows (assign_ids_and_splits's rule); returns the rows left, counts
    for the driver (users, rows, the dropped users' count, rows and first one in input order) and the sorted
    items left (for the item map task)."""
    uc = table.group_by("user").aggregate([("item", "count"), ("seq", "min")])
    few = uc.filter(pc.less(uc["item_count"], min_per_user))
    first = None
    if few.num_rows:
        j = int(pc.index(few["seq_min"], pc.min(few["seq_min"])).as_py())
        first = (int(few["seq_min"][j].as_py()), few["user"][j].as_py())
        table = table.filter(pc.invert(pc.is_in(table["user"], few["user"])))
    items = sorted(pc.unique(table["item"]).to_pylist())
    return table, {"users": len(pc.unique(table["user"])), "rows": table.num_rows, "few_users": few.num_rows,
                   "few_rows": int(pc.sum(few["item_count"]).as_py() or 0), "first_few": first}, items


def _union_sorted(*lists: list[str]) -> list[str]:
    return sorted(set().union(*lists))


def _assign_ids(table: pa.Table, uid_offset: int, items: list[str], cold_threshold: int) -> tuple[pa.Table,
                                                                                                    pa.Table,
                                                                                                    dict[str, int]]:
    """preprocess.assign_ids_and_splits on one partition, with its uid range and the global item map.

    Returns the rows (uid, iid, rating, ts, review, split, pos), the users' rows of users.parquet and counts."""
    t, users, local_items = assign_ids_and_splits(table, 3, SkipReport())  # short users are gone already
    to_global = pc.index_in(pa.array(local_items, pa.string()), pa.array(items, pa.string())).cast(pa.int32())
    t = t.set_column(0, "uid", pc.add(t["uid"], pa.scalar(uid_offset, pa.int32())))
    t = t.set_column(1, "iid", pc.take(to_global, t["iid"]))
    split, uid = t["split"].to_numpy(), t["uid"].to_numpy() - uid_offset
    n_train = np.bincount(uid[split == 0], minlength=len(users)).astype(np.int32)
    is_cold = n_train <= cold_threshold
    user_rows = pa.table({"uid": pa.array(uid_offset + np.arange(len(users), dtype=np.int32)),
                          "raw_id": pa.array(users, pa.string()), "n_train": pa.array(n_train),
                          "is_cold": pa.array(is_cold)})
    counts = {sp: int((split == c).sum()) for c, sp in enumerate(SPLITS)}
    counts.update(cold=int(is_cold.sum()), warm=int((~is_cold).sum()))
    return t, user_rows, counts


def _build_block(batch: pa.Table, ctx: BuildContext) -> pa.Table:
    """build_user_samples on one partition, sorted canonically (split, task, uid, n) as preprocess.build_samples
    sorts the whole output (note rows first)."""
    out = build_user_samples(batch.select(BUILD_COLUMNS), ctx).cast(SAMPLE_SCHEMA)
    out = out.append_column("_s", pc.index_in(out["split"], pa.array(["", *SPLITS])))
    out = out.sort_by([("_s", "ascending"), ("task", "ascending"), ("uid", "ascending"), ("n", "ascending")])
    return out.drop_columns(["_s"])


def _block_summary(block: pa.Table, raw_users_by_part: list[Any], uid_starts: list[int]) -> dict[str, Any]:
    """Where each (split, task) run starts in a sorted sample block and how long it is, and its prompt notes as a
    skip report (the raw user ids of the notes are looked up in the users' rows of their partition)."""
    import ray

    split, task = block["split"].to_pylist(), block["task"].to_pylist()
    runs: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(split, task)):
        if key in runs:
            runs[key][1] += 1
        else:
            runs[key] = [i, 1]
    skips = SkipReport()
    notes = [(t, u, c) for (s, t), (a, n) in runs.items() if s == ""
             for t, u, c in zip([t] * n, block["uid"][a:a + n].to_pylist(), block["n"][a:a + n].to_pylist())]
    if notes:
        cache: dict[int, pa.Table] = {}
        for reason, u, c in notes:
            p = bisect.bisect_right(uid_starts, u) - 1
            if p not in cache:
                cache[p] = ray.get(raw_users_by_part[p][0])
            skips.add(reason, "prompts", None, f"user {u} ({cache[p]['raw_id'][u - uid_starts[p]].as_py()})", n=c)
    return {"runs": {k: v for k, v in runs.items() if k[0] != ""}, "skips": skips}


def _sha(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def _write_parquet(path: str, schema: pa.Schema, parts: list[Any], split_code: int | None,
                   columns: list[str]) -> dict[str, Any]:
    """Stream the tables behind `parts` (refs, in order) into one Parquet file with pq.write_table's row groups;
    `split_code` keeps only that split's rows. Returns sha256 and size."""
    import ray

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pending: list[pa.Table] = []
    n_pending = 0
    with pq.ParquetWriter(out, schema) as writer:
        def flush(final: bool) -> None:
            nonlocal pending, n_pending
            buf = pa.concat_tables(pending) if pending else schema.empty_table()
            while buf.num_rows >= PARQUET_ROW_GROUP or (final and buf.num_rows):
                n = min(PARQUET_ROW_GROUP, buf.num_rows)
                writer.write_table(buf.slice(0, n).combine_chunks())
                buf = buf.slice(n)
            pending, n_pending = [buf], buf.num_rows

        wrote = False
        for ref in parts:
            t = ray.get(ref)
            if split_code is not None:
                t = t.filter(pc.equal(t["split"], split_code))
            pending.append(t.select(columns).cast(schema))
            n_pending += t.num_rows
            if n_pending >= PARQUET_ROW_GROUP:
                flush(False)
                wrote = True
        if n_pending or not wrote:
            if n_pending == 0:  # pq.write_table of an empty table writes one empty row group
                writer.write_table(schema.empty_table())
            else:
                flush(True)
    return _sha(out)


def _write_shards(root: str, specs: list[tuple[str, str, list[tuple[int, int, int]]]],
                  blocks: list[Any]) -> dict[str, dict[str, Any]]:
    """Write prompt shards: each spec is (split, task, shard index, [(block, start, stop), ...]); returns sha256
    and size per file (relative to root)."""
    import ray

    got: dict[int, pa.Table] = {}
    out = {}
    for split, task, index, pieces in specs:
        members: list[tuple[str, bytes]] = []
        for b, a, z in pieces:
            if b not in got:
                got.clear()  # pieces come in block order: keep one block at a time
                got[b] = ray.get(blocks[b][0])
            part = got[b].slice(a, z - a)
            members += zip((member_name(k) for k in part["key"].to_pylist()), part["json"].to_pylist())
        path = prompts_dir(root, split) / shard_name(task, index)
        write_tar(path, members)
        out[str(path.relative_to(root))] = _sha(path)
    return out


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


@functools.cache
def _remote(fn, num_returns: int = 1):
    import ray

    return ray.remote(num_returns=num_returns)(fn) if num_returns != 1 else ray.remote(fn)


def _cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _read_plan(pf: pq.ParquetFile, cpus: int) -> list[tuple[list[int], int]]:
    """Row groups grouped into read blocks of up to ROWS_PER_READ rows, at least 2 per CPU where the row groups
    allow: [(row groups, first row number)]."""
    target = min(ROWS_PER_READ, max(1, math.ceil(pf.metadata.num_rows / (2 * cpus))))
    plan, cur, first, n = [], [], 0, 0
    for g in range(pf.metadata.num_row_groups):
        if cur and n >= target:
            plan.append((cur, first))
            cur, first, n = [], first + n, 0
        cur.append(g)
        n += pf.metadata.row_group(g).num_rows
    if cur:
        plan.append((cur, first))
    return plan


def prepare_distributed(cfg: DataConfig, root: Path, fingerprint: dict[str, Any],
                        inputs: dict[str, str]) -> dict[str, Any]:
    """Build the prepared dataset of `cfg` into `root` on Ray (see the module docstring); returns its manifest.

    Raises:
        FileNotFoundError, ValueError, InputLossError: as preprocess.prepare_data, with the same messages.
    """
    import ray

    started = init_local_ray(cfg.ray_num_cpus, cfg.ray_object_store_mb)
    try:
        manifest = _prepare(cfg, root, fingerprint, inputs)
        (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
        return manifest
    finally:
        if started:
            ray.shutdown()


def _prepare(cfg: DataConfig, root: Path, fingerprint: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any]:
    import ray

    clock = _StageClock()

    if cfg.source == "synthetic":
        from ckf_dist.data.synthetic import INTERACTIONS_FILE, ITEMS_FILE, generate_synthetic

        raw_dir = generate_synthetic(cfg.synthetic, root / "raw", cfg.seed)
        path, items_path, columns = raw_dir / INTERACTIONS_FILE, raw_dir / ITEMS_FILE, SYNTHETIC_COLUMNS
        where = cfg.path or str(raw_dir)
    else:
        assert cfg.path is not None
        path = _require_file(Path(cfg.path), "interaction table")
        items_path, columns, where = cfg.metadata_path, cfg.columns, str(cfg.path)
        path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputLossError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    wanted = _wanted_columns(path, pf.schema_arrow.names, columns)

    # 1. read + validate + range-partition by raw user.
    cpus = _cpus()
    plan = _read_plan(pf, cpus)
    samples = ray.get([_remote(_user_sample).remote(str(path), g, wanted["user"], USER_SAMPLE_PER_READ)
                       for g, _ in plan])
    users_seen = sorted(u for s in samples for u in s)
    n_parts = max(1, min(max(2 * cpus, math.ceil(pf.metadata.num_rows / ROWS_PER_PARTITION)), len(users_seen)))
    bounds = sorted({users_seen[len(users_seen) * j // n_parts] for j in range(1, n_parts)})
    reads = [_remote(_read_block, len(bounds) + 2).remote(str(path), g, first, wanted, columns, bounds)
             for g, first in plan]
    skips, validated, raw_rows = SkipReport(), _Validated(), 0
    for meta in ray.get([r[0] for r in reads]):  # in file order: examples and titles as one sequential pass
        skips.merge(meta["skips"])
        validated.merge(meta["validated"])
        raw_rows += meta["kept"]
    _check_whole_file(path, columns, skips, validated)
    titles = validated.titles
    if items_path:
        ipath = _require_file(Path(items_path), "items table")
        titles.update(_read_item_titles(ipath, columns, skips, cfg.allow_truncated))
    files_read = skips.file_stats()
    if err := budget_error(skips.to_dict(), files_read, cfg.max_skip_frac, where):
        raise err
    if raw_rows == 0:
        raise ValueError(f"{where}: no valid interaction was read ({skips.summary()})")
    if "exp" in cfg.tasks and columns.review is None:
        raise ValueError(f"data.tasks contains 'exp' but {where} has no review text (for source='table' set "
                         f"data.columns.review); drop 'exp' from data.tasks")

    clock.mark("read")

    # 2. dedup per partition.
    deduped = [_remote(_dedup, 2).remote(*[r[j + 1] for r in reads]) for j in range(len(bounds) + 1)]
    parts = [d[0] for d in deduped]
    # dedup_latest reports one example, its first duplicate in (user, item) order: the first partition's (they are
    # in user order), with the count of all.
    reps = [r for r in ray.get([d[1] for d in deduped]) if r.total]
    if reps:
        e = reps[0].examples["duplicate_interaction"][0]
        skips.add("duplicate_interaction", e["file"], e["line"], e["detail"], e["text"], n=sum(r.total for r in reps))
    del reads, deduped

    clock.mark("dedup")

    # 3. k-core: count + filter rounds until no user or item is under k.
    if cfg.k_core > 1:
        before = sum(ray.get([_remote(_num_rows).remote(p) for p in parts]))
        bad_items, filter_users, rounds_run = None, False, 0
        while True:
            rounds_run += 1
            rounds = [_remote(_kcore_round, 3).remote(p, cfg.k_core, bad_items, filter_users) for p in parts]
            parts = [r[0] for r in rounds]
            bad_items, n_bad = _remote(_items_under, 2).remote(cfg.k_core, *[r[1] for r in rounds])
            filter_users = any(ray.get([r[2] for r in rounds]))
            if ray.get(n_bad) == 0 and not filter_users:
                break
        after = sum(ray.get([_remote(_num_rows).remote(p) for p in parts]))
        if before > after:
            skips.add("k_core_filtered", "interactions", None, f"{cfg.k_core}-core filtering", n=before - after)
        if after == 0:
            raise ValueError(f"{where}: nothing left after {cfg.k_core}-core filtering; lower data.k_core")

        clock.mark(f"k-core ({rounds_run} rounds)")

    # 4. ids and the chronological leave-last-out split.
    dropped = [_remote(_drop_short_users, 3).remote(p, 3) for p in parts]
    stats = ray.get([d[1] for d in dropped])
    few = [s for s in stats if s["few_users"]]
    if few:
        first = min(s["first_few"] for s in few)
        skips.add("user_fewer_than_3_interactions", "interactions", None,
                  f"{sum(s['few_users'] for s in few)} users cannot be split into train/valid/test",
                  f"user={first[1]}", n=sum(s["few_rows"] for s in few))
    keep = [j for j, s in enumerate(stats) if s["rows"]]
    if not keep:
        raise ValueError(f"{where}: no user has the 3 interactions leave-last-out needs (train, valid, test)")
    items = ray.get(_remote(_union_sorted).remote(*[dropped[j][2] for j in keep]))
    items_ref = ray.put(items)
    uid_starts = [0, *np.cumsum([stats[j]["users"] for j in keep])[:-1].tolist()]
    ided = [_remote(_assign_ids, 3).remote(dropped[j][0], int(o), items_ref, cfg.cold_threshold)
            for j, o in zip(keep, uid_starts)]
    del dropped, parts
    counts_by_part = ray.get([r[2] for r in ided])
    num_users = sum(stats[j]["users"] for j in keep)
    titles_list = unique_titles(items, titles)

    # Files of the driver (small) and of the Parquet writers.
    files: dict[str, dict[str, Any]] = {}
    pq.write_table(pa.table({"iid": pa.array(np.arange(len(items), dtype=np.int32)),
                             "raw_id": pa.array(items, pa.string()), "title": pa.array(titles_list, pa.string())}),
                   root / ITEMS)
    user_schema = pa.schema([("uid", pa.int32()), ("raw_id", pa.string()), ("n_train", pa.int32()),
                             ("is_cold", pa.bool_())])
    inter_schema = pa.schema([("uid", pa.int32()), ("iid", pa.int32()), ("rating", pa.float32()), ("ts", pa.int64()),
                              ("review", pa.string())])
    write = _remote(_write_parquet)
    writes = {USERS: write.remote(str(root / USERS), user_schema, [r[1] for r in ided], None, user_schema.names)}
    for code, sp in enumerate(SPLITS):
        rel = str(interactions_path(root, sp).relative_to(root))
        writes[rel] = write.remote(str(root / rel), inter_schema, [r[0] for r in ided], code, inter_schema.names)

    clock.mark("ids")

    # 5. prompts: one task per partition (whole users), blocks in uid order.
    ctx = BuildContext(num_items=len(items), titles=titles_list, tasks=list(cfg.tasks), seed=cfg.seed,
                       history_len=cfg.history_len, like_threshold=cfg.like_threshold,
                       ctr_negatives=cfg.ctr_negatives, num_candidates=cfg.num_candidates,
                       max_explanation_words=cfg.max_explanation_words,
                       train_windows_per_user=cfg.train_windows_per_user, cold_threshold=cfg.cold_threshold)
    ctx_ref = ray.put(ctx)  # shipped once, not once per task
    blocks = [_remote(_build_block).remote(r[0], ctx_ref) for r in ided]
    user_refs = [[r[1]] for r in ided]  # wrapped: resolved in the task only for a block that has notes
    summaries = ray.get([_remote(_block_summary).remote(b, user_refs, uid_starts) for b in blocks])
    for s in summaries:
        skips.merge(s["skips"])

    clock.mark("prompts")

    # 6. shard plan from the per-block counts, then the writers.
    counts: dict[str, dict[str, int]] = {}
    shards: dict[str, dict[str, list[str]]] = {}
    specs: list[tuple[str, str, int, list[tuple[int, int, int]]]] = []
    for sp in SPLITS:
        counts[sp], shards[sp] = {}, {}
        for task in cfg.tasks:
            runs = [(b, *s["runs"][(sp, task)]) for b, s in enumerate(summaries) if (sp, task) in s["runs"]]
            total = sum(n for _, _, n in runs)
            n_shards = max(1, math.ceil(total / cfg.shard_size))
            pieces: list[list[tuple[int, int, int]]] = [[] for _ in range(n_shards)]
            pos = 0
            for b, start, n in runs:  # global positions [pos, pos + n) of this block's run
                for k in range(pos // cfg.shard_size, (pos + n - 1) // cfg.shard_size + 1):
                    lo, hi = max(pos, k * cfg.shard_size), min(pos + n, (k + 1) * cfg.shard_size)
                    pieces[k].append((b, start + lo - pos, start + hi - pos))
                pos += n
            specs += [(sp, task, k, p) for k, p in enumerate(pieces)]
            counts[sp][task] = total
            shards[sp][task] = [str((prompts_dir(root, sp) / shard_name(task, k)).relative_to(root))
                                for k in range(n_shards)]
        if sum(counts[sp].values()) == 0:
            raise ValueError(f"{where}: no {sp} prompt could be built for tasks {cfg.tasks} ({skips.summary()})")
    block_refs = [[b] for b in blocks]
    shard_writes = [_remote(_write_shards).remote(str(root), specs[i:i + SHARDS_PER_WRITER], block_refs)
                    for i in range(0, len(specs), SHARDS_PER_WRITER)]
    for got in ray.get(shard_writes):
        files.update(got)
    for rel, ref in writes.items():
        files[rel] = ray.get(ref)
    for f in root.rglob("*"):  # the driver's own files: the synthetic raw data, items.parquet
        rel = str(f.relative_to(root))
        if f.is_file() and rel not in files:
            files[rel] = _sha(f)
    files = {rel: files[rel] for rel in sorted(files, key=Path)}  # preprocess.py's order (sorted Paths)
    clock.mark("write")
    print(f"[ckf] prepare on Ray: {len(plan)} read blocks, {len(keep)} partitions, {len(blocks)} prompt blocks; "
          f"{clock}", flush=True)

    totals = {k: sum(c[k] for c in counts_by_part) for k in ("train", "valid", "test", "warm", "cold")}
    return {
        "schema_version": SCHEMA_VERSION,
        "source": cfg.source,
        "seed": cfg.seed,
        "tasks": list(cfg.tasks),
        "num_users": num_users,
        "num_items": len(items),
        "warm_users": totals["warm"],
        "cold_users": totals["cold"],
        "cold_threshold": cfg.cold_threshold,
        "interactions": {sp: totals[sp] for sp in SPLITS},
        "raw_rows_read": raw_rows,
        "counts": counts,
        "shards": shards,
        "skips": {**skips.to_dict(), "files": files_read},
        "config": fingerprint,
        "inputs": inputs,
        "files": files,
    }


def _num_rows(table: pa.Table) -> int:
    return table.num_rows


class _StageClock:
    """Wall seconds per stage, for the one-line summary (stages overlap where Ray runs them concurrently)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.parts: list[str] = []

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.parts.append(f"{stage} {now - self.t:.1f}s")
        self.t = now

    def __str__(self) -> str:
        return ", ".join(self.parts)
