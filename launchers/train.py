"""Main job: data -> CF -> CKF fine-tuning (ZeRO-3) -> adapters -> evaluation report.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml [train.lr=2e-4 ...]
"""

import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckf_dist.cli import parse_run_args
from ckf_dist.pipeline import run_pipeline

if __name__ == "__main__":
    cfg = parse_run_args(prog="launchers/train.py", description=__doc__)
    try:
        run_pipeline(cfg)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter teardown: with a dead peer, process-group destructors can block forever.
        os._exit(1)
