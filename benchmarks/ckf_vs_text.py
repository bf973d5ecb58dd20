"""Does the fusion path carry the CF signal? Train CKF (CF-slot prompts) and the same LLM with text-only prompts
for the same steps on the same data, evaluate both (and the CF model alone) on the same test samples, and write
one report with all three.

    python benchmarks/ckf_vs_text.py --config configs/ml100k.yaml [overrides...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckf_dist.config import load_config
from ckf_dist.testing.jobs import env, launcher_cmd


def run(name: str, config: str, run_dir: Path, nproc: int, overrides: list[str]) -> dict:
    if (run_dir / "metrics.json").is_file():  # finished earlier: the benchmark resumes where it stopped
        print(f"{name}: reusing {run_dir}", flush=True)
        return json.loads((run_dir / "metrics.json").read_text())
    t0 = time.perf_counter()
    # log.run_dir goes last so that it wins over a log.run_dir among the user's overrides.
    cmd = launcher_cmd(nproc, ["--config", config, *overrides, f"log.run_dir={run_dir}"])
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ml100k.yaml")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    base = Path(cfg.log.run_dir)
    ckf_dir, text_dir = base / "ckf", base / "text"
    common = [*args.overrides, f"data.prepared_dir={cfg.data.prepared_dir}"]
    ckf = run("CKF", args.config, ckf_dir, args.nproc, common)
    # The text-only model shares the data, the CF tables and the base LLM, so only the prompts differ.
    text = run("LLM (text-only)", args.config, text_dir, args.nproc,
               [*common, "train.prompts=text", "eval.baselines=[]",
                f"cf.embeddings_path={ckf_dir / 'cf' / 'embeddings.safetensors'}",
                f"model.base_model={cfg.model.base_model or ckf_dir / 'base_model'}"])
    results = {"CKF": ckf["CKF"], "LLM (text-only)": text["LLM (text-only)"]}
    results.update({k: v for k, v in ckf.items() if k.startswith("CF (")})

    from ckf_dist.eval.report import format_table, write_report

    paths = write_report(base, results, tb_dir=str(ckf_dir / "tb"))
    print(format_table(results))
    a, b = results["CKF"].get("auc_ctr"), results["LLM (text-only)"].get("auc_ctr")
    if a is not None and b is not None:
        print(f"CTR AUC: CKF {a:.4f} vs text-only {b:.4f} -> difference {a - b:+.4f}")
    print("report:", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
