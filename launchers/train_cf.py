"""Train the CF model (CKEM) and export its tables (= `ckf-dist train-cf`).

    python launchers/train_cf.py --config configs/ml100k.yaml cf.model=lightgcn       # one process
    torchrun --nproc_per_node 2 launchers/train_cf.py --config configs/ml100k.yaml    # 2 data-parallel ranks
    python launchers/train_cf.py --ray-workers 2 --config configs/ml100k.yaml         # Ray Train, 2 workers

A thin wrapper: the code and the flags are ckf_dist/cli/train_cf.py's (`--help`).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckf_dist.cli.train_cf import main

if __name__ == "__main__":
    main(prog="launchers/train_cf.py")
