#!/usr/bin/env bash
# The README's test command: sets up .venv and runs the whole suite (slow and multi-node tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# -X faulthandler: pytest turns its own fault handler off when it finishes; this keeps one on through the
# interpreter's exit, so a crash in an exit hook or a library's teardown prints every thread's stack.
exec .venv/bin/python -X faulthandler -m pytest -q "$@"
