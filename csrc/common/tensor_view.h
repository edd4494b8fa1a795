#pragma once
// A plain description of a tensor that crossed the Python boundary. It owns nothing: Python keeps the
// torch.Tensor alive for the duration of the call. Built in exactly one place (pyview.cpp).
#include <cstdint>

namespace fastcv {

// The dtypes the kernels know, in the order pyview.cpp reads torch's (torch.float32, ...).
enum class DType : int32_t { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, Int64 = 4, Int32 = 5, Bool = 6, UInt8 = 7 };
enum class DeviceType : int32_t { CPU = 0, CUDA = 1 };

const char* dtype_name(DType dt);
inline int64_t dtype_size(DType dt) {
  switch (dt) {
    case DType::Float64: case DType::Int64: return 8;
    case DType::Float32: case DType::Int32: return 4;
    case DType::Float16: case DType::BFloat16: return 2;
    default: return 1;
  }
}

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  int32_t ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, as torch reports them
  DType dtype = DType::Float32;
  DeviceType device = DeviceType::CPU;
  int32_t device_index = -1;

  int64_t size(int d) const { return sizes[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= sizes[d];
    return n;
  }
  bool is_contiguous() const {  // as torch: an empty tensor is contiguous whatever its strides
    if (numel() == 0) return true;
    int64_t expected = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      if (sizes[d] != 1 && strides[d] != expected) return false;
      expected *= sizes[d];
    }
    return true;
  }
  // Dense NHWC strides of a 4-D tensor (torch's channels_last), ignoring the strides of size-1 dims.
  bool is_channels_last() const {
    if (ndim != 4) return false;
    if (numel() == 0) return true;
    const int64_t n = sizes[0], c = sizes[1], h = sizes[2], w = sizes[3];
    return (c == 1 || strides[1] == 1) && (w == 1 || strides[3] == c) && (h == 1 || strides[2] == w * c) &&
           (n == 1 || strides[0] == h * w * c);
  }
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }

  // The sub-tensor at `index` along the first dimension (a view, like t[index] in torch).
  TensorView select0(int64_t index) const {
    TensorView v = *this;
    v.ndim = ndim - 1;
    for (int d = 0; d < v.ndim; ++d) v.sizes[d] = sizes[d + 1], v.strides[d] = strides[d + 1];
    v.data = static_cast<char*>(data) + index * strides[0] * dtype_size(dtype);
    return v;
  }
};

// The data of an optional tensor, nullptr for none.
template <class T>
T* optional_ptr(const TensorView* t) {
  return t ? t->ptr<T>() : nullptr;
}

}  // namespace fastcv
