#pragma once
// Stable LSD radix sort of (key, value) pairs by unsigned key, and the keys that order floating
// scores and signed labels the way torch.sort(descending=True, stable=True) and ascending ints do.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastcv {

// Sorts keys ascending, carrying values along; equal keys keep their order. 11-bit digits; passes in
// which every key has the same digit (the high bits of scores in [0, 1], of small labels) are skipped.
template <class K>
void radix_sort_pairs(std::vector<K>& keys, std::vector<int64_t>& values) {
  static_assert(std::is_unsigned<K>::value, "radix keys are unsigned");
  constexpr int kBits = 11;
  constexpr K kMask = (K(1) << kBits) - 1;
  const int64_t n = int64_t(keys.size());
  if (n < 2) return;
  std::vector<K> keys2(n);
  std::vector<int64_t> values2(n);
  std::vector<int64_t> start(size_t(kMask) + 1);
  for (int shift = 0; shift < int(sizeof(K) * 8); shift += kBits) {
    std::fill(start.begin(), start.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++start[(keys[i] >> shift) & kMask];
    if (start[(keys[0] >> shift) & kMask] == n) continue;
    int64_t sum = 0;
    for (auto& s : start) sum += std::exchange(s, sum);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t to = start[(keys[i] >> shift) & kMask]++;
      keys2[to] = keys[i];
      values2[to] = values[i];
    }
    keys.swap(keys2);
    values.swap(values2);
  }
}

// Ascending order of these keys = descending score, NaN first (torch.sort ranks NaN highest), and
// -0.0 equal to 0.0, as comparisons make them.
template <class F>
auto descending_key(F f) {
  using U = std::conditional_t<sizeof(F) == 4, uint32_t, uint64_t>;
  constexpr U kSign = U(1) << (8 * sizeof(U) - 1);
  if (f != f) return U(0);
  if (f == F(0)) f = F(0);
  U b;
  std::memcpy(&b, &f, sizeof(b));
  const U ascending = (b & kSign) ? ~b : (b | kSign);
  return U(~ascending);  // never 0 for a number: that would need the bits of a NaN
}
// Ascending order of these keys = ascending signed label.
inline uint64_t ascending_key(int64_t label) { return uint64_t(label) ^ 0x8000000000000000ull; }

}  // namespace fastcv
