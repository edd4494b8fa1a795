// Python bindings of im2col and col2im. The geometry crosses as a tuple of 13 integers.
#include <pybind11/stl.h>

#include <array>

#include "common/pyview.h"
#include "ops/im2col/im2col_ops.h"

namespace py = pybind11;

namespace fastcv {
namespace {

using Dims = std::array<int64_t, 13>;  // C, H, W, kh, kw, dh, dw, ph, pw, sh, sw, out_h, out_w

im2col::Geometry geometry(const Dims& d) {
  return {d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12]};
}

}  // namespace

void bind_im2col(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("im2col_cpu", [](TensorView image, Dims d, TensorView columns, int nthreads) {
    im2col_cpu(image, geometry(d), columns, nthreads);
  }, nogil);
  m.def("col2im_cpu", [](TensorView columns, Dims d, TensorView image, int nthreads) {
    col2im_cpu(columns, geometry(d), image, nthreads);
  }, nogil);
#ifdef FASTCV_WITH_CUDA
  m.def("im2col_cuda", [](TensorView image, Dims d, TensorView columns, uintptr_t stream) {
    im2col_cuda(image, geometry(d), columns, stream);
  }, nogil);
  m.def("col2im_cuda", [](TensorView columns, Dims d, TensorView image, uintptr_t stream) {
    col2im_cuda(columns, geometry(d), image, stream);
  }, nogil);
#endif
}

}  // namespace fastcv
