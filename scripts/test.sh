#!/usr/bin/env bash
# The README's test command: sets up .venv and runs the whole suite (slow and multi-node tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The fused codec kernels, compiled into numba's disk cache on every core first: the suite would compile them
# one at a time as tests first use them (~100 kernels at ~5-10 s each here); warm, each loads in milliseconds.
# (Skipped where the kernels are off, e.g. QWEN3VL_CODEC_KERNELS=torch: the suite then runs the torch paths.)
if .venv/bin/python -c "from qwen3vl_ray.codecs import fused; raise SystemExit(not fused.available())"; then
  .venv/bin/qwen3vl-ray warm-kernels
fi
# -X faulthandler: a crash anywhere in the process (collection, a test, a library's threads, pytest's own
# wrap-up) prints every thread's stack instead of a bare exit 139; pytest's handler covers the tests only.
# --durations: the slowest tests in every CI log, the place to start when the suite grows slow.
exec .venv/bin/python -X faulthandler -m pytest -q --durations=25 "$@"
