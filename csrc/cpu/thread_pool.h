// A small fork-join pool for the CPU kernels, used instead of OpenMP parallel regions.
//
// Why not OpenMP: libgomp's idle workers spin for a long time after every region (unless the
// user sets OMP_WAIT_POLICY=PASSIVE). On a 2-core machine with one other busy process that
// spinning fights the calling thread for a core: the ResNet-18 gradient list took ~10x
// longer through `select_ef_multi` at 2 threads than with PASSIVE (bench/bench_select_threads.py).
// This pool's waits are bounded: a waiting thread spins for at most kSpinNs, then sleeps on
// a condition variable, so the speed does not depend on any environment variable.
//
// run(tasks, threads, f) calls f(t) for every t in [0, tasks) on up to `threads` threads
// (the caller is one of them) and returns when all calls have returned. Tasks are handed out
// one at a time from a shared counter, so a thread that was preempted (another process on
// its core) holds back at most the task it is running. f must not throw. Calls that find the
// pool busy (another caller thread) run their tasks serially on the calling thread; calls
// after fork() in a child process start a fresh pool.
#pragma once

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DGP_PAUSE() _mm_pause()
#else
#define DGP_PAUSE() ((void)0)
#endif

namespace dgp {

class ThreadPool {
 public:
  // A waiting thread spins this long before it sleeps: back-to-back dispatches of one call
  // (a few microseconds apart) find the workers awake; between calls they sleep.
  static constexpr int64_t kSpinNs = 30000;

  static ThreadPool& get() {
    static ThreadPool* pool = [] {
      pthread_atfork(nullptr, nullptr, [] { instance_ptr() = new ThreadPool(); });
      instance_ptr() = new ThreadPool();
      return instance_ptr();
    }();
    (void)pool;
    return *instance_ptr();  // a forked child sees its own fresh pool (the parent's leaks)
  }

  template <typename F>
  void run(int64_t tasks, int threads, F&& f) {
    if (tasks <= 0) return;
    if (threads > tasks) threads = static_cast<int>(tasks);
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (threads <= 1 || !busy.owns_lock()) {
      for (int64_t t = 0; t < tasks; ++t) f(t);
      return;
    }
    grow(threads - 1);
    using Fn = std::remove_reference_t<F>;
    job_ = [](void* ctx, int64_t t) { (*static_cast<Fn*>(ctx))(t); };
    ctx_ = static_cast<void*>(&f);
    tasks_ = tasks;
    next_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(m_);
      want_ = threads - 1;
      pending_.store(threads - 1, std::memory_order_relaxed);
      epoch_.fetch_add(1, std::memory_order_release);
    }
    cv_work_.notify_all();
    work();
    // Join: spin briefly, then sleep until the last worker leaves the job.
    const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kSpinNs);
    while (pending_.load(std::memory_order_acquire) != 0) {
      if (std::chrono::steady_clock::now() > until) {
        std::unique_lock<std::mutex> lk(m_);
        cv_done_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
        break;
      }
      DGP_PAUSE();
    }
  }

 private:
  static ThreadPool*& instance_ptr() {
    static ThreadPool* p = nullptr;
    return p;
  }

  void work() {
    for (;;) {
      const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= tasks_) return;
      job_(ctx_, t);
    }
  }

  void grow(int n) {
    while (static_cast<int>(workers_) < n) {
      const int id = static_cast<int>(workers_++);
      // The epoch before the job that needs this worker: a thread that starts late must
      // still see that job as new.
      const uint64_t seen = epoch_.load(std::memory_order_acquire);
      std::thread([this, id, seen] { loop(id, seen); }).detach();
    }
  }

  void loop(int id, uint64_t seen) {
    for (;;) {
      // Wait for a new job: spin briefly, then sleep.
      const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kSpinNs);
      while (epoch_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < until)
        DGP_PAUSE();
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_work_.wait(lk, [&] { return epoch_.load(std::memory_order_acquire) != seen; });
        seen = epoch_.load(std::memory_order_acquire);
        if (id >= want_) continue;  // this job uses fewer threads
      }
      work();
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(m_);
        cv_done_.notify_one();
      }
    }
  }

  std::mutex busy_;  // one job at a time
  std::mutex m_;
  std::condition_variable cv_work_, cv_done_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> pending_{0};
  int want_ = 0;
  size_t workers_ = 0;
  void (*job_)(void*, int64_t) = nullptr;
  void* ctx_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_{0};
};

}  // namespace dgp
