#!/usr/bin/env bash
# The README's test command: sets up .venv and runs the whole suite (slow and multi-node tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
