// CUDA batch norm: per-channel statistics, normalisation (with a fused residual add and ReLU) and
// backward, with the per-element arithmetic of batch_norm.h. Memory traffic decides the speed, so each
// pass reads every tensor once, in vectors of up to 16 bytes where the layout and alignment allow.
//
// One work division serves every kernel. A "column" is what a thread keeps fixed:
//   planar (NCHW): one channel, whose N*S values are N runs of S contiguous values, C*S apart;
//   packed (channels_last): V adjacent channels (one vector), whose values are the rows, C apart.
// Block (blockIdx.x, blockIdx.y) takes blockDim.x columns and one chunk of their values; threadIdx.y
// strides through the chunk, so a warp reads contiguous memory. A thread's channels never change: their
// coefficients are computed once and kept in registers, and no element needs a division to find its
// channel. Few columns (C small, N*S large) are split into one wave of equal blocks; many columns (C
// large, N*S small) take a block each, split further only where several waves of work need it.
//   statistics: each thread keeps the moments of its values: every tile of values it loads is reduced
//     in registers in two passes (mean, then squared deviations), tiles are Chan-merged (batch_norm.h).
//     The block merges its threads in a fixed tree, the blocks of a channel are merged in a fixed order
//     by one warp: the results are the same on every run.
//   backward sums: the same with plain sums of g and g * (x - mean), centred so float suffices.
//   elementwise (forward, input gradient): one load, two multiply-adds, one store per element.
// Launches: training forward = stats_kernel [+ finalize_kernel] + forward_kernel; evaluation forward =
// forward_kernel; backward = [grad_sums_kernel [+ finalize_kernel]] + grad_kernel. The partials and the
// backward's channel sums live in stream-ordered scratch memory (cudaMallocAsync / cudaFreeAsync).
// Float16 and bfloat16 compute in float, float64 in double. Indices are 64-bit. Nothing syncs the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "ops/batch_norm/batch_norm.h"
#include "ops/batch_norm/batch_norm_ops.h"

