// The single Python module, fastcv._C. It does not link libtorch: tensors arrive as plain views
// (common/pyview.h), outputs are allocated by the Python caller, and CUDA work runs on the stream passed in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "compute/gemm.h"
#include "common/check.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"
#ifdef FASTCV_WITH_CUDA
#include "common/cuda_info.h"
#endif

#ifndef FASTCV_VERSION
#define FASTCV_VERSION ""
#endif
#ifndef FASTCV_CUDA_ARCHS_STR
#define FASTCV_CUDA_ARCHS_STR ""
#endif
#ifndef FASTCV_NVCC_VERSION
#define FASTCV_NVCC_VERSION ""
#endif

namespace py = pybind11;

namespace fastcv {
void bind_nms(py::module_& m);
void bind_roi_align(py::module_& m);
void bind_im2col(py::module_& m);
void bind_conv2d(py::module_& m);
void bind_batch_norm(py::module_& m);
void bind_attention(py::module_& m);
}  // namespace fastcv

#ifdef FASTCV_WITH_CUDA
static py::dict cuda_info_dict() {
  const fastcv::CudaInfo info = fastcv::cuda_runtime_info();
  py::dict d;
  d["runtime_version"] = info.runtime_version;
  d["driver_version"] = info.driver_version;
  d["error"] = info.error;
  py::list devices;
  for (const auto& dev : info.devices) {
    py::dict e;
    e["index"] = dev.index;
    e["name"] = dev.name;
    e["capability"] = py::make_tuple(dev.major, dev.minor);
    devices.append(e);
  }
  d["devices"] = devices;
  return d;
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcv compiled kernels (CPU C++ and, when built, CUDA)";
  py::register_exception<fastcv::ArgError>(m, "ArgError", PyExc_ValueError);

  py::dict build;
  build["version"] = FASTCV_VERSION;
#ifdef FASTCV_WITH_CUDA
  build["cuda"] = true;
#else
  build["cuda"] = false;
#endif
  build["cuda_archs"] = FASTCV_CUDA_ARCHS_STR;
  build["nvcc"] = FASTCV_NVCC_VERSION;
  build["cxx"] = __VERSION__;
  m.attr("build_info") = build;
#ifdef FASTCV_WITH_CUDA
  m.def("cuda_runtime_info", &cuda_info_dict);
#endif

  py::list isas;
  for (fastcv::Isa isa : fastcv::compiled_isas()) isas.append(fastcv::isa_name(isa));
  build["cpu_isas"] = isas;  // compiled, best last
  m.def("cpu_isa", [] { return fastcv::isa_name(fastcv::cpu_isa()); }, "the CPU instruction set the kernels run");
  m.def("set_cpu_isa", &fastcv::set_cpu_isa, "forces the CPU instruction set of every dispatched kernel");
  m.def("cpu_supports", [](const std::string& name) {
    for (fastcv::Isa isa : fastcv::compiled_isas())
      if (name == fastcv::isa_name(isa)) return fastcv::cpu_supports(isa);
    return false;
  }, "whether this CPU runs the kernels compiled for an instruction set");
  m.def("gemm_tile_gflops", &fastcv::gemm::tile_gflops<float>,
        "the float32 GEMM micro-kernel's GFLOP/s on L1-resident panels, summed over nthreads threads");
  m.def("parallel_backend", &fastcv::parallel_backend, "what runs the CPU kernels' parallel regions");
  m.def("_set_use_openmp", &fastcv::set_use_openmp, "tests: False runs parallel regions on fastcv's pool");

  fastcv::bind_nms(m);
  fastcv::bind_roi_align(m);
  fastcv::bind_im2col(m);
  fastcv::bind_conv2d(m);
  fastcv::bind_batch_norm(m);
  fastcv::bind_attention(m);
}
