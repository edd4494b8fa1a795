#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (see the README): builds fastcv for the GPU it finds, runs
# the test suite (CUDA tests included; Triton compiled for real, not interpreted), a compute-sanitizer
# pass over the CUDA NMS and RoI Align kernels, and the GPU benchmarks (CUDA kernels, then the Triton ones). Everything goes under $OUT (default
# ./device_out): logs, bench JSON, and a summary printed last.
#   bash bench/device_check.sh            # full
#   QUICK=1 bash bench/device_check.sh    # bench --quick
set -uo pipefail
OUT="${OUT:-$PWD/device_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
status=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, remember failures
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
# The machine has no network: build with what is installed, for the GPU that is here.
export FASTCV_WITH_CUDA=ON FASTCV_CUDA_ARCHS="${FASTCV_CUDA_ARCHS:-${cap}-real}"
step build pip install --no-build-isolation --no-deps -v -e . || { tail -40 "$OUT/build.log"; exit 1; }
step info python -m fastcv info
cat "$OUT/info.log"
step tests python -m pytest -q -x --junitxml="$OUT/tests.xml"
tail -3 "$OUT/tests.log"
if command -v compute-sanitizer >/dev/null; then
  step sanitizer compute-sanitizer --tool memcheck --error-exitcode 9 \
    python -m pytest -q -x tests/test_nms.py tests/test_roi_align.py -k "cuda and (matches or empty or padded or deterministic)"
  tail -3 "$OUT/sanitizer.log"
fi
quick=${QUICK:+--quick}
step bench_cuda python -m fastcv bench --device cuda $quick --json "$OUT/bench_cuda.json"
cat "$OUT/bench_cuda.log"
# The Triton kernels, which builds without nvcc use on GPUs.
FASTCV_GPU_BACKEND=triton step bench_cuda_triton python -m fastcv bench --device cuda --quick --json "$OUT/bench_cuda_triton.json"
cat "$OUT/bench_cuda_triton.log"
step bench_pytest python -m pytest bench/ -q -k cuda --benchmark-json="$OUT/pytest_benchmark.json" --benchmark-max-time=0.5
echo "---- summary"; cat "$OUT/summary.txt"
exit $status