namespace fastcv {
namespace {

using batch_norm::Affine;
using batch_norm::GradCoeffs;
using batch_norm::Moments;

constexpr int kThreads = 256;  // threads per block of the main kernels
// Blocks of kThreads resident per SM: __launch_bounds__ holds the kernels to the 80 registers this
// allows (none spills), and plan() sizes a wave of blocks by it.
constexpr int kBlocksPerSm = 3;
constexpr int kWarp = 32;
constexpr int kFinalizeWarps = 4;  // finalize: one warp per channel, 4 per block
constexpr int kMinThreadBytes = 128;  // of each tensor per thread at least, when splitting columns

// Vectors of V values a thread loads before it uses them (a batch): about 64 bytes of each tensor in
// flight per thread (32 for the backward's three tensors), which covers DRAM latency at kBlocksPerSm
// blocks per SM. Narrow vectors (odd S or C) need more of them, up to what 80 registers hold; packed
// batches hold fewer, as the compiler keeps their (affine) addresses from the loads to the stores.
template <class S, int V>
constexpr int kReadUnroll = std::min(16, std::max(1, 64 / int(sizeof(S) * V)));
template <class S, int V, bool kPacked>
constexpr int kApplyUnroll =
    std::min(kPacked ? 32 / int(sizeof(compute_t<S>)) : 16, std::max(1, 64 / int(sizeof(S) * V)));
template <class S, int V, bool kPacked>
constexpr int kGradUnroll = std::min(kPacked ? 4 : 8, std::max(1, 32 / int(sizeof(S) * V)));

// ---------------------------------------------------------------- element access

// Hardware conversions for float16 and bfloat16: one instruction each, where dtype.h's portable bit
// versions cost about ten per element, too many for a pass that moves two bytes per element. Both round
// to nearest even, as dtype.h does (only NaN payloads may differ).
__device__ __forceinline__ float device_float(Half h) { return __half2float(__ushort_as_half(h.bits)); }
__device__ __forceinline__ float device_float(BFloat16 b) { return __uint_as_float(uint32_t(b.bits) << 16); }
__device__ __forceinline__ float device_float(float v) { return v; }
__device__ __forceinline__ double device_float(double v) { return v; }

__device__ __forceinline__ void device_store(float v, Half& h) { h.bits = __half_as_ushort(__float2half_rn(v)); }
__device__ __forceinline__ void device_store(float v, BFloat16& b) {
  b.bits = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
__device__ __forceinline__ void device_store(float v, float& out) { out = v; }
__device__ __forceinline__ void device_store(double v, double& out) { out = v; }

// A vector of V storage values moves as one unsigned integer type of its size (one load instruction).
template <int kBytes> struct RawVec;
template <> struct RawVec<2> { using type = unsigned short; };
template <> struct RawVec<4> { using type = unsigned int; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<16> { using type = uint4; };
template <class S, int V>
using Raw = typename RawVec<int(sizeof(S)) * V>::type;

// V storage values as one load brought them. They are converted where used, so that the registers of a
// batch of loads in flight stay as few as the bytes (half of the float values for 2-byte types).
template <class S, int V>
struct Packet {
  Raw<S, V> raw;
  __device__ __forceinline__ compute_t<S> operator[](int v) const {
    S s[V];
    memcpy(s, &raw, sizeof(raw));
    return device_float(s[v]);
  }
};

// Vector i of p (values i*V .. i*V + V-1). No __restrict__ or __ldg: the output may be the input (in
// place), which is safe because each element is read before the same thread writes it.
template <class S, int V>
__device__ __forceinline__ Packet<S, V> load_vec(const S* p, int64_t i) {
  return {reinterpret_cast<const Raw<S, V>*>(p)[i]};
}

template <class S, int V>
__device__ __forceinline__ void store_vec(S* p, int64_t i, const compute_t<S> (&in)[V]) {
  S s[V];
#pragma unroll
  for (int v = 0; v < V; ++v) device_store(in[v], s[v]);
  Raw<S, V> raw;
  memcpy(&raw, s, sizeof(raw));
  reinterpret_cast<Raw<S, V>*>(p)[i] = raw;
}

// Channel of value slot k of a thread's vectors: planar vectors lie in the column's one channel, packed
// vectors hold V channels.
template <bool kPacked, int V>
__device__ __forceinline__ int64_t channel_of(int64_t column, int k) {
  return kPacked ? column * V + k : column;
}

// ---------------------------------------------------------------- the work division

// Where a thread is in its column: position p (in units of V values), p % len, and the vector offset.
struct Cursor {
  int64_t p, r, off;
};

// The vectors of a column. Column j's position p is at vector offset j * len + (p / len) * pitch + p % len.
struct Walk {
  int64_t columns;  // planar: C; packed: C / V
  int64_t len;      // positions that lie contiguous (planar: S / V; packed: 1)
  int64_t pitch;    // from one such run to the next (planar: C * S / V; packed: C / V)
  int64_t length;   // positions per column (planar: N * S / V; packed: N * S rows)
  int64_t chunk;    // positions per block along blockIdx.y
  int64_t step_r, step_off;  // a thread's step, blockDim.y positions: the move within the run, in memory

  __device__ __forceinline__ Cursor at(int64_t column, int64_t p) const {
    const int64_t r = p % len;
    return {p, r, column * len + p / len * pitch + r};
  }
  // Moves dp positions on, dr = dp % len of them within the run, doff in memory; no division.
  template <bool kPacked>
  __device__ __forceinline__ void advance(Cursor& c, int64_t dp, int64_t dr, int64_t doff) const {
    c.p += dp, c.off += doff;
    if (kPacked) return;  // packed runs are one position long: never a partial run to carry
    c.r += dr;
    if (c.r >= len) c.r -= len, c.off += pitch - len;
  }
};

// A thread's next U positions (the cursor at the first) and how many of them lie in the block's chunk.
struct Batch {
  Cursor first;
  int valid;
};

// Calls visit(batch) for the thread's positions blockIdx.y * chunk + threadIdx.y + k * blockDim.y inside
// the block's chunk of `column`, U at a time.
template <bool kPacked, int U, class F>
__device__ __forceinline__ void walk(const Walk& w, int64_t column, F&& visit) {
  const int64_t first = int64_t(blockIdx.y) * w.chunk, stop = std::min(w.length, first + w.chunk);
  const int64_t step = blockDim.y, batch = U * step;
  const int64_t batch_r = batch % w.len, batch_off = batch / w.len * w.pitch + batch_r;
  for (Cursor c = w.at(column, first + threadIdx.y); c.p < stop; w.advance<kPacked>(c, batch, batch_r, batch_off)) {
    // Every batch is full but the chunk's last: the division is paid once.
    const int valid = c.p + (U - 1) * step < stop ? U : int((stop - c.p + step - 1) / step);
    visit(Batch{c, valid});
  }
}

// Calls f(u, vector offset) for the batch's valid positions u in order. Kernels call it once to load and
// once to store: replaying the cursor costs a few integer adds, keeping U offsets would cost 2U registers.
template <bool kPacked, int U, class F>
__device__ __forceinline__ void for_each(const Walk& w, const Batch& b, F&& f) {
  Cursor c = b.first;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (u < b.valid) f(u, c.off);
    w.advance<kPacked>(c, blockDim.y, w.step_r, w.step_off);
  }
}

// The thread's column: planar blocks are one column wide (blockDim.x = 1), packed ones up to 32.
__device__ __forceinline__ int64_t thread_column() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }

// Sets the thread's column and out[k] = of(channel of slot k), per-channel values computed once per
// thread and kept in registers; false, with out untouched, when the thread has no column (a partial
// last packed tile).
template <bool kPacked, int V, class T, int K, class F>
__device__ __forceinline__ bool column_values(const Walk& w, int64_t& column, T (&out)[K], F&& of) {
  column = thread_column();
  if (column >= w.columns) return false;
#pragma unroll
  for (int k = 0; k < K; ++k) out[k] = of(channel_of<kPacked, V>(column, k));
  return true;
}

// ---------------------------------------------------------------- reductions

template <class A>
struct GradSums {
  A g = 0, gx = 0;  // sum(g), sum(g * (x - mean))
};

template <class A>
__device__ __forceinline__ Moments<A> combine(const Moments<A>& a, const Moments<A>& b) {
  return batch_norm::merge(a, b);
}
template <class A>
__device__ __forceinline__ GradSums<A> combine(const GradSums<A>& a, const GradSums<A>& b) {
  return {a.g + b.g, a.gx + b.gx};
}

template <class A>
__device__ __forceinline__ Moments<A> shuffle_down(const Moments<A>& m, int delta) {
  return {__shfl_down_sync(~0u, m.n, delta), __shfl_down_sync(~0u, m.mean, delta),
          __shfl_down_sync(~0u, m.m2, delta)};
}
template <class A>
__device__ __forceinline__ GradSums<A> shuffle_down(const GradSums<A>& s, int delta) {
  return {__shfl_down_sync(~0u, s.g, delta), __shfl_down_sync(~0u, s.gx, delta)};
}

// Lane 0 gets the combination of the warp's 32 values, always in the same tree.
template <class Acc>
__device__ __forceinline__ Acc warp_combine(Acc v) {
#pragma unroll
  for (int delta = kWarp / 2; delta > 0; delta /= 2) v = combine(v, shuffle_down(v, delta));
  return v;
}

// Combines the values of the threads that share threadIdx.x (threadIdx.y = 0 .. blockDim.y - 1) in a
// fixed tree; every thread gets its column's result. All threads of the block must call it.
template <class Acc>
__device__ Acc reduce_column(const Acc& v) {
  __shared__ __align__(16) unsigned char storage[kThreads * sizeof(Acc)];  // Acc is not trivially constructible
  Acc* buf = reinterpret_cast<Acc*>(storage);
  const int x = threadIdx.x, y = threadIdx.y, nx = blockDim.x, ny = blockDim.y;
  buf[y * nx + x] = v;
  __syncthreads();
  // After the step of size s, rows [0, s) hold the combination of rows [0, 2s): any ny, fixed order.
  for (int s = ny > 1 ? 1 << (31 - __clz(ny - 1)) : 0; s > 0; s /= 2) {
    if (y < s && y + s < ny) buf[y * nx + x] = combine(buf[y * nx + x], buf[(y + s) * nx + x]);
    __syncthreads();
  }
  const Acc r = buf[x];
  __syncthreads();  // the next call reuses the buffer
  return r;
}

// The block's result for each channel of its columns: the channel's total when the block is the only one
// along blockIdx.y, else a partial at partial[blockIdx.y * channels + c] for finalize_kernel.
template <bool kPacked, int V, int K, class Out>
__device__ void publish(const Out& out, const typename Out::Acc (&acc)[K], int64_t column, bool active) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const typename Out::Acc total = reduce_column(acc[k]);
    if (!active || threadIdx.y != 0) continue;
    const int64_t c = channel_of<kPacked, V>(column, k);
    if (gridDim.y == 1)
      out.finish(c, total);
    else
      out.partial[blockIdx.y * out.channels + c] = total;
  }
}

