// Run-time choice of the GEMM micro-kernel (isa/gemm_tile.cpp is compiled once per instruction set).
#include "common/gemm.h"

namespace fastcv {
namespace gemm {

#define FASTCV_DECLARE_ISA(name)   \
  namespace name {                 \
  Kernel<float> kernel_f32();      \
  Kernel<double> kernel_f64();     \
  }
FASTCV_DECLARE_ISA(baseline)
#ifdef FASTCV_GEMM_X86_ISAS
FASTCV_DECLARE_ISA(avx512)
FASTCV_DECLARE_ISA(avx2)
#endif

namespace {

enum class Isa { avx512, avx2, baseline };

Isa best_isa() {
#ifdef FASTCV_GEMM_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::baseline;
}

}  // namespace

const Kernel<float>& kernel(float) {
  static const Kernel<float> k = [] {
#ifdef FASTCV_GEMM_X86_ISAS
    if (best_isa() == Isa::avx512) return avx512::kernel_f32();
    if (best_isa() == Isa::avx2) return avx2::kernel_f32();
#endif
    return baseline::kernel_f32();
  }();
  return k;
}

const Kernel<double>& kernel(double) {
  static const Kernel<double> k = [] {
#ifdef FASTCV_GEMM_X86_ISAS
    if (best_isa() == Isa::avx512) return avx512::kernel_f64();
    if (best_isa() == Isa::avx2) return avx2::kernel_f64();
#endif
    return baseline::kernel_f64();
  }();
  return k;
}

}  // namespace gemm
}  // namespace fastcv
