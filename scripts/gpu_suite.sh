#!/usr/bin/env bash
# The prepared GPU suite: the GPU test tier, then benchmarks; each tier fail-fast (a failed test tier still lets the
# benchmarks run; the exit status is the failure's), one short table printed last.
#
#   bash scripts/gpu_suite.sh                 # default: pytest -m gpu (<= 3 min) + quick benchmarks (<= 3 min)
#   bash scripts/gpu_suite.sh --full          # every benchmark (for a second call when time is left)
#   bash scripts/gpu_suite.sh --dry-run       # CPU, < 1 min: gpu tests' bodies on the CPU + tiny benchmarks
#   bash scripts/gpu_suite.sh --original third_party/VAR   # also the original VAR sampler on the same weights
#
# Runs on the machine's own torch/triton: installs nothing but this package (pip install --no-deps -e ., without
# build isolation: the GPU machine has no network to fetch setuptools). The interpreter is $PYTHON, else python3
# (the GPU image's plain `python3` holds its torch; a bare `python` may be another one or missing).
# Tables: benchmarks/gpu/*.md + .json (dry run: a temporary folder). Code: var/eval/gpu_suite.py.
set -euo pipefail
cd "$(dirname "$0")/.."
tier=quick dry=0 original=() out=benchmarks/gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --full) tier=full ;;
    --dry-run) dry=1 ;;
    --original) original=(--original "$2"); shift ;;
    --out) out="$2"; shift ;;
    *) echo "usage: $0 [--full] [--dry-run] [--original DIR] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PIP_DISABLE_PIP_VERSION_CHECK=1
py="${PYTHON:-python3}"
status=()
finish() {  # the one short table, printed last whatever happened
  echo
  echo "| gpu_suite step | result |"
  echo "|---|---|"
  for s in "${status[@]}"; do echo "$s"; done
}
trap finish EXIT
failed=0
step() {  # step NAME CMD...: run, record, stop the suite at the first failure
  local name="$1"; shift
  local t0=$SECONDS
  if "$@"; then status+=("| $name | ok ($((SECONDS - t0)) s) |"); else
    local rc=$?; status+=("| $name | FAILED rc=$rc ($((SECONDS - t0)) s) |"); exit "$rc"; fi
}
tier() {  # tier NAME CMD...: a tier stops at its own first failure (-x), the next tier still runs (GPU time is scarce)
  local name="$1"; shift
  local t0=$SECONDS
  if "$@"; then status+=("| $name | ok ($((SECONDS - t0)) s) |"); else
    local rc=$?; failed=$rc; status+=("| $name | FAILED rc=$rc ($((SECONDS - t0)) s) |"); fi
}
if [ "$dry" = 1 ]; then
  out="$(mktemp -d)"
  step "python imports var" "$py" -c "import var, var.eval.gpu_suite"
  tier "gpu tests (bodies on the CPU)" env VAR_GPU_TESTS_ON_CPU=1 VAR_KERNELS=torch \
    "$py" -m pytest -q -x -p no:cacheprovider -m gpu tests/gpu
  tier "benchmarks $tier (tiny, CPU)" "$py" -m var.eval.gpu_suite --tier "$tier" --dry-run --out "$out" "${original[@]}"
  status+=("| reports | $(ls "$out" | tr '\n' ' ') |")
  exit "$failed"
fi
unset TRITON_INTERPRET  # compiled kernels
# PYTHONPATH already imports the checkout: a failed install (say, an old setuptools) costs the console scripts only
tier "install (no deps)" "$py" -m pip install -q --no-deps --no-build-isolation -e .
step "environment" "$py" -c "import torch, triton, platform; print('GPU', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| triton', triton.__version__, '| CUDA', torch.version.cuda, '| Python', platform.python_version())"
tier "gpu tests" "$py" -m pytest -q -x -p no:cacheprovider -m gpu tests/gpu
tier "benchmarks $tier" "$py" -m var.eval.gpu_suite --tier "$tier" --out "$out" "${original[@]}"
exit "$failed"
