#pragma once
// Helpers for the CUDA kernels and their launchers: error checks that name what failed, a device guard,
// and the grid of a one-dimensional grid-stride loop.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/check.h"
#include "common/tensor_view.h"

#ifndef FASTCV_CUDA_ARCHS_STR
#define FASTCV_CUDA_ARCHS_STR ""
#endif

namespace fastcv {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  std::string msg = std::string(what) + ": " + cudaGetErrorString(err);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorUnsupportedPtxVersion)
    msg += " (fastcv was built for CUDA architectures '" FASTCV_CUDA_ARCHS_STR
           "'; rebuild with FASTCV_CUDA_ARCHS set to include this GPU, e.g. FASTCV_CUDA_ARCHS=native)";
  throw std::runtime_error(msg);
}
#define FASTCV_CUDA_CHECK(expr) ::fastcv::cuda_check((expr), #expr)
// After a launch: configuration errors surface here, not at the next unrelated CUDA call.
#define FASTCV_CUDA_CHECK_LAUNCH(name) ::fastcv::cuda_check(cudaGetLastError(), name)

// Makes the tensor's device current for the launch and restores the caller's afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(const TensorView& t) {
    check_device(t, "tensor", DeviceType::CUDA);
    FASTCV_CUDA_CHECK(cudaGetDevice(&previous_));
    if (t.device_index != previous_) FASTCV_CUDA_CHECK(cudaSetDevice(t.device_index));
    changed_ = t.device_index != previous_;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// The indices of [0, total) that this thread visits in a grid-stride loop over a one-dimensional grid
// (from its global index, in steps of the grid's thread count):
//   for (const int64_t idx : grid_stride(total)) ...
struct GridStride {
  struct Iterator {
    int64_t index;
    __device__ int64_t operator*() const { return index; }
    __device__ Iterator& operator++() {
      index += int64_t(gridDim.x) * blockDim.x;
      return *this;
    }
    __device__ bool operator!=(const Iterator& end) const { return index < end.index; }  // steps past the end
  };
  int64_t total;
  __device__ Iterator begin() const { return {blockIdx.x * int64_t(blockDim.x) + threadIdx.x}; }
  __device__ Iterator end() const { return {total}; }
};

__device__ inline GridStride grid_stride(int64_t total) { return {total}; }

// Blocks of `threads` threads for `total` elements walked by grid_stride: one element a thread, up to
// 65535 * 8 blocks (beyond that each thread takes several).
inline unsigned blocks_for(int64_t total, int threads) {
  return unsigned(std::min<int64_t>((total + threads - 1) / threads, 65535 * 8));
}

}  // namespace fastcv
