"""Memory of one training rank's data stream: TaskStream (data.stream=local: the task's shards in memory) vs
RayTaskStream (data.stream=ray: windows read through Ray Data), at two split sizes, in one run.

    python benchmarks/stream_memory.py [--sizes 100000 400000] [--payload-bytes 1000] [--read 20000] [--json F]

Each (stream, size) runs in a fresh child process that opens the stream of one task (rank 0 of 2), reads `--read`
samples and reports its peak RSS (VmHWM) and the peak above its own baseline (RSS after imports and, for Ray,
after joining the local Ray, before the stream opens). The shards are written here by `write_task_shards` with a
manifest of the prepared layout; each sample is a PromptSample-shaped JSON of about `--payload-bytes` bytes.
Goal: RayTaskStream's peak above baseline flat (within 1.5x) from the small to the large split; TaskStream's grows
with the split.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MB. Not getrusage's ru_maxrss: it survives fork + exec, so a
    child would report the benchmark parent's peak (the parent holds the payloads while it writes the shards)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return status_mb("VmRSS")


def write_split(root: Path, n: int, payload_bytes: int, shard_size: int) -> None:
    from ckf_dist.data.schema import MANIFEST
    from ckf_dist.data.shards import dumps_sample, write_task_shards

    filler = "x" * max(0, payload_bytes - 300)
    payloads = []
    for k in range(n):
        key = f"train/ctr/{k // 8}/{k % 8}"
        s = {"key": key, "task": "ctr", "split": "train", "uid": k // 8, "history": [1, 2, 3, 4], "slot_items": [5],
             "prompt_cf": "User <u> liked ...", "prompt_text": filler, "answer": "Yes", "label": 1.0,
             "candidates": [], "candidate_titles": [], "item": k % 100, "is_cold": False}
        payloads.append((key, dumps_sample(s)))
    files = write_task_shards(root, "train", "ctr", payloads, shard_size)
    man = {"counts": {"train": {"ctr": n}}, "shards": {"train": {"ctr": [str(f.relative_to(root)) for f in files]}},
           "config": {"shard_size": shard_size}}
    (root / MANIFEST).write_text(json.dumps(man))


def child(kind: str, prepared: str, read: int, window: int) -> None:
    if kind == "ray":
        from ckf_dist.data.preprocess import init_local_ray
        from ckf_dist.data.ray_stream import RayTaskStream

        init_local_ray(4, 512)
        base = rss_mb()
        stream = RayTaskStream(prepared, "train", "ctr", 0, 2, seed=0, window=window)
    else:
        from ckf_dist.data.stream import TaskStream

        base = rss_mb()
        stream = TaskStream(prepared, "train", "ctr", 0, 2, seed=0)
    t = time.perf_counter()
    for _ in range(read):
        next(stream)
    dt = time.perf_counter() - t
    peak = status_mb("VmHWM")
    print(json.dumps({"baseline_mb": base, "peak_mb": peak, "peak_above_baseline_mb": peak - base,
                      "read_s": dt, "samples": stream.num_samples}))
    if hasattr(stream, "close"):
        stream.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000])
    p.add_argument("--payload-bytes", type=int, default=1000)
    p.add_argument("--read", type=int, default=20_000)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--shard-size", type=int, default=2000)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("KIND", "PREPARED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.read, args.window)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="ckf_stream_mem_") as tmp:
        for n in args.sizes:
            prepared = Path(tmp) / f"n{n}"
            write_split(prepared, n, args.payload_bytes, args.shard_size)
            for kind in ("local", "ray"):
                out = subprocess.run([sys.executable, __file__, "--child", kind, str(prepared), "--read",
                                      str(args.read), "--window", str(args.window)], capture_output=True, text=True,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
                if out.returncode != 0:
                    raise SystemExit(f"{kind} n={n} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.append({"stream": kind, "split_samples": n, **r})
                print(f"{kind:5s} split {n:>9,} samples: peak RSS {r['peak_mb']:7.0f} MB, "
                      f"{r['peak_above_baseline_mb']:7.0f} MB above baseline ({r['baseline_mb']:.0f} MB), "
                      f"{args.read:,} samples in {r['read_s']:.1f} s", flush=True)
    small, large = min(args.sizes), max(args.sizes)
    growth = {}
    for kind in ("local", "ray"):
        a = next(r for r in results if r["stream"] == kind and r["split_samples"] == small)
        b = next(r for r in results if r["stream"] == kind and r["split_samples"] == large)
        growth[kind] = b["peak_above_baseline_mb"] / max(a["peak_above_baseline_mb"], 1.0)
        print(f"{kind}: peak above baseline x{growth[kind]:.2f} from {small:,} to {large:,} samples")
    ok = growth["ray"] <= 1.5
    print(f"goal RayTaskStream flat (<= 1.5x): {'PASS' if ok else 'FAIL'} (x{growth['ray']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "growth": growth, "goal_met": ok}, indent=1))


if __name__ == "__main__":
    main()
