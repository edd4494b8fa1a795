#!/usr/bin/env bash
# The GPU check, for a bare GPU machine with no network (a lent one: see the README), in at most $BUDGET
# seconds (default 480, eight minutes): builds fastcv for the GPU it finds with the tools installed there,
# reports the installation (doctor), measures the GPU's ceilings, runs every CUDA-device test (the CUDA C++
# kernels, the op layer, CuPy arrays through fastcv.array), the Triton kernels compiled for real with one
# configuration each, a compute-sanitizer memcheck pass over the CUDA kernels' tests, and the GPU benchmarks.
# Each step has a time box, cut to what is left of the budget, so a slow step cannot take the others' results
# with it; a step the budget no longer allows is skipped and counted as a failure.
#
# Results under $OUT (default ./device_out), six files (the device tool brings back at most eight):
#   summary.txt    one line per step (exit status, seconds, test counts), the GPU, doctor's report
#   summary.json   the same as JSON: {"gpu", "budget_s", "steps": [{step, rc, seconds, limit_s, tests}], "doctor"}
#   logs.txt       the end of every step's log
#   peaks.json, bench_conv.json, bench_batch_norm.json   the GPU's ceilings and the benchmark figures
#
#   bash bench/device_check.sh                        # the check
#   BENCH_MATCH=bfloat16 bash bench/device_check.sh   # which conv benchmark cases (default: bfloat16)
#   ONLY=attention bash bench/device_check.sh         # attention alone, for a lease of about four minutes:
#       a CPU-only build (attention's GPU kernels are Triton's), a few CUDA attention tests compiled for
#       real, and the attention GPU benchmark with one configuration per kernel
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"
BUDGET="${BUDGET:-480}"
mkdir -p "$OUT"
LOGS=$(mktemp -d)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# The interpreter that has torch and the build tools (python3 on the GPU image; pip alone may be another)
PY="${PYTHON:-python3}"
status=0
start=$SECONDS
: >"$OUT/summary.txt"

step() {  # step NAME SECONDS CMD...: run under a time box cut to the budget left; log, count tests, remember
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - start))) t0=$SECONDS rc
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    rc=125; echo "(skipped: the budget is spent)" >"$LOGS/$name.log"
  else
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
  fi
  # pytest's last line, e.g. "12 passed, 3 skipped in 40.1s"; empty for the other steps
  local tests
  tests=$(grep -E "^=*.* (passed|failed|error|errors|skipped|deselected|no tests ran).* in [0-9.]+s" "$LOGS/$name.log" \
          | tail -1 | sed -E 's/^=+ //; s/ =+$//')
  echo "$name: rc=$rc ($((SECONDS - t0)) s of $limit)${tests:+ $tests}" | tee -a "$OUT/summary.txt"
  printf '{"step": "%s", "rc": %d, "seconds": %d, "limit_s": %d, "tests": "%s"}\n' \
    "$name" "$rc" "$((SECONDS - t0))" "$limit" "$tests" >>"$LOGS/steps.jsonl"
  [ $rc -eq 0 ] || status=1
  return $rc
}

