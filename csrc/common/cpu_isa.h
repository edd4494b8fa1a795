#pragma once
// The instruction set the CPU kernels run: the best one this CPU supports, unless forced (tests run
// every kernel under each ISA the machine has; FASTCV_CPU_ISA and fastcv.force_cpu_isa set it).
//
// Kernels whose speed depends on the ISA are compiled once per ISA: the GEMM micro-kernels in their own
// translation units (compute/isa/gemm_tile.cpp), hot loops elsewhere through FASTCV_ISA_DISPATCH below. Both
// read cpu_isa() on every call, so forcing takes effect at once for every kernel.
#include <atomic>
#include <string>
#include <vector>

namespace fastcv {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

// The instruction sets this build has kernels for, best last.
const std::vector<Isa>& compiled_isas();
const char* isa_name(Isa isa);
// Whether this CPU runs `isa` (baseline always).
bool cpu_supports(Isa isa);
// The best compiled ISA this CPU runs.
Isa best_cpu_isa();

namespace detail {
extern std::atomic<int> current_isa;
}

// The ISA in use.
inline Isa cpu_isa() { return Isa(detail::current_isa.load(std::memory_order_relaxed)); }

// Forces the ISA in use by name ("baseline", "avx2", "avx512"); ArgError for an unknown name, one this
// build has no kernels for, or one this CPU lacks.
void set_cpu_isa(const std::string& name);

}  // namespace fastcv

// FASTCV_ISA_DISPATCH(ret, name, impl, (params), (args)) defines `ret name(params)` that runs
// `impl(args)` compiled for the ISA in use: one copy of the function per ISA, each with that ISA's
// target attribute, so whatever `impl` inlines is vectorised for it. `impl` must be inlined into the
// copies (FASTCV_ISA_INLINE) for them to differ.
#define FASTCV_ISA_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define FASTCV_ISA_X86 1
#define FASTCV_ISA_DISPATCH(ret, name, impl, params, args)                                        \
  __attribute__((target("arch=x86-64-v4"))) static ret name##_avx512 params { return impl args; } \
  __attribute__((target("arch=x86-64-v3"))) static ret name##_avx2 params { return impl args; }   \
  static ret name##_baseline params { return impl args; }                                         \
  ret name params {                                                                               \
    switch (::fastcv::cpu_isa()) {                                                                \
      case ::fastcv::Isa::avx512: return name##_avx512 args;                                      \
      case ::fastcv::Isa::avx2: return name##_avx2 args;                                          \
      default: return name##_baseline args;                                                       \
    }                                                                                             \
  }
#else
#define FASTCV_ISA_DISPATCH(ret, name, impl, params, args) \
  ret name params { return impl args; }
#endif
