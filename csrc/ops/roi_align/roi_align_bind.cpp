// Python bindings of roi_align. Arguments are converted with the GIL held; kernels run without it.
#include "common/pyview.h"
#include "ops/roi_align/roi_align_ops.h"

namespace py = pybind11;

namespace fastcv {

void bind_roi_align(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("roi_align_forward_cpu", &roi_align_forward_cpu, nogil);
  m.def("roi_align_backward_cpu", &roi_align_backward_cpu, nogil);
}

}  // namespace fastcv
