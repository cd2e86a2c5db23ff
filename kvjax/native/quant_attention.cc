// Quantized-domain attention over int4 / int8 codes on the CPU, on every core.
//
// One XLA FFI custom call (target "kvjax_quant_attention"), compiled on first use by
// kvjax/native/__init__.py with the host's own instruction set (-march=native). What it computes
// is kvjax.attention.quantized_attention's math for queries already rotated (q~ = R_k (lam_k q)):
//
//   score[i, n] = (sum_G ks[n, G] sum_{d in G} q~[i, d] level_k[n, d] + offset[i, n]) * scale
//   score       = softcap * tanh(score / softcap)      (softcap > 0), -inf where masked
//   p           = softmax over n
//   out[i, d]   = sum_n p[i, n] vs[n, G(d)] level_v[n, d]                (rotated domain)
//   w[i, k]     = p[i, slot[i, k]]        (the corrected slots the value corrections need)
//
// Levels: 4-bit byte j holds nibbles c_j (low) and c_{j + D/2} (high), level = 2 c + 1; 8-bit
// codes are the levels. The codes are read as vectors of L 32-bit words (L = 16, or 8 for the
// smallest heads) and a code is taken out of all L words at once with shifts and masks, so one
// vector holds channels 4 l + b (l < L) of one token for a byte position b: the kernel works on
// channels in that order. kvjax.native permutes the queries into it and the outputs back
// (`to_kernel_order`, `from_kernel_order`), O(D) per query row, so the per-token work is shifts,
// converts and FMAs.
//
// Work is split into (pair, block of tokens) tasks with a flash-decoding merge (each block's max,
// sum and unnormalised output), so one sequence of one KV head still uses every core; the tasks
// run on XLA's intra-op thread pool (`parallel_for`, simd.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "simd.h"

namespace ffi = xla::ffi;

