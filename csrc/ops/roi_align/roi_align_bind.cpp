// Python bindings of roi_align. Arguments are converted with the GIL held; kernels run without it.
#include <pybind11/stl.h>

#include "common/pyview.h"
#include "ops/roi_align/roi_align_ops.h"

namespace py = pybind11;

namespace fastcv {

void bind_roi_align(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("roi_align_forward_cpu", &roi_align_forward_cpu, nogil);
  m.def("roi_align_backward_cpu", &roi_align_backward_cpu, nogil);
  m.def(
      "multi_scale_roi_align_forward_cpu",
      [](std::vector<TensorView> inputs, std::vector<double> scales, TensorView rois, double canonical_scale,
         int64_t canonical_level, int64_t k_min, int64_t sampling_ratio, bool aligned, TensorView output,
         int nthreads) {
        multi_scale_roi_align_forward_cpu(inputs, scales, rois, {canonical_scale, canonical_level, k_min},
                                          sampling_ratio, aligned, output, nthreads);
      },
      nogil);
  m.def(
      "multi_scale_roi_align_backward_cpu",
      [](TensorView grad_output, std::vector<double> scales, TensorView rois, double canonical_scale,
         int64_t canonical_level, int64_t k_min, int64_t sampling_ratio, bool aligned,
         std::vector<TensorView> grad_inputs, int nthreads) {
        multi_scale_roi_align_backward_cpu(grad_output, scales, rois, {canonical_scale, canonical_level, k_min},
                                           sampling_ratio, aligned, grad_inputs, nthreads);
      },
      nogil);
}

}  // namespace fastcv
