"""Main job: data -> CF -> CKF fine-tuning (ZeRO-3) -> adapters -> evaluation report (= `ckf-dist train`).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml [train.lr=2e-4 ...]

A thin wrapper: the code and the flags are ckf_dist/cli/train.py's (`--help`).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckf_dist.cli.train import main

if __name__ == "__main__":
    main(prog="launchers/train.py")
