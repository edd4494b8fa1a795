// Python bindings of the nms op family. Arguments are converted with the GIL held; kernels run without it.
#include <optional>

#include <pybind11/stl.h>

#include "common/pyview.h"
#include "ops/nms/nms_ops.h"

namespace py = pybind11;

namespace fastcv {

void bind_nms(py::module_& m) {
  using OptView = std::optional<TensorView>;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "nms_cpu",
      [](TensorView boxes, TensorView scores, OptView labels, double iou_threshold, TensorView keep, int nthreads) {
        return nms_cpu(boxes, scores, labels ? &*labels : nullptr, iou_threshold, keep, nthreads);
      },
      nogil);
  m.def("batched_nms_padded_cpu", &batched_nms_padded_cpu, nogil);
#ifdef FASTCV_WITH_CUDA
  m.def(
      "nms_mask_cuda",
      [](TensorView boxes, OptView labels, double iou_threshold, TensorView mask, uintptr_t stream) {
        nms_mask_cuda(boxes, labels ? &*labels : nullptr, iou_threshold, mask, stream);
      },
      nogil);
  m.def(
      "nms_keep_cuda",
      [](TensorView mask, OptView n_valid, TensorView removed, TensorView keep, TensorView count, uintptr_t stream) {
        nms_keep_cuda(mask, n_valid ? &*n_valid : nullptr, removed, keep, count, stream);
      },
      nogil);
#endif
}

}  // namespace fastcv
