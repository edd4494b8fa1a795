#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (see the README), sized to fit a lease of about ten minutes:
# builds fastcv for the GPU it finds, measures the GPU's ceilings, runs the CUDA-device tests (the
# CUDA C++ kernels, then the Triton kernels compiled for real with one configuration each), a
# compute-sanitizer pass over the CUDA kernels, and the GPU benchmarks. Each step has a time box, so a
# slow step cannot take the others' results with it. Everything goes under $OUT (default
# ./device_out), at most eight files: summary.txt, and one log or JSON per step.
#   bash bench/device_check.sh                    # the check
#   BENCH_MATCH=bfloat16 bash bench/device_check.sh   # which conv benchmark cases (default: bfloat16)
#   ONLY=attention bash bench/device_check.sh         # attention alone, for a lease of about four minutes:
#       a CPU-only build (attention's GPU kernels are Triton's), a few CUDA attention tests compiled for
#       real, and the attention GPU benchmark with one configuration per kernel
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# The interpreter that has torch and the build tools (python3 on the GPU image; pip alone may be another)
PY="${PYTHON:-python3}"
status=0
step() {  # step NAME SECONDS CMD...: run under a time box, log to $OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee -a "$OUT/summary.txt"
# Build tools missing from the image travel as wheels in .whl/ (README of the device tool; carry .whl)
if ! "$PY" -c "import scikit_build_core.build" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
if [ "${ONLY:-}" = attention ]; then
  export FASTCV_WITH_CUDA=OFF CMAKE_BUILD_PARALLEL_LEVEL=16
  step build 120 "$PY" -m pip install --no-build-isolation --no-deps -v -e . || { tail -40 "$OUT/build.log"; exit 1; }
  "$PY" -m fastcv info >>"$OUT/summary.txt" 2>&1
  # Triton compiles one kernel per (configuration, flags): a sample of the CUDA attention tests
  FASTCV_TRITON_AUTOTUNE=0 step tests_attention 75 "$PY" -m pytest -q -x tests/test_attention.py \
    -k "cuda and (test_long_sequence or test_gqa or test_fully_masked_rows or test_dropout_gradients)"
  tail -3 "$OUT/tests_attention.log"
  # Mask gradients (atomic adds where the mask broadcasts) and broadcast batch dims, compiled for real
  FASTCV_TRITON_AUTOTUNE=0 step tests_attention_mask_grad 60 "$PY" -m pytest -q -x tests/test_attention_triton.py \
    tests/test_attention.py -k "cuda and (mask_grad or broadcast)"
  tail -3 "$OUT/tests_attention_mask_grad.log"
  FASTCV_TRITON_AUTOTUNE=0 step bench_attention 110 "$PY" -m fastcv bench --device cuda --op attention \
    --match "${BENCH_MATCH:-FA2}" --json "$OUT/bench_attention.json"
  cat "$OUT/bench_attention.log"
  echo "---- summary"; cat "$OUT/summary.txt"
  exit $status
fi
# The machine has no network: build with what is installed, for the GPU that is here.
export FASTCV_WITH_CUDA=ON FASTCV_CUDA_ARCHS="${FASTCV_CUDA_ARCHS:-${cap}-real}" CMAKE_BUILD_PARALLEL_LEVEL=16
step build 240 "$PY" -m pip install --no-build-isolation --no-deps -v -e . || { tail -40 "$OUT/build.log"; exit 1; }
grep -E "registers|spill" "$OUT/build.log" | grep -v " 0 bytes spill" | head -5 >>"$OUT/summary.txt"
"$PY" -m fastcv info >>"$OUT/summary.txt" 2>&1
step peaks 60 "$PY" bench/peaks/gpu_peaks.py "$OUT/peaks.json"
# CUDA C++ kernels (NMS, RoI Align, im2col, depthwise) and the conv op layer on the GPU
step tests_cuda 120 "$PY" -m pytest -q -x tests -k cuda --ignore=tests/test_conv2d_triton.py \
  --ignore=tests/test_nms_triton.py --ignore=tests/test_roi_align_triton.py --ignore=tests/test_batch_norm_triton.py
tail -3 "$OUT/tests_cuda.log"
# Triton kernels compiled for real; one configuration per kernel keeps compile time bounded
FASTCV_TRITON_AUTOTUNE=0 step tests_triton 150 "$PY" -m pytest -q tests/test_conv2d_triton.py \
  tests/test_nms_triton.py tests/test_roi_align_triton.py tests/test_batch_norm_triton.py
tail -3 "$OUT/tests_triton.log"
if command -v compute-sanitizer >/dev/null; then
  step sanitizer 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest -q -x \
    tests/test_conv2d_depthwise.py tests/test_im2col.py tests/test_nms.py tests/test_batch_norm.py \
    -k "cuda and not gradcheck"
  tail -3 "$OUT/sanitizer.log"
fi
# The GPU target: the ResNet-50 layers in bfloat16 channels_last against cuDNN, forward and backward
# (autotuned), then the other ops' quick cases.
step bench 150 "$PY" -m fastcv bench --device cuda --op conv2d --match "${BENCH_MATCH:-bfloat16}" \
  --json "$OUT/bench_conv.json"
cat "$OUT/bench.log"
# Batch norm against PyTorch's (cuDNN-free) CUDA kernels: GB/s next to the measured copy bandwidth
step bench_bn 120 "$PY" -m fastcv bench --device cuda --op batch_norm --op batch_norm_relu \
  --op batch_norm_add_relu --json "$OUT/bench_batch_norm.json"
cat "$OUT/bench_bn.log"
echo "---- summary"; cat "$OUT/summary.txt"
exit $status
