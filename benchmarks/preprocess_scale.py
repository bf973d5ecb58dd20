"""Preprocessing at scale: the distributed 'ray' engine (data/ray_preprocess.py) vs the single-process 'local' one
on synthetic interaction logs of growing size, in one run: rows/s and the peak RSS of the driver process.

    python benchmarks/preprocess_scale.py [--sizes 1M 10M] [--ray-cpus 2] [--json out.json]

Each (size, engine) runs `prepare_data` in a fresh child process (this script with --child), so the driver's peak
RSS is that process's own ru_maxrss. Linux records the parent's RSS at fork into an exec'ed child's ru_maxrss, so
the log is generated in a child of its own (--gen) and this parent never imports numpy or pyarrow (a first
version generated it here and charged its ~600 MB to the 10M driver). A sampler thread in the child also records
the peak summed RSS of the Ray processes (psutil, every 0.5 s). Ray's start-up is inside the timed call, as a user of `ckf-dist prepare`
sees it. The input is one Parquet table (source='table', written here, outside the measured processes): users with
a skewed number of interactions (some under the k-core), items drawn by a Zipf-like popularity (so some
(user, item) pairs repeat: dedup), rows in global time order, row groups of 128k rows, item titles in a metadata
table. Tasks ctr + rating with data.train_windows_per_user=1 (one training target per user, plus valid and test):
the prompt shards then stay about one sample per 10 interactions, so the single-process path, which holds every
sample in memory, still fits at 10M; k_core=5. Goals (issue #15): the 'ray' driver's peak RSS within 1.5x from the
smallest to the largest size, and at the largest size the 'ray' engine no slower than 0.8x the 'local' one. Both
engines' files are compared (sha256 of every file) at every size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROW_GROUP = 128 * 1024
TASKS = ["ctr", "rating"]


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def write_log(path: Path, n_rows: int, seed: int = 0) -> dict[str, int]:
    """A synthetic interaction log of about n_rows rows (Parquet, row groups of ROW_GROUP) and its items table."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng([seed, n_rows])
    n_users = max(100, n_rows // 50)
    n_items = max(500, n_rows // 500)
    per_user = 3 + np.floor(rng.pareto(1.5, size=n_users) * 20).astype(np.int64)
    per_user = np.maximum(3, np.round(per_user * n_rows / per_user.sum())).astype(np.int64)
    user = np.repeat(np.arange(n_users, dtype=np.int64), per_user)[:n_rows]
    n = len(user)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.9
    item = rng.choice(n_items, size=n, p=pop / pop.sum())
    ts = 1_500_000_000 + rng.integers(0, 200_000_000, size=n)
    rating = rng.integers(1, 6, size=n).astype(np.float64)
    order = np.argsort(ts, kind="stable")  # a log: rows in time order, users interleaved
    user, item, ts, rating = user[order], item[order], ts[order], rating[order]
    perm_u = rng.permutation(n_users)  # raw ids not in first-seen order
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("rating", pa.float64()),
                        ("timestamp", pa.int64())])
    with pq.ParquetWriter(path, schema) as w:
        for a in range(0, n, ROW_GROUP):
            z = min(n, a + ROW_GROUP)
            w.write_table(pa.table({"user_id": pa.array([f"u{x:08d}" for x in perm_u[user[a:z]]], pa.string()),
                                    "item_id": pa.array([f"i{x:07d}" for x in item[a:z]], pa.string()),
                                    "rating": rating[a:z], "timestamp": ts[a:z]}, schema=schema))
    pq.write_table(pa.table({"item_id": [f"i{x:07d}" for x in range(n_items)],
                             "title": [f"Item {x} of the log" for x in range(n_items)]}), path.with_name("items.parquet"))
    return {"rows": n, "users": n_users, "items": n_items}


def data_config(table: Path, out: Path, ray_cpus: int, store_mb: int):
    from ckf_dist.config import ColumnMap, DataConfig

    return DataConfig(source="table", path=str(table), metadata_path=str(table.with_name("items.parquet")),
                      columns=ColumnMap(), prepared_dir=str(out), tasks=list(TASKS), k_core=5,
                      train_windows_per_user=1, ray_num_cpus=ray_cpus, ray_object_store_mb=store_mb)