namespace {

using kvjax_native::load;
using kvjax_native::parallel_for;
using kvjax_native::store;
using kvjax_native::sum_lanes;
using kvjax_native::Vec;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum class ScaleType { kF32, kBF16 };

struct Problem {
  const float* q;        // [x, m, D]   rotated queries, m = t * r rows per (batch, KV head) pair
  const uint8_t* kc;     // [x, n, D/2 or D]
  const void* ks;        // [x, n, G]
  const uint8_t* vc;     // [x, n, D/2 or D]
  const void* vs;        // [x, n, G]
  const float* off;      // [x, m, noff]  noff in {1, n}
  const bool* mask;      // [B, t, n]
  const int32_t* slots;  // [B, t, K]    -1: none
  float* out;            // [x, m, D]
  float* wout;           // [x, m, K]
  int64_t x, m, n, d, groups, group, t, r, heads, noff, k_slots;
  int key_bits, value_bits;
  ScaleType scale_type;
  float scale, softcap;
  int64_t block, num_blocks;
};

// exp(x) for x <= 0 (softmax arguments), branch-free so loops over it vectorize: x = k ln2 + f,
// |f| <= ln2 / 2, exp(f) by its degree-6 Taylor polynomial (relative error < 2e-7), 2^k by the
// exponent bits. Below -87 (where float32 exp underflows to denormals) it returns 0.
inline float exp_nonpos(float x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  x = std::max(x, -87.f);
  const float k = std::nearbyint(x * kLog2e);
  const float f = (x - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return p * two_k;
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void load_scales(const Problem& p, const void* base, int64_t index, float* s) {
  if (p.scale_type == ScaleType::kF32) {
    const float* src = static_cast<const float*>(base) + index * p.groups;
    for (int64_t g = 0; g < p.groups; ++g) s[g] = src[g];
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(base) + index * p.groups;
    for (int64_t g = 0; g < p.groups; ++g) s[g] = bf16_to_f32(src[g]);
  }
}

// The scales of one vector's lanes: channels c0 + 4 l + b (l < L) span 4 L channels from c0, a
// multiple of 4 L, so at most two groups (4 L = 64 > group size 32), split at lane 8.
inline Vec<8>::f lane_scales(const float* s, int64_t c0, int64_t gs, Vec<8>::f*) {
  return Vec<8>::f{} + s[c0 / gs];  // 4 L = 32 channels: one group
}
inline Vec<16>::f lane_scales(const float* s, int64_t c0, int64_t gs, Vec<16>::f*) {
  typedef Vec<16>::f vf;
  const vf s0 = vf{} + s[c0 / gs];
  if (gs >= 64) return s0;
  const vf s1 = vf{} + s[(c0 + 32) / gs];
  return __builtin_shufflevector(s0, s1, 0, 1, 2, 3, 4, 5, 6, 7, 24, 25, 26, 27, 28, 29, 30, 31);
}

// One token's codes as vectors in the kernel's channel order, level times its group's scale:
// 4-bit: y[(h * 4 + b) * W + v] = channels h D/2 + 4 L v + 4 l + b, W = D / (8 L); 8-bit:
// y[b * W + v] = channels 4 L v + 4 l + b, W = D / (4 L). 4-bit level 2 n + 1 of nibble n is
// applied as n * 2s + s.
template <int L, int kBits, int kD, int kGS>
inline void dequant_token(const uint8_t* __restrict codes, const float* s,
                          typename Vec<L>::f* __restrict y) {
  typedef typename Vec<L>::f vf;
  typedef typename Vec<L>::i vi;
  typedef typename Vec<L>::u vu;
  if constexpr (kBits == 4) {
    constexpr int W = kD / (8 * L);
    for (int v = 0; v < W; ++v) {
      const vu w = load<vu>(codes + 16 * L * v / 4);
      const vf slo = lane_scales(s, 4 * L * v, kGS, (vf*)nullptr);
      const vf shi = lane_scales(s, kD / 2 + 4 * L * v, kGS, (vf*)nullptr);
      const vf slo2 = slo + slo, shi2 = shi + shi;
      for (int b = 0; b < 4; ++b) {
        const vi lo = (vi)(((w >> (8 * b)) & 15) ^ 8) - 8;
        const vi hi = (vi)(((w >> (8 * b + 4)) & 15) ^ 8) - 8;
        y[b * W + v] = __builtin_convertvector(lo, vf) * slo2 + slo;
        y[(4 + b) * W + v] = __builtin_convertvector(hi, vf) * shi2 + shi;
      }
    }
  } else {
    constexpr int W = kD / (4 * L);
    for (int v = 0; v < W; ++v) {
      const vi w = load<vi>(codes + 16 * L * v / 4);
      const vf sc = lane_scales(s, 4 * L * v, kGS, (vf*)nullptr);
      for (int b = 0; b < 4; ++b) {
        const vi x = (w << (24 - 8 * b)) >> 24;  // arithmetic: sign-extends byte b
        y[b * W + v] = __builtin_convertvector(x, vf) * sc;
      }
    }
  }
}

template <int L, int kKeyBits, int kValueBits, int kD, int kGS>
void run_task(const Problem& p, int64_t task, float* __restrict part_mx, float* __restrict part_sum,
              float* __restrict part_o, float* __restrict slot_scores) {
  typedef typename Vec<L>::f vf;
  constexpr int C = kD / L;   // vectors per token
  constexpr int kTile = L;    // tokens per tile: one sum_lanes per row
  const int64_t pair = task / p.num_blocks, blk = task % p.num_blocks;
  const int64_t n0 = blk * p.block, n1 = std::min(p.n, n0 + p.block), nb = n1 - n0;
  const int64_t m = p.m, b = pair / p.heads;
  const int64_t stride = nb + kTile;  // a row of scores, with room for the last tile
  thread_local std::vector<float> scores_buf;
  scores_buf.resize(m * stride);
  float* __restrict scores = scores_buf.data();
  constexpr int64_t kbytes = kKeyBits == 4 ? kD / 2 : kD, vbytes = kValueBits == 4 ? kD / 2 : kD;
  const uint8_t* kc = p.kc + (pair * p.n + n0) * kbytes;
  const uint8_t* vc = p.vc + (pair * p.n + n0) * vbytes;
  const int64_t sfirst = pair * p.n + n0;
  const float* __restrict q = p.q + pair * m * kD;
  vf y[kTile * C];
  float s[16];
  // Which tiles any query row of this pair sees: the others are neither read nor computed (a
  // cache allocated far beyond its contents costs what its contents cost, and slots past the
  // end, which may hold anything, never reach a sum).
  const int64_t num_tiles = (nb + kTile - 1) / kTile;
  thread_local std::vector<char> tile_seen;
  tile_seen.assign(num_tiles, 0);
  for (int64_t ti = 0; ti < p.t; ++ti) {
    const bool* vis = p.mask + (b * p.t + ti) * p.n + n0;
    for (int64_t i = 0; i < nb; ++i) tile_seen[i / kTile] |= vis[i];
  }
  // Scores: a tile of L tokens is dequantized once, then each row's L dot products end in one
  // sum_lanes.
  for (int64_t i0 = 0; i0 < nb; i0 += kTile) {
    const int64_t tb = std::min<int64_t>(kTile, nb - i0);
    if (!tile_seen[i0 / kTile]) continue;  // masked below, whatever the scores buffer holds
    for (int64_t i = 0; i < tb; ++i) {
      load_scales(p, p.ks, sfirst + i0 + i, s);
      dequant_token<L, kKeyBits, kD, kGS>(kc + (i0 + i) * kbytes, s, y + i * C);
    }
    for (int64_t i = tb; i < kTile; ++i)
      for (int k = 0; k < C; ++k) y[i * C + k] = vf{};
    for (int64_t row = 0; row < m; ++row) {
      vf qv[C];
      for (int k = 0; k < C; ++k) qv[k] = load<vf>(q + row * kD + L * k);
      vf acc[kTile];
      for (int i = 0; i < kTile; ++i) {
        vf a = qv[0] * y[i * C];
        for (int k = 1; k < C; ++k) a += qv[k] * y[i * C + k];
        acc[i] = a;
      }
      store(scores + row * stride + i0, sum_lanes(acc));
    }
  }
  const float scale = p.scale, cap = p.softcap;
  for (int64_t row = 0; row < m; ++row) {
    const int64_t ti = row / p.r;
    const bool* vis = p.mask + (b * p.t + ti) * p.n + n0;
    const float* off = p.off + (pair * m + row) * p.noff;
    float* __restrict sr = scores + row * stride;
    float mx = kNegInf;
    if (p.noff == 1) {
      const float o0 = off[0];
#pragma omp simd reduction(max : mx)
      for (int64_t i = 0; i < nb; ++i) {
        const float v = vis[i] ? (sr[i] + o0) * scale : kNegInf;
        sr[i] = v;
        mx = v > mx ? v : mx;
      }
    } else {
      const float* offn = off + n0;
#pragma omp simd reduction(max : mx)
      for (int64_t i = 0; i < nb; ++i) {
        const float v = vis[i] ? (sr[i] + offn[i]) * scale : kNegInf;
        sr[i] = v;
        mx = v > mx ? v : mx;
      }
    }
    if (cap > 0.f) {
      mx = kNegInf;
      for (int64_t i = 0; i < nb; ++i) {
        if (sr[i] != kNegInf) sr[i] = cap * std::tanh(sr[i] / cap);
        mx = std::max(mx, sr[i]);
      }
    }
    part_mx[row] = mx;
    const int32_t* sl = p.slots + (b * p.t + ti) * p.k_slots;
    for (int64_t k = 0; k < p.k_slots; ++k) {
      if (sl[k] >= n0 && sl[k] < n1) slot_scores[(pair * m + row) * p.k_slots + k] = sr[sl[k] - n0];
    }
    float sum = 0.f;
    if (mx != kNegInf) {
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < nb; ++i) {
        const float e = sr[i] == kNegInf ? 0.f : exp_nonpos(sr[i] - mx);
        sr[i] = e;
        sum += e;
      }
    }
    part_sum[row] = sum;
  }
  // Values, a tile at a time: each row's output vectors stay in registers across the tile.
  for (int64_t row = 0; row < m; ++row)
    for (int k = 0; k < C; ++k) store(part_o + row * kD + L * k, vf{});
  for (int64_t i0 = 0; i0 < nb; i0 += kTile) {
    const int64_t tb = std::min<int64_t>(kTile, nb - i0);
    if (!tile_seen[i0 / kTile]) continue;
    for (int64_t i = 0; i < tb; ++i) {
      load_scales(p, p.vs, sfirst + i0 + i, s);
      dequant_token<L, kValueBits, kD, kGS>(vc + (i0 + i) * vbytes, s, y + i * C);
    }
    for (int64_t row = 0; row < m; ++row) {
      if (part_mx[row] == kNegInf) continue;
      const float* __restrict w = scores + row * stride + i0;
      float* __restrict o = part_o + row * kD;
      vf acc[C];
      for (int k = 0; k < C; ++k) acc[k] = load<vf>(o + L * k);
      for (int64_t i = 0; i < tb; ++i) {
        if (w[i] == 0.f) continue;  // masked (or underflowed): its values, whatever they are, add nothing
        const vf wi = vf{} + w[i];
        for (int k = 0; k < C; ++k) acc[k] += wi * y[i * C + k];
      }
      for (int k = 0; k < C; ++k) store(o + L * k, acc[k]);
    }
  }
}

using TaskFn = void (*)(const Problem&, int64_t, float*, float*, float*, float*);

template <int kKeyBits, int kValueBits>
TaskFn pick_dims(int64_t lanes, int64_t d, int64_t gs) {
#define KVJAX_DIMS(L, D, GS) \
  if (lanes == L && d == D && gs == GS) return run_task<L, kKeyBits, kValueBits, D, GS>;
  KVJAX_DIMS(8, 64, 32) KVJAX_DIMS(8, 64, 64)
  KVJAX_DIMS(16, 128, 32) KVJAX_DIMS(16, 128, 64) KVJAX_DIMS(16, 128, 128)
  KVJAX_DIMS(16, 256, 32) KVJAX_DIMS(16, 256, 64) KVJAX_DIMS(16, 256, 128)
#undef KVJAX_DIMS
  return nullptr;
}

TaskFn pick(int key_bits, int value_bits, int64_t lanes, int64_t d, int64_t gs) {
  if (key_bits == 4 && value_bits == 4) return pick_dims<4, 4>(lanes, d, gs);
  if (key_bits == 8 && value_bits == 4) return pick_dims<8, 4>(lanes, d, gs);
  if (key_bits == 4 && value_bits == 8) return pick_dims<4, 8>(lanes, d, gs);
  return pick_dims<8, 8>(lanes, d, gs);
}

// Per-task results of the blocks, merged afterwards.
struct Partials {
  std::vector<float> mx, sum, o, slot_scores;  // per task: [m], [m], [m, D]; [x, m, K]
};

// Flash-decoding merge of the blocks of each (pair, row); zeros for a row with no visible key.
void merge(const Problem& p, const Partials& w) {
  const int64_t d = p.d, m = p.m;
  for (int64_t pair = 0; pair < p.x; ++pair) {
    for (int64_t row = 0; row < m; ++row) {
      float mx = kNegInf;
      for (int64_t blk = 0; blk < p.num_blocks; ++blk)
        mx = std::max(mx, w.mx[(pair * p.num_blocks + blk) * m + row]);
      float* o = p.out + (pair * m + row) * d;
      float* wt = p.wout + (pair * m + row) * p.k_slots;
      std::fill(o, o + d, 0.f);
      std::fill(wt, wt + p.k_slots, 0.f);
      if (mx == kNegInf) continue;
      float sum = 0.f;
      for (int64_t blk = 0; blk < p.num_blocks; ++blk) {
        const int64_t t = pair * p.num_blocks + blk;
        const float bm = w.mx[t * m + row];
        if (bm == kNegInf) continue;
        const float c = exp_nonpos(bm - mx);
        sum += c * w.sum[t * m + row];
        const float* po = w.o.data() + (t * m + row) * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) o[j] += c * po[j];
      }
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) o[j] *= inv;
      const float* ss = w.slot_scores.data() + (pair * m + row) * p.k_slots;
      for (int64_t k = 0; k < p.k_slots; ++k)
        wt[k] = ss[k] == kNegInf ? 0.f : exp_nonpos(ss[k] - mx) * inv;
    }
  }
}

