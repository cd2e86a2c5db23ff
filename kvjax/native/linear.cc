// Matrix times a few vectors with bfloat16 weights on the CPU, on every core, reading each weight
// once where it lies.
//
// One XLA FFI custom call (target "kvjax_bf16_linear"):
//
//   y[m, n] = sum_k x[m, k] W[k, n]     layout 0 ("kn": a Linear kernel [K, N])
//   y[m, n] = sum_k x[m, k] W[n, k]     layout 1 ("nk": an embedding [N, K] used as the LM head)
//
// x float32 [M, K], y float32 [M, N], W bfloat16, accumulated in float32. W may be a stack of
// such matrices [S, ...] with an int32 index operand choosing one (a scanned model's layer
// weights, read in place: no slice is copied out of the stack).
//
// Why it exists: XLA's CPU backend has no bfloat16 dot; it converts a bfloat16 weight to float32
// (writing a float32 copy) before every product, so a decode step reads each weight's bytes five
// times (bf16 read, f32 write, f32 read) where one read is the floor. Here a weight is read once:
// two bfloat16 values share a 32-bit word, and `w << 16` (the even one) and `w & 0xffff0000` (the
// odd one) are their float32 values, so a vector of L words gives L even and L odd columns at the
// cost of two integer operations.
//
// "kn": tasks are (block of up to 1024 columns, block of rows); each streams its rows'
// contiguous segments once and leaves float32 partial sums, added in a fixed order afterwards
// (the split depends only on the shapes, so results do not depend on the thread count).
// "nk": tasks are blocks of 256 rows of W; a row's dot products with the M vectors end, 16 rows
// at a time, in one transpose-and-add tree (`sum_lanes`).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "simd.h"

namespace ffi = xla::ffi;

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the even bfloat16 value of a 32-bit word is its low half on little-endian hosts");

