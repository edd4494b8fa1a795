// The GEMM micro-kernel for the ISA in use (isa/gemm_tile.cpp is compiled once per instruction set).
#include "compute/gemm.h"

#include "common/cpu_isa.h"

namespace fastcv {
namespace gemm {

#define FASTCV_DECLARE_ISA(name)   \
  namespace name {                 \
  Kernel<float> make(float);       \
  Kernel<double> make(double);     \
  }
FASTCV_DECLARE_ISA(baseline)
#ifdef FASTCV_ISA_X86
FASTCV_DECLARE_ISA(avx512)
FASTCV_DECLARE_ISA(avx2)
#endif

// Each ISA's kernel is made on first use: make() itself is compiled for its ISA, so it must not run on
// a CPU without it (cpu_isa() is only ever one the CPU supports).
template <class T>
const Kernel<T>& kernel_for(Isa isa) {
  static const Kernel<T> base = baseline::make(T{});
#ifdef FASTCV_ISA_X86
  if (isa == Isa::avx512) {
    static const Kernel<T> k = avx512::make(T{});
    return k;
  }
  if (isa == Isa::avx2) {
    static const Kernel<T> k = avx2::make(T{});
    return k;
  }
#endif
  return base;
}

const Kernel<float>& kernel(float) { return kernel_for<float>(cpu_isa()); }
const Kernel<double>& kernel(double) { return kernel_for<double>(cpu_isa()); }

}  // namespace gemm
}  // namespace fastcv
