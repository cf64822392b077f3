#!/usr/bin/env bash
# The prepared GPU suite: the GPU test tier, then benchmarks; each tier fail-fast (a failed test tier still lets the
# benchmarks run; the exit status is the failure's), everything under one wall-clock budget, one short table last.
#
#   bash scripts/gpu_suite.sh --out "$OUT"     # default, <= 6 min: pytest -m gpu (<= ~3 min) + quick benchmarks
#   bash scripts/gpu_suite.sh --full --no-tests --out "$OUT" --budget-s 540   # every benchmark, a second call
#   bash scripts/gpu_suite.sh --dry-run       # CPU, < 1 min: gpu tests' bodies on the CPU + tiny benchmarks
#   bash scripts/gpu_suite.sh --original third_party/VAR   # also the original VAR sampler on the same weights
#   rerun a part: --no-bench --tests tests/gpu/test_gpu_kernel.py | --no-tests --only SECTION[,SECTION] (merged into
#   the report already in --out)
#
# Runs on the machine's own torch/triton: installs nothing but this package (pip install --no-deps -e ., without
# build isolation: the GPU machine has no network to fetch setuptools). The interpreter is $PYTHON, else python3
# (the GPU image's plain `python3` holds its torch; a bare `python` may be another one or missing).
# Output folder (--out, default benchmarks/gpu; dry run: a temporary one): <tier>-<gpu>.md + .json (every benchmark
# section, rewritten as each finishes) and gpu_suite-<tier>.log (this whole output): 3 files a call.
# Budget (--budget-s, default 360): the test tier gets at most 200 s and leaves the benchmarks >= 150 s (pytest-timeout,
# when installed, also stops any one test after 150 s); each benchmark section has its own budget inside that.
# Code: var/eval/gpu_suite.py.
set -euo pipefail
cd "$(dirname "$0")/.."
tier=quick dry=0 original=() out="" budget=360 run_tests=1 run_bench=1 only=() test_paths=()
while [ $# -gt 0 ]; do
  case "$1" in
    --full) tier=full ;;
    --dry-run) dry=1 ;;
    --original) original=(--original "$2"); shift ;;
    --out) out="$2"; shift ;;
    --budget-s) budget="$2"; shift ;;
    --no-tests) run_tests=0 ;;
    --no-bench) run_bench=0 ;;
    --only) only=(--only "$2"); shift ;;
    --tests) test_paths+=("$2"); shift ;;
    *) echo "usage: $0 [--full] [--dry-run] [--original DIR] [--out DIR] [--budget-s S] [--no-tests] [--no-bench]" \
            "[--only SECTION,...] [--tests PYTEST_PATH]..." >&2; exit 2 ;;
  esac
  shift
done
if [ ${#test_paths[@]} -eq 0 ]; then  # the kernel and the samplers first, the compiled (experimental) steps last
  test_paths=(tests/gpu/test_gpu_kernel.py tests/gpu/test_gpu_samplers.py)
  for f in tests/gpu/test_*.py; do
    case " ${test_paths[*]} " in *" $f "*) ;; *) test_paths+=("$f") ;; esac
  done
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PIP_DISABLE_PIP_VERSION_CHECK=1
py="${PYTHON:-python3}"
status=()
if [ -z "$out" ]; then
  if [ "$dry" = 1 ]; then out="$(mktemp -d)"; else out=benchmarks/gpu; fi
fi
mkdir -p "$out"
exec > >(tee -a "$out/gpu_suite-$tier.log") 2>&1  # the whole output, next to the tables
tee_pid=$!
finish() {  # the one short table, printed last whatever happened
  local rc=$?
  echo
  echo "| gpu_suite step | result |"
  echo "|---|---|"
  for s in "${status[@]}"; do echo "$s"; done
  echo "| reports in $out | $(ls "$out" | tr '\n' ' ') |"
  exec 1>&- 2>&-
  wait "$tee_pid" 2>/dev/null || true
  exit "$rc"
}
trap finish EXIT
t_start=$SECONDS
left() { echo $((budget - (SECONDS - t_start))); }
bounded() {  # bounded SECONDS CMD...: SIGINT at the limit (pytest and the benchmarks then write what they have)
  local limit="$1"; shift
  if command -v timeout >/dev/null; then timeout -s INT -k 20 "$limit" "$@"; else "$@"; fi
}
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
    local rc=$? why="FAILED"
    [ "$rc" = 124 ] && why="STOPPED at its time budget"
    failed=$rc; status+=("| $name | $why rc=$rc ($((SECONDS - t0)) s) |"); fi
}
tests_budget() {  # the test tier's seconds: <= 200 and leaving the benchmarks >= 150 (all of the rest without them)
  local t; t=$(left)
  if [ "$run_bench" = 1 ]; then t=$((t - 150)); [ "$t" -gt 200 ] && t=200; fi
  [ "$t" -lt 60 ] && t=60
  echo "$t"
}
bench_budget() { local t; t=$(($(left) - 10)); [ "$t" -lt 60 ] && t=60; echo "$t"; }
pytest_args=(-m pytest -q -x -p no:cacheprovider -m gpu -rfE --durations=15)
if "$py" -c "import pytest_timeout" 2>/dev/null; then pytest_args+=(-o timeout=150); fi
if [ "$dry" = 1 ]; then
  step "python imports var" "$py" -c "import var, var.eval.gpu_suite"
  if [ "$run_tests" = 1 ]; then
    t=$(tests_budget)
    tier "gpu tests (bodies on the CPU)" bounded "$t" env VAR_GPU_TESTS_ON_CPU=1 VAR_KERNELS=torch \
      "$py" "${pytest_args[@]}" "${test_paths[@]}"
  fi
  if [ "$run_bench" = 1 ]; then
    b=$(bench_budget)
    tier "benchmarks $tier (tiny, CPU)" bounded $((b + 60)) "$py" -m var.eval.gpu_suite --tier "$tier" --dry-run \
      --out "$out" --budget-s "$b" "${original[@]}" "${only[@]}"
  fi
  exit "$failed"
fi
unset TRITON_INTERPRET  # compiled kernels
# PYTHONPATH already imports the checkout: a failed install (say, an old setuptools) costs the console scripts only
tier "install (no deps)" "$py" -m pip install -q --no-deps --no-build-isolation -e .
step "environment" "$py" -c "import torch, triton, platform; print('GPU', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| triton', triton.__version__, '| CUDA', torch.version.cuda, '| Python', platform.python_version())"
if [ "$run_tests" = 1 ]; then
  t=$(tests_budget)
  tier "gpu tests (<= $t s)" bounded "$t" "$py" "${pytest_args[@]}" "${test_paths[@]}"
fi
if [ "$run_bench" = 1 ]; then
  b=$(bench_budget)
  tier "benchmarks $tier (<= $b s)" bounded $((b + 60)) "$py" -m var.eval.gpu_suite --tier "$tier" --out "$out" \
    --budget-s "$b" "${original[@]}" "${only[@]}"
fi
exit "$failed"
