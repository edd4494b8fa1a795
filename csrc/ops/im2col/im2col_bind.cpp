// Python bindings of im2col and col2im. The geometry crosses as fastcv.ops.im2col.Im2colGeometry.
#include <pybind11/stl.h>

#include "common/pyview.h"
#include "ops/im2col/im2col_ops.h"

namespace py = pybind11;

namespace fastcv {
template <>
struct Fields<im2col::Geometry> {
  static constexpr const char* what = "im2col's geometry";
  static constexpr std::array<const char*, 13> names{"channels", "height", "width", "kh", "kw", "dh", "dw", "ph", "pw",
                                                     "sh", "sw", "out_h", "out_w"};
};
}  // namespace fastcv

namespace pybind11::detail {
template <>
struct type_caster<fastcv::im2col::Geometry> : fastcv::NamedIntsCaster<fastcv::im2col::Geometry> {};
}  // namespace pybind11::detail

namespace fastcv {
using im2col::Geometry;

void bind_im2col(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("im2col_cpu", [](TensorView image, Geometry g, TensorView columns, int nthreads) {
    im2col_cpu(image, g, columns, nthreads);
  }, nogil);
  m.def("col2im_cpu", [](TensorView columns, Geometry g, TensorView image, int nthreads) {
    col2im_cpu(columns, g, image, nthreads);
  }, nogil);
#ifdef FASTCV_WITH_CUDA
  m.def("im2col_cuda", [](TensorView image, Geometry g, TensorView columns, uintptr_t stream) {
    im2col_cuda(image, g, columns, stream);
  }, nogil);
  m.def("col2im_cuda", [](TensorView columns, Geometry g, TensorView image, uintptr_t stream) {
    col2im_cuda(columns, g, image, stream);
  }, nogil);
#endif
}

}  // namespace fastcv