// Merges each channel's partials in index order, one warp per channel (lane l takes partials l, l + 32,
// ..., then the warp tree): deterministic.
template <class Out>
__global__ void finalize_kernel(Out out, int64_t splits) {
  const int64_t c = blockIdx.x * int64_t(kFinalizeWarps) + threadIdx.x / kWarp;
  if (c >= out.channels) return;  // c is the same across the warp: whole warps leave
  typename Out::Acc acc;
  for (int64_t j = threadIdx.x % kWarp; j < splits; j += kWarp) acc = combine(acc, out.partial[j * out.channels + c]);
  acc = warp_combine(acc);
  if (threadIdx.x % kWarp == 0) out.finish(c, acc);
}

// ---------------------------------------------------------------- statistics

template <class A>
struct StatsOut {
  using Acc = Moments<A>;
  Acc* partial;
  A *mean, *var;
  int64_t channels;
  A count;  // N * S
  __device__ void finish(int64_t c, const Acc& m) const { mean[c] = m.mean, var[c] = m.m2 / count; }
};

// Folds a tile (the first `valid` of U loaded vectors) into the thread's moments: the tile's mean and
// squared deviations from it, both over registers, then Chan's merge. Slot k of the K moments takes
// values v with v % K == k (K = 1 planar: one channel; K = V packed: one per channel).
template <int U, class S, int V, int K>
__device__ __forceinline__ void add_tile(const Packet<S, V> (&x)[U], int valid, Moments<compute_t<S>> (&acc)[K]) {
  using A = compute_t<S>;
  A mean[K] = {}, m2[K] = {};
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (u < valid) mean[v % K] += x[u][v];
  const A n = A(valid * (V / K));
  const A inv = valid == U ? A(1) / A(U * (V / K)) : A(1) / n;  // a constant for full tiles
#pragma unroll
  for (int k = 0; k < K; ++k) mean[k] *= inv;
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (u < valid) {
        const A d = x[u][v] - mean[v % K];
        m2[v % K] += d * d;
      }
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = batch_norm::merge(acc[k], Moments<A>{n, mean[k], m2[k]});
}

