#pragma once
// The one place a Python tensor description becomes a TensorView. Python (fastcv/_backend.py, view())
// passes (data_ptr, sizes, strides, dtype_code, device_type, device_index, tensor); the tensor keeps
// the memory alive for the call. Plain tuples cost a fraction of a DLPack capsule per tensor, and tiny
// calls are where per-call overhead shows.
#include <pybind11/pybind11.h>

#include "common/check.h"
#include "common/tensor_view.h"

namespace fastcv {
TensorView view_from_tuple(pybind11::handle obj);
}

namespace pybind11 {
namespace detail {
template <>
struct type_caster<fastcv::TensorView> {
  PYBIND11_TYPE_CASTER(fastcv::TensorView, const_name("TensorView"));
  bool load(handle src, bool) {
    if (!isinstance<tuple>(src)) return false;
    value = fastcv::view_from_tuple(src);
    return true;
  }
};
}  // namespace detail
}  // namespace pybind11