ffi::Error QuantAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kc,
                              ffi::AnyBuffer ks, ffi::AnyBuffer vc, ffi::AnyBuffer vs,
                              ffi::Buffer<ffi::F32> off, ffi::Buffer<ffi::PRED> mask,
                              ffi::Buffer<ffi::S32> slots, ffi::ResultBuffer<ffi::F32> out,
                              ffi::ResultBuffer<ffi::F32> wout, int64_t key_bits,
                              int64_t value_bits, int64_t group_size, int64_t heads, float scale,
                              float softcap, int64_t block, int64_t lanes) {
  auto qd = q.dimensions(), kd = kc.dimensions(), sd = ks.dimensions(), od = off.dimensions(),
       md = mask.dimensions(), sld = slots.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || sd.size() != 3 || od.size() != 3 || md.size() != 3 ||
      sld.size() != 3)
    return ffi::Error::InvalidArgument("kvjax_quant_attention: every operand is rank 3");
  Problem p{};
  p.x = qd[0];
  p.m = qd[1];
  p.d = qd[2];
  p.n = kd[1];
  p.t = md[1];
  p.heads = heads;
  p.k_slots = sld[2];
  p.noff = od[2];
  p.group = group_size;
  p.groups = p.d / group_size;
  p.key_bits = static_cast<int>(key_bits);
  p.value_bits = static_cast<int>(value_bits);
  if ((key_bits != 4 && key_bits != 8) || (value_bits != 4 && value_bits != 8))
    return ffi::Error::InvalidArgument("kvjax_quant_attention: bits must be 4 or 8");
  if (p.d % group_size || p.m % p.t || p.x % heads || md[0] * heads != p.x || md[2] != p.n ||
      sd[2] != p.groups || kd[0] != p.x || kd[2] != (key_bits == 4 ? p.d / 2 : p.d) ||
      (p.noff != 1 && p.noff != p.n) || (p.d % 32) || p.d > 512 || group_size < 32 ||
      vc.dimensions().size() != 3 || vc.dimensions()[2] != (value_bits == 4 ? p.d / 2 : p.d) ||
      vc.dimensions()[1] != p.n || vs.dimensions().size() != 3 || vs.dimensions()[2] != p.groups)
    return ffi::Error::InvalidArgument("kvjax_quant_attention: operand shapes disagree");
  if (ks.element_type() != vs.element_type())
    return ffi::Error::InvalidArgument("kvjax_quant_attention: key and value scales differ in dtype");
  if (ks.element_type() == ffi::DataType::F32) p.scale_type = ScaleType::kF32;
  else if (ks.element_type() == ffi::DataType::BF16) p.scale_type = ScaleType::kBF16;
  else return ffi::Error::InvalidArgument("kvjax_quant_attention: scales must be f32 or bf16");
  p.r = p.m / p.t;
  p.q = q.typed_data();
  p.kc = static_cast<const uint8_t*>(kc.untyped_data());
  p.ks = ks.untyped_data();
  p.vc = static_cast<const uint8_t*>(vc.untyped_data());
  p.vs = vs.untyped_data();
  p.off = off.typed_data();
  p.mask = mask.typed_data();
  p.slots = slots.typed_data();
  p.out = out->typed_data();
  p.wout = wout->typed_data();
  p.scale = scale;
  p.softcap = softcap;
  p.block = std::max<int64_t>(1, block);
  p.num_blocks = std::max<int64_t>(1, (p.n + p.block - 1) / p.block);
  if (p.x == 0 || p.m == 0) return ffi::Error::Success();

  const TaskFn fn = pick(p.key_bits, p.value_bits, lanes, p.d, p.group);
  if (fn == nullptr)
    return ffi::Error::InvalidArgument("kvjax_quant_attention: no kernel for this head dim, group "
                                       "size and lane count");
  const int64_t num_tasks = p.x * p.num_blocks;
  Partials parts;
  parts.mx.resize(num_tasks * p.m);
  parts.sum.resize(num_tasks * p.m);
  parts.o.resize(num_tasks * p.m * p.d);
  parts.slot_scores.assign(p.x * p.m * p.k_slots, kNegInf);
  parallel_for(pool, num_tasks, [&](int64_t task) {
    fn(p, task, parts.mx.data() + task * p.m, parts.sum.data() + task * p.m,
       parts.o.data() + task * p.m * p.d, parts.slot_scores.data());
  });
  merge(p, parts);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvjaxQuantAttention, QuantAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // k codes
                                  .Arg<ffi::AnyBuffer>()         // k scales
                                  .Arg<ffi::AnyBuffer>()         // v codes
                                  .Arg<ffi::AnyBuffer>()         // v scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logit offsets
                                  .Arg<ffi::Buffer<ffi::PRED>>() // mask
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slots
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // slot weights
                                  .Attr<int64_t>("key_bits")
                                  .Attr<int64_t>("value_bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("lanes"));
