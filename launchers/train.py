"""Main job: data -> CF -> CKF fine-tuning (ZeRO-3) -> adapters -> evaluation report.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml [train.lr=2e-4 ...]
"""

import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckf_dist.cli import parse_run_args
from ckf_dist.data.skips import InputLossError
from ckf_dist.pipeline import run_pipeline
from ckf_dist.train.checkpoint import CheckpointError
from ckf_dist.train.loop import NonfiniteError
from ckf_dist.train.resume import ResumeRefused
from ckf_dist.train.runlock import RunDirLocked

if __name__ == "__main__":
    cfg = parse_run_args(prog="launchers/train.py", description=__doc__)
    try:
        run_pipeline(cfg)
    except ResumeRefused as e:  # a configuration problem (the changed fields and the ways out): exit 2 like one
        print(f"error: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)
    except (InputLossError, RunDirLocked, CheckpointError, NonfiniteError) as e:  # the message says it all
        print(f"error: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    except RuntimeError as e:
        if not str(e).startswith("rank 0 failed: "):  # rank 0 prints the error; the others say why they stop
            traceback.print_exc()
        else:
            print(f"[rank {os.environ.get('RANK', '?')}] stopping: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter teardown: with a dead peer, process-group destructors can block forever.
        os._exit(1)
