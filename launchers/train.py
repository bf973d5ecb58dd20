"""Main job: data -> CF -> CKF fine-tuning (ZeRO-3) -> adapters -> evaluation report.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml [train.lr=2e-4 ...]
"""

import os
import sys
import traceback
from typing import NoReturn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckf_dist.cli import parse_run_args
from ckf_dist.data.skips import InputLossError
from ckf_dist.pipeline import run_pipeline
from ckf_dist.train.checkpoint import CheckpointError
from ckf_dist.train.loop import NonfiniteError
from ckf_dist.train.resume import ResumeRefused
from ckf_dist.train.runlock import RunDirLocked


def stop(code: int, message: str | None = None) -> NoReturn:
    """Print `message` (else the current traceback) and exit at once. Interpreter teardown is skipped: with a dead
    peer, process-group destructors can block forever."""
    if message is None:
        traceback.print_exc()
    else:
        print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cfg = parse_run_args(prog="launchers/train.py", description=__doc__)
    try:
        run_pipeline(cfg)
    except ResumeRefused as e:  # a configuration problem (the changed fields and the ways out): exit 2 like one
        stop(2, f"error: {e}")
    except (InputLossError, RunDirLocked, CheckpointError, NonfiniteError) as e:  # the message says it all
        stop(1, f"error: {e}")
    except RuntimeError as e:
        if str(e).startswith("rank 0 failed: "):  # rank 0 prints the error; the others say why they stop
            stop(1, f"[rank {os.environ.get('RANK', '?')}] stopping: {e}")
        stop(1)
    except BaseException:  # noqa: BLE001
        stop(1)
