"""Run the main job as a Ray Train job (the same as `ckf-dist ray-job`; flags and storage rules in
ckf_dist/cli/ray_job.py):

    python launchers/ray_job.py --num-workers 2 --config configs/demo.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python launchers/ray_job.py --num-workers 16 --storage /shared/ckf --config configs/llama7b_ml1m.yaml
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckf_dist.cli.ray_job import main

if __name__ == "__main__":
    main(prog="launchers/ray_job.py")
