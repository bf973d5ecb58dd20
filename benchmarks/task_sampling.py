"""Uniform vs gradient-balanced task sampling for the same number of steps, on the synthetic data.

Runs the main job (2 CPU ranks by default) for each sampler and seed, then prints every task's metric per sampler
with its seed spread (the noise band) and checks the goal: the worst task improves and no task drops by more than
its noise band.

    python benchmarks/task_sampling.py --seeds 0 1 2 --steps 150 [overrides...]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.run_utils import env, launcher_cmd  # noqa: E402

# One headline metric per task and whether higher is better.
HEADLINE = {"ctr": ("auc_ctr", True), "topk": ("ndcg@10_topk", True), "rating": ("rmse_rating", False),
            "exp": ("rougeL_exp", True)}


def normalised(task: str, value: float, candidates: int = 10) -> float:
    if task == "ctr":
        return (value - 0.5) / 0.5
    if task == "topk":
        chance = sum(1 / math.log2(i + 1) for i in range(1, candidates + 1)) / candidates
        return (value - chance) / (1 - chance)
    if task == "rating":
        return 1 - value / 4
    return value


def run(sampler: str, seed: int, steps: int, out: Path, nproc: int, extra: list[str]) -> dict:
    run_dir = out / f"{sampler}-seed{seed}"
    if (run_dir / "metrics.json").is_file():  # finished earlier: reuse (delete the folder to rerun)
        print(f"  {sampler:>13} seed {seed}: reusing {run_dir}", flush=True)
        return json.loads((run_dir / "metrics.json").read_text())["CKF"]
    overrides = ["--config", str(ROOT / "configs" / "demo.yaml"), f"log.run_dir={run_dir}",
                 f"data.prepared_dir={out / 'data'}", f"train.sampler={sampler}", f"train.seed={seed}",
                 f"train.max_steps={steps}", f"train.ckpt_every={steps}", "train.resume=never", "log.progress=false",
                 "eval.baselines=[]", *extra]
    t0 = time.perf_counter()
    res = subprocess.run(launcher_cmd(nproc, overrides), cwd=ROOT, env=env(), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{sampler} seed {seed} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())["CKF"]
    print(f"  {sampler:>13} seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    return metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="runs/bench_task_sampling")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = (ROOT / args.out).resolve()
    results: dict[str, list[dict]] = {"uniform": [], "grad_balanced": []}
    for seed in args.seeds:
        for sampler in results:
            results[sampler].append(run(sampler, seed, args.steps, out, args.nproc, args.overrides))

    print(f"\n{'task':8} {'metric':14} {'uniform':>18} {'grad_balanced':>18} {'delta':>8} {'noise':>7}")
    rel_gain, ok_noise = {}, True
    for task, (key, higher) in HEADLINE.items():
        vals = {s: [m[key] for m in rs if m.get(key) is not None] for s, rs in results.items()}
        if not vals["uniform"] or not vals["grad_balanced"]:
            continue
        mu = {s: statistics.mean(v) for s, v in vals.items()}
        sd = {s: statistics.pstdev(v) if len(v) > 1 else 0.0 for s, v in vals.items()}
        delta = (mu["grad_balanced"] - mu["uniform"]) * (1 if higher else -1)  # > 0 = better
        noise = 2 * max(sd["uniform"], sd["grad_balanced"])
        rel_gain[task] = (mu["uniform"], delta)
        ok_noise &= delta >= -noise
        print(f"{task:8} {key:14} {mu['uniform']:>10.4f}±{sd['uniform']:.4f} {mu['grad_balanced']:>10.4f}±"
              f"{sd['grad_balanced']:.4f} {delta:>+8.4f} {noise:>7.4f}")
    # "Worst" task: the lowest score on a common 0-1 scale between chance and perfect (AUC: 0.5 -> 1; NDCG@10:
    # random ranking of the candidates -> 1; RMSE: 4 (worst on a 1-5 scale) -> 0; ROUGE-L: 0 -> 1).
    worst = min(rel_gain, key=lambda t: normalised(t, rel_gain[t][0]))
    print(f"\nworst task under uniform: {worst}; change with grad_balanced: {rel_gain[worst][1]:+.4f} "
          f"({'improves' if rel_gain[worst][1] > 0 else 'does not improve'})")
    print(f"no task drops by more than its noise band (2 x seed std): {ok_noise}")


if __name__ == "__main__":
    main()
