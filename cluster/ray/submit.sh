#!/bin/bash
# Submit the main job to a running Ray cluster: one Ray Train worker per GPU (or CPU process on a CPU cluster).
#   ssh -N -L 8265:localhost:8265 ubuntu@HEAD &     # the dashboard listens on the head's loopback (cluster.yaml)
#   RAY_ADDRESS=http://localhost:8265 CKF_STORAGE=/shared/ckf cluster/ray/submit.sh 16 configs/llama7b_ml1m.yaml [overrides...]
# CKF_STORAGE: a folder every node mounts (NFS, Lustre); relative log.run_dir / data.prepared_dir land under it.
# GPUs are used when the cluster has them (--gpu auto); a lost worker restarts the workers from the newest
# checkpoint up to CKF_MAX_FAILURES (default 2) times.
set -euo pipefail
WORKERS=${1:?usage: cluster/ray/submit.sh NUM_WORKERS CONFIG [overrides...]}; CONFIG=${2:?config}; shift 2
STORAGE=${CKF_STORAGE:?set CKF_STORAGE to a folder every Ray node sees (shared file system)}
ray job submit --working-dir . --runtime-env-json '{"excludes": [".venv", "runs", ".whl"]}' -- \
  python launchers/ray_job.py --num-workers "$WORKERS" --storage "$STORAGE" \
  --max-failures "${CKF_MAX_FAILURES:-2}" --config "$CONFIG" "$@"
