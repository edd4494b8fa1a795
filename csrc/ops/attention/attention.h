#pragma once
// Per-element math of scaled-dot-product attention: the exponential of the online softmax, and the
// counter-based random numbers of dropout (Philox 4x32-10, the generator of Triton's tl.philox, with the
// counters kernels/attention.py uses, so the CPU and Triton kernels drop the same elements).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/macros.h"

namespace fastcv {
namespace attention {

// Scores are kept in base 2 (the scale multiplied by log2(e) when Q is packed), so the softmax's
// exponential is 2^x, which needs no range reduction by ln 2.

// 2^x for float x <= 0 (the softmax only ever exponentiates a score minus its row's maximum or
// log-sum-exp), within 2 ulp, without branches or library calls so that loops over it vectorise.
// Below 2^-125 it returns exactly 0 (masked scores, -inf, give probability 0); NaN propagates.
FASTCV_HD float exp2(float x) {
  const float xc = x < -125.0f ? -125.0f : x;
  // n = round(x) by the 1.5 * 2^23 trick: t holds n in its low mantissa bits, f = x - n in [-1/2, 1/2].
  const float magic = 12582912.0f;
  const float t = xc + magic;
  const float f = xc - (t - magic);
  // Cephes' exp2f polynomial: 2^f = 1 + f P(f) on [-1/2, 1/2].
  float p = 1.535336188319500e-4f;
  p = std::fma(p, f, 1.339887440266574e-3f);
  p = std::fma(p, f, 9.618437357674640e-3f);
  p = std::fma(p, f, 5.550332471162809e-2f);
  p = std::fma(p, f, 2.402264791363012e-1f);
  p = std::fma(p, f, 6.931472028550421e-1f);
  p = std::fma(p, f, 1.0f);
  // Times 2^n: add n to the exponent field (t's bits shifted left by 23 are n << 23, wrapped).
  uint32_t pb, tb;
  std::memcpy(&pb, &p, 4);
  std::memcpy(&tb, &t, 4);
  const uint32_t yb = pb + (tb << 23);
  float y;
  std::memcpy(&y, &yb, 4);
  return x < -125.0f ? 0.0f : (x != x ? x : y);
}
FASTCV_HD double exp2(double x) { return std::exp2(x); }

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// ---- dropout: Philox 4x32 with 10 rounds, as Triton's tl.philox computes it

FASTCV_HD uint32_t mulhi(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * b) >> 32); }

struct Philox4 {
  uint32_t w[4];
};

// Philox4x32-10 of counter (c0, c1, c2, c3) under the 64-bit key `seed` (low word first).
FASTCV_HD Philox4 philox(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// A probability p as the threshold the 32-bit words are compared with: round(p * 2^32), at most 2^32 - 1.
inline uint32_t dropout_threshold(double p) {
  const double t = std::nearbyint(p * 4294967296.0);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
}

// Whether element (b, h, i, j) of the probabilities survives dropout (bh = b * Hq + h): word j % 4 of
// Philox(seed, counter (j / 4, i, bh, offset)) at or above the threshold. One Philox call decides four
// neighbouring keys; kernels/attention.py draws the same words, so the CPU and Triton kernels drop the
// same elements for the same seed.
FASTCV_HD bool dropout_keep(uint64_t seed, uint32_t offset, uint32_t bh, uint32_t i, uint32_t j, uint32_t threshold) {
  return philox(seed, j / 4, i, bh, offset).w[j % 4] >= threshold;
}

}  // namespace attention
}  // namespace fastcv
