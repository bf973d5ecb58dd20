"""Prepare a dataset and print its counts (= `ckf-dist prepare`).

    python launchers/prepare_data.py --config configs/ml100k.yaml [data.path=/data/ml-100k] [--force] [--local]
    python launchers/prepare_data.py --config my.yaml --check       # then verify leakage / format invariants
    python launchers/prepare_data.py --config my.yaml --dry-run     # validate and report; writes nothing

A thin wrapper: the code and the flags are ckf_dist/cli/prepare.py's (`--help`).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckf_dist.cli.prepare import main

if __name__ == "__main__":
    main(prog="launchers/prepare_data.py")