template <class S, int V, bool kPacked>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    stats_kernel(const S* x, Walk w, StatsOut<compute_t<S>> out) {
  using A = compute_t<S>;
  constexpr int K = kPacked ? V : 1;
  const int64_t column = thread_column();
  const bool active = column < w.columns;
  constexpr int U = kReadUnroll<S, V>;
  Moments<A> acc[K];
  if (active)
    walk<kPacked, U>(w, column, [&](const Batch& b) {
      Packet<S, V> v[U] = {};
      for_each<kPacked, U>(w, b, [&](int u, int64_t off) { v[u] = load_vec<S, V>(x, off); });
      add_tile(v, b.valid, acc);
    });
  publish<kPacked, V>(out, acc, column, active);
}

// ---------------------------------------------------------------- forward normalisation

template <class A>
struct ChannelParams {
  const A *mean, *var, *weight, *bias;  // weight, bias: null when absent (1, 0)
  A eps;
};

template <class S, int V, bool kPacked>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    forward_kernel(const S* x, const S* residual, S* y, Walk w, ChannelParams<compute_t<S>> p, bool relu) {
  using A = compute_t<S>;
  constexpr int K = kPacked ? V : 1;
  int64_t column;
  Affine<A> f[K];
  const bool active = column_values<kPacked, V>(w, column, f, [&](int64_t c) {
    return batch_norm::affine(p.mean[c], p.var[c], p.eps, p.weight ? p.weight[c] : A(1), p.bias ? p.bias[c] : A(0));
  });
  if (!active) return;  // no barriers in this kernel
  constexpr int U = kApplyUnroll<S, V, kPacked>;
  walk<kPacked, U>(w, column, [&](const Batch& b) {
    Packet<S, V> v[U] = {}, r[U] = {};
    for_each<kPacked, U>(w, b, [&](int u, int64_t off) {  // every load first: they are in flight together
      v[u] = load_vec<S, V>(x, off);
      if (residual) r[u] = load_vec<S, V>(residual, off);
    });
    for_each<kPacked, U>(w, b, [&](int u, int64_t off) {
      A o[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        o[k] = batch_norm::apply(v[u][k], f[k % K]);
        if (residual) o[k] += r[u][k];
        if (relu) o[k] = batch_norm::relu(o[k]);
      }
      store_vec<S, V>(y, off, o);
    });
  });
}

