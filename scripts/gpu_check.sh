#!/usr/bin/env bash
# The prepared GPU check (issue 12): the CUDA tests, the codec benchmark on the GPU, the tier benchmark with a
# device tier on the GPU and the connector benchmark, each with its own time limit, each writing its output
# (and its JSON) into RESULTS_DIR, then a summary table (also RESULTS_DIR/summary.json).
#
#   bash scripts/gpu_check.sh [--cpu] RESULTS_DIR      exit 0 when no step failed, 1 otherwise, 2 on bad usage
#   bash scripts/gpu_check.sh --fetch-wheels [PYVER]   with internet: the wheels a bare GPU image lacks -> .whl/
#
# Made for a bare GPU image without internet: the steps run in a fresh venv over the given python (whose
# packages, torch included, stay visible), with the repository on PYTHONPATH (nothing to build or download),
# and wheels found in .whl/ installed offline. The time limits add up to 7 minutes, so a run stays under 8
# even when every step runs into its limit.
#
# Environment:
#   GPU_CHECK_PYTHON  the python to run on (default python3)
#   GPU_CHECK_DEVICE  cpu: as --cpu (the same steps on CPU with tiny sizes, so CI runs the script end to end)
#   GPU_CHECK_VENV    none: run on GPU_CHECK_PYTHON itself, no venv (CI: a venv costs time there)
#   GPU_CHECK_STEPS   only these steps (space-separated; default all): rerun one step after a fix
#   GPU_CHECK_WHEELS  the folder of wheels to install offline (default .whl)
#   GPU_CHECK_BREAK   this step fails on purpose (tests that a failure is reported and the rest still runs)
set -uo pipefail

STEPS_ALL="env cuda_tests codecs tiers connector pools"
MODE=${GPU_CHECK_DEVICE:-cuda}
BASE_PY=${GPU_CHECK_PYTHON:-python3}

usage() {
  echo "usage: bash scripts/gpu_check.sh [--cpu] RESULTS_DIR | --fetch-wheels [PYVER]  (see the comment at its top)" >&2
  exit 2
}

# Wheels of the project's dependencies that the bare GPU image lacks (zstandard: the codecs import it;
# nvidia-ml-py: the metrics' GPU readings), for its python (3.12 there), downloaded here into .whl/.
fetch_wheels() {
  local pyver=${1:-3.12}
  cd "$(dirname "$0")/.." || exit 1
  mkdir -p .whl
  "$BASE_PY" -m pip download --only-binary=:all: --no-deps --python-version "$pyver" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl "zstandard>=0.22" "nvidia-ml-py>=12"
  exit $?
}

RES=""
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) MODE=cpu ;;
    --fetch-wheels) shift; fetch_wheels "$@" ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) [ -z "$RES" ] || usage; RES=$1 ;;
  esac
  shift
done
[ -n "$RES" ] || usage
case $MODE in cuda|cpu) ;; *) echo "GPU_CHECK_DEVICE must be cuda or cpu, got $MODE" >&2; exit 2 ;; esac
mkdir -p "$RES" && RES=$(cd "$RES" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
PY=$BASE_PY
WHEEL_DISTS=""  # the distributions the wheels installed, whose versions env.json reports
T_START=$SECONDS

# One line per step in the summary: name, status (ok, failed, timeout, skipped), seconds, note.
NAMES=() STATUS=() SECS=() NOTES=()
record() {
  NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); NOTES+=("$4")
}

wanted() {
  [[ " ${GPU_CHECK_STEPS:-$STEPS_ALL} " == *" $1 "* ]]
}

