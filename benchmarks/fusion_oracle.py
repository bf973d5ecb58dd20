"""Ablations of the fusion knobs on the fusion oracle (ckf_dist/testing/fusion_oracle.py): CTR data whose label only
the CF vectors carry. Prints CTR AUC per variant and seed, and writes JSON.

    python benchmarks/fusion_oracle.py --seeds 0 1 [--steps 1500] [--out /tmp/fusion_oracle.json]

Each run trains the tiny CKF model for `--steps` steps of 32 rows (about 1 minute on one core).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckf_dist.testing.fusion_oracle import OracleRun, run_oracle, tiny_llm_dir

VARIANTS = {
    "CKF (token-norm init, fusion lr x3.3)": {},
    "CKF, nn.Linear init, fusion lr x1": {"fusion_init": "default", "fusion_lr_scale": 1.0},
    "CKF, nn.Linear init": {"fusion_init": "default"},
    "CKF, fusion lr x1": {"fusion_lr_scale": 1.0},
    "CKF, d=16": {"dim": 16},
    "text-only LLM": {"variant": "text"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    p.add_argument("--out", default="fusion_oracle.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    llm_dir = tiny_llm_dir(Path(tempfile.mkdtemp(prefix="fusion_oracle_")))
    results: dict[str, list[float]] = {}
    for name, knobs in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            run = dataclasses.replace(OracleRun(steps=args.steps, seed=seed), **knobs)
            r = run_oracle(run, llm_dir)
            results.setdefault(name, []).append(r["auc_ctr"])
            print(f"{name:50s} seed {seed}: AUC {r['auc_ctr']:.3f} ({r['seconds']:.0f}s)", flush=True)
    print(f"\nfusion oracle, {args.steps} steps x 32 rows, CTR AUC on 600 held-out pairs (chance 0.5)")
    for name, aucs in results.items():
        spread = f" ± {statistics.stdev(aucs):.3f}" if len(aucs) > 1 else ""
        print(f"{name:50s} {statistics.mean(aucs):.3f}{spread}  {[round(a, 3) for a in aucs]}")
    Path(args.out).write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "auc_ctr": results}, indent=1))


if __name__ == "__main__":
    main()
