// Shared by the CPU kernels of kvjax.native: portable SIMD types and a parallel-for over XLA's
// intra-op thread pool.
#ifndef KVJAX_NATIVE_SIMD_H_
#define KVJAX_NATIVE_SIMD_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace kvjax_native {

// Portable SIMD: GCC / Clang vector extensions, lowered to AVX-512, AVX2 or NEON as the host
// has them (-march=native).
template <int L>
struct Vec {
  typedef float f __attribute__((vector_size(4 * L)));
  typedef int32_t i __attribute__((vector_size(4 * L)));
  typedef uint32_t u __attribute__((vector_size(4 * L)));
};

template <class V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class V>
inline void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// L vectors in, one out: lane i = the sum of a[i]'s lanes (a transpose-and-add tree, instead of L
// horizontal sums).
inline Vec<16>::f sum_lanes(const Vec<16>::f* a) {
  Vec<16>::f c[8], d[4], f[2];
  for (int k = 0; k < 8; ++k)
    c[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10,
                                   26, 12, 28, 14, 30) +
           __builtin_shufflevector(a[2 * k], a[2 * k + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11,
                                   27, 13, 29, 15, 31);
  for (int k = 0; k < 4; ++k)
    d[k] = __builtin_shufflevector(c[2 * k], c[2 * k + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24,
                                   25, 12, 13, 28, 29) +
           __builtin_shufflevector(c[2 * k], c[2 * k + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11,
                                   26, 27, 14, 15, 30, 31);
  for (int k = 0; k < 2; ++k)
    f[k] = __builtin_shufflevector(d[2 * k], d[2 * k + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10,
                                   11, 24, 25, 26, 27) +
           __builtin_shufflevector(d[2 * k], d[2 * k + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13,
                                   14, 15, 28, 29, 30, 31);
  return __builtin_shufflevector(f[0], f[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22,
                                 23) +
         __builtin_shufflevector(f[0], f[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                 30, 31);
}

inline Vec<8>::f sum_lanes(const Vec<8>::f* a) {
  Vec<8>::f c[4], d[2];
  for (int k = 0; k < 4; ++k)
    c[k] = __builtin_shufflevector(a[2 * k], a[2 * k + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(a[2 * k], a[2 * k + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int k = 0; k < 2; ++k)
    d[k] = __builtin_shufflevector(c[2 * k], c[2 * k + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(c[2 * k], c[2 * k + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(d[0], d[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(d[0], d[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// Runs f(0) .. f(n - 1) on the calling thread and XLA's intra-op pool. The caller and the helpers
// claim tasks from one atomic counter; the caller then waits only for tasks already claimed,
// never for a helper that has not started, so it cannot deadlock when the pool is busy. Helpers
// that start late find no task left; they keep the shared state alive and never call f.
template <class F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, F f) {
  if (n <= 0) return;
  struct State {
    std::function<void(int64_t)> f;
    int64_t n;
    std::atomic<int64_t> next{0}, done{0};
    void drain() {
      for (;;) {
        const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
        if (t >= n) return;
        f(t);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto st = std::make_shared<State>();
  st->f = f;
  st->n = n;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([st] { st->drain(); });
  st->drain();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace kvjax_native

#endif  // KVJAX_NATIVE_SIMD_H_
