// The GEMM micro-kernel for the ISA in use (isa/gemm_tile.cpp is compiled once per instruction set).
#include "compute/gemm.h"

#include <chrono>
#include <vector>

#include "common/cpu_isa.h"
#include "common/parallel.h"

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

template <class T>
double tile_gflops(int nthreads, double seconds) {
  const Kernel<T>& kern = kernel(T{});
  std::vector<double> rates(size_t(std::max(nthreads, 1)), 0.0);
  run_on_threads(nthreads, [&](int worker) {
    // One kKC-deep A and B panel and a C tile: all in L1, so only the arithmetic is timed.
    std::vector<T> a(size_t(kKC * kern.mr), T(1) / T(3)), b(size_t(kKC * kern.nr), T(1) / T(7));
    std::vector<T> c(size_t(kern.mr * kern.nr), T(0));
    using clock = std::chrono::steady_clock;
    int64_t calls = 0;
    const auto start = clock::now();
    double elapsed = 0;
    do {
      for (int r = 0; r < 64; ++r) kern.tile(kKC, a.data(), b.data(), c.data(), kern.nr, true);
      calls += 64;
      elapsed = std::chrono::duration<double>(clock::now() - start).count();
    } while (elapsed < seconds);
    rates[size_t(worker)] = 2.0 * kern.mr * kern.nr * kKC * double(calls) / elapsed / 1e9;
  });
  double total = 0;
  for (double r : rates) total += r;
  return total;
}
template double tile_gflops<float>(int, double);
template double tile_gflops<double>(int, double);

}  // namespace gemm
}  // namespace fastcv