# run_step NAME LIMIT_S json|log CMD...: CMD under a time limit, its stdout in NAME.log and stderr in
# NAME.stderr.log; for json steps the last stdout line (the benchmarks' --json) must parse and goes to
# NAME.json. A failing step is recorded, never fatal: the next steps still run.
run_step() {
  local name=$1 limit=$2 kind=$3 rc t0=$SECONDS status=ok note=""
  shift 3
  if ! wanted "$name"; then
    record "$name" skipped 0 "not in GPU_CHECK_STEPS"
    return
  fi
  if [ "${GPU_CHECK_BREAK:-}" = "$name" ]; then
    set -- "$PY" -c 'import sys; sys.exit("failed on purpose: GPU_CHECK_BREAK names this step")'
  fi
  local shown="$*"
  echo "== $name (limit ${limit}s): ${shown%%$'\n'*}"
  timeout -k 5 "$limit" "$@" >"$RES/$name.log" 2>"$RES/$name.stderr.log"
  rc=$?
  [ -s "$RES/$name.stderr.log" ] || rm -f "$RES/$name.stderr.log"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status=timeout note="killed after ${limit}s"
  elif [ $rc -ne 0 ]; then
    status=failed note="exit $rc; see $name.log"
  fi
  if [ "$kind" = json ] && ! tail -n 1 "$RES/$name.log" | "$PY" -c \
      'import json, sys; json.dump(json.loads(sys.stdin.read()), open(sys.argv[1], "w"), indent=1)' "$RES/$name.json" 2>/dev/null; then
    rm -f "$RES/$name.json"
    [ $status != ok ] || { status=failed note="no JSON on the last line of $name.log"; }
  fi
  record "$name" "$status" $((SECONDS - t0)) "$note"
  echo "   $status${note:+ ($note)}"
}

# The python the steps run on: a venv with --system-site-packages over BASE_PY. When BASE_PY is itself a
# venv's (the GPU image's /opt/torch/.venv), the new venv would see only the interpreter's own packages,
# not that venv's, so a .pth file adds BASE_PY's site directories after the new venv's own.
setup() {
  local t0=$SECONDS site note w wheels=("${GPU_CHECK_WHEELS:-.whl}"/*.whl)
  [ -e "${wheels[0]}" ] || wheels=()
  if [ "${GPU_CHECK_VENV:-}" = none ]; then
    site=$WORK/site  # wheels go here, on PYTHONPATH, rather than into the caller's environment
    mkdir -p "$site"
    export PYTHONPATH=$site:$REPO${PYTHONPATH:+:$PYTHONPATH}
    note="no venv: $PY"
  else
    # --without-pip: quick, and works where the interpreter has no ensurepip; BASE_PY's pip stays visible
    if ! "$BASE_PY" -m venv --system-site-packages --without-pip "$WORK/venv" >"$RES/setup.log" 2>&1; then
      record setup failed $((SECONDS - t0)) "venv failed, steps run on $BASE_PY; see setup.log"
      export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
      return
    fi
    PY=$WORK/venv/bin/python
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$BASE_PY" -c 'import sys; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in sys.path
                   if p.endswith(("site-packages", "dist-packages"))))' >"$site/_gpu_check_base.pth"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    note="venv over $BASE_PY"
  fi
  if [ ${#wheels[@]} -gt 0 ]; then
    # offline, no dependencies: the wheels are exactly what is missing; without pip a wheel (no .data
    # folder, as these have none) installs by unpacking it into the site directory
    if "$PY" -m pip --version >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --target "$site" "${wheels[@]}" >>"$RES/setup.log" 2>&1
    else
      (for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$site" || exit 1; done) >>"$RES/setup.log" 2>&1
    fi || { record setup failed $((SECONDS - t0)) "installing the wheels failed; see setup.log"; return; }
    note="$note; ${#wheels[@]} wheels from ${GPU_CHECK_WHEELS:-.whl}/"
    for w in "${wheels[@]}"; do w=${w##*/}; WHEEL_DISTS+=" ${w%%-*}"; done
  fi
  if ! "$PY" -c 'import torch' >>"$RES/setup.log" 2>&1; then
    record setup failed $((SECONDS - t0)) "torch does not import; see setup.log"
    return
  fi
  record setup ok $((SECONDS - t0)) "$note"
}

# Facts about the machine (and the versions the wheels installed) into env.json, nvidia-smi into nvidia-smi.txt;
# fails on a GPU run when CUDA is not usable.
ENV_PY='
import importlib.metadata, importlib.util, json, os, platform, sys
import torch
cuda = torch.cuda.is_available()
mods = {m: importlib.util.find_spec(m) is not None for m in ("ray", "vllm", "zstandard", "pynvml", "numba", "xxhash", "transformers")}
vers = {}
for m in ("numba", "numpy", "transformers", "triton"):
    try:
        vers[m] = __import__(m).__version__
    except Exception as e:
        vers[m] = f"not importable: {type(e).__name__}"
wheels = {}
for d in os.environ["GPU_CHECK_WHEEL_DISTS"].split():
    try:
        wheels[d] = importlib.metadata.version(d)
    except importlib.metadata.PackageNotFoundError:
        wheels[d] = "not installed"
gpus = [{"name": torch.cuda.get_device_name(i), "capability": list(torch.cuda.get_device_capability(i)),
         "memory_gib": torch.cuda.get_device_properties(i).total_memory / 2**30} for i in range(torch.cuda.device_count())] if cuda else []
