#pragma once
// The GEMM micro-kernel's interface, kept apart from gemm.h: isa/gemm_tile.cpp (compiled with AVX-512 or
// AVX2 flags) includes only this, so no inline function of a shared header is compiled with those flags.
#include <cstdint>

namespace fastcv {
namespace gemm {

// One register-blocked micro-kernel: c[i * ldc + j] (+)= sum_k a[k * mr + i] * b[k * nr + j] for an
// mr x nr tile; `accumulate` false overwrites c. Compiled per instruction set (isa/gemm_tile.cpp).
template <class T>
struct Kernel {
  int mr, nr;
  void (*tile)(int64_t kc, const T* a, const T* b, T* c, int64_t ldc, bool accumulate);
  const char* isa;
};

}  // namespace gemm
}  // namespace fastcv
