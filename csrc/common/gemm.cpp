// Run-time choice of the GEMM micro-kernel (isa/gemm_tile.cpp is compiled once per instruction set).
#include "common/gemm.h"

namespace fastcv {
namespace gemm {

#define FASTCV_DECLARE_ISA(name)   \
  namespace name {                 \
  Kernel<float> make(float);       \
  Kernel<double> make(double);     \
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

template <class T>
Kernel<T> best_kernel() {
#ifdef FASTCV_GEMM_X86_ISAS
  if (best_isa() == Isa::avx512) return avx512::make(T{});
  if (best_isa() == Isa::avx2) return avx2::make(T{});
#endif
  return baseline::make(T{});
}

const Kernel<float>& kernel(float) {
  static const Kernel<float> k = best_kernel<float>();
  return k;
}

const Kernel<double>& kernel(double) {
  static const Kernel<double> k = best_kernel<double>();
  return k;
}

}  // namespace gemm
}  // namespace fastcv
