// Python bindings of roi_align. Arguments are converted with the GIL held; kernels run without it.
#include <pybind11/stl.h>

#include <optional>
#include <tuple>

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
         int64_t canonical_level, int64_t k_min, int64_t k_max, int64_t sampling_ratio, bool aligned,
         TensorView output, int nthreads) {
        multi_scale_roi_align_forward_cpu(inputs, scales, rois, {canonical_scale, canonical_level, k_min, k_max},
                                          sampling_ratio, aligned, output, nthreads);
      },
      nogil);
  m.def(
      "multi_scale_roi_align_backward_cpu",
      [](TensorView grad_output, std::vector<double> scales, TensorView rois, double canonical_scale,
         int64_t canonical_level, int64_t k_min, int64_t k_max, int64_t sampling_ratio, bool aligned,
         std::vector<TensorView> grad_inputs, int nthreads) {
        multi_scale_roi_align_backward_cpu(grad_output, scales, rois,
                                           {canonical_scale, canonical_level, k_min, k_max},
                                           sampling_ratio, aligned, grad_inputs, nthreads);
      },
      nogil);
#ifdef FASTCV_WITH_CUDA
  // canonical scale, canonical level, k_min, k_max
  using Mapping = std::optional<std::tuple<double, int64_t, int64_t, int64_t>>;
  const auto level_mapping = [](const Mapping& m) {
    return m ? LevelMapping{std::get<0>(*m), std::get<1>(*m), std::get<2>(*m), std::get<3>(*m)} : LevelMapping{};
  };
  m.def(
      "roi_align_forward_cuda",
      [=](std::vector<TensorView> inputs, std::vector<double> scales, TensorView rois, Mapping mapping,
          int64_t sampling_ratio, bool aligned, TensorView output, uintptr_t stream) {
        const LevelMapping lm = level_mapping(mapping);
        roi_align_forward_cuda(inputs, scales, rois, mapping ? &lm : nullptr, sampling_ratio, aligned, output, stream);
      },
      nogil);
  m.def(
      "roi_align_backward_cuda",
      [=](TensorView grad_output, std::vector<double> scales, TensorView rois, Mapping mapping, int64_t sampling_ratio,
          bool aligned, bool deterministic, std::vector<TensorView> grad_inputs, uintptr_t stream) {
        const LevelMapping lm = level_mapping(mapping);
        roi_align_backward_cuda(grad_output, scales, rois, mapping ? &lm : nullptr, sampling_ratio, aligned,
                                deterministic, grad_inputs, stream);
      },
      nogil);
#endif
}

}  // namespace fastcv