def child(args: argparse.Namespace) -> None:
    """One measured preparation; prints one JSON line."""
    import psutil

    me = psutil.Process()
    peak = {"workers": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            total = 0
            for p in me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak["workers"] = max(peak["workers"], total)

    threading.Thread(target=sample, daemon=True).start()
    from ckf_dist.data.preprocess import prepare_data

    cfg = data_config(Path(args.table), Path(args.out), args.ray_cpus, args.object_store_mb)
    t0 = time.perf_counter()
    m = prepare_data(cfg, force=True, engine=args.engine)
    took = time.perf_counter() - t0
    stop.set()
    print("RESULT " + json.dumps({
        "seconds": took, "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ray_processes_peak_rss_mb": peak["workers"] / 2**20, "raw_rows_read": m["raw_rows_read"],
        "users": m["num_users"], "items": m["num_items"], "samples": sum(sum(c.values()) for c in m["counts"].values()),
        "files": {k: v["sha256"] for k, v in m["files"].items()}}), flush=True)


def run_one(engine: str, table: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--engine", engine, "--table", str(table), "--out", str(out),
           "--ray-cpus", str(args.ray_cpus), "--object-store-mb", str(args.object_store_mb)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"{engine} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1M", "10M"], help="interactions per log (1M, 300k, 10M, ...)")
    ap.add_argument("--engines", nargs="+", default=["ray", "local"], choices=["ray", "local"])
    ap.add_argument("--ray-cpus", type=int, default=2, help="data.ray_num_cpus of the local Ray (default 2 = cores)")
    ap.add_argument("--object-store-mb", type=int, default=2048)
    ap.add_argument("--work", default=None, help="folder for the logs and outputs (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gen", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--table", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.gen:
        print("RESULT " + json.dumps(write_log(Path(args.table), args.gen)), flush=True)
        return

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="ckf-scale-")
    work = Path(args.work or tmp.name)
    results = []
    for size in args.sizes:
        n = parse_size(size)
        d = work / size
        d.mkdir(parents=True, exist_ok=True)
        table = d / "interactions.parquet"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--gen", str(n), "--table", str(table)], check=True,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        log = json.loads(p.stdout.split("RESULT ", 1)[1])
        print(f"[{size}] log: {log} written in {time.perf_counter() - t0:.1f}s", flush=True)
        got = {}
        for engine in args.engines:
            r = run_one(engine, table, d / f"prepared-{engine}", args)
            r["rows_per_s"] = log["rows"] / r["seconds"]
            got[engine] = r
            print(f"[{size}] {engine}: {r['seconds']:.1f}s, {r['rows_per_s']:,.0f} rows/s, driver peak RSS "
                  f"{r['driver_peak_rss_mb']:.0f} MB, Ray processes peak {r['ray_processes_peak_rss_mb']:.0f} MB",
                  flush=True)
            import shutil

            shutil.rmtree(d / f"prepared-{engine}", ignore_errors=True)
        same = None
        if len(got) == 2:
            same = got["ray"]["files"] == got["local"]["files"]
        for engine, r in got.items():
            results.append({"size": size, "rows": log["rows"], "engine": engine, "identical_files": same,
                            **{k: v for k, v in r.items() if k != "files"}, "num_files": len(r["files"])})
        table.unlink()

    print("\n| size | engine | rows | s | rows/s | driver peak RSS MB | Ray processes peak RSS MB | same files |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size']} | {r['engine']} | {r['rows']:,} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | "
              f"{r['driver_peak_rss_mb']:.0f} | {r['ray_processes_peak_rss_mb']:.0f} | {r['identical_files']} |")
    by = {(r["size"], r["engine"]): r for r in results}
    small, large = args.sizes[0], args.sizes[-1]
    goals = []
    if ("ray" in args.engines) and len(args.sizes) > 1:
        ratio = by[(large, "ray")]["driver_peak_rss_mb"] / by[(small, "ray")]["driver_peak_rss_mb"]
        goals.append({"goal": f"ray driver peak RSS {large} / {small} <= 1.5", "value": round(ratio, 3),
                      "pass": ratio <= 1.5})
        if "local" in args.engines:
            lr = by[(large, "local")]["driver_peak_rss_mb"] / by[(small, "local")]["driver_peak_rss_mb"]
            print(f"local driver peak RSS {large} / {small}: {lr:.2f}x")
    if {"ray", "local"} <= set(args.engines):
        speed = by[(large, "local")]["seconds"] / by[(large, "ray")]["seconds"]
        goals.append({"goal": f"ray speed / local speed at {large} >= 0.8", "value": round(speed, 3),
                      "pass": speed >= 0.8})
        goals.append({"goal": "byte-identical files at every size",
                      "value": all(r["identical_files"] for r in results), "pass": all(r["identical_files"]
                                                                                      for r in results)})
    for g in goals:
        print(f"{'PASS' if g['pass'] else 'FAIL'}: {g['goal']} (got {g['value']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "goals": goals, "cpus": os.cpu_count()}, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
