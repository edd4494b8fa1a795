#include <cuda_runtime.h>

#include "common/cuda_info.h"

namespace fastcv {

CudaInfo cuda_runtime_info() {
  CudaInfo info;
  cudaRuntimeGetVersion(&info.runtime_version);
  cudaDriverGetVersion(&info.driver_version);
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it so that later calls start clean
    info.error = cudaGetErrorString(err);
    return info;
  }
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) continue;
    info.devices.push_back({d, prop.major, prop.minor, prop.name});
  }
  return info;
}

}  // namespace fastcv
