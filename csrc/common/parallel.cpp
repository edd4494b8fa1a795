#include "common/parallel.h"

#include <dlfcn.h>
#include <pthread.h>

#include <chrono>
#include <condition_variable>
#include <thread>
#include <vector>

namespace fastcv {
namespace {

thread_local bool t_in_parallel = false;

// Waits on `done()` by spinning for up to ~50 us before blocking: parallel regions come in quick
// succession (one per block of an NMS pass), and a futex wake-up costs tens of microseconds.
template <class Done>
bool spin_until(const Done& done) {
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0;; ++i) {
    if (done()) return true;
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
    if ((i & 255) == 255 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(50)) return false;
  }
}

class ThreadPool {
 public:
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  // Returns false (and does nothing) when another caller holds the pool.
  bool run(int nthreads, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(nthreads - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      active_ = nthreads - 1;
      pending_.store(nthreads - 1);
      error_ = nullptr;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    std::exception_ptr error;
    try {
      run_job(job, 0);
    } catch (...) {
      error = std::current_exception();
    }
    if (!spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return pending_.load() == 0; });
    }
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = nullptr;
    if (!error) error = error_;
    if (error) std::rethrow_exception(error);
    return true;
  }

 private:
  static void run_job(const std::function<void(int)>& job, int worker) {
    t_in_parallel = true;
    try {
      job(worker);
    } catch (...) {
      t_in_parallel = false;
      throw;
    }
    t_in_parallel = false;
  }

  void grow(int count) {
    while (int(workers_.size()) < count) {
      const int id = int(workers_.size()) + 1;
      workers_.emplace_back([this, id] { loop(id); });
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || (generation_.load() != seen && id <= active_); });
        if (stopping_) return;
        seen = generation_.load();
        job = job_;
      }
      std::exception_ptr error;
      try {
        run_job(*job, id);
      } catch (...) {
        error = std::current_exception();
      }
      if (error) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = error;
      }
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);  // the caller is either before its check or asleep
        done_.notify_one();
      }
    }
  }

  std::mutex run_mutex_;  // one parallel region at a time
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  int active_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

// Heap-allocated and never destroyed: worker threads must not be joined during interpreter shutdown,
// and after fork() the child drops the parent's pool (its threads do not exist there) and makes a new one.
ThreadPool* g_pool = nullptr;
std::mutex* g_pool_mutex = new std::mutex();  // replaced in the child too: it may be held at fork time
bool g_forked = false;                        // in a fork()ed child, where libgomp must not be used
std::once_flag g_atfork_once;

void register_atfork() {
  std::call_once(g_atfork_once, [] {
    pthread_atfork(nullptr, nullptr, [] {
      g_pool = nullptr;
      g_pool_mutex = new std::mutex();
      g_forked = true;
    });
  });
}

ThreadPool& pool() {
  register_atfork();
  std::lock_guard<std::mutex> lock(*g_pool_mutex);
  if (!g_pool) g_pool = new ThreadPool();
  return *g_pool;
}

// torch's own OpenMP runtime, when the process exposes it (torch loads its libgomp globally). Running
// our regions on torch's OpenMP team means one set of threads: a second pool would compete with
// torch's threads, which keep spinning after each torch op (measured: 3.6 -> 5.5 ms for
// batched_nms_padded right after a torch op).
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel
  int (*thread_num)() = nullptr;                                          // omp_get_thread_num
};

const OpenMP& torch_openmp() {
  static const OpenMP omp = [] {
    OpenMP o;
    o.parallel = reinterpret_cast<decltype(o.parallel)>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    o.thread_num = reinterpret_cast<decltype(o.thread_num)>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
    if (!o.thread_num) o.parallel = nullptr;
    return o;
  }();
  return omp;
}

std::atomic<bool> g_use_openmp{true};

bool run_on_openmp(int nthreads, const std::function<void(int)>& job) {
  register_atfork();
  const OpenMP& omp = torch_openmp();
  if (!omp.parallel || g_forked || !g_use_openmp.load()) return false;
  struct Region {
    const std::function<void(int)>* job;
    int (*thread_num)();
    std::mutex mutex;
    std::exception_ptr error;
  } region{&job, omp.thread_num, {}, nullptr};
  omp.parallel(
      [](void* data) {
        auto* r = static_cast<Region*>(data);
        t_in_parallel = true;
        try {
          (*r->job)(r->thread_num());
        } catch (...) {  // exceptions must not leave an OpenMP region
          std::lock_guard<std::mutex> lock(r->mutex);
          if (!r->error) r->error = std::current_exception();
        }
        t_in_parallel = false;
      },
      &region, unsigned(nthreads), 0);
  if (region.error) std::rethrow_exception(region.error);
  return true;
}

}  // namespace

bool in_parallel_region() { return t_in_parallel; }

void run_on_threads(int nthreads, const std::function<void(int)>& job) {
  if (nthreads > 1 && !t_in_parallel && run_on_openmp(nthreads, job)) return;
  if (nthreads <= 1 || t_in_parallel || !pool().run(nthreads, job)) {
    for (int w = 0; w < std::max(nthreads, 1); ++w) job(w);  // serial fallback keeps every worker's share
  }
}

}  // namespace fastcv

namespace fastcv {

const char* parallel_backend() {
  register_atfork();
  return torch_openmp().parallel && !g_forked && g_use_openmp.load() ? "openmp (torch's)" : "fastcv thread pool";
}

void set_use_openmp(bool use) { g_use_openmp.store(use); }

}  // namespace fastcv