facts = {"mode": os.environ["GPU_CHECK_MODE"], "git_commit": os.environ.get("GPU_CHECK_COMMIT", ""),
         "python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
         "cpus": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "cuda_available": cuda, "gpus": gpus, "modules": mods, "versions": vers, "wheels": wheels}
print(json.dumps(facts))
if os.environ["GPU_CHECK_MODE"] == "cuda" and not cuda:
    sys.exit("CUDA is not available to torch")
'
step_env() {
  if wanted env; then
    timeout 20 nvidia-smi >"$RES/nvidia-smi.txt" 2>&1 || echo "nvidia-smi: not available or failed" >>"$RES/nvidia-smi.txt"
  fi
  GPU_CHECK_MODE=$MODE GPU_CHECK_COMMIT=$(git rev-parse HEAD 2>/dev/null) GPU_CHECK_WHEEL_DISTS=$WHEEL_DISTS run_step env 20 json "$PY" -c "$ENV_PY"
}

# The tests that use CUDA where it is present: the CUDA-only ones (codecs, pools) and the device tier's,
# which put its pool on the GPU (they run on CPU without one).
step_cuda_tests() {
  run_step cuda_tests 80 log "$PY" -m pytest -q -m "not slow" -p no:cacheprovider --junitxml="$RES/cuda_tests.xml" \
    tests/test_codecs.py tests/test_pools.py tests/test_tiers.py tests/test_codecs_triton.py -k "cuda or device or pinned"
}

# The codecs whose speed targets are judged (and none, the codec path without compression), on the GPU, at the
# realistic sizes too, with the Triton kernels and on the torch paths they replace (the CPU run: torch only, the
# Triton kernels need a GPU). No checkpoint KV: it measures error, not speed, and needs a model generated with
# transformers.
step_codecs() {
  local args=(--device cuda --repeats 5 --kernels both)
  [ "$MODE" = cpu ] && args=(--device cpu --repeats 1 --kernels torch --threads 1 --no-large)
  run_step codecs 120 json "$PY" -m benchmarks.codecs --json "${args[@]}" --kv-from-checkpoint none \
    --codecs none int8 kv-int8 kv-int4
}

# Host and disk tiers as always, plus a device tier on the GPU against d2d/h2d/d2h copies in the same run.
step_tiers() {
  local args=(--device-tier cuda)
  [ "$MODE" = cpu ] && args=(--device-tier cpu --device-only --sizes 1 --reps 3)
  run_step tiers 120 json "$PY" -m benchmarks.tiers --json --dir "$WORK" "${args[@]}"
}

# The connector's data path; only where vLLM is installed (the bare GPU image has none).
step_connector() {
  local args=()
  [ "$MODE" = cpu ] && args=(--quick)
  if wanted connector && ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)'; then
    record connector skipped 0 "vllm not installed"
    return
  fi
  run_step connector 80 json "$PY" -m benchmarks.connector --json --dir "$WORK" "${args[@]}"
}

# benchmarks.pools measures CPU pools only (no CUDA rows): nothing for this check to add.
step_pools() {
  record pools skipped 0 "benchmarks.pools has no CUDA rows"
}

summary() {
  local i failed=0
  printf '\n%-12s %-8s %7s  %s\n' step status seconds note
  for i in "${!NAMES[@]}"; do
    printf '%-12s %-8s %7s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
    case ${STATUS[$i]} in failed|timeout) failed=1 ;; esac
  done
  printf 'mode %s, %ss in all, results in %s\n' "$MODE" $((SECONDS - T_START)) "$RES"
  for i in "${!NAMES[@]}"; do
    printf '%s\t%s\t%s\t%s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
  done | "$PY" -c '
import json, sys
steps = [dict(zip(("step", "status", "seconds", "note"), l.rstrip("\n").split("\t"))) for l in sys.stdin]
for s in steps:
    s["seconds"] = int(s["seconds"])
json.dump({"mode": sys.argv[1], "seconds": int(sys.argv[2]), "steps": steps,
           "failed": [s["step"] for s in steps if s["status"] in ("failed", "timeout")]}, open(sys.argv[3], "w"), indent=1)
' "$MODE" $((SECONDS - T_START)) "$RES/summary.json"
  return $failed
}

setup
step_env
step_cuda_tests
step_codecs
step_tiers
step_connector
step_pools
summary
