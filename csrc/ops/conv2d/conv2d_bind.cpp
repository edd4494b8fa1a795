// Python bindings of the convolution. The geometry crosses as fastcv.ops.conv.Conv2dGeometry.
#include <pybind11/stl.h>

#include <optional>

#include "common/pyview.h"
#include "compute/gemm.h"
#include "ops/conv2d/conv2d_ops.h"

namespace py = pybind11;

namespace fastcv {
template <>
struct Fields<conv2d::Geometry> {
  static constexpr const char* what = "the convolution's geometry";
  static constexpr std::array<const char*, 16> names{"batch", "channels", "height", "width", "out_channels", "groups",
                                                     "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "out_h", "out_w"};
};
}  // namespace fastcv

namespace pybind11::detail {
template <>
struct type_caster<fastcv::conv2d::Geometry> : fastcv::NamedIntsCaster<fastcv::conv2d::Geometry> {};
}  // namespace pybind11::detail

namespace fastcv {
using conv2d::Geometry;

void bind_conv2d(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("conv2d_forward_cpu", [](TensorView input, TensorView weight, std::optional<TensorView> bias,
                                  std::optional<TensorView> residual, bool relu, TensorView output, Geometry g,
                                  int nthreads, std::optional<TensorView> mean, std::optional<TensorView> var) {
    const Epilogue epilogue{bias ? &*bias : nullptr, residual ? &*residual : nullptr, relu, mean ? &*mean : nullptr,
                            var ? &*var : nullptr};
    conv2d_forward_cpu(input, weight, epilogue, output, g, nthreads);
  }, nogil, py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("relu"),
     py::arg("output"), py::arg("g"), py::arg("nthreads"), py::arg("mean") = py::none(), py::arg("var") = py::none());
  m.def("conv2d_input_grad_cpu", [](TensorView grad_output, TensorView weight, TensorView grad_input, Geometry g,
                                     int nthreads) {
    conv2d_input_grad_cpu(grad_output, weight, grad_input, g, nthreads);
  }, nogil);
  m.def("conv2d_weight_grad_cpu", [](TensorView grad_output, TensorView input, TensorView grad_weight, Geometry g,
                                      int nthreads) {
    conv2d_weight_grad_cpu(grad_output, input, grad_weight, g, nthreads);
  }, nogil);
#ifdef FASTCV_WITH_CUDA
  m.def("depthwise_forward_cuda", [](TensorView input, TensorView weight, std::optional<TensorView> bias,
                                      TensorView output, Geometry g, uintptr_t stream) {
    depthwise_forward_cuda(input, weight, bias ? &*bias : nullptr, output, g, stream);
  }, nogil);
  m.def("depthwise_input_grad_cuda", [](TensorView grad_output, TensorView weight, TensorView grad_input, Geometry g,
                                         uintptr_t stream) {
    depthwise_input_grad_cuda(grad_output, weight, grad_input, g, stream);
  }, nogil);
  m.def("depthwise_weight_grad_cuda", [](TensorView grad_output, TensorView input, TensorView grad_weight, Geometry g,
                                          uintptr_t stream) {
    depthwise_weight_grad_cuda(grad_output, input, grad_weight, g, stream);
  }, nogil);
#endif
  m.def("gemm_kernel_info", [] {
    const auto& k = gemm::kernel(float{});
    return py::dict(py::arg("isa") = k.isa, py::arg("mr") = k.mr, py::arg("nr") = k.nr);
  });
}

}  // namespace fastcv
