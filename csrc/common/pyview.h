#pragma once
// The one place a Python torch.Tensor becomes a TensorView: bindings take tensors as they are and read
// their data pointer, sizes, strides, dtype and device through CPython calls (no libtorch: the module
// does not link against torch's C++ ABI). The call's arguments keep the tensors alive while C++ runs.
// A fraction of a microsecond a tensor: tiny calls are where per-call overhead shows.
#include <pybind11/pybind11.h>

#include "common/check.h"
#include "common/tensor_view.h"

namespace fastcv {
bool is_tensor(pybind11::handle obj);
TensorView view_from_tensor(pybind11::handle obj);
}

namespace pybind11 {
namespace detail {
template <>
struct type_caster<fastcv::TensorView> {
  PYBIND11_TYPE_CASTER(fastcv::TensorView, const_name("TensorView"));
  bool load(handle src, bool) {
    if (!fastcv::is_tensor(src)) return false;
    value = fastcv::view_from_tensor(src);
    return true;
  }
};
}  // namespace detail
}  // namespace pybind11
