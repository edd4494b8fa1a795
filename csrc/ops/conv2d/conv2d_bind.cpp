// Python bindings of the convolution. The geometry crosses as a tuple of 16 integers.
#include <pybind11/stl.h>

#include <array>
#include <optional>

#include "common/pyview.h"
#include "compute/gemm.h"
#include "ops/conv2d/conv2d_ops.h"

namespace py = pybind11;

namespace fastcv {
namespace {

// N, C, H, W, Cout, groups, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w
using Dims = std::array<int64_t, 16>;

conv2d::Geometry geometry(const Dims& d) {
  return {d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]};
}

}  // namespace

void bind_conv2d(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("conv2d_forward_cpu", [](TensorView input, TensorView weight, std::optional<TensorView> bias,
                                  std::optional<TensorView> residual, bool relu, TensorView output, Dims d,
                                  int nthreads) {
    const Epilogue epilogue{bias ? &*bias : nullptr, residual ? &*residual : nullptr, relu};
    conv2d_forward_cpu(input, weight, epilogue, output, geometry(d), nthreads);
  }, nogil);
  m.def("conv2d_input_grad_cpu", [](TensorView grad_output, TensorView weight, TensorView grad_input, Dims d,
                                     int nthreads) {
    conv2d_input_grad_cpu(grad_output, weight, grad_input, geometry(d), nthreads);
  }, nogil);
  m.def("conv2d_weight_grad_cpu", [](TensorView grad_output, TensorView input, TensorView grad_weight, Dims d,
                                      int nthreads) {
    conv2d_weight_grad_cpu(grad_output, input, grad_weight, geometry(d), nthreads);
  }, nogil);
#ifdef FASTCV_WITH_CUDA
  m.def("depthwise_forward_cuda", [](TensorView input, TensorView weight, std::optional<TensorView> bias,
                                      TensorView output, Dims d, uintptr_t stream) {
    depthwise_forward_cuda(input, weight, bias ? &*bias : nullptr, output, geometry(d), stream);
  }, nogil);
  m.def("depthwise_input_grad_cuda", [](TensorView grad_output, TensorView weight, TensorView grad_input, Dims d,
                                         uintptr_t stream) {
    depthwise_input_grad_cuda(grad_output, weight, grad_input, geometry(d), stream);
  }, nogil);
  m.def("depthwise_weight_grad_cuda", [](TensorView grad_output, TensorView input, TensorView grad_weight, Dims d,
                                          uintptr_t stream) {
    depthwise_weight_grad_cuda(grad_output, input, grad_weight, geometry(d), stream);
  }, nogil);
#endif
  m.def("gemm_kernel_info", [] {
    const auto& k = gemm::kernel(float{});
    return py::dict(py::arg("isa") = k.isa, py::arg("mr") = k.mr, py::arg("nr") = k.nr);
  });
}

}  // namespace fastcv