namespace {

using kvjax_native::load;
using kvjax_native::parallel_for;
using kvjax_native::store;
using kvjax_native::sum_lanes;

typedef kvjax_native::Vec<16>::f vf;
typedef kvjax_native::Vec<16>::u vu;

constexpr int64_t kChunk = 32;      // columns (kn) or row elements (nk) per vector of 16 words
constexpr int64_t kColBlock = 1024;  // kn: columns per task
constexpr int64_t kRowBlock = 256;   // nk: rows per task
constexpr int64_t kMinTasks = 16;

inline void split(vu w, vf& even, vf& odd) {
  even = (vf)(w << 16);
  odd = (vf)(w & 0xffff0000u);
}

struct KnPlan {
  int64_t col_blocks, row_blocks, rows_per_block;
};

// The task split of a [K, N] product: depends only on the shapes.
KnPlan kn_plan(int64_t k, int64_t n) {
  KnPlan p;
  p.col_blocks = (n + kColBlock - 1) / kColBlock;
  const int64_t want = std::max<int64_t>(1, (kMinTasks + p.col_blocks - 1) / p.col_blocks);
  p.row_blocks = std::max<int64_t>(1, std::min(want, k / 32));
  p.rows_per_block = (k + p.row_blocks - 1) / p.row_blocks;
  p.rows_per_block = (p.rows_per_block + 7) / 8 * 8;
  p.row_blocks = (k + p.rows_per_block - 1) / p.rows_per_block;
  return p;
}

// One kn task: rows [k0, k1) of columns [c0, c0 + nb) into part [M][stride] (deinterleaved
// per chunk of 32 columns: 16 even, then 16 odd). Eight rows meet the accumulators per pass, two
// adjacent rows from each of four far-apart quarters of the task's rows: four independent
// streams through memory, which one core reads faster than one stream (or than rows that lie
// within a page or two of each other).
void kn_task(const float* __restrict x, const uint16_t* __restrict w, int64_t m, int64_t k,
             int64_t n, int64_t k0, int64_t k1, int64_t c0, int64_t nb, int64_t stride,
             float* __restrict part) {
  const int64_t chunks = nb / kChunk;
  std::memset(part, 0, sizeof(float) * m * stride);
  const int64_t q = (k1 - k0) / 8 * 2;  // rows per quarter, even
  for (int64_t r = 0; r < q; r += 2) {
    const uint16_t* wp[8];
    int64_t rows[8];
    for (int s = 0; s < 4; ++s) {
      rows[2 * s] = k0 + s * q + r;
      rows[2 * s + 1] = rows[2 * s] + 1;
    }
    for (int j = 0; j < 8; ++j) wp[j] = w + rows[j] * n + c0;
    for (int64_t c = 0; c < chunks; ++c) {
      vf e[8], o[8];
      for (int j = 0; j < 8; ++j) split(load<vu>(wp[j] + c * kChunk), e[j], o[j]);
      for (int64_t i = 0; i < m; ++i) {
        const float* xi = x + i * k;
        float* acc = part + i * stride + c * kChunk;
        vf ea = load<vf>(acc), oa = load<vf>(acc + 16), eb = vf{}, ob = vf{};
        for (int j = 0; j < 8; j += 2) {
          ea += xi[rows[j]] * e[j];
          oa += xi[rows[j]] * o[j];
          eb += xi[rows[j + 1]] * e[j + 1];
          ob += xi[rows[j + 1]] * o[j + 1];
        }
        store(acc, ea + eb);
        store(acc + 16, oa + ob);
      }
    }
  }
  for (int64_t r = k0 + 4 * q; r < k1; ++r) {  // the rows left over, one at a time
    const uint16_t* w0 = w + r * n + c0;
    for (int64_t c = 0; c < chunks; ++c) {
      vf e0, o0;
      split(load<vu>(w0 + c * kChunk), e0, o0);
      for (int64_t i = 0; i < m; ++i) {
        const float xv = x[i * k + r];
        float* acc = part + i * stride + c * kChunk;
        store(acc, load<vf>(acc) + xv * e0);
        store(acc + 16, load<vf>(acc + 16) + xv * o0);
      }
    }
  }
}

void kn(ffi::ThreadPool& pool, const float* x, const uint16_t* w, float* y, int64_t m, int64_t k,
        int64_t n) {
  const KnPlan p = kn_plan(k, n);
  const int64_t blk = std::min(n, kColBlock);
  // Every task zeroes its own part first.
  std::unique_ptr<float[]> parts(new float[p.col_blocks * p.row_blocks * m * blk]);
  parallel_for(pool, p.col_blocks * p.row_blocks, [&](int64_t task) {
    const int64_t cb = task / p.row_blocks, rb = task % p.row_blocks;
    const int64_t c0 = cb * kColBlock, nb = std::min(kColBlock, n - c0);
    const int64_t k0 = rb * p.rows_per_block, k1 = std::min(k, k0 + p.rows_per_block);
    kn_task(x, w, m, k, n, k0, k1, c0, nb, blk, parts.get() + task * m * blk);
  });
  // Sum the row blocks in order and undo the even / odd split: one task per column block.
  parallel_for(pool, p.col_blocks, [&](int64_t cb) {
    const int64_t c0 = cb * kColBlock, nb = std::min(kColBlock, n - c0);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t c = 0; c < nb / kChunk; ++c) {
        vf e = vf{}, o = vf{};
        for (int64_t rb = 0; rb < p.row_blocks; ++rb) {
          const float* src = parts.get() + ((cb * p.row_blocks + rb) * m + i) * blk + c * kChunk;
          e += load<vf>(src);
          o += load<vf>(src + 16);
        }
        float* dst = y + i * n + c0 + c * kChunk;
        for (int j = 0; j < 16; ++j) {
          dst[2 * j] = e[j];
          dst[2 * j + 1] = o[j];
        }
      }
    }
  });
}