finish() {  # the logs' ends into one file, summary.json, and the exit status
  for f in "$LOGS"/*.log; do
    [ -e "$f" ] || continue
    echo "==== $(basename "$f" .log)"; tail -60 "$f"
  done >"$OUT/logs.txt"
  "$PY" - "$LOGS" "$OUT" "$BUDGET" <<'EOF'
import json, os, sys
logs, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = open(os.path.join(logs, "steps.jsonl")).read().splitlines() if os.path.exists(os.path.join(logs, "steps.jsonl")) else []
doctor = None
if os.path.exists(os.path.join(logs, "doctor.json")):
    try:
        doctor = json.load(open(os.path.join(logs, "doctor.json")))
    except ValueError:
        pass
gpu = open(os.path.join(logs, "gpu.csv")).read().strip() if os.path.exists(os.path.join(logs, "gpu.csv")) else ""
json.dump({"gpu": gpu, "budget_s": budget, "steps": [json.loads(l) for l in lines], "doctor": doctor},
          open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
  echo "---- summary"; cat "$OUT/summary.txt"
  exit $status
}

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader | tee "$LOGS/gpu.csv" \
  | tee -a "$OUT/summary.txt"
# Build tools missing from the image travel as wheels in .whl/ (README of the device tool; carry .whl)
if ! "$PY" -c "import scikit_build_core.build" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
report() {  # doctor: the facts and the backend each op runs on this GPU (exit 1 = a problem, shown not fatal)
  "$PY" -m fastcv doctor --json >"$LOGS/doctor.json" 2>"$LOGS/doctor.err"
  "$PY" -m fastcv doctor >>"$OUT/summary.txt" 2>&1 || echo "doctor: found problems (above)" >>"$OUT/summary.txt"
}
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
if [ "${ONLY:-}" = attention ]; then
  export FASTCV_WITH_CUDA=OFF CMAKE_BUILD_PARALLEL_LEVEL=16
  step build 120 "$PY" -m pip install --no-build-isolation --no-deps -v -e . || finish
  report
  # Triton compiles one kernel per (configuration, flags): a sample of the CUDA attention tests
  FASTCV_TRITON_AUTOTUNE=0 step tests_attention 75 "$PY" -m pytest -q -x tests/test_attention.py \
    -k "cuda and (test_long_sequence or test_gqa or test_fully_masked_rows or test_dropout_gradients)"
  # Mask gradients (atomic adds where the mask broadcasts) and broadcast batch dims, compiled for real
  FASTCV_TRITON_AUTOTUNE=0 step tests_attention_mask_grad 60 "$PY" -m pytest -q -x tests/test_attention_triton.py \
    tests/test_attention.py -k "cuda and (mask_grad or broadcast)"
  FASTCV_TRITON_AUTOTUNE=0 step bench_attention 110 "$PY" -m fastcv bench --device cuda --op attention \
    --match "${BENCH_MATCH:-FA2}" --json "$OUT/bench_attention.json"
  cat "$LOGS/bench_attention.log"
  finish
fi
# The machine has no network: build with what is installed (no build isolation), for the GPU that is here.
export FASTCV_WITH_CUDA=ON FASTCV_CUDA_ARCHS="${FASTCV_CUDA_ARCHS:-${cap}-real}" CMAKE_BUILD_PARALLEL_LEVEL=16
step build 150 "$PY" -m pip install --no-build-isolation --no-deps -v -e . || finish
grep -E "registers|spill" "$LOGS/build.log" | grep -v " 0 bytes spill" | head -5 >>"$OUT/summary.txt"
report
step archs 20 "$PY" -m fastcv archs
step peaks 30 "$PY" bench/peaks/gpu_peaks.py "$OUT/peaks.json"
# Every CUDA-device test outside the Triton modules: the CUDA C++ kernels, the op layer, the networks on the
# GPU, and CuPy arrays through fastcv.array (test_array's CuPy tests)
TRITON_MODULES="tests/test_conv2d_triton.py tests/test_nms_triton.py tests/test_roi_align_triton.py
  tests/test_batch_norm_triton.py tests/test_attention_triton.py"
step tests_cuda 110 "$PY" -m pytest -q -p no:cacheprovider tests -k "cuda or cupy" \
  $(for m in $TRITON_MODULES; do echo --ignore="$m"; done)
# Triton kernels compiled for real (their modules run on the GPU when there is one); one configuration per
# kernel keeps compile time bounded
FASTCV_TRITON_AUTOTUNE=0 step tests_triton 110 "$PY" -m pytest -q -p no:cacheprovider $TRITON_MODULES
if command -v compute-sanitizer >/dev/null; then
  step sanitizer 60 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/test_conv2d_depthwise.py tests/test_im2col.py tests/test_nms.py tests/test_roi_align.py \
    tests/test_batch_norm.py -k "cuda and not gradcheck and not compile"
fi
# The GPU target: the ResNet-50 layers in bfloat16 channels_last against cuDNN, forward and backward,
# then batch norm against PyTorch's CUDA kernels (GB/s next to the measured copy bandwidth)
step bench_conv 50 "$PY" -m fastcv bench --device cuda --quick --op conv2d --match "${BENCH_MATCH:-bfloat16}" \
  --json "$OUT/bench_conv.json"
step bench_bn 30 "$PY" -m fastcv bench --device cuda --quick --op batch_norm --op batch_norm_relu \
  --op batch_norm_add_relu --json "$OUT/bench_batch_norm.json"
finish
