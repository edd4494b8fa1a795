#pragma once
// What `python -m fastcv info` reports about the CUDA runtime and the visible GPUs.
#include <string>
#include <vector>

namespace fastcv {

struct CudaDevice {
  int index, major, minor;
  std::string name;
};
struct CudaInfo {
  int runtime_version = 0, driver_version = 0;
  std::string error;  // why no device could be listed, if that is the case
  std::vector<CudaDevice> devices;
};

// Never throws: on a machine with no driver or GPU it returns no devices and the reason.
CudaInfo cuda_runtime_info();

}  // namespace fastcv
