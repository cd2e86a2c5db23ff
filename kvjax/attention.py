"""Attention over a KV cache: decode (one query token) and chunks, dense or quantized.

Over a quantized cache the XLA path never forms un-rotated keys or values per
token. With q~ = R_k (lam_k * q) computed once per query,

    score_t = q . k_t = sum_groups s_{t,g} (q~_g . codes_{t,g})
    out     = lam_v * R_v^T (sum_t p_t s_{t,g} codes_{t,g})

so the rotation costs O(D^2) per query, not per cached token, and the codes
are only ever multiplied by one scale per group (per query at decode; once per
chunk, in float32, when a chunk's queries outnumber D / (R * G)).

impl:
  "auto"      single-token decode over a quantized cache: the Pallas kernel on
              TPU/GPU, "native" (else "int8dot") on the CPU; chunks: "dequant" on the CPU, "xla" on
              TPU/GPU;
  "xla"       the quantized-domain jnp path above in float32 (plain attention for
              dense caches), equal to the reference to float32 rounding;
  "native"    the same math in a C++ CPU kernel (`kvjax.native`): codes dequantized in
              registers, (sequence, head, block of tokens) tasks on every core, float32
              throughout: the CPU decode path where a C++ compiler is found;
  "int8dot"   the same math with int8 x int8 -> int32 dot products (two-level int8
              queries and weights): the CPU decode path otherwise;
  "dequant"   chunks (many queries per step): the codes are dequantized once, in the
              rotated domain and in bf16, and the queries q~ meet them in bf16 matmuls
              (float32 accumulation), as a bf16 dense cache would: the CPU chunk path;
  "reference" dequantize every cached vector, then plain attention (the oracle);
  "pallas"    the fused decode kernel (interpret mode on the CPU).

Query heads are grouped as in Hugging Face `repeat_kv`: query head j reads
KV head j // (q_heads // kv_heads).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kvjax import cache as cache_lib
from kvjax import corrections as corrections_lib
from kvjax import quantizer
from kvjax.cache import DenseKVCache, QuantizedKVCache

_HI = jax.lax.Precision.HIGHEST
_IMPLS = ("auto", "xla", "native", "int8dot", "dequant", "reference", "pallas")


def _check_q(q, c):
  if not hasattr(q, "shape") or q.ndim != 4:
    raise ValueError(f"q must be [batch, q_seq, q_heads, head_dim], got "
                     f"{getattr(q, 'shape', type(q).__name__)}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise TypeError(f"q must be a floating dtype, got {q.dtype}")
  b, _, hq, d = q.shape
  if b != c.batch:
    raise ValueError(f"q batch {b} does not match the cache batch {c.batch}")
  if d != c.head_dim:
    raise ValueError(f"q head_dim {d} does not match the cache head_dim {c.head_dim}")
  if hq % c.num_kv_heads:
    raise ValueError(f"q_heads={hq} must be a multiple of the cache's kv_heads={c.num_kv_heads}")


# Cache types that run their own attention (kvjax.certified): type -> (attend, append_and_attend),
# registered by the module that defines them, so this module imports none of them.
_OWN_ATTENTION = {}


def register_cache_type(cls, *, attend, append_and_attend) -> None:
  """Lets `attend` / `append_and_attend` hand caches of type `cls` to their own functions:
  attend(q, cache, scale=, softcap=, window=, q_positions=) -> out and
  append_and_attend(cache, q, k, v, scale=, softcap=, num_tokens=, impl=) -> (out, cache)."""
  _OWN_ATTENTION[cls] = (attend, append_and_attend)


def check_impl(impl):
  if impl not in _IMPLS:
    raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


def visibility_mask(q_pos: jax.Array, kv_pos: jax.Array, window: int | None) -> jax.Array:
  """bool [B, Tq, N]: query at absolute position q_pos [B, Tq] sees key kv_pos [B, N]."""
  qp = q_pos[:, :, None]
  kp = kv_pos[:, None, :]
  m = (kp >= 0) & (kp <= qp)
  if window is not None:
    m &= kp > qp - window
  return m


def _softmax_weights(scores, mask, softcap):
  """Masked softmax over the last axis in float32; rows with no visible key give 0."""
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)
  scores = jnp.where(mask, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom > 0, denom, 1.0)


def _grouped_q(q, num_kv_heads):
  """[B, T, Hq, D] -> [B, H, T, R, D] with R = Hq // H query heads per KV head."""
  b, t, hq, d = q.shape
  return q.reshape(b, t, num_kv_heads, hq // num_kv_heads, d).transpose(0, 2, 1, 3, 4)


def _ungroup(o, dtype):
  """[B, H, T, R, D] -> [B, T, H*R, D]."""
  b, h, t, r, d = o.shape
  return o.transpose(0, 2, 1, 3, 4).reshape(b, t, h * r, d).astype(dtype)


def dense_attention(q, k, v, mask, *, scale, softcap=None):
  """Plain softmax attention with float32 accumulation and softmax.

  q: [B, Tq, Hq, D]; k, v: [B, H, N, D]; mask: bool [B, Tq, N]. Returns [B, Tq, Hq, D].
  A float32 cache is computed in float32 throughout; a bf16/f16 cache is read in
  its own dtype (q and p rounded to it, products accumulated in float32), which
  is how accelerators run it and what a fair bf16 baseline is on the CPU too
  (converting the cache to float32 first would triple its memory traffic).
  """
  if k.dtype == jnp.float32:
    qg = _grouped_q(q.astype(jnp.float32), k.shape[1])
    s = jnp.einsum("bhtrd,bhnd->bhtrn", qg, k, precision=_HI) * scale
    p = _softmax_weights(s, mask[:, None, :, None, :], softcap)
    o = jnp.einsum("bhtrn,bhnd->bhtrd", p, v, precision=_HI)
    return _ungroup(o, q.dtype)
  qg = _grouped_q(q.astype(k.dtype), k.shape[1])
  s = jnp.einsum("bhtrd,bhnd->bhtrn", qg, k, preferred_element_type=jnp.float32) * scale
  p = _softmax_weights(s, mask[:, None, :, None, :], softcap)
  o = jnp.einsum("bhtrn,bhnd->bhtrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return _ungroup(o, q.dtype)


def _rotate_grouped_q(qg, rotation, lam):
  """q~ = R (lam * q) for grouped queries [B, H, T, R, D]; rotation [Hr, D, D]."""
  lam = lam[None, :, None, None, :]
  return jnp.einsum("bhtrd,hed->bhtre", qg * lam, rotation, precision=_HI)


class QuantView(NamedTuple):
  """What attention reads of a quantized cache: codes and scales [B, H, N, ...] (the cache's,
  or the cache's plus a chunk's), the basis (rotations [Hr, D, D], λ [Hr, D]), each
  correction's arrays (`QuantizedKVCache.corrections`) and what each correction's write of
  this step's tokens handed over (`pending`; None when attending over a cache alone)."""

  k_codes: jax.Array
  k_scales: jax.Array
  v_codes: jax.Array
  v_scales: jax.Array
  k_rotation: jax.Array
  k_lambda: jax.Array
  v_rotation: jax.Array
  v_lambda: jax.Array
  corrections: tuple
  pending: tuple | None = None


def quant_view(c: QuantizedKVCache, pending=None) -> QuantView:
  return QuantView(c.k_codes, c.k_scales, c.v_codes, c.v_scales, c.k_rotation, c.k_lambda,
                   c.v_rotation, c.v_lambda, c.corrections, pending)


def _rotated_query(q, view, config):
  """Grouped queries [B, H, T, R, D] and q~ = R_k (lam_k * q) split into groups [B, H, T, R, G, g]."""
  qg = _grouped_q(q.astype(jnp.float32), view.k_codes.shape[1])
  b, h, t, r, d = qg.shape
  g = config.group_size
  qr = _rotate_grouped_q(qg, view.k_rotation, view.k_lambda)
  return qg, qr.reshape(b, h, t, r, d // g, g)


def _logit_terms(qg, view, config, kv_pos, q_pos):
  """The corrections' (unscaled) logit terms, [B, H, T, R, 1 or N], or 0.0."""
  terms = corrections_lib.logit_terms(config.corrections, view.corrections,
                                      corrections_lib.Read(qg, kv_pos, q_pos))
  return 0.0 if terms is None else terms


def _value_terms(qg, view, config, kv_pos, q_pos, *, oracle=False):
  """The corrections' value terms: None or [(slots [B, T, K, N], errors [B, H, T, K, D]), ...],
  one pair per correction."""
  return corrections_lib.value_terms(config.corrections, view.corrections, view.pending,
                                     corrections_lib.Read(qg, kv_pos, q_pos), oracle=oracle)


def _add_value_terms(o, weights, terms):
  """o [B, H, T, R, D] (original value domain) + sum_k weights[..., k] errors[k] for each
  correction's terms in turn: the output as if the corrected slots' values were stored exactly.
  weights [B, H, T, R, K_total], the corrections' slots one after another."""
  start = 0
  for slots, errors in terms:
    k = slots.shape[2]
    o = o + jnp.einsum("bhtrk,bhtkd->bhtrd", weights[..., start:start + k], errors, precision=_HI)
    start += k
  return o


def _all_slots(terms):
  """The corrected slots of every correction, [B, T, K_total, N]."""
  return jnp.concatenate([slots for slots, _ in terms], axis=2)


def _slot_weights(p, terms):
  """[B, H, T, R, K_total]: the weight softmax weights p [B, H, T, R, N] give each corrected
  slot."""
  return jnp.einsum("bhtrn,btkn->bhtrk", p, _all_slots(terms), precision=_HI)


def _unrotate_output(o_rot, view):
  """lam_v * R_v^T o~ for rotated outputs [B, H, T, R, D]."""
  o = jnp.einsum("bhtre,hed->bhtrd", o_rot, view.v_rotation, precision=_HI)
  return o * view.v_lambda[None, :, None, None, :]


def quantized_attention(q, view: QuantView, mask, *, config, scale, softcap=None, kv_pos=None,
                        q_pos=None):
  """Attention in the rotated, quantized domain (no per-token dequantized K/V).

  q: [B, Tq, Hq, D]; view: `QuantView`; mask: bool [B, Tq, N]; kv_pos: int [B, N] slot
  positions and q_pos int [B, Tq] query positions (for the corrections' terms).
  """
  qg, qr = _rotated_query(q, view, config)
  b, h, t, r, G, g = qr.shape
  d, n = G * g, view.k_codes.shape[2]
  kc = view.k_codes
  k_int = quantizer.unpack_int4(kc) if config.key_bits == 4 else kc
  k_int = k_int.reshape(b, h, n, G, g).astype(jnp.float32)
  v_int = quantizer.unpack_int4(view.v_codes) if config.value_bits == 4 else view.v_codes
  v_int = v_int.reshape(b, h, n, G, g).astype(jnp.float32)
  k_sc = view.k_scales.astype(jnp.float32)
  v_sc = view.v_scales.astype(jnp.float32)
  # Per-group partial products [.., T, R, N, G] are smaller than the scaled codes [.., N, D]
  # only for few queries (decode); a chunk scales the codes once instead.
  per_group = t * r * G <= d
  if per_group:
    # Few queries (decode): per-group partial dot products [.., N, G], then one
    # multiply-add with the group scales; nothing of size [N, D] beyond the codes.
    part = jnp.einsum("bhtrGc,bhnGc->bhtrnG", qr, k_int, precision=_HI)
    s = jnp.einsum("bhtrnG,bhnG->bhtrn", part, k_sc, precision=_HI)
  else:
    # Many queries (a chunk): the partial products would outgrow the keys themselves, so
    # the keys are scaled once in float32. level * bf16 scale is exact in float32 (a 4- or
    # 8-bit integer times an 8-bit significand), so this is the same sum in another order.
    k_hat = (k_int * k_sc[..., None]).reshape(b, h, n, d)
    s = jnp.einsum("bhtrd,bhnd->bhtrn", qr.reshape(b, h, t, r, d), k_hat, precision=_HI)
  # The corrections' logit terms (q . k_mean, rotary offsets, the sink key's error).
  s = (s + _logit_terms(qg, view, config, kv_pos, q_pos)) * scale
  p = _softmax_weights(s, mask[:, None, :, None, :], softcap)
  if per_group:
    pw = p[..., None] * v_sc[:, :, None, None, :, :]
    o_rot = jnp.einsum("bhtrnG,bhnGc->bhtrGc", pw, v_int, precision=_HI).reshape(b, h, t, r, d)
  else:
    v_hat = (v_int * v_sc[..., None]).reshape(b, h, n, d)
    o_rot = jnp.einsum("bhtrn,bhnd->bhtrd", p, v_hat, precision=_HI)
  o = _unrotate_output(o_rot, view)
  terms = _value_terms(qg, view, config, kv_pos, q_pos)
  if terms is not None:
    o = _add_value_terms(o, _slot_weights(p, terms), terms)
  return _ungroup(o, q.dtype)


# Unpacked codes of one block of (batch, KV head) pairs stay under this many bytes, so the
# int8 dot products read them from cache rather than memory (measured on 2 cores: 4 MiB).
_INT8DOT_BLOCK_BYTES = 1 << 22
# int32 accumulation of the value products: |weight| <= 127 and |code| <= 128 (16 c for
# 4-bit, c for 8-bit), so partial sums stay below 2^31 for up to 2^17 tokens; longer caches
# are summed in segments of this many tokens.
_INT8DOT_SEGMENT = 1 << 16


def _int8_two_level(x):
  """x ~ s (hi + lo / 256) with int8 hi, lo and s = max|x| / 127 over the last axis."""
  s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
  s = jnp.where(s > 0, s, 1.0)
  u = x / s
  hi = jnp.round(u)
  lo = jnp.clip(jnp.round((u - hi) * 256.0), -128, 127)
  return hi.astype(jnp.int8), lo.astype(jnp.int8), s


def _int8_pieces(codes, bits):
  """The codes as int8 dot operands: 4-bit -> (16 c of channels [0, D/2), 16 c of [D/2, D)).

  Byte j holds nibbles c_j (low) and c_{j+D/2} (high); `byte << 4` and `byte & 0xF0`, read
  as int8, are exactly 16 c of each (no sign extension, no 8-bit arithmetic shift: one
  vector op each). 8-bit codes are used as they are.
  """
  if bits == 8:
    return (codes,)
  return (jax.lax.bitcast_convert_type(codes << jnp.uint8(4), jnp.int8),
          jax.lax.bitcast_convert_type(codes & jnp.uint8(0xF0), jnp.int8))


def _piece_groups(d, g, pieces):
  """(width, [piece][j] -> group index) for `pieces` equal channel blocks of a D-vector."""
  w = d // pieces
  return w, [[c // g for c in range(p * w, (p + 1) * w, min(g, w))] for p in range(pieces)]


def quantized_attention_int8dot(q, view: QuantView, mask, *, config, scale, softcap=None,
                                kv_pos=None, q_pos=None):
  """The CPU fast path: the quantized-domain math with int8 x int8 -> int32 dot products.

  Scores. q~ = R_k (lam_k q) is split per (query head, group) into two int8 levels,
  q~ ~ s (hi + lo / 256) (error <= s / 512 per entry, s = max|q~_group| / 127). Per piece of
  channels (4-bit: the low-nibble and high-nibble halves, each read as 16 c straight from
  the bytes; 8-bit: all D channels), ONE int8 matmul of a block-diagonal query [E, w] (row
  (group, level, query) holds that level of q~ on the group's channels) with the codes
  [N, w] gives every per-group partial dot product; hi * 256 + lo is combined in int32 and
  the 4-bit levels 2c + 1 are restored exactly as q~ . levels = (q~ . 16c) / 8 + sum(q~).
  Then score = sum_groups s_k,group * partial + q . k_mean.
  Values. With p = exp(score - max) (max 1, masked 0), the weights p_t s_v,t,G are scaled
  by 127 / max_t s_v,t,G (max over visible slots, fixed per (sequence, head, group): no
  per-row reduction) and split
  into two int8 levels the same way; one int8 matmul [E, N] x [N, w] per piece gives the
  rotated outputs (only each row's own group's channels are kept), restored to levels as
  above, divided by sum(p) at the end.
  Blocks of (batch, KV head) pairs go through a `lax.map` so the unpacked codes of one
  block stay in cache (_INT8DOT_BLOCK_BYTES). Added error vs `quantized_attention`: the
  two-level rounding of q~ and of the weights (each ~2^-16 of a group's largest entry);
  tests bound it per row.
  """
  qg, qr = _rotated_query(q, view, config)                         # qr [b,h,t,r,G,g]
  b, h, t, r, G, g = qr.shape
  d, n, x = G * g, view.k_codes.shape[2], b * h
  kbits, vbits = config.key_bits, config.value_bits
  # Query side (small, computed once): block-diagonal int8 queries per key piece.
  npk = 2 if kbits == 4 else 1
  wk, kgroups = _piece_groups(d, g, npk)
  q_hi, q_lo, q_s = _int8_two_level(qr)                             # [b,h,t,r,G,g], [...,1]
  q2 = jnp.stack([q_hi, q_lo], 2).reshape(b, h, 2, t, r, d)        # [b,h,level,t,r,d]
  kf = 0.125 if kbits == 4 else 1.0                                 # 16 c -> 2 c
  qbd, qscale, qsum = [], [], []
  for p, groups in enumerate(kgroups):
    ch = jnp.arange(p * wk, (p + 1) * wk)
    sel = (ch[None, :] // g == jnp.asarray(groups)[:, None]).astype(jnp.int8)   # [Gp, w]
    blk = q2[..., p * wk:(p + 1) * wk][:, :, None] * sel[:, None, None, None, :]  # [b,h,Gp,2,t,r,w]
    qbd.append(blk.reshape(x, -1, wk))
    qscale.append((q_s[..., groups, 0] * (kf / 256.0)).reshape(x, t, r, -1))   # [x,t,r,Gp]
    if kbits == 4:  # sum(q~) over each group's channels, for the odd levels 2c + 1
      part_sum = jnp.einsum("bhtrw,Gw->bhtrG", qr.reshape(b, h, t, r, d)[..., p * wk:(p + 1) * wk],
                            sel.astype(jnp.float32), precision=_HI)
      qsum.append(part_sum.reshape(x, t, r, -1))
    else:
      qsum.append(jnp.zeros((x, t, r, len(groups)), jnp.float32))
  qbd = jnp.stack(qbd, 1)                                           # [x, P, E, w]
  qscale, qsum = jnp.stack(qscale, 3), jnp.stack(qsum, 3)           # [x, t, r, P, Gp]
  offset = _logit_terms(qg, view, config, kv_pos, q_pos)            # [b,h,t,r,1 or n] or 0
  offset = jnp.broadcast_to(offset, (b, h, t, r, n)).reshape(x, t, r, n)
  npv = 2 if vbits == 4 else 1
  wv, vgroups = _piece_groups(d, g, npv)
  vf = 0.125 if vbits == 4 else 1.0
  vsel = [(jnp.arange(p * wv, (p + 1) * wv)[None, :] // g == jnp.asarray(gr)[:, None])
          .astype(jnp.float32) for p, gr in enumerate(vgroups)]    # [Gv, w] each

  def block(args):
    qbd, qscale, qsum, offset, k_codes, k_scales, v_codes, v_scales, visible, *slots = args
    c = qbd.shape[0]
    k_scales = k_scales.astype(jnp.float32)
    s = offset
    for p, piece in enumerate(_int8_pieces(k_codes, kbits)):
      part = jnp.einsum("xew,xnw->xen", qbd[:, p], piece, preferred_element_type=jnp.int32)
      part = part.reshape(c, -1, 2, t, r, n)
      for j, grp in enumerate(kgroups[p]):
        dot = (part[:, j, 0] * 256 + part[:, j, 1]).astype(jnp.float32)
        dot = dot * qscale[:, :, :, p, j, None] + qsum[:, :, :, p, j, None]
        s = s + dot * k_scales[:, None, None, grp]
    s = s * scale
    if softcap is not None:
      s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(visible[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    w = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))            # [c,t,r,n] in [0, 1]
    denom = jnp.sum(w, axis=-1)
    v_scales = v_scales.astype(jnp.float32)
    # Largest visible value scale per group: slots no query sees do not coarsen the grid.
    vmax = jnp.max(jnp.where(jnp.any(visible, 1)[:, None], v_scales, 0.0), axis=-1)   # [c, G]
    vmax = jnp.where(vmax > 0, vmax, 1.0)
    u = w[:, :, :, None, :] * (v_scales * (127.0 / vmax)[..., None])[:, None, None]   # [c,t,r,G,n]
    u_hi = jnp.round(u)
    u_lo = jnp.clip(jnp.round((u - u_hi) * 256.0), -128, 127)
    wsum = jnp.einsum("xtrn,xGn->xtrG", w, v_scales, precision=_HI)  # exact sum_t w_t s_v,t
    outs = []
    for p, piece in enumerate(_int8_pieces(v_codes, vbits)):
      grs = vgroups[p]
      g0, ng = grs[0], len(grs)
      wts = jnp.stack([u_hi[:, :, :, g0:g0 + ng], u_lo[:, :, :, g0:g0 + ng]], 1)  # [c,2,t,r,Gv,n]
      wts = wts.transpose(0, 4, 1, 2, 3, 5).astype(jnp.int8).reshape(c, -1, n)
      o = 0.0
      for lo in range(0, n, _INT8DOT_SEGMENT):  # int32 sums stay exact per segment
        hi = min(n, lo + _INT8DOT_SEGMENT)
        seg = jnp.einsum("xen,xnw->xew", wts[..., lo:hi], piece[:, lo:hi],
                         preferred_element_type=jnp.int32)
        o = o + seg.reshape(c, ng, 2, t, r, wv).astype(jnp.float32)
      acc = 0.0
      for j, grp in enumerate(grs):
        oj = (o[:, j, 0] * 256.0 + o[:, j, 1]) * (vmax[:, grp] * (vf / (127.0 * 256.0)))[:, None, None, None]
        if vbits == 4:
          oj = oj + wsum[:, :, :, grp, None]
        acc = acc + oj * vsel[p][j]
      outs.append(acc)                                              # [c,t,r,w]
    o = jnp.concatenate(outs, -1) if len(outs) > 1 else outs[0]
    inv = 1.0 / jnp.where(denom > 0, denom, 1.0)
    # The weights of the slots with an exact-value correction (sink; each query's own).
    if not slots:
      return o * inv[..., None], ()
    # slots[0] [c, t, K, n] one-hot: the weight [c, t, r, K] of each slot with an exact-value
    # correction (the sink; each query's recent positions).
    weights = jnp.einsum("xtrn,xtkn->xtrk", w, slots[0], precision=_HI) * inv[..., None]
    return o * inv[..., None], weights

  visible = jnp.broadcast_to(mask[:, None], (b, h, t, n)).reshape(x, t, n)
  args = (qbd, qscale, qsum, offset,
          view.k_codes.reshape(x, n, -1), view.k_scales.reshape(x, n, G).swapaxes(1, 2),
          view.v_codes.reshape(x, n, -1), view.v_scales.reshape(x, n, G).swapaxes(1, 2),
          visible)
  # One-hot slots whose weights the value corrections need (the sink; each query's recent
  # positions): [b, t, K, n], their weights come out of the blocks.
  terms = _value_terms(qg, view, config, kv_pos, q_pos)
  if terms is not None:
    sel = _all_slots(terms)
    args += (jnp.broadcast_to(sel[:, None], (b, h) + sel.shape[1:]).reshape(x, *sel.shape[1:]),)
  cb = max(1, _INT8DOT_BLOCK_BYTES // max(1, n * d))
  cb = max(i for i in range(1, min(cb, x) + 1) if x % i == 0)
  if cb == x:
    o_rot, weights = block(args)
  else:
    o_rot, weights = jax.lax.map(
        block, jax.tree.map(lambda a: a.reshape(x // cb, cb, *a.shape[1:]), args))
  o = _unrotate_output(o_rot.reshape(b, h, t, r, d), view)
  if terms is not None:
    o = _add_value_terms(o, weights.reshape(b, h, t, r, -1), terms)
  return _ungroup(o, q.dtype)


def quantized_attention_native(q, view: QuantView, mask, *, config, scale, softcap=None,
                               kv_pos=None, q_pos=None):
  """The CPU decode path: `quantized_attention`'s math in the C++ kernel of `kvjax.native`.

  The queries are rotated here (q~ = R_k (lam_k q), O(D^2) per query), the corrections' logit
  terms passed as offsets and their corrected slots as positions; the kernel dequantizes each
  token's codes in registers, runs (pair, block of tokens) tasks on every core and returns the
  rotated outputs and the corrected slots' weights, which the value terms and the inverse
  rotation take from there. float32 throughout: it differs from "xla" by summation order only.
  """
  from kvjax import native
  if not native.available():
    raise RuntimeError("impl='native' needs the CPU kernel, which is not available: "
                       f"{native.unavailable_reason()}")
  qg, qr = _rotated_query(q, view, config)
  b, h, t, r, G, g = qr.shape
  d, n, x = G * g, view.k_codes.shape[2], b * h
  offset = _logit_terms(qg, view, config, kv_pos, q_pos)
  if isinstance(offset, float):
    offset = jnp.zeros((x, t * r, 1), jnp.float32)
  else:
    noff = offset.shape[-1]
    offset = jnp.broadcast_to(offset, (b, h, t, r, noff)).reshape(x, t * r, noff)
  terms = _value_terms(qg, view, config, kv_pos, q_pos)
  if terms is None:
    slots = jnp.zeros((b, t, 0), jnp.int32)
  else:  # one-hot [b, t, K, n] -> the position of each slot (-1: none)
    sel = _all_slots(terms) > 0
    slots = jnp.where(jnp.any(sel, -1), jnp.argmax(sel, -1), -1).astype(jnp.int32)
  o_rot, weights = native.quant_attention(
      qr.reshape(x, t * r, d), view.k_codes.reshape(x, n, -1), view.k_scales.reshape(x, n, G),
      view.v_codes.reshape(x, n, -1), view.v_scales.reshape(x, n, G), offset,
      jnp.broadcast_to(mask, (b, t, n)), slots, key_bits=config.key_bits,
      value_bits=config.value_bits, group_size=g, heads=h, scale=scale, softcap=softcap)
  o = _unrotate_output(o_rot.reshape(b, h, t, r, d), view)
  if terms is not None:
    o = _add_value_terms(o, weights.reshape(b, h, t, r, -1), terms)
  return _ungroup(o, q.dtype)


def quantized_attention_dequant(q, view: QuantView, mask, *, config, scale, softcap=None,
                                kv_pos=None, q_pos=None):
  """The CPU chunk path: rotated-domain dequantization to bf16, then bf16 matmuls.

  With many queries per step (a prefill chunk) the codes are worth dequantizing once:
  y^ = levels * s per group, rounded to bf16 (2^-9 relative, as a bf16 cache stores its
  values), [B, H, N, D] for keys and values; scores q~ . y^_k + q . k_mean and outputs
  lam_v * R_v^T (p . y^_v) then cost what a bf16 dense cache costs, plus O(N D) for the
  dequantization and O(Tq D^2) for the two rotations. No per-token rotation.
  """
  qg, qr = _rotated_query(q, view, config)
  b, h, t, r, G, g = qr.shape
  d, n = G * g, view.k_codes.shape[2]

  def dequant(codes, scales, bits):
    lev = quantizer.unpack_int4(codes) if bits == 4 else codes
    y = lev.reshape(b, h, n, G, g).astype(jnp.float32) * scales.astype(jnp.float32)[..., None]
    return y.reshape(b, h, n, d).astype(jnp.bfloat16)

  k_hat = dequant(view.k_codes, view.k_scales, config.key_bits)
  s = jnp.einsum("bhtrd,bhnd->bhtrn", qr.reshape(b, h, t, r, d).astype(jnp.bfloat16), k_hat,
                 preferred_element_type=jnp.float32)
  s = (s + _logit_terms(qg, view, config, kv_pos, q_pos)) * scale
  p = _softmax_weights(s, mask[:, None, :, None, :], softcap)
  v_hat = dequant(view.v_codes, view.v_scales, config.value_bits)
  o_rot = jnp.einsum("bhtrn,bhnd->bhtrd", p.astype(jnp.bfloat16), v_hat,
                     preferred_element_type=jnp.float32)
  o = _unrotate_output(o_rot, view)
  terms = _value_terms(qg, view, config, kv_pos, q_pos)
  if terms is not None:
    o = _add_value_terms(o, _slot_weights(p, terms), terms)
  return _ungroup(o, q.dtype)


def _dequantized_kv(config, view: QuantView, kv_pos):
  """The oracle's keys and values [B, H, N, D] (float32): every cached vector dequantized and
  un-rotated, then restored by the corrections (key offsets, the sink, ...)."""
  g = config.group_size

  def deq(codes, scales, rot, lam, bits):
    y = quantizer.dequantize_rotated(codes, scales, bits=bits, group_size=g)  # [B,H,N,D]
    x = jnp.einsum("bhne,hed->bhnd", y, rot, precision=_HI)
    return x * lam[None, :, None, :]

  k = deq(view.k_codes, view.k_scales, view.k_rotation, view.k_lambda, config.key_bits)
  v = deq(view.v_codes, view.v_scales, view.v_rotation, view.v_lambda, config.value_bits)
  return corrections_lib.restore(config.corrections, view.corrections, k, v, kv_pos)


def reference_attention(q, view: QuantView, mask, *, config, scale, softcap=None, kv_pos=None,
                        q_pos=None):
  """The oracle: dequantize every cached vector, restore it, plain float32 attention; plus
  the terms of corrections that depend on the query (recent values), which no restored
  vector can express."""
  k, v = _dequantized_kv(config, view, kv_pos)
  qg = _grouped_q(q.astype(jnp.float32), k.shape[1])
  logits = corrections_lib.logit_terms(config.corrections, view.corrections,
                                       corrections_lib.Read(qg, kv_pos, q_pos), oracle=True)
  terms = _value_terms(qg, view, config, kv_pos, q_pos, oracle=True)
  if terms is None and logits is None:
    return dense_attention(q, k, v, mask, scale=scale, softcap=softcap)
  s = jnp.einsum("bhtrd,bhnd->bhtrn", qg, k, precision=_HI)
  s = (s if logits is None else s + logits) * scale
  p = _softmax_weights(s, mask[:, None, :, None, :], softcap)
  o = jnp.einsum("bhtrn,bhnd->bhtrd", p, v, precision=_HI)
  if terms is not None:
    o = _add_value_terms(o, _slot_weights(p, terms), terms)
  return _ungroup(o, q.dtype)


# ---------------------------------------------------------------------------------- dispatch

# The implementations over a quantized cache, by name; each takes
# (q, QuantView, mask, *, config, scale, softcap, kv_pos, q_pos). "pallas" (the fused decode
# kernel) reads the cache itself: see `_attend`.
QUANTIZED_IMPLS = {
    "xla": quantized_attention,
    "native": quantized_attention_native,
    "int8dot": quantized_attention_int8dot,
    "dequant": quantized_attention_dequant,
    "reference": reference_attention,
}
# What impl="auto" runs over a quantized cache: (platform, single-token decode?) -> name.
# "native" (the C++ CPU kernel) is taken where `kvjax.native` has a kernel for the cache's
# format and could be built; "int8dot" otherwise (`_cpu_decode_impl`).
AUTO_IMPL = {
    ("tpu", True): "pallas", ("gpu", True): "pallas", ("cpu", True): "native",
    ("tpu", False): "xla", ("gpu", False): "xla", ("cpu", False): "dequant",
}


def _cpu_decode_impl(cache) -> str:
  """"native" when the C++ kernel has a variant for the cache's format and is available
  (built on first use), else "int8dot"."""
  from kvjax import native
  cfg = cache.config
  if native.supported(cfg.key_bits, cfg.value_bits, cache.head_dim, cfg.group_size) and \
      native.available():
    return "native"
  return "int8dot"


def _auto_name(platform: str, decode: bool, cache) -> str:
  name = AUTO_IMPL.get((platform, decode), "xla")
  return _cpu_decode_impl(cache) if name == "native" else name


# lax.platform_dependent's lowering platforms -> (AUTO_IMPL's platform, the kernels' backend).
# Anything else (e.g. ROCm) lowers the default branch: the XLA path.
_LOWERING_PLATFORMS = {"cpu": ("cpu", None), "tpu": ("tpu", "tpu"), "cuda": ("gpu", "gpu")}


def _dispatch(impl: str, cache, q_len: int, run):
  """run(name, backend) for the implementation `impl` selects.

  "auto" over a quantized cache is decided when the step is lowered, not when it is traced
  (`lax.platform_dependent`): a step jitted here runs this platform's entry of `AUTO_IMPL`, and
  a step exported from a CPU host for TPU or CUDA (`jax.export(..., platforms=["tpu"])`)
  carries the fused kernel, lowered for that target (backend given, no interpret mode).
  Every other choice is fixed at trace time (`choose_impl`)."""
  if impl != "auto" or not isinstance(cache, QuantizedKVCache):
    return run(choose_impl(impl, cache, q_len), None)
  decode = q_len == 1
  branches = {lowering: (lambda name=_auto_name(platform, decode, cache), backend=backend:
                         run(name, backend))
              for lowering, (platform, backend) in _LOWERING_PLATFORMS.items()}
  return jax.lax.platform_dependent(default=lambda: run("xla", None), **branches)


def choose_impl(impl: str, cache, q_len: int, platform: str | None = None) -> str:
  """The implementation a call with `impl` runs: "auto" looks `AUTO_IMPL` up for the platform
  (default: `jax.default_backend()`) over a quantized cache and takes "xla" (plain attention)
  over a dense one; "pallas" is decode-only, so chunks (q_len > 1) run "xla"."""
  check_impl(impl)
  if not isinstance(cache, QuantizedKVCache):
    return "reference" if impl == "reference" else "xla"
  if impl == "auto":
    return _auto_name(platform or jax.default_backend(), q_len == 1, cache)
  if impl == "pallas" and q_len > 1:
    return "xla"
  return impl


def _attend_view(q, c, view, kv_pos, q_pos, *, scale, softcap, window, impl):
  mask = visibility_mask(q_pos, kv_pos, window)
  if isinstance(c, DenseKVCache):
    return dense_attention(q, view["k"], view["v"], mask, scale=scale, softcap=softcap)
  fn = QUANTIZED_IMPLS[impl]
  return fn(q, view, mask, config=c.config, scale=scale, softcap=softcap, kv_pos=kv_pos,
            q_pos=q_pos)


def _resolve(q, c, scale, window, impl):
  check_impl(impl)
  _check_q(q, c)
  scale = 1.0 / math.sqrt(c.head_dim) if scale is None else float(scale)
  window = c.window if window is None else window
  return scale, window


def attend(q: jax.Array, cache: cache_lib.KVCache, *, scale: float | None = None,
           softcap: float | None = None, window: int | None = None,
           q_positions: jax.Array | None = None, impl: str = "auto") -> jax.Array:
  """Causal attention of q [B, Tq, Hq, D] over the cache's contents.

  The queries are taken to be the last Tq tokens written to each sequence
  (positions lengths - Tq .. lengths - 1) unless `q_positions` [B, Tq] says
  otherwise. `window` overrides the cache's sliding window for the mask.
  Over a ring-buffer cache Tq must be 1 (earlier queries of a chunk would need
  keys the chunk itself overwrote): use `append_and_attend` for chunks.
  impl: see the module docstring (`choose_impl`, `AUTO_IMPL`).

  Returns [B, Tq, Hq, D] in q's dtype; a query with no visible key gets zeros.
  """
  own = _OWN_ATTENTION.get(type(cache))
  if own is not None:  # a cache that runs its own attention (kvjax.certified, kvjax.paged)
    return own[0](q, cache, scale=scale, softcap=softcap, window=window, q_positions=q_positions)
  scale, window = _resolve(q, cache, scale, window, impl)
  if impl == "pallas" and (not isinstance(cache, QuantizedKVCache) or q.shape[1] != 1):
    raise ValueError("impl='pallas' is the single-token decode kernel over a quantized cache")
  return _dispatch(impl, cache, q.shape[1], lambda name, backend: _attend(
      q, cache, scale=scale, softcap=softcap, window=window, q_positions=q_positions, impl=name,
      backend=backend))


def _attend(q, cache, *, scale, softcap, window, q_positions, impl, pending=None, backend=None):
  tq = q.shape[1]
  if cache.ring and tq > 1:
    raise ValueError("attend over a ring-buffer (sliding-window) cache takes one query token; "
                     f"got q_seq={tq}. Use kvjax.append_and_attend for chunks.")
  if q_positions is None:
    q_positions = cache.lengths[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None, :]
  if impl == "pallas":
    from kvjax import _pallas_dispatch
    return _pallas_dispatch.decode(q, cache, scale=scale, softcap=softcap, window=window,
                                   pending=pending, backend=backend)
  view = ({"k": cache.k, "v": cache.v} if isinstance(cache, DenseKVCache)
          else quant_view(cache, pending))
  return _attend_view(q, cache, view, cache_lib.positions(cache), q_positions, scale=scale,
                      softcap=softcap, window=window, impl=impl)


def append_and_attend(cache: cache_lib.KVCache, q: jax.Array, k: jax.Array, v: jax.Array, *,
                      scale: float | None = None, softcap: float | None = None,
                      num_tokens: jax.Array | None = None,
                      impl: str = "auto") -> tuple[jax.Array, cache_lib.KVCache]:
  """Writes k, v [B, T, H, D] and attends q [B, T, Hq, D] (the same T new tokens).

  The call a model layer makes, for prefill chunks and decode steps alike. On a
  ring-buffer cache a chunk attends over the slots as they were before the
  write plus the chunk itself (in the cache's storage form, so quantization
  error is exactly what later decode steps see), which keeps the window exact
  for chunks of any length with a ring of only `window` slots.

  num_tokens: optional int [B] for ragged chunks; tokens at index >= num_tokens[b]
    are not written (their query outputs are unspecified).
  impl: see the module docstring (`choose_impl`); the fused write kernel runs when the
    attention does ("pallas").
  Returns (out [B, T, Hq, D], new cache).
  """
  own = _OWN_ATTENTION.get(type(cache))
  if own is not None:  # a cache that runs its own attention (kvjax.certified, kvjax.paged)
    check_impl(impl)
    return own[1](cache, q, k, v, scale=scale, softcap=softcap, num_tokens=num_tokens,
                  impl=impl)
  scale_, window = _resolve(q, cache, scale, None, impl)
  t = q.shape[1]
  if k.shape[1] != t:
    raise ValueError(f"q and k must cover the same new tokens, got q_seq={t}, k_seq={k.shape[1]}")
  if isinstance(cache, cache_lib.StatsKVCache):
    cache = cache_lib.accumulate_stats(cache, q, k, v, num_tokens)
  # The fused write kernel runs with the fused decode kernel: "pallas", or "auto" for a decode
  # step (resolved at lowering like the attention); chunks are written by the XLA path.
  fixed = impl != "auto" or not isinstance(cache, QuantizedKVCache)
  if fixed:
    append_impl = "pallas" if choose_impl(impl, cache, t) == "pallas" else "xla"
  else:
    append_impl = "auto" if t == 1 else "xla"
  chunk = cache_lib.encode(cache, k, v, num_tokens=num_tokens, impl=append_impl)
  q_pos = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  pending = chunk.pending if isinstance(cache, QuantizedKVCache) else None
  if not cache.ring or t == 1:
    new = cache_lib.write(cache, chunk)
    out = _dispatch(impl, cache, t, lambda name, backend: _attend(
        q, new, scale=scale_, softcap=softcap, window=window, q_positions=q_pos, impl=name,
        pending=pending, backend=backend))
    return out, new
  chunk_pos = jnp.where(chunk.valid, q_pos, -1)
  kv_pos = jnp.concatenate([cache_lib.positions(cache), chunk_pos], axis=1)
  joined = lambda n: jnp.concatenate([getattr(cache, n), chunk.arrays[n].swapaxes(1, 2)], axis=2)
  if isinstance(cache, DenseKVCache):
    view = {n: joined(n) for n in ("k", "v")}
  else:
    # The chunk's codes after the ring's, and the corrections' arrays after the write.
    view = QuantView(joined("k_codes"), joined("k_scales"), joined("v_codes"),
                     joined("v_scales"), cache.k_rotation, cache.k_lambda, cache.v_rotation,
                     cache.v_lambda, chunk.corrections, pending)
  # A chunk (t > 1) never runs the decode kernel: only the chunk paths take part.
  out = _dispatch(impl, cache, t, lambda name, backend: _attend_view(
      q, cache, view, kv_pos, q_pos, scale=scale_, softcap=softcap, window=window, impl=name))
  return out, cache_lib.write(cache, chunk)


def attend_reference(q, cache, **kwargs):
  """The oracle: dequantize-then-attend (dense caches: plain attention)."""
  return attend(q, cache, impl="reference", **kwargs)
