// The CPU instruction set in use (see cpu_isa.h).
#include "common/cpu_isa.h"

#include <cstdlib>

#include "common/check.h"

namespace fastcv {

const std::vector<Isa>& compiled_isas() {
#ifdef FASTCV_ISA_X86
  static const std::vector<Isa> isas{Isa::baseline, Isa::avx2, Isa::avx512};
#else
  static const std::vector<Isa> isas{Isa::baseline};
#endif
  return isas;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

bool cpu_supports(Isa isa) {
#ifdef FASTCV_ISA_X86
  __builtin_cpu_init();
  // x86-64-v3 and -v4, as the kernels are compiled (-march / target("arch=...")).
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                  __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512cd");
  switch (isa) {
    case Isa::avx512: return v4;
    case Isa::avx2: return v3;
    default: return true;
  }
#else
  return isa == Isa::baseline;
#endif
}

Isa best_cpu_isa() {
  Isa best = Isa::baseline;
  for (Isa isa : compiled_isas())
    if (cpu_supports(isa)) best = isa;
  return best;
}

namespace detail {
std::atomic<int> current_isa{int(best_cpu_isa())};
}

void set_cpu_isa(const std::string& name) {
  std::string known;
  for (Isa isa : compiled_isas()) {
    known += std::string(known.empty() ? "" : ", ") + isa_name(isa);
    if (name != isa_name(isa)) continue;
    if (!cpu_supports(isa))
      throw ArgError("cpu_isa: this CPU does not support '" + name + "' (best: '" + isa_name(best_cpu_isa()) + "')");
    detail::current_isa.store(int(isa), std::memory_order_relaxed);
    return;
  }
  throw ArgError("cpu_isa: expected one of " + known + ", got '" + name + "'");
}

}  // namespace fastcv
