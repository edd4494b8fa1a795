// Python bindings of attention. Arguments are converted with the GIL held; kernels run without it.
#include <pybind11/stl.h>

#include <optional>

#include "common/pyview.h"
#include "ops/attention/attention_ops.h"

namespace py = pybind11;

namespace fastcv {

void bind_attention(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  using Opt = std::optional<TensorView>;
  m.def("attention_forward_cpu",
        [](TensorView q, TensorView k, TensorView v, Opt mask, double scale, bool is_causal, double dropout_p,
           uint64_t seed, uint64_t offset, TensorView out, TensorView lse, int nthreads) {
          attention_forward_cpu(q, k, v, mask ? &*mask : nullptr, scale, is_causal, dropout_p, seed, offset, out,
                                lse, nthreads);
        },
        nogil);
  m.def("attention_backward_cpu",
        [](TensorView grad_out, TensorView q, TensorView k, TensorView v, TensorView out, TensorView lse, Opt mask,
           double scale, bool is_causal, double dropout_p, uint64_t seed, uint64_t offset, TensorView dq,
           TensorView dk, TensorView dv, Opt grad_mask, int nthreads) {
          attention_backward_cpu(grad_out, q, k, v, out, lse, mask ? &*mask : nullptr, scale, is_causal, dropout_p,
                                 seed, offset, dq, dk, dv, grad_mask ? &*grad_mask : nullptr, nthreads);
        },
        nogil);
}

}  // namespace fastcv
