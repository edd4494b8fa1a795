#include "common/pyview.h"

namespace py = pybind11;

namespace fastcv {

TensorView view_from_tuple(py::handle obj) {
  auto t = py::reinterpret_borrow<py::tuple>(obj);
  // A 7th element, the tensor itself, only keeps the memory alive for the call.
  check_arg(t.size() == 6 || t.size() == 7,
            "tensor view must be (data_ptr, sizes, strides, dtype, device_type, device_index[, tensor])");
  TensorView v;
  v.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
  auto sizes = t[1].cast<py::tuple>();
  auto strides = t[2].cast<py::tuple>();
  check_arg(sizes.size() <= size_t(kMaxDims) && sizes.size() == strides.size(),
            "tensor view: at most 8 dimensions, with one stride per size");
  v.ndim = int32_t(sizes.size());
  for (int d = 0; d < v.ndim; ++d) {
    v.sizes[d] = sizes[d].cast<int64_t>();
    v.strides[d] = strides[d].cast<int64_t>();
  }
  const int dtype = t[3].cast<int>();
  check_arg(dtype >= 0 && dtype <= int(DType::UInt8), "tensor view: unknown dtype code");
  v.dtype = DType(dtype);
  v.device = DeviceType(t[4].cast<int>());
  v.device_index = t[5].cast<int32_t>();
  return v;
}

}  // namespace fastcv
