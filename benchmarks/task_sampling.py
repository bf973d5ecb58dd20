"""Uniform vs gradient-balanced task sampling for the same number of steps, on the synthetic data.

Runs the main job (2 CPU ranks by default) for each sampler and seed, then prints every task's metric per sampler
with its seed spread (the noise band) and checks the goal: the worst task improves and no task drops by more than
its noise band.

    python benchmarks/task_sampling.py --seeds 0 1 2 --steps 200 [overrides...]

Run folders are <out>/uniform-seed<S> and <out>/grad_balanced[-<tag>]-seed<S>; a folder with metrics.json is reused,
so several balanced variants (--tag, with --sampler-args such as train.sampler_temperature=2 that only the balanced
runs get) can be compared against one set of uniform runs in the same --out. Overrides after the options go to
every run (e.g. eval.max_samples_per_task=400: the whole synthetic test split).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckf_dist.testing.jobs import env, launcher_cmd

# One headline metric per task and whether higher is better.
# Top-K: HR@1 (1-of-10 accuracy, the paper's metric; eval.ks no longer allows a cut-off that cannot fail).
HEADLINE = {"ctr": ("auc_ctr", True), "topk": ("hr@1_topk", True), "rating": ("rmse_rating", False),
            "exp": ("rougeL_exp", True)}


def normalised(task: str, value: float, candidates: int = 10) -> float:
    if task == "ctr":
        return (value - 0.5) / 0.5
    if task == "topk":
        chance = 1 / candidates  # HR@1 of a random ranking
        return (value - chance) / (1 - chance)
    if task == "rating":
        return 1 - value / 4
    return value / 100  # ROUGE-L is reported in percent


def run(sampler: str, seed: int, steps: int, out: Path, nproc: int, extra: list[str], tag: str = "") -> dict:
    run_dir = out / f"{sampler}{'-' + tag if tag else ''}-seed{seed}"
    if (run_dir / "metrics.json").is_file():  # finished earlier: reuse (delete the folder to rerun)
        print(f"  {run_dir.name}: reusing {run_dir}", flush=True)
        return json.loads((run_dir / "metrics.json").read_text())["CKF"]
    overrides = ["--config", str(ROOT / "configs" / "demo.yaml"), f"log.run_dir={run_dir}",
                 f"data.prepared_dir={out / 'data'}", f"train.sampler={sampler}", f"train.seed={seed}",
                 f"train.max_steps={steps}", f"train.ckpt_every={steps}", "train.resume=never", "log.progress=false",
                 "eval.baselines=[]", *extra]
    t0 = time.perf_counter()
    res = subprocess.run(launcher_cmd(nproc, overrides), check=False, cwd=ROOT, env=env(), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{sampler} seed {seed} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())["CKF"]
    print(f"  {run_dir.name}: {time.perf_counter() - t0:.0f}s", flush=True)
    return metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="runs/bench_task_sampling")
    p.add_argument("--tag", default="", help="name of the balanced variant (its run folders: grad_balanced-<tag>-...)")
    p.add_argument("--sampler-args", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for the grad_balanced runs only, e.g. train.sampler_temperature=2")
    p.add_argument("--only", choices=["uniform", "grad_balanced"], help="run one sampler only (no table)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = (ROOT / args.out).resolve()
    results: dict[str, list[dict]] = {"uniform": [], "grad_balanced": []}
    for seed in args.seeds:
        for sampler in ("uniform", "grad_balanced"):
            if args.only and sampler != args.only:
                continue
            balanced = sampler == "grad_balanced"
            results[sampler].append(run(sampler, seed, args.steps, out, args.nproc,
                                        [*args.overrides, *(args.sampler_args if balanced else [])],
                                        args.tag if balanced else ""))
    if args.only:
        return

    print(f"\n{'task':8} {'metric':14} {'uniform':>18} {'grad_balanced':>18} {'delta':>8} {'noise':>7} {'scale01':>8}")
    rel_gain, ok_noise, per_seed = {}, True, {}
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
              f"{sd['grad_balanced']:.4f} {delta:>+8.4f} {noise:>7.4f} {normalised(task, mu['uniform']):>8.3f}")
        per_seed[task] = vals
    print(f"\nper seed ({' '.join(map(str, args.seeds))}):")
    for task, vals in per_seed.items():
        print(f"  {task:8} " + "   ".join(f"{s}: " + " ".join(f"{v:.4f}" for v in vs) for s, vs in vals.items()))
    # "Worst" task (scale01 column, uniform mean): the lowest score on a common 0-1 scale between chance and perfect (AUC: 0.5 -> 1; NDCG@10:
    # random ranking of the candidates -> 1; RMSE: 4 (worst on a 1-5 scale) -> 0; ROUGE-L: 0 -> 1).
    worst = min(rel_gain, key=lambda t: normalised(t, rel_gain[t][0]))
    print(f"\nworst task under uniform: {worst}; change with grad_balanced: {rel_gain[worst][1]:+.4f} "
          f"({'improves' if rel_gain[worst][1] > 0 else 'does not improve'})")
    print(f"no task drops by more than its noise band (2 x seed std): {ok_noise}")


if __name__ == "__main__":
    main()
