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
              TPU/GPU, "int8dot" on the CPU; chunks: "dequant" on the CPU, "xla" on
              TPU/GPU;
  "xla"       the quantized-domain jnp path above in float32 (plain attention for
              dense caches), equal to the reference to float32 rounding;
  "int8dot"   the same math with int8 x int8 -> int32 dot products (two-level int8
              queries and weights): the CPU decode path;
  "dequant"   chunks (many queries per step): the codes are dequantized once, in the
              rotated domain and in bf16, and the queries q~ meet them in bf16 matmuls
              (float32 accumulation), as a bf16 dense cache would: the CPU chunk path;
  "reference" dequantize every cached vector, then plain attention (the oracle);
  "pallas"    the fused decode kernel (interpret mode on the CPU).

Query heads are grouped as in Hugging Face `repeat_kv`: query head j reads
KV head j // (q_heads // kv_heads).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax import cache as cache_lib
from kvjax import quantizer, rotary
from kvjax.cache import DenseKVCache, QuantizedKVCache

_HI = jax.lax.Precision.HIGHEST
_IMPLS = ("auto", "xla", "int8dot", "dequant", "reference", "pallas")


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


def _check_impl(impl):
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


def _rotated_query(q, view, config):
  """Grouped queries [B, H, T, R, D] and q~ = R_k (lam_k * q) split into groups [B, H, T, R, G, g]."""
  qg = _grouped_q(q.astype(jnp.float32), view["k_codes"].shape[1])
  b, h, t, r, d = qg.shape
  g = config.group_size
  qr = _rotate_grouped_q(qg, view["k_rotation"], view["k_lambda"])
  return qg, qr.reshape(b, h, t, r, d // g, g)


def _key_logit_offsets(qg, view, config, kv_pos):
  """q . k_mean, plus q . c_t of the rotary key offset and q . e_0 at the sink slot (position 0)
  when the cache has them (unscaled).

  qg [B, H, T, R, D] -> [B, H, T, R, 1] or [B, H, T, R, N]."""
  off = jnp.einsum("bhtrd,hd->bhtr", qg, view["k_mean"], precision=_HI)[..., None]
  if (config.key_rope_pairs or config.key_sink) and kv_pos is None:
    raise ValueError("a cache with rotary key offsets or an exact sink key needs the slot "
                     "positions (kv_pos)")
  if config.key_rope_pairs:
    off = off + rotary.logit_offsets(qg, kv_pos, view["k_rope_freq"], view["k_rope_channels"],
                                     view["k_rope_mean"])
  if config.key_sink:
    sink = jnp.einsum("bhtrd,bhd->bhtr", qg, view["k_sink"], precision=_HI)[..., None]
    off = off + jnp.where((kv_pos == 0)[:, None, None, None, :], sink, 0.0)
  return off


def _sink_slots(kv_pos):
  """bool [B, N]: the slot holding position 0, for a cache that keeps its sink value exact."""
  if kv_pos is None:
    raise ValueError("a cache with an exact sink value needs the slot positions (kv_pos)")
  return kv_pos == 0


def _sink_weight(p, kv_pos):
  """p0 [B, H, T, R]: the weight of the slot holding position 0 in softmax weights p [.., N]."""
  return jnp.sum(jnp.where(_sink_slots(kv_pos)[:, None, None, None, :], p, 0.0), axis=-1)


def _add_value_sink(o, p0, view):
  """o [B, H, T, R, D] (original domain) + p0 [B, H, T, R] times the sink value's rounding
  error v_sink [B, H, D]: the attention output as if the sink value were stored exactly."""
  return o + p0[..., None] * view["v_sink"][:, :, None, None, :]


def _recent_onehot(kv_pos, positions):
  """float32 [B, T, W, N]: 1 where slot n holds position positions[b, t, w]."""
  if kv_pos is None:
    raise ValueError("a cache that reads recent values exact needs the slot positions (kv_pos)")
  return (kv_pos[:, None, None, :] == positions[..., None]).astype(jnp.float32)


def _recent_weights(p, kv_pos, recent):
  """[B, H, T, R, W]: the weight each query gives the slot of each of its recent positions."""
  return jnp.einsum("bhtrn,btwn->bhtrw", p, _recent_onehot(kv_pos, recent[1]), precision=_HI)


def _add_recent_values(o, weights, recent):
  """o [B, H, T, R, D] (original domain) + the recent values' rounding errors
  (recent = (errors [B, H, T, W, D], positions [B, T, W])) times their weights [B, H, T, R, W]:
  the attention output as if those values were stored exactly."""
  return o + jnp.einsum("bhtrw,bhtwd->bhtrd", weights, recent[0], precision=_HI)


def _recent_value_errors(cache: QuantizedKVCache, chunk, q_pos):
  """(errors float32 [B, H, T, W, D], positions int32 [B, T, W]) for QuantConfig.value_recent =
  W: for query t and w < W, the rounding error of the value at position q_pos - w, from the
  chunk itself or, before it, from the cache's `v_recent` ring; position -2 (no slot) where
  q_pos - w < 0."""
  w_count = cache.config.value_recent
  rows = cache_lib.recent_rows(cache.config)
  err = chunk.value_errors                                                     # [B, T, H, D]
  b, t = err.shape[:2]
  b_idx = jnp.arange(b, dtype=jnp.int32)[:, None]
  errors, positions = [], []
  for w in range(w_count):
    pos = q_pos - w
    from_chunk = jnp.pad(err, ((0, 0), (w, 0), (0, 0), (0, 0)))[:, :t]      # token t - w
    if rows:
      from_ring = cache.v_recent[b_idx, :, jnp.mod(pos, rows)]              # [B, T, H, D]
      e = jnp.where((jnp.arange(t) >= w)[None, :, None, None], from_chunk, from_ring)
    else:
      e = from_chunk
    errors.append(jnp.where((pos >= 0)[:, :, None, None], e, 0.0))
    positions.append(jnp.where(pos >= 0, pos, -2))
  return jnp.stack(errors, 2).transpose(0, 3, 1, 2, 4), jnp.stack(positions, -1)


def quantized_attention(q, view: dict, mask, *, config, scale, softcap=None, kv_pos=None,
                        recent=None):
  """Attention in the rotated, quantized domain (no per-token dequantized K/V).

  q: [B, Tq, Hq, D]; view: k_codes/k_scales/v_codes/v_scales [B, H, N, ...] and
  the cache's parameters; mask: bool [B, Tq, N]; kv_pos: int [B, N] slot positions
  (needed for rotary key offsets); recent: None or `_recent_value_errors`' (errors,
  positions): the recent values' rounding errors each query adds (QuantConfig.value_recent).
  """
  qg, qr = _rotated_query(q, view, config)
  b, h, t, r, G, g = qr.shape
  d, n = G * g, view["k_codes"].shape[2]
  kc = view["k_codes"]
  k_int = quantizer.unpack_int4(kc) if config.key_bits == 4 else kc
  k_int = k_int.reshape(b, h, n, G, g).astype(jnp.float32)
  v_int = quantizer.unpack_int4(view["v_codes"]) if config.value_bits == 4 else view["v_codes"]
  v_int = v_int.reshape(b, h, n, G, g).astype(jnp.float32)
  k_sc = view["k_scales"].astype(jnp.float32)
  v_sc = view["v_scales"].astype(jnp.float32)
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
  # Keys were stored minus k_mean (and c_t): add q . k_mean (+ q . c_t) back (exact).
  s = (s + _key_logit_offsets(qg, view, config, kv_pos)) * scale
  p = _softmax_weights(s, mask[:, None, :, None, :], softcap)
  if per_group:
    pw = p[..., None] * v_sc[:, :, None, None, :, :]
    o_rot = jnp.einsum("bhtrnG,bhnGc->bhtrGc", pw, v_int, precision=_HI).reshape(b, h, t, r, d)
  else:
    v_hat = (v_int * v_sc[..., None]).reshape(b, h, n, d)
    o_rot = jnp.einsum("bhtrn,bhnd->bhtrd", p, v_hat, precision=_HI)
  rot, lam = view["v_rotation"], view["v_lambda"]
  o = jnp.einsum("bhtre,hed->bhtrd", o_rot, rot, precision=_HI) * lam[None, :, None, None, :]
  if config.value_sink:
    o = _add_value_sink(o, _sink_weight(p, kv_pos), view)
  if recent is not None:
    o = _add_recent_values(o, _recent_weights(p, kv_pos, recent), recent)
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


def quantized_attention_int8dot(q, view: dict, mask, *, config, scale, softcap=None,
                                kv_pos=None, recent=None):
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
  d, n, x = G * g, view["k_codes"].shape[2], b * h
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
  offset = _key_logit_offsets(qg, view, config, kv_pos)             # [b,h,t,r,1 or n]
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
          view["k_codes"].reshape(x, n, -1), view["k_scales"].reshape(x, n, G).swapaxes(1, 2),
          view["v_codes"].reshape(x, n, -1), view["v_scales"].reshape(x, n, G).swapaxes(1, 2),
          visible)
  sel = []  # one-hot slots whose weights the value corrections need: [b, t, K, n]
  corrected = config.value_sink or recent is not None
  if config.value_sink:  # the sink slot per sequence
    sel.append(jnp.broadcast_to(_sink_slots(kv_pos)[:, None, None].astype(jnp.float32),
                                (b, t, 1, n)))
  if recent is not None:  # each query's recent positions
    sel.append(_recent_onehot(kv_pos, recent[1]))
  if corrected:
    sel = jnp.concatenate(sel, axis=2)
    args += (jnp.broadcast_to(sel[:, None], (b, h) + sel.shape[1:]).reshape(x, *sel.shape[1:]),)
  cb = max(1, _INT8DOT_BLOCK_BYTES // max(1, n * d))
  cb = max(i for i in range(1, min(cb, x) + 1) if x % i == 0)
  if cb == x:
    o_rot, weights = block(args)
  else:
    o_rot, weights = jax.lax.map(
        block, jax.tree.map(lambda a: a.reshape(x // cb, cb, *a.shape[1:]), args))
  o_rot = o_rot.reshape(b, h, t, r, d)
  rot, lam = view["v_rotation"], view["v_lambda"]
  o = jnp.einsum("bhtre,hed->bhtrd", o_rot, rot, precision=_HI) * lam[None, :, None, None, :]
  if corrected:
    weights = weights.reshape(b, h, t, r, -1)
    if config.value_sink:
      o = _add_value_sink(o, weights[..., 0], view)
    if recent is not None:
      o = _add_recent_values(o, weights[..., -recent[1].shape[-1]:], recent)
  return _ungroup(o, q.dtype)


def quantized_attention_dequant(q, view: dict, mask, *, config, scale, softcap=None,
                                kv_pos=None, recent=None):
  """The CPU chunk path: rotated-domain dequantization to bf16, then bf16 matmuls.

  With many queries per step (a prefill chunk) the codes are worth dequantizing once:
  y^ = levels * s per group, rounded to bf16 (2^-9 relative, as a bf16 cache stores its
  values), [B, H, N, D] for keys and values; scores q~ . y^_k + q . k_mean and outputs
  lam_v * R_v^T (p . y^_v) then cost what a bf16 dense cache costs, plus O(N D) for the
  dequantization and O(Tq D^2) for the two rotations. No per-token rotation.
  """
  qg, qr = _rotated_query(q, view, config)
  b, h, t, r, G, g = qr.shape
  d, n = G * g, view["k_codes"].shape[2]

  def dequant(codes, scales, bits):
    lev = quantizer.unpack_int4(codes) if bits == 4 else codes
    y = lev.reshape(b, h, n, G, g).astype(jnp.float32) * scales.astype(jnp.float32)[..., None]
    return y.reshape(b, h, n, d).astype(jnp.bfloat16)

  k_hat = dequant(view["k_codes"], view["k_scales"], config.key_bits)
  s = jnp.einsum("bhtrd,bhnd->bhtrn", qr.reshape(b, h, t, r, d).astype(jnp.bfloat16), k_hat,
                 preferred_element_type=jnp.float32)
  s = (s + _key_logit_offsets(qg, view, config, kv_pos)) * scale
  p = _softmax_weights(s, mask[:, None, :, None, :], softcap)
  v_hat = dequant(view["v_codes"], view["v_scales"], config.value_bits)
  o_rot = jnp.einsum("bhtrn,bhnd->bhtrd", p.astype(jnp.bfloat16), v_hat,
                     preferred_element_type=jnp.float32)
  rot, lam = view["v_rotation"], view["v_lambda"]
  o = jnp.einsum("bhtre,hed->bhtrd", o_rot, rot, precision=_HI) * lam[None, :, None, None, :]
  if config.value_sink:
    o = _add_value_sink(o, _sink_weight(p, kv_pos), view)
  if recent is not None:
    o = _add_recent_values(o, _recent_weights(p, kv_pos, recent), recent)
  return _ungroup(o, q.dtype)


def _quant_view(c: QuantizedKVCache) -> dict:
  return {f: getattr(c, f) for f in ("k_codes", "k_scales", "v_codes", "v_scales",
                                     "k_rotation", "v_rotation", "k_lambda", "v_lambda",
                                     "k_mean", "k_rope_freq", "k_rope_channels", "k_rope_mean",
                                     "k_sink", "v_sink")}


def _dequantized_kv(c: QuantizedKVCache, view: dict, kv_pos):
  cfg = c.config
  g = cfg.group_size

  def deq(codes, scales, rot, lam, bits):
    y = quantizer.dequantize_rotated(codes, scales, bits=bits, group_size=g)  # [B,H,N,D]
    x = jnp.einsum("bhne,hed->bhnd", y, rot, precision=_HI)
    return x * lam[None, :, None, :]

  k = deq(view["k_codes"], view["k_scales"], view["k_rotation"], view["k_lambda"], cfg.key_bits)
  k = k + view["k_mean"][None, :, None, :]
  if cfg.key_rope_pairs:
    off = rotary.key_offset(kv_pos, view["k_rope_freq"], view["k_rope_channels"],
                            view["k_rope_mean"], c.head_dim)           # [B, N, Hr, D]
    k = k + off.transpose(0, 2, 1, 3)
  if cfg.key_sink:
    k = k + jnp.where((kv_pos == 0)[:, None, :, None], view["k_sink"][:, :, None, :], 0.0)
  v = deq(view["v_codes"], view["v_scales"], view["v_rotation"], view["v_lambda"], cfg.value_bits)
  if cfg.value_sink:
    v = v + jnp.where(_sink_slots(kv_pos)[:, None, :, None], view["v_sink"][:, :, None, :], 0.0)
  return k, v


def _reference_attention(q, k, v, mask, *, scale, softcap, kv_pos, recent):
  """The oracle over dequantized k, v [B, H, N, D] (float32), plus the recent values'
  corrections when `recent` is given."""
  if recent is None:
    return dense_attention(q, k, v, mask, scale=scale, softcap=softcap)
  qg = _grouped_q(q.astype(jnp.float32), k.shape[1])
  s = jnp.einsum("bhtrd,bhnd->bhtrn", qg, k, precision=_HI) * scale
  p = _softmax_weights(s, mask[:, None, :, None, :], softcap)
  o = jnp.einsum("bhtrn,bhnd->bhtrd", p, v, precision=_HI)
  return _ungroup(_add_recent_values(o, _recent_weights(p, kv_pos, recent), recent), q.dtype)


def _attend_view(q, c, view, kv_pos, q_pos, *, scale, softcap, window, impl, recent=None):
  mask = visibility_mask(q_pos, kv_pos, window)
  if isinstance(c, DenseKVCache):
    return dense_attention(q, view["k"], view["v"], mask, scale=scale, softcap=softcap)
  if impl == "reference":
    k, v = _dequantized_kv(c, view, kv_pos)
    return _reference_attention(q, k, v, mask, scale=scale, softcap=softcap, kv_pos=kv_pos,
                                recent=recent)
  fn = {"int8dot": quantized_attention_int8dot,
        "dequant": quantized_attention_dequant}.get(impl, quantized_attention)
  return fn(q, view, mask, config=c.config, scale=scale, softcap=softcap, kv_pos=kv_pos,
            recent=recent)


def _resolve(q, c, scale, window, impl, softcap=None):
  _check_impl(impl)
  _check_q(q, c)
  scale = 1.0 / math.sqrt(c.head_dim) if scale is None else float(scale)
  window = c.window if window is None else window
  if impl == "auto" and isinstance(c, QuantizedKVCache) and c.config.attention_impl != "auto":
    impl = c.config.attention_impl
    if impl == "pallas" and q.shape[1] > 1:
      impl = "xla"  # the fused kernel is decode-only; chunks use the XLA path
  if impl == "auto":
    on_accel = jax.default_backend() in ("tpu", "gpu")
    decode = isinstance(c, QuantizedKVCache) and q.shape[1] == 1
    if on_accel:
      impl = "pallas" if decode else "xla"
    elif isinstance(c, QuantizedKVCache):
      impl = "int8dot" if decode else "dequant"
    else:
      impl = "xla"
  return scale, window, impl


def attend(q: jax.Array, cache: cache_lib.KVCache, *, scale: float | None = None,
           softcap: float | None = None, window: int | None = None,
           q_positions: jax.Array | None = None, impl: str = "auto") -> jax.Array:
  """Causal attention of q [B, Tq, Hq, D] over the cache's contents.

  The queries are taken to be the last Tq tokens written to each sequence
  (positions lengths - Tq .. lengths - 1) unless `q_positions` [B, Tq] says
  otherwise. `window` overrides the cache's sliding window for the mask.
  Over a ring-buffer cache Tq must be 1 (earlier queries of a chunk would need
  keys the chunk itself overwrote): use `append_and_attend` for chunks.

  Returns [B, Tq, Hq, D] in q's dtype; a query with no visible key gets zeros.
  """
  scale, window, impl = _resolve(q, cache, scale, window, impl, softcap)
  return _attend(q, cache, scale=scale, softcap=softcap, window=window, q_positions=q_positions,
                 impl=impl)


def _attend(q, cache, *, scale, softcap, window, q_positions, impl, recent=None):
  tq = q.shape[1]
  if cache.ring and tq > 1:
    raise ValueError("attend over a ring-buffer (sliding-window) cache takes one query token; "
                     f"got q_seq={tq}. Use kvjax.append_and_attend for chunks.")
  if q_positions is None:
    q_positions = cache.lengths[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None, :]
  if impl == "pallas":
    if not isinstance(cache, QuantizedKVCache) or tq != 1:
      raise ValueError("impl='pallas' is the single-token decode kernel over a quantized cache")
    from kvjax import _pallas_dispatch
    return _pallas_dispatch.decode(q, cache, scale=scale, softcap=softcap, window=window,
                                   recent=None if recent is None else recent[0][:, :, 0])  # [B, H, W, D]
  view = {"k": cache.k, "v": cache.v} if isinstance(cache, DenseKVCache) else _quant_view(cache)
  return _attend_view(q, cache, view, cache_lib.positions(cache), q_positions, scale=scale,
                      softcap=softcap, window=window, impl=impl, recent=recent)


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
  Returns (out [B, T, Hq, D], new cache).
  """
  scale_, window, impl_ = _resolve(q, cache, scale, None, impl, softcap)
  t = q.shape[1]
  if k.shape[1] != t:
    raise ValueError(f"q and k must cover the same new tokens, got q_seq={t}, k_seq={k.shape[1]}")
  if isinstance(cache, cache_lib.StatsKVCache):
    cache = cache_lib.accumulate_stats(cache, q, k, v, num_tokens)
  append_impl = "pallas" if impl_ == "pallas" else "xla"
  chunk = cache_lib.encode(cache, k, v, num_tokens=num_tokens, impl=append_impl)
  q_pos = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  recent = None
  if isinstance(cache, QuantizedKVCache) and cache.config.value_recent:
    recent = _recent_value_errors(cache, chunk, q_pos)
  if not cache.ring or t == 1:
    new = cache_lib.write(cache, chunk)
    out = _attend(q, new, scale=scale_, softcap=softcap, window=window, q_positions=q_pos,
                  impl=impl_ if t == 1 else _chunk_impl(impl_), recent=recent)
    return out, new
  chunk_pos = jnp.where(chunk.valid, q_pos, -1)
  kv_pos = jnp.concatenate([cache_lib.positions(cache), chunk_pos], axis=1)
  if isinstance(cache, DenseKVCache):
    view = {n: jnp.concatenate([getattr(cache, n), chunk.arrays[n].swapaxes(1, 2)], axis=2)
            for n in ("k", "v")}
  else:
    view = _quant_view(cache)
    for n in ("k_codes", "k_scales", "v_codes", "v_scales"):
      view[n] = jnp.concatenate([view[n], chunk.arrays[n].swapaxes(1, 2)], axis=2)
    for n in ("k_sink", "v_sink"):
      if n in chunk.arrays:
        view[n] = chunk.arrays[n]
  out = _attend_view(q, cache, view, kv_pos, q_pos, scale=scale_, softcap=softcap,
                     window=window, impl=_chunk_impl(impl_), recent=recent)
  return out, cache_lib.write(cache, chunk)


def _chunk_impl(impl):
  # Chunks (prefill) have no fused kernel; they keep an explicit reference / int8dot /
  # dequant choice.
  return impl if impl in ("reference", "int8dot", "dequant") else "xla"


def attend_reference(q, cache, **kwargs):
  """The oracle: dequantize-then-attend (dense caches: plain attention)."""
  return attend(q, cache, impl="reference", **kwargs)
