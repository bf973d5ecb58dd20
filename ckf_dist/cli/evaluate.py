"""Evaluate a finished run directory (CKF + baselines on the test split) and write its report.

    python launchers/evaluate.py --config configs/ml100k.yaml [eval.max_samples_per_task=200 ...]
    ckf-dist evaluate --config configs/ml100k.yaml                                                   (the same)
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/evaluate.py --config configs/ml100k.yaml   (ranks split it)

Reads the run's exported adapters, CF tables and prepared data (log.run_dir, data.prepared_dir); exit 2 when one
of them is missing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ckf_dist.cli import config_from_args, run_parser


def main(argv: Sequence[str] | None = None, prog: str = "ckf-dist evaluate") -> None:
    cfg = config_from_args(run_parser(prog, __doc__).parse_intermixed_args(argv))
    from ckf_dist.eval.run import evaluate_run

    try:
        evaluate_run(cfg)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
