#!/usr/bin/env bash
# Prepare .whl/: the Python packages benchmarks/gpu_check.py needs that a bare GPU machine's image lacks (its Python
# 3.12 has torch, transformers, peft, accelerate, pyarrow, tensorboard, ...; not deepspeed, pydantic, hjson,
# rouge-score, nltk). Run here, in the repo root, with the project's venv active (it reads the versions to pin from
# it, so the GPU machine runs what the tests ran with here). Ray and webdataset are not carried: the check prepares
# data with CKF_DATA_ENGINE=local and never imports them.
#
#   bash benchmarks/gpu_wheels.sh            # -> .whl/*.whl (git-ignored through .git/info/exclude), sizes printed
#
# On the GPU machine gpu_check.py installs them itself (pip --no-index --no-deps --target) when it finds .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.whl
PY=${PYTHON:-python3}

grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf "$OUT" && mkdir -p "$OUT"

ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# DeepSpeed as a pure-Python wheel: no CUDA ops compiled (none could be here); the venv's torch is used by setup.py
# (no build isolation, so no second torch is downloaded).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$(ver deepspeed)"

# Binary wheels for the GPU machine's Python 3.12 on x86-64 (pydantic-core is compiled).
BINARY=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson nltk)
PINNED=()
for p in "${BINARY[@]}"; do PINNED+=("$p==$(ver "$p")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT" "${PINNED[@]}"

# rouge-score is published as a source archive only: build its (pure-Python) wheel here.
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "rouge-score==$(ver rouge-score)"

ls -l "$OUT" | awk 'NR > 1 {printf "%10d  %s\n", $5, $9}'
du -sh "$OUT"
total=$(du -sb "$OUT" | cut -f1)
if [ "$total" -gt $((48 * 1024 * 1024)) ]; then
  echo "warning: .whl is $total bytes; the device call carries at most 64 MiB with the working tree" >&2
fi
