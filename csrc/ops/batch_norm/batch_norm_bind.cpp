// Python bindings of batch norm. Arguments are converted with the GIL held; kernels run without it.
#include <pybind11/stl.h>

#include <optional>

#include "common/pyview.h"
#include "ops/batch_norm/batch_norm_ops.h"

namespace py = pybind11;

namespace fastcv {
namespace {

using Opt = std::optional<TensorView>;
const TensorView* ptr(const Opt& t) { return t ? &*t : nullptr; }

// Device is the last argument: the thread count (CPU) or the stream (CUDA).
template <class Device, class Train, class Eval, class Backward>
void bind_backend(py::module_& m, const char* suffix, Train train, Eval eval, Backward backward) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  const std::string s = suffix;
  m.def(("batch_norm_forward_train_" + s).c_str(),
        [=](TensorView x, Opt weight, Opt bias, Opt residual, bool relu, double eps, TensorView y, TensorView mean,
            TensorView var, Device device) {
          train(x, ptr(weight), ptr(bias), ptr(residual), relu, eps, y, mean, var, device);
        },
        nogil);
  m.def(("batch_norm_forward_eval_" + s).c_str(),
        [=](TensorView x, TensorView mean, TensorView var, Opt weight, Opt bias, Opt residual, bool relu, double eps,
            TensorView y, Device device) {
          eval(x, mean, var, ptr(weight), ptr(bias), ptr(residual), relu, eps, y, device);
        },
        nogil);
  m.def(("batch_norm_backward_" + s).c_str(),
        [=](TensorView grad_y, TensorView x, Opt y, TensorView mean, TensorView var, Opt weight, bool training,
            double eps, Opt grad_x, Opt grad_residual, Opt grad_weight, Opt grad_bias, Device device) {
          backward(grad_y, x, ptr(y), mean, var, ptr(weight), training, eps, ptr(grad_x), ptr(grad_residual),
                   ptr(grad_weight), ptr(grad_bias), device);
        },
        nogil);
}

}  // namespace

void bind_batch_norm(py::module_& m) {
  bind_backend<int>(m, "cpu", &batch_norm_forward_train_cpu, &batch_norm_forward_eval_cpu, &batch_norm_backward_cpu);
  m.def("batch_norm_update_running_cpu", &batch_norm_update_running_cpu, py::call_guard<py::gil_scoped_release>());
#ifdef FASTCV_WITH_CUDA
  bind_backend<uintptr_t>(m, "cuda", &batch_norm_forward_train_cuda, &batch_norm_forward_eval_cuda,
                          &batch_norm_backward_cuda);
#endif
}

}  // namespace fastcv
