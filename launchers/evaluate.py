"""Evaluate a finished run directory and write its report (= `ckf-dist evaluate`).

    python launchers/evaluate.py --config configs/ml100k.yaml [eval.max_samples_per_task=200 ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/evaluate.py --config configs/ml100k.yaml   (ranks split it)

A thin wrapper: the code and the flags are ckf_dist/cli/evaluate.py's (`--help`).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckf_dist.cli.evaluate import main

if __name__ == "__main__":
    main(prog="launchers/evaluate.py")
