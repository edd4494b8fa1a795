#pragma once
// Parallel regions for the CPU kernels. They run on torch's own OpenMP team when the process exposes
// torch's libgomp (found at run time; the module does not link an OpenMP runtime of its own), else on
// a small persistent thread pool (also after fork(), where libgomp cannot be used). Either way the
// process has one set of worker threads per runtime torch already has. The caller passes the thread
// count (torch.get_num_threads()) with every call.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>

namespace fastcv {

// Runs job(worker) on up to nthreads threads, the calling thread being worker 0, and returns when all
// are done. A team may be smaller than asked (nested regions, another caller holding the pool: then
// the caller alone), so jobs must take their work from a shared counter, as parallel_for's do.
void run_on_threads(int nthreads, const std::function<void(int)>& job);
bool in_parallel_region();
const char* parallel_backend();     // which of the two runs parallel regions now
void set_use_openmp(bool use);      // tests use it to exercise the thread pool too

// The threads worth waking for a call that touches `work` values: a team's wake-up costs a few
// microseconds, as much as a tiny kernel's whole run, so small calls run on the caller alone. 32768
// values a thread, PyTorch's at::internal::GRAIN_SIZE. Results never depend on the thread count.
inline int threads_for(int64_t work, int nthreads) {
  constexpr int64_t kMinWorkPerThread = 32768;
  return int(std::clamp<int64_t>(work / kMinWorkPerThread, 1, std::max(nthreads, 1)));
}

// A grain giving each of nthreads threads one contiguous share of `items` uniform items, so that each thread
// streams through its own part of memory: small chunks handed out in turn interleave the threads' accesses
// (batch norm's 14x14 planar passes scaled 1.5x on 2 threads that way, PyTorch's contiguous halves 1.9x).
inline int64_t contiguous_share(int64_t items, int nthreads) {
  return std::max<int64_t>(1, (items + nthreads - 1) / std::max(nthreads, 1));
}

// f(begin, end) over [begin, end) in chunks of `grain`, handed out dynamically to `nthreads` threads.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, int nthreads, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  const int threads = int(std::min<int64_t>(nthreads, chunks));
  if (threads <= 1 || in_parallel_region()) {
    f(begin, end);
    return;
  }
  std::atomic<int64_t> next{0};
  run_on_threads(threads, [&](int) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
      f(begin + c * grain, std::min(end, begin + (c + 1) * grain));
  });
}

}  // namespace fastcv
