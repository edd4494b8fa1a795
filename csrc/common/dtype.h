#pragma once
// Reduced-precision storage types and the dtype dispatch. The conversions are written out with bit
// operations so that host and device code use the same ones and no CUDA or torch header is needed.
#include <cstdint>
#include <cstring>

#include "common/check.h"
#include "common/macros.h"
#include "common/tensor_view.h"

namespace fastcv {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

FASTCV_HD float bits_to_float(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

FASTCV_HD float to_float(Half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}
FASTCV_HD float to_float(BFloat16 b) { return bits_to_float(uint32_t(b.bits) << 16); }
FASTCV_HD float to_float(float f) { return f; }
FASTCV_HD double to_float(double d) { return d; }

FASTCV_HD uint32_t float_to_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// float -> float16, rounding to nearest even (as PyTorch converts); overflow gives inf, NaN stays NaN.
FASTCV_HD Half to_half(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return Half{uint16_t(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u))};
  if (x >= 0x477ff000u) return Half{uint16_t(sign | 0x7c00u)};  // rounds past the largest half
  if (x < 0x38800000u) {  // below the smallest normal half: a multiple of 2^-24, rounded to even
    float r = bits_to_float(x) * 16777216.0f + 8388608.0f;  // adding 2^23 rounds to an integer
    r -= 8388608.0f;
    return Half{uint16_t(sign | uint16_t(r))};
  }
  x -= 112u << 23;  // rebias the exponent from float's 127 to half's 15
  return Half{uint16_t(sign | ((x + 0xfffu + ((x >> 13) & 1u)) >> 13))};
}

// float -> bfloat16, rounding to nearest even; NaN stays NaN.
FASTCV_HD BFloat16 to_bfloat16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((x >> 16) | 0x40u)};
  return BFloat16{uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

FASTCV_HD Half to_storage(float v, Half) { return to_half(v); }
FASTCV_HD BFloat16 to_storage(float v, BFloat16) { return to_bfloat16(v); }
FASTCV_HD float to_storage(float v, float) { return v; }
FASTCV_HD double to_storage(double v, double) { return v; }

// Arithmetic type for a storage type: reduced precision computes in float, as PyTorch's CUDA kernels do.
template <class T> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };
template <class T> using compute_t = typename ComputeType<T>::type;

// A compute-type value -> storage type S (rounding to nearest even for float16 and bfloat16).
template <class S>
FASTCV_HD S from_compute(compute_t<S> v) { return to_storage(v, S{}); }

// Calls f(T{}) with T the storage type of a floating dtype.
template <class F>
decltype(auto) dispatch_floating(DType dt, const char* arg, F&& f) {
  switch (dt) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(Half{});
    case DType::BFloat16: return f(BFloat16{});
    default: throw ArgError(std::string(arg) + " must be a floating tensor (float32, float64, float16 or bfloat16), got " + dtype_name(dt));
  }
}

}  // namespace fastcv
