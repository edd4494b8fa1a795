#include "common/check.h"

#include <sstream>

namespace fastcv {

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int64: return "int64";
    case DType::Int32: return "int32";
    case DType::Bool: return "bool";
    case DType::UInt8: return "uint8";
  }
  return "unknown";
}

static std::string shape_str(const TensorView& t) {
  std::ostringstream s;
  s << "[";
  for (int d = 0; d < t.ndim; ++d) s << (d ? ", " : "") << t.sizes[d];
  s << "]";
  return s.str();
}

void check_shape(const TensorView& t, const char* arg, std::initializer_list<int64_t> sizes) {
  bool ok = t.ndim == int(sizes.size());
  int d = 0;
  for (int64_t s : sizes) {
    if (ok && s >= 0 && t.sizes[d] != s) ok = false;
    ++d;
  }
  if (!ok) {
    std::ostringstream want;
    want << "[";
    d = 0;
    for (int64_t s : sizes) want << (d++ ? ", " : "") << (s < 0 ? std::string("*") : std::to_string(s));
    want << "]";
    throw ArgError(std::string(arg) + " must have shape " + want.str() + ", got " + shape_str(t));
  }
}

void check_dtype(const TensorView& t, const char* arg, DType dtype) {
  if (t.dtype != dtype)
    throw ArgError(std::string(arg) + " must be " + dtype_name(dtype) + ", got " + dtype_name(t.dtype));
}

void check_device(const TensorView& t, const char* arg, DeviceType device) {
  if (t.device != device)
    throw ArgError(std::string(arg) + " must be on " + (device == DeviceType::CPU ? "the CPU" : "a CUDA device"));
}

void check_contiguous(const TensorView& t, const char* arg) {
  if (!t.is_contiguous()) throw ArgError(std::string(arg) + " must be contiguous");
}

}  // namespace fastcv
