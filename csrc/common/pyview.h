#pragma once
// The one place a Python torch.Tensor becomes a TensorView: bindings take tensors as they are and read
// their data pointer, sizes, strides, dtype and device through CPython calls (no libtorch: the module
// does not link against torch's C++ ABI). The call's arguments keep the tensors alive while C++ runs.
// A fraction of a microsecond a tensor: tiny calls are where per-call overhead shows.
#include <pybind11/pybind11.h>

#include "common/check.h"
#include "common/tensor_view.h"

#include <array>
#include <cstring>
#include <type_traits>

namespace fastcv {
bool is_tensor(pybind11::handle obj);
TensorView view_from_tensor(pybind11::handle obj);

// Geometries cross the boundary by name: Python passes a NamedTuple of ints (Conv2dGeometry in
// fastcv/ops/conv.py, say) and C++ reads it into a struct of int64_t fields in the same order. The
// field names are checked against the NamedTuple's _fields the first time a type is seen, so the two
// sides cannot drift apart silently. Fields<Struct>::names lists them, next to the binding.
template <class Struct> struct Fields;

// Reads the n ints of obj, a NamedTuple whose _fields are `names` (checked once per type, remembered in
// *checked); raises ArgError naming `what` otherwise.
void read_named_ints(pybind11::handle obj, const char* what, const char* const* names, int n, PyObject** checked,
                     int64_t* out);

template <class Struct>
struct NamedIntsCaster {
  PYBIND11_TYPE_CASTER(Struct, pybind11::detail::const_name("NamedTuple"));
  bool load(pybind11::handle src, bool) {
    constexpr auto& names = Fields<Struct>::names;
    static_assert(std::is_trivially_copyable_v<Struct> && sizeof(Struct) == names.size() * sizeof(int64_t),
                  "a geometry struct is its named int64_t fields, in order");
    static PyObject* checked = nullptr;
    std::array<int64_t, names.size()> v;
    read_named_ints(src, Fields<Struct>::what, names.data(), int(names.size()), &checked, v.data());
    std::memcpy(&value, v.data(), sizeof(Struct));
    return true;
  }
};
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
