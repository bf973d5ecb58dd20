"""Run the main job: data -> CF -> CKF fine-tuning (ZeRO-3) -> adapters -> evaluation report.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/train.py --config configs/demo.yaml [train.lr=2e-4 ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 $(which ckf-dist) train --config configs/demo.yaml   (the same)
    torchrun --nproc_per_node 2 $(which ckf-dist) train --config configs/demo.yaml

Every stage is skipped when its output is already there; rerunning resumes from the newest complete checkpoint.
Exit status: 0 done, 2 a configuration problem or a refused resume, 75 stopped by SIGTERM / SIGUSR1 at a safe point
(a checkpoint written: rerun the same command to resume; cluster/slurm/train.sbatch requeues the job), 1 any other
failure.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from ckf_dist.cli import config_from_args, run_parser


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


def main(argv: Sequence[str] | None = None, prog: str = "ckf-dist train") -> None:
    cfg = config_from_args(run_parser(prog, __doc__).parse_intermixed_args(argv))
    from ckf_dist.data.skips import InputLossError
    from ckf_dist.pipeline import STOPPED_EXIT, RunStopped, run_pipeline
    from ckf_dist.train.checkpoint import CheckpointError
    from ckf_dist.train.loop import NonfiniteError
    from ckf_dist.train.resume import ResumeRefused
    from ckf_dist.train.runlock import RunDirLocked

    try:
        run_pipeline(cfg)
    except RunStopped as e:  # the checkpoint (if training had started) is complete
        stop(STOPPED_EXIT, f"[ckf] {e}; exit {STOPPED_EXIT}: rerun the same command to resume")
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
