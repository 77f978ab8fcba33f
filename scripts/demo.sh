#!/usr/bin/env bash
# The README's main command: sets up .venv and runs the demo job on an embedded Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/qwen3vl-ray demo "$@"
