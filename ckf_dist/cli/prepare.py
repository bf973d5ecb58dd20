"""Prepare the data only (read -> Ray Data preprocessing -> Parquet + WebDataset shards + manifest).

    python launchers/prepare_data.py --config configs/ml100k.yaml [data.path=/data/ml-100k] [--force] [--local]
    ckf-dist prepare --config configs/ml100k.yaml [data.path=/data/ml-100k] [--force] [--local]   (the same)
    ckf-dist prepare --config configs/demo.yaml --dry-run      (validate, say what would be built; writes nothing)

Idempotent: an up-to-date prepared dataset (same config fields, same input file hashes) is reported, not rebuilt,
unless --force. --check also runs the leakage / format checks over every sample afterwards. Exit status: 0 done,
2 a configuration problem or a missing input file, 1 input loss over data.max_skip_frac or a failed check.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ckf_dist.cli import config_from_args, run_parser
from ckf_dist.config import DataConfig


def main(argv: Sequence[str] | None = None, prog: str = "ckf-dist prepare") -> None:
    p = run_parser(prog, __doc__)
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date prepared dataset exists")
    p.add_argument("--local", action="store_true",
                   help="preprocess in this one process, not on Ray Data (even with a Ray cluster running or "
                        "RAY_ADDRESS set); the output is byte-identical")
    p.add_argument("--check", action="store_true",
                   help="after preparing, verify the leakage / format invariants over every sample")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and the input files and report what would be built (or reused); "
                        "writes nothing")
    args = p.parse_intermixed_args(argv)
    cfg = config_from_args(args)
    engine = "local" if args.local else None
    if args.dry_run:
        problems, lines = plan(cfg.data, args.force, engine)
        print("\n".join(lines))
        if problems:
            print("error: " + "\n  ".join(["the data cannot be prepared:", *problems]), file=sys.stderr)
            raise SystemExit(2)
        return

    from ckf_dist.data.preprocess import prepare_data
    from ckf_dist.data.skips import InputLossError

    t0 = time.perf_counter()
    try:
        # prepare_data prints the skip summary (counts per input file and reason, file:line examples) itself.
        m = prepare_data(cfg.data, force=args.force, engine=engine)
    except InputLossError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except FileNotFoundError as e:  # a missing input file: fix the path and rerun, nothing was written
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    took = time.perf_counter() - t0
    summary = {k: m[k] for k in ("source", "num_users", "num_items", "warm_users", "cold_users", "interactions",
                                 "counts")}
    summary["skips"] = m["skips"]["counts"]
    print(json.dumps(summary, indent=1))
    print(f"prepared {cfg.data.prepared_dir} in {took:.1f}s")
    if args.check:
        from ckf_dist.data.checks import leakage_problems

        problems = leakage_problems(cfg.data.prepared_dir)
        if problems:
            raise SystemExit("leakage / format problems:\n" + "\n".join(problems))
        print("checks passed: histories strictly earlier, no held-out item in training prompts, slots aligned")


def plan(cfg: DataConfig, force: bool, engine: str | None) -> tuple[list[str], list[str]]:
    """(problems, report) of preparing `cfg` now, reading only: the config's data checks, the input files and
    their hashes, and whether the manifest at data.prepared_dir would be reused (data/preprocess.py::stale_reasons,
    the test prepare_data itself makes)."""
    from ckf_dist.data import preprocess as pp
    from ckf_dist.data.schema import MANIFEST

    problems = list(cfg.problems("data"))
    engine = engine or os.environ.get("CKF_DATA_ENGINE", "ray")
    if engine not in ("ray", "local"):
        problems.append(f"data engine {engine!r} (CKF_DATA_ENGINE) must be 'ray' or 'local'")
    fields = {"data.path": cfg.path, "data.metadata_path": cfg.metadata_path, "data.valid_path": cfg.valid_path,
              "data.test_path": cfg.test_path} if cfg.source != "synthetic" else {}
    problems += [f"{k}={v!r} does not exist (looked for {Path(v).resolve()})" for k, v in fields.items()
                 if v and not Path(v).exists()]
    out = Path(cfg.prepared_dir)
    lines = [f"source: {cfg.source}" + (f" ({cfg.synthetic.num_users} users x {cfg.synthetic.num_items} items, "
                                        f"seed {cfg.seed})" if cfg.source == "synthetic" else ""),
             f"tasks: {', '.join(cfg.tasks)}", f"engine: {engine}", f"prepared_dir: {out.resolve()}"]
    if problems:
        return problems, lines
    inputs = pp._input_fingerprint(cfg)
    if cfg.source != "synthetic" and not inputs:
        problems.append(f"data.path={cfg.path!r}: no input files found there for data.source={cfg.source!r}")
    lines += [f"input {name}: sha256 {digest[:12]}" for name, digest in inputs.items()]
    mpath = out / MANIFEST
    if force:
        verdict = "would rebuild (--force)"
    elif not mpath.is_file():
        verdict = f"would build (no {MANIFEST} yet)"
    else:
        try:
            old = json.loads(mpath.read_text())
        except json.JSONDecodeError:
            old = {}
        why = pp.stale_reasons(cfg, out, old, pp.config_fingerprint(cfg), inputs)
        verdict = f"would rebuild ({'; '.join(why)})" if why else "up to date: would be reused, not rebuilt"
    lines.append(f"prepared data: {verdict}")
    return problems, lines
