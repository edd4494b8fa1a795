// The single Python module, fastcv._C. It does not link libtorch: tensors arrive as plain views
// (common/pyview.h), outputs are allocated by the Python caller, and CUDA work runs on the stream passed in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/check.h"
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

static const char* cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "x86-64-v3 (AVX2)";
  return "x86-64 (baseline)";
#else
  return "generic";
#endif
}

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
  build["cpu_isa"] = cpu_isa();
  m.attr("build_info") = build;
#ifdef FASTCV_WITH_CUDA
  m.def("cuda_runtime_info", &cuda_info_dict);
#endif

  m.def("parallel_backend", &fastcv::parallel_backend, "what runs the CPU kernels' parallel regions");
  m.def("_set_use_openmp", &fastcv::set_use_openmp, "tests: False runs parallel regions on fastcv's pool");

  fastcv::bind_nms(m);
  fastcv::bind_roi_align(m);
  fastcv::bind_im2col(m);
  fastcv::bind_conv2d(m);
  fastcv::bind_batch_norm(m);
  fastcv::bind_attention(m);
}