// ---------------------------------------------------------------- backward

template <class S>
struct GradTensors {
  const S *dy, *x, *y;  // y: the forward's output when a ReLU was fused (its sign masks dy), else null
  S *dx, *dres;         // outputs, null when not requested
};

template <class A>
struct SumsOut {
  using Acc = GradSums<A>;
  Acc* partial;
  Acc* sums;  // [C] the channel totals, for grad_kernel
  const A* var;
  A eps;
  A *grad_weight, *grad_bias;  // null when not requested
  int64_t channels;
  __device__ void finish(int64_t c, const Acc& s) const {
    sums[c] = s;
    if (grad_weight) grad_weight[c] = s.gx * batch_norm::inverse_std(var[c], eps);
    if (grad_bias) grad_bias[c] = s.g;
  }
};

// A step's vectors of grad_y, y (when a ReLU was fused) and x (when needed), as loaded.
template <class S, int U, int V>
struct GradBatch {
  Packet<S, V> dy[U] = {}, y[U] = {}, x[U] = {};

  // Loads the batch's vectors; x only when x_or_null is non-null.
  template <bool kPacked>
  __device__ __forceinline__ void load(const GradTensors<S>& t, const S* x_or_null, const Walk& w, const Batch& b) {
    for_each<kPacked, U>(w, b, [&](int u, int64_t off) {
      dy[u] = load_vec<S, V>(t.dy, off);
      if (t.y) y[u] = load_vec<S, V>(t.y, off);
      if (x_or_null) x[u] = load_vec<S, V>(x_or_null, off);
    });
  }
  // The gradient that reaches the normalisation: dy, masked by the fused ReLU's output if any.
  __device__ __forceinline__ compute_t<S> g(const GradTensors<S>& t, int u, int v) const {
    return t.y ? batch_norm::relu_mask(dy[u][v], y[u][v]) : dy[u][v];
  }
};

template <class S, int V, bool kPacked>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    grad_sums_kernel(GradTensors<S> t, const compute_t<S>* mean, Walk w, SumsOut<compute_t<S>> out) {
  using A = compute_t<S>;
  constexpr int K = kPacked ? V : 1;
  constexpr int U = kGradUnroll<S, V, kPacked>;
  int64_t column;
  A m[K];
  const bool active = column_values<kPacked, V>(w, column, m, [&](int64_t c) { return mean[c]; });
  GradSums<A> acc[K];
  if (active)
    walk<kPacked, U>(w, column, [&](const Batch& b) {
      GradBatch<S, U, V> d;
      d.template load<kPacked>(t, t.x, w, b);
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int v = 0; v < V; ++v)
          if (u < b.valid) {
            const A g = d.g(t, u, v);
            acc[v % K].g += g;
            acc[v % K].gx += g * (d.x[u][v] - m[v % K]);
          }
    });
  publish<kPacked, V>(out, acc, column, active);
}

template <class A>
struct GradParams {
  const A *mean, *var, *weight;  // weight: null when absent (1)
  const GradSums<A>* sums;       // null: no sums were needed (evaluation), they count as 0
  A eps, count;
  bool training;
};

// grad_x = grad_input(g, x) and grad_residual = g. In evaluation the input gradient does not depend on x
// (cx = c0 = 0), so x is not read: the mean stands in for it and the (x - mean) term is exactly 0.
template <class S, int V, bool kPacked>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    grad_kernel(GradTensors<S> t, Walk w, GradParams<compute_t<S>> p) {
  using A = compute_t<S>;
  constexpr int K = kPacked ? V : 1;
  int64_t column;
  GradCoeffs<A> q[K];
  if (!column_values<kPacked, V>(w, column, q, [&](int64_t c) {
        const GradSums<A> s = p.sums ? p.sums[c] : GradSums<A>{};
        return batch_norm::grad_coeffs(p.mean[c], p.var[c], p.eps, p.weight ? p.weight[c] : A(1), s.g, s.gx,
                                       p.count, p.training);
      }))
    return;  // no barriers in this kernel
  constexpr int U = kGradUnroll<S, V, kPacked>;
  const S* x = t.dx && p.training ? t.x : nullptr;
  walk<kPacked, U>(w, column, [&](const Batch& b) {
    GradBatch<S, U, V> d;
    d.template load<kPacked>(t, x, w, b);
    for_each<kPacked, U>(w, b, [&](int u, int64_t off) {
      A g[V], dx[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        g[v] = d.g(t, u, v);
        dx[v] = batch_norm::grad_input(g[v], x ? d.x[u][v] : q[v % K].mean, q[v % K]);
      }
      if (t.dres) store_vec<S, V>(t.dres, off, g);
      if (t.dx) store_vec<S, V>(t.dx, off, dx);
    });
  });
}

