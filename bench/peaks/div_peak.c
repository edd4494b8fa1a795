// The machine limit NMS is measured against (README, Performance): gcc -O2 -mavx512f div_peak.c && ./a.out
#include <stdio.h>
#include <time.h>
#include <immintrin.h>
// Peak of 16-wide float division on one core: 8 independent chains of vdivps on registers.
int main(void) {
  __m512 a[8], b = _mm512_set1_ps(1.0000001f);
  for (int i = 0; i < 8; ++i) a[i] = _mm512_set1_ps(1.0f + i);
  const long iters = 20000000;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long it = 0; it < iters; ++it)
    for (int i = 0; i < 8; ++i) a[i] = _mm512_div_ps(a[i], b);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  float sink = 0; for (int i = 0; i < 8; ++i) sink += _mm512_reduce_add_ps(a[i]);
  printf("%.2f G float divisions/s per core (sink %g)\n", iters * 8.0 * 16 / s / 1e9, sink);
  return 0;
}
