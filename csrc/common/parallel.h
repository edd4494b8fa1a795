#pragma once
// A small persistent thread pool for the CPU kernels. We do not use OpenMP: torch's wheels bundle their
// own libgomp, and a second OpenMP runtime in the process means two sets of spinning threads on the
// same cores. The caller passes the thread count (torch.get_num_threads()) with every call.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>

namespace fastcv {

// Runs job(worker) for worker = 0 .. nthreads-1, the calling thread being worker 0, and returns when all
// are done. Calls from inside a job, or while another thread holds the pool, run serially in the caller.
void run_on_threads(int nthreads, const std::function<void(int)>& job);
bool in_parallel_region();

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