// ---------------------------------------------------------------- host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The device's SM count, queried once per device.
int sm_count(int device) {
  static std::atomic<int> cache[64];
  const bool cached = device >= 0 && device < 64;
  if (cached)
    if (const int n = cache[device].load(std::memory_order_relaxed)) return n;
  int n = 0;
  FASTCV_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (cached) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

// Scratch memory ordered on the launch stream: cudaMallocAsync and cudaFreeAsync queue the allocation
// and its release behind the kernels that use it, so the host never waits (cudaFree would synchronise).
class Workspace {
 public:
  Workspace(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes) FASTCV_CUDA_CHECK(cudaMallocAsync(&data_, bytes, stream));
  }
  ~Workspace() {
    if (data_) cudaFreeAsync(data_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  template <class T>
  T* get() const { return static_cast<T*>(data_); }

 private:
  void* data_ = nullptr;
  cudaStream_t stream_;
};

// The widest vector (at most 16 bytes) that evenly divides the contiguous runs (S planar, C packed) and
// to whose size every given pointer is aligned; null pointers (absent tensors) do not count.
int vector_width(const BatchNormShape& sh, int elem, std::initializer_list<const void*> ptrs) {
  const int64_t run = sh.packed ? sh.c : sh.s;
  int v = 16 / elem;
  for (; v > 1; v /= 2) {
    bool ok = run % v == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % uintptr_t(v * elem) == 0;
    if (ok) break;
  }
  return v;
}

// Calls f(std::integral_constant<int, V>{}, std::bool_constant<packed>{}).
template <class S, class F>
void dispatch_layout(int v, bool packed, F&& f) {
  const auto with = [&](auto width) {
    if (packed)
      f(width, std::true_type{});
    else
      f(width, std::false_type{});
  };
  switch (v) {
    case 1: return with(std::integral_constant<int, 1>{});
    case 2: return with(std::integral_constant<int, 2>{});
    case 4:
      if constexpr (sizeof(S) <= 4) return with(std::integral_constant<int, 4>{});
      break;
    case 8:
      if constexpr (sizeof(S) <= 2) return with(std::integral_constant<int, 8>{});
      break;
  }
  throw std::logic_error("batch_norm: no kernel for vector width " + std::to_string(v));
}

struct Launch {
  dim3 grid, block;
  Walk walk;
};

// Threads and blocks for vectors of V values of elem bytes.
//   planar: blocks of one channel, 32..256 threads along it (fewer for short channels);
//   packed: up to 32 vector columns across (a warp reads whole rows when C / V < 32) and the rest of
//     the 256 threads down the rows.
// Along blockIdx.y each column's values are split: with fewer column blocks than one wave of resident
// blocks, into as many chunks as fill that wave (equal blocks, no tail); with more, into enough chunks
// for about 8 waves so that the last, partial wave costs little. Either way each thread gets at least
// kMinThreadBytes, and the split depends only on the shape and the device: results are deterministic.
Launch plan(const BatchNormShape& sh, int V, int elem, int sms) {
  Walk w{};
  int64_t bx, by;
  if (sh.packed) {
    w.columns = sh.c / V, w.len = 1, w.pitch = w.columns, w.length = sh.n * sh.s;
    bx = std::min<int64_t>(w.columns, kWarp);
    by = std::min<int64_t>(kThreads / bx, w.length);
  } else {
    w.columns = sh.c, w.len = sh.s / V, w.pitch = sh.c * w.len, w.length = sh.n * w.len;
    bx = 1;
    by = std::clamp<int64_t>(ceil_div(w.length, kWarp) * kWarp, kWarp, kThreads);
  }
  const int64_t tiles = ceil_div(w.columns, bx), wave = int64_t(kBlocksPerSm) * sms;
  check_arg(tiles < (int64_t(1) << 31), "batch_norm: too many channels for one CUDA grid");
  int64_t splits = tiles <= wave ? wave / tiles : ceil_div(8 * wave, tiles);
  const int64_t min_chunk = by * std::max(1, kMinThreadBytes / (V * elem));
  splits = std::clamp<int64_t>(std::min(splits, ceil_div(w.length, min_chunk)), 1, 65535);
  w.chunk = ceil_div(w.length, splits);
  splits = ceil_div(w.length, w.chunk);  // no empty blocks
  w.step_r = by % w.len, w.step_off = by / w.len * w.pitch + w.step_r;
  return {dim3(unsigned(tiles), unsigned(splits)), dim3(unsigned(bx), unsigned(by)), w};
}

// Per-block partials (when the plan splits the columns) and finalize_kernel, or the totals directly.
template <class Out, class Kernel, class... Args>
void launch_reduction(Kernel kernel, const Launch& l, Out out, cudaStream_t stream, const char* name,
                      Args... args) {
  const int64_t splits = l.grid.y;
  Workspace partials(splits > 1 ? size_t(splits * out.channels) * sizeof(typename Out::Acc) : 0, stream);
  out.partial = partials.get<typename Out::Acc>();
  kernel<<<l.grid, l.block, 0, stream>>>(args..., l.walk, out);
  FASTCV_CUDA_CHECK_LAUNCH(name);
  if (splits == 1) return;
  finalize_kernel<Out><<<unsigned(ceil_div(out.channels, kFinalizeWarps)), kFinalizeWarps * kWarp, 0, stream>>>(
      out, splits);
  FASTCV_CUDA_CHECK_LAUNCH("batch_norm finalize_kernel");
}

template <class S>
void launch_statistics(const TensorView& x, const BatchNormShape& sh, int sms, const TensorView& mean,
                       const TensorView& var, cudaStream_t stream) {
  using A = compute_t<S>;
  const StatsOut<A> out{nullptr, mean.ptr<A>(), var.ptr<A>(), sh.c, A(sh.n * sh.s)};
  dispatch_layout<S>(vector_width(sh, sizeof(S), {x.data}), sh.packed, [&](auto width, auto packed) {
    constexpr int V = decltype(width)::value;
    launch_reduction(stats_kernel<S, V, decltype(packed)::value>, plan(sh, V, sizeof(S), sms), out, stream,
                     "batch_norm stats_kernel", x.ptr<S>());
  });
}

template <class S>
void launch_forward(const TensorView& x, const TensorView* residual, const TensorView& y, const BatchNormShape& sh,
                    const ChannelParams<compute_t<S>>& p, bool relu, int sms, cudaStream_t stream) {
  const int v = vector_width(sh, sizeof(S), {x.data, y.data, residual ? residual->data : nullptr});
  dispatch_layout<S>(v, sh.packed, [&](auto width, auto packed) {
    constexpr int V = decltype(width)::value;
    const Launch l = plan(sh, V, sizeof(S), sms);
    forward_kernel<S, V, decltype(packed)::value>
        <<<l.grid, l.block, 0, stream>>>(x.ptr<S>(), optional_ptr<S>(residual), y.ptr<S>(), l.walk, p, relu);
  });
  FASTCV_CUDA_CHECK_LAUNCH("batch_norm forward_kernel");
}

template <class S>
void launch_grad_sums(const GradTensors<S>& t, const BatchNormShape& sh, const compute_t<S>* mean,
                      const SumsOut<compute_t<S>>& out, int sms, cudaStream_t stream) {
  dispatch_layout<S>(vector_width(sh, sizeof(S), {t.dy, t.x, t.y}), sh.packed, [&](auto width, auto packed) {
    constexpr int V = decltype(width)::value;
    launch_reduction(grad_sums_kernel<S, V, decltype(packed)::value>, plan(sh, V, sizeof(S), sms), out, stream,
                     "batch_norm grad_sums_kernel", t, mean);
  });
}

template <class S>
void launch_grad(const GradTensors<S>& t, const BatchNormShape& sh, const GradParams<compute_t<S>>& p, int sms,
                 cudaStream_t stream) {
  const int v = vector_width(sh, sizeof(S), {t.dy, t.x, t.y, t.dx, t.dres});
  dispatch_layout<S>(v, sh.packed, [&](auto width, auto packed) {
    constexpr int V = decltype(width)::value;
    const Launch l = plan(sh, V, sizeof(S), sms);
    grad_kernel<S, V, decltype(packed)::value><<<l.grid, l.block, 0, stream>>>(t, l.walk, p);
  });
  FASTCV_CUDA_CHECK_LAUNCH("batch_norm grad_kernel");
}

template <class A>
ChannelParams<A> channel_params(const TensorView& mean, const TensorView& var, const TensorView* weight,
                                const TensorView* bias, double eps) {
  return {mean.ptr<A>(), var.ptr<A>(), optional_ptr<A>(weight), optional_ptr<A>(bias), A(eps)};
}

}  // namespace

void batch_norm_forward_train_cuda(const TensorView& x, const TensorView* weight, const TensorView* bias,
                                   const TensorView* residual, bool relu, double eps, const TensorView& y,
                                   const TensorView& mean, const TensorView& var, uintptr_t stream) {
  const BatchNormShape sh = check_batch_norm_args(x, weight, bias, &mean, &var, residual, &y, DeviceType::CUDA);
  check_arg(sh.n * sh.s > 0 || sh.c == 0, "batch_norm in training needs at least one value per channel");
  if (x.numel() == 0) return;
  DeviceGuard guard(x);
  const cudaStream_t s = as_stream(stream);
  const int sms = sm_count(x.device_index);
  dispatch_floating(x.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    launch_statistics<S>(x, sh, sms, mean, var, s);
    launch_forward<S>(x, residual, y, sh, channel_params<compute_t<S>>(mean, var, weight, bias, eps), relu, sms, s);
  });
}