// nk: rows [n0, n1) of W [N, K]; xd holds x deinterleaved per chunk of 32 (16 even, 16 odd).
void nk_task(const float* __restrict xd, const uint16_t* __restrict w, float* __restrict y,
             int64_t m, int64_t k, int64_t n, int64_t n0, int64_t n1) {
  const int64_t chunks = k / kChunk;
  for (int64_t t0 = n0; t0 < n1; t0 += 16) {
    const int64_t rows = std::min<int64_t>(16, n1 - t0);
    for (int64_t i = 0; i < m; ++i) {
      const float* xi = xd + i * k;
      vf acc[16];
      for (int64_t j = 0; j < 16; ++j) acc[j] = vf{};
      for (int64_t j = 0; j < rows; ++j) {
        const uint16_t* row = w + (t0 + j) * k;
        vf a = vf{}, b = vf{};
        for (int64_t c = 0; c < chunks; ++c) {
          vf e, o;
          split(load<vu>(row + c * kChunk), e, o);
          a += e * load<vf>(xi + c * kChunk);
          b += o * load<vf>(xi + c * kChunk + 16);
        }
        acc[j] = a + b;
      }
      const vf s = sum_lanes(acc);
      float* dst = y + i * n + t0;
      for (int64_t j = 0; j < rows; ++j) dst[j] = s[j];
    }
  }
}

void nk(ffi::ThreadPool& pool, const float* x, const uint16_t* w, float* y, int64_t m, int64_t k,
        int64_t n) {
  std::vector<float> xd(m * k);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k / kChunk; ++c)
      for (int j = 0; j < 16; ++j) {
        xd[i * k + c * kChunk + j] = x[i * k + c * kChunk + 2 * j];
        xd[i * k + c * kChunk + 16 + j] = x[i * k + c * kChunk + 2 * j + 1];
      }
  const int64_t tasks = (n + kRowBlock - 1) / kRowBlock;
  parallel_for(pool, tasks, [&](int64_t t) {
    nk_task(xd.data(), w, y, m, k, n, t * kRowBlock, std::min(n, (t + 1) * kRowBlock));
  });
}

ffi::Error LinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::Buffer<ffi::S32> index, ffi::ResultBuffer<ffi::F32> y,
                      int64_t layout) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || wd.size() < 2 || index.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "kvjax_bf16_linear: x and y are [M, K] and [M, N], W [..., K, N] or [..., N, K], one index");
  if (layout != 0 && layout != 1)
    return ffi::Error::InvalidArgument("kvjax_bf16_linear: layout must be 0 (kn) or 1 (nk)");
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  const int64_t r0 = wd[wd.size() - 2], r1 = wd[wd.size() - 1];
  if (yd[0] != m || (layout == 0 ? (r0 != k || r1 != n) : (r0 != n || r1 != k)) ||
      (layout == 0 ? n % kChunk : k % kChunk))
    return ffi::Error::InvalidArgument("kvjax_bf16_linear: operand shapes disagree");
  int64_t stack = 1;
  for (size_t i = 0; i + 2 < wd.size(); ++i) stack *= wd[i];
  const int64_t idx = index.typed_data()[0];
  if (idx < 0 || idx >= stack)
    return ffi::Error::InvalidArgument("kvjax_bf16_linear: index outside the weight stack");
  if (m == 0 || n == 0) return ffi::Error::Success();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.untyped_data()) + idx * k * n;
  if (k == 0) {
    std::fill(y->typed_data(), y->typed_data() + m * n, 0.f);
    return ffi::Error::Success();
  }
  if (layout == 0) kn(pool, x.typed_data(), wp, y->typed_data(), m, k, n);
  else nk(pool, x.typed_data(), wp, y->typed_data(), m, k, n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvjaxBf16Linear, LinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // W [..., K, N] or [..., N, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // index into the stack
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [M, N]
                                  .Attr<int64_t>("layout"));
