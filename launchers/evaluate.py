"""Evaluate a finished run directory (CKF + baselines on the test split) and write its report.

    python launchers/evaluate.py --config configs/ml100k.yaml [eval.max_samples_per_task=200 ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/evaluate.py --config configs/ml100k.yaml   (ranks split it)
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckf_dist.cli import parse_run_args
from ckf_dist.eval.run import evaluate_run

if __name__ == "__main__":
    cfg = parse_run_args(prog="launchers/evaluate.py", description=__doc__)
    try:
        evaluate_run(cfg)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