void batch_norm_forward_eval_cuda(const TensorView& x, const TensorView& mean, const TensorView& var,
                                  const TensorView* weight, const TensorView* bias, const TensorView* residual,
                                  bool relu, double eps, const TensorView& y, uintptr_t stream) {
  const BatchNormShape sh = check_batch_norm_args(x, weight, bias, &mean, &var, residual, &y, DeviceType::CUDA);
  if (x.numel() == 0) return;
  DeviceGuard guard(x);
  const int sms = sm_count(x.device_index);
  dispatch_floating(x.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    launch_forward<S>(x, residual, y, sh, channel_params<compute_t<S>>(mean, var, weight, bias, eps), relu, sms,
                      as_stream(stream));
  });
}

// The per-channel sums are reduced only when something needs them: the parameter gradients, or the input
// gradient in training (batch statistics). Evaluation's input gradient is one elementwise pass.
void batch_norm_backward_cuda(const TensorView& grad_y, const TensorView& x, const TensorView* y,
                              const TensorView& mean, const TensorView& var, const TensorView* weight, bool training,
                              double eps, const TensorView* grad_x, const TensorView* grad_residual,
                              const TensorView* grad_weight, const TensorView* grad_bias, uintptr_t stream) {
  const BatchNormShape sh = check_batch_norm_backward_args(grad_y, x, y, mean, var, weight, grad_x, grad_residual,
                                                           grad_weight, grad_bias, DeviceType::CUDA);
  if (sh.c == 0) return;
  DeviceGuard guard(x);
  const cudaStream_t s = as_stream(stream);
  if (x.numel() == 0) {  // no values: zero parameter gradients, as on the CPU
    for (const TensorView* t : {grad_weight, grad_bias})
      if (t) FASTCV_CUDA_CHECK(cudaMemsetAsync(t->data, 0, size_t(t->numel() * dtype_size(t->dtype)), s));
    return;
  }
  const bool need_sums = grad_weight || grad_bias || (training && grad_x);
  const int sms = sm_count(x.device_index);
  dispatch_floating(x.dtype, "input", [&](auto tag) {
    using S = decltype(tag);
    using A = compute_t<S>;
    const GradTensors<S> t{grad_y.ptr<S>(), x.ptr<S>(), optional_ptr<S>(y), optional_ptr<S>(grad_x),
                           optional_ptr<S>(grad_residual)};
    Workspace sums(need_sums ? size_t(sh.c) * sizeof(GradSums<A>) : 0, s);  // until grad_kernel has run
    if (need_sums)
      launch_grad_sums(t, sh, mean.ptr<A>(),
                       SumsOut<A>{nullptr, sums.get<GradSums<A>>(), var.ptr<A>(), A(eps), optional_ptr<A>(grad_weight),
                                  optional_ptr<A>(grad_bias), sh.c},
                       sms, s);
    if (grad_x || grad_residual)
      launch_grad(t, sh,
                  GradParams<A>{mean.ptr<A>(), var.ptr<A>(), optional_ptr<A>(weight), sums.get<GradSums<A>>(), A(eps),
                                A(sh.n * sh.s), training},
                  sms, s);
  });
}

}  // namespace fastcv
