#!/bin/bash
# Submit the main job to a running Ray cluster: one Ray Train worker per GPU.
#   ssh -N -L 8265:localhost:8265 ubuntu@HEAD &     # the dashboard listens on the head's loopback (cluster.yaml)
#   RAY_ADDRESS=http://localhost:8265 cluster/ray/submit.sh 16 configs/llama7b_ml1m.yaml [overrides...]
set -euo pipefail
WORKERS=${1:?usage: cluster/ray/submit.sh NUM_WORKERS CONFIG [overrides...]}; CONFIG=${2:?config}; shift 2
ray job submit --working-dir . --runtime-env-json '{"excludes": [".venv", "runs"]}' -- \
  python launchers/ray_job.py --num-workers "$WORKERS" --gpu --address auto --config "$CONFIG" "$@"
