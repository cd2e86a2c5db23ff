"""Attention over a KV cache: decode (one query token) and chunks, dense or quantized.

Over a quantized cache the XLA path never forms dequantized keys or values per
token. With q~ = R_k (lam_k * q) computed once per query,

    score_t = q . k_t = sum_groups s_{t,g} (q~_g . codes_{t,g})
    out     = lam_v * R_v^T (sum_t p_t s_{t,g} codes_{t,g})

so the rotation costs O(D^2) per query, not per cached token, and the codes
are only ever multiplied by one scale per group.

impl:
  "auto"      single-token decode over a quantized cache: the Pallas kernel on
              TPU/GPU, "int8dot" on the CPU; everything else: "xla";
  "xla"       the quantized-domain jnp path above in float32 (plain attention for
              dense caches), equal to the reference to float32 rounding;
  "int8dot"   the same math with int8 x int8 -> int32 score products and bf16
              value products (query rounded to int8 per group): the CPU fast path;
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
from kvjax import quantizer
from kvjax.cache import DenseKVCache, QuantizedKVCache

_HI = jax.lax.Precision.HIGHEST
_IMPLS = ("auto", "xla", "int8dot", "reference", "pallas")


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


def quantized_attention(q, view: dict, mask, *, config, scale, softcap=None):
  """Attention in the rotated, quantized domain (no per-token dequantized K/V).

  q: [B, Tq, Hq, D]; view: k_codes/k_scales/v_codes/v_scales [B, H, N, ...] and
  the four rotation/lambda parameters; mask: bool [B, Tq, N].
  """
  qg, qr = _rotated_query(q, view, config)
  b, h, t, r, G, g = qr.shape
  d, n = G * g, view["k_codes"].shape[2]
  kc = view["k_codes"]
  k_int = quantizer.unpack_int4(kc) if config.key_bits == 4 else kc
  k_int = k_int.reshape(b, h, n, G, g).astype(jnp.float32)
  # Per-group partial dot products, then one multiply-add with the group scales.
  part = jnp.einsum("bhtrGc,bhnGc->bhtrnG", qr, k_int, precision=_HI)
  s = jnp.einsum("bhtrnG,bhnG->bhtrn", part, view["k_scales"].astype(jnp.float32),
                 precision=_HI)
  # Keys were stored minus k_mean: add q . k_mean back, once per query (exact).
  s = (s + jnp.einsum("bhtrd,hd->bhtr", qg, view["k_mean"], precision=_HI)[..., None]) * scale
  p = _softmax_weights(s, mask[:, None, :, None, :], softcap)
  v_int = quantizer.unpack_int4(view["v_codes"]) if config.value_bits == 4 else view["v_codes"]
  v_int = v_int.reshape(b, h, n, G, g).astype(jnp.float32)
  pw = p[..., None] * view["v_scales"].astype(jnp.float32)[:, :, None, None, :, :]
  o_rot = jnp.einsum("bhtrnG,bhnGc->bhtrGc", pw, v_int, precision=_HI).reshape(b, h, t, r, d)
  rot, lam = view["v_rotation"], view["v_lambda"]
  o = jnp.einsum("bhtre,hed->bhtrd", o_rot, rot, precision=_HI) * lam[None, :, None, None, :]
  return _ungroup(o, q.dtype)


def _int8_per_group(x, axis):
  """Symmetric int8 quantization of x along `axis`; returns (int8 codes, float32 scale)."""
  s = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / 127.0
  s = jnp.where(s > 0, s, 1.0)
  return jnp.round(x / s).astype(jnp.int8), s


def quantized_attention_int8dot(q, view: dict, mask, *, config, scale, softcap=None):
  """The CPU fast path: the quantized-domain math with integer and bf16 dot products.

  Scores: q~ is split into two int8 parts per (query head, group), q~ = s_hi q_hi
  + s_lo q_lo, and multiplied with the int8 key codes in ONE int8 x int8 -> int32
  matmul against a block-diagonal query matrix [D, 2*R*G] (column (part, r, G)
  holds that part of q~_r's group G); XLA's CPU int8 dot is ~3x faster than
  float32 and needs no widening of the codes. Values: the
  per-group weights p_t * s_{t,G} in bf16 times the codes in bf16 with float32
  accumulation, again one matmul with a block-diagonal output of which the
  diagonal blocks are kept. Added error versus `quantized_attention`: the
  two-level rounding of q~ (<= 1/254^2 of a group's largest entry; one int8 level
  alone moved real-model logits by up to 0.5 nats) and bf16 rounding of the
  weights (2^-9 relative, as in any bf16 cache); tests bound it per row.
  """
  qg, qr = _rotated_query(q, view, config)
  b, h, t, r, G, g = qr.shape
  d, n = G * g, view["k_codes"].shape[2]
  kc = view["k_codes"]
  # q~ = s_hi * q_hi + s_lo * q_lo, both int8: the residual of the first rounding
  # quantized again, so q~ is carried to ~1/254^2 of a group's largest entry.
  q_hi, s_hi = _int8_per_group(qr, -1)                               # [b,h,t,r,G,g], [...,1]
  q_lo, s_lo = _int8_per_group(qr - q_hi.astype(jnp.float32) * s_hi, -1)
  block = jnp.repeat(jnp.eye(G, dtype=jnp.int8), g, axis=0)          # [D, G]

  def block_diag(qi):                                                # -> [b,h,D,t*r*G]
    qbd = qi.reshape(b, h, t, r, d)[..., None] * block
    return qbd.transpose(0, 1, 4, 2, 3, 5).reshape(b, h, d, t * r * G)

  # Both halves as extra columns of ONE matmul: the codes are read once.
  q_bd = jnp.concatenate([block_diag(q_hi), block_diag(q_lo)], axis=-1)
  k_int = quantizer.unpack_int4(kc) if config.key_bits == 4 else kc   # int8 [b,h,n,D]
  part = jnp.einsum("bhnd,bhde->bhne", k_int, q_bd, preferred_element_type=jnp.int32)
  part = part.reshape(b, h, n, 2, t, r, G).astype(jnp.float32)
  part = part[:, :, :, 0] * s_hi[..., 0][:, :, None] + part[:, :, :, 1] * s_lo[..., 0][:, :, None]
  s = jnp.einsum("bhntrG,bhnG->bhtrn", part, view["k_scales"].astype(jnp.float32))
  s = (s + jnp.einsum("bhtrd,hd->bhtr", qg, view["k_mean"], precision=_HI)[..., None]) * scale
  p = _softmax_weights(s, mask[:, None, :, None, :], softcap)
  pw = p[..., None] * view["v_scales"].astype(jnp.float32)[:, :, None, None, :, :]  # [b,h,t,r,n,G]
  pw = pw.transpose(0, 1, 2, 3, 5, 4).reshape(b, h, t * r * G, n).astype(jnp.bfloat16)
  v_int = quantizer.unpack_int4(view["v_codes"]) if config.value_bits == 4 else view["v_codes"]
  o = jnp.einsum("bhen,bhnd->bhed", pw, v_int.astype(jnp.bfloat16),
                 preferred_element_type=jnp.float32).reshape(b, h, t, r, G, G, g)
  o_rot = jnp.diagonal(o, axis1=4, axis2=5)                           # [b,h,t,r,g,G]
  o_rot = o_rot.swapaxes(-1, -2).reshape(b, h, t, r, d)
  rot, lam = view["v_rotation"], view["v_lambda"]
  o = jnp.einsum("bhtre,hed->bhtrd", o_rot, rot, precision=_HI) * lam[None, :, None, None, :]
  return _ungroup(o, q.dtype)


def _quant_view(c: QuantizedKVCache) -> dict:
  return {f: getattr(c, f) for f in ("k_codes", "k_scales", "v_codes", "v_scales",
                                     "k_rotation", "v_rotation", "k_lambda", "v_lambda",
                                     "k_mean")}


def _dequantized_kv(c: QuantizedKVCache, view: dict):
  cfg = c.config
  g = cfg.group_size

  def deq(codes, scales, rot, lam, bits):
    y = quantizer.dequantize_rotated(codes, scales, bits=bits, group_size=g)  # [B,H,N,D]
    x = jnp.einsum("bhne,hed->bhnd", y, rot, precision=_HI)
    return x * lam[None, :, None, :]

  k = deq(view["k_codes"], view["k_scales"], view["k_rotation"], view["k_lambda"], cfg.key_bits)
  k = k + view["k_mean"][None, :, None, :]
  v = deq(view["v_codes"], view["v_scales"], view["v_rotation"], view["v_lambda"], cfg.value_bits)
  return k, v


def _attend_view(q, c, view, kv_pos, q_pos, *, scale, softcap, window, impl):
  mask = visibility_mask(q_pos, kv_pos, window)
  if isinstance(c, DenseKVCache):
    return dense_attention(q, view["k"], view["v"], mask, scale=scale, softcap=softcap)
  if impl == "reference":
    k, v = _dequantized_kv(c, view)
    return dense_attention(q, k, v, mask, scale=scale, softcap=softcap)
  if impl == "int8dot":
    return quantized_attention_int8dot(q, view, mask, config=c.config, scale=scale,
                                       softcap=softcap)
  return quantized_attention(q, view, mask, config=c.config, scale=scale, softcap=softcap)


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
    else:
      impl = "int8dot" if decode else "xla"
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
    return _pallas_dispatch.decode(q, cache, scale=scale, softcap=softcap, window=window)
  view = {"k": cache.k, "v": cache.v} if isinstance(cache, DenseKVCache) else _quant_view(cache)
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
  Returns (out [B, T, Hq, D], new cache).
  """
  scale_, window, impl_ = _resolve(q, cache, scale, None, impl, softcap)
  t = q.shape[1]
  if k.shape[1] != t:
    raise ValueError(f"q and k must cover the same new tokens, got q_seq={t}, k_seq={k.shape[1]}")
  if isinstance(cache, cache_lib.StatsKVCache):
    cache = cache_lib.accumulate_stats(cache, q, k, v, num_tokens)
  append_impl = "pallas" if impl_ == "pallas" else "xla"
  if not cache.ring or t == 1:
    new = cache_lib.append(cache, k, v, num_tokens=num_tokens, impl=append_impl)
    q_pos = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    out = attend(q, new, scale=scale_, softcap=softcap, window=window, q_positions=q_pos,
                 impl=impl_ if t == 1 else _chunk_impl(impl_))
    return out, new
  chunk = cache_lib.encode(cache, k, v, num_tokens=num_tokens, impl=append_impl)
  q_pos = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  chunk_pos = jnp.where(chunk.valid, q_pos, -1)
  kv_pos = jnp.concatenate([cache_lib.positions(cache), chunk_pos], axis=1)
  if isinstance(cache, DenseKVCache):
    view = {n: jnp.concatenate([getattr(cache, n), chunk.arrays[n].swapaxes(1, 2)], axis=2)
            for n in ("k", "v")}
  else:
    view = _quant_view(cache)
    for n in ("k_codes", "k_scales", "v_codes", "v_scales"):
      view[n] = jnp.concatenate([view[n], chunk.arrays[n].swapaxes(1, 2)], axis=2)
  out = _attend_view(q, cache, view, kv_pos, q_pos, scale=scale_, softcap=softcap,
                     window=window, impl=_chunk_impl(impl_))
  return out, cache_lib.write(cache, chunk)


def _chunk_impl(impl):
  # Chunks (prefill) have no fused kernel; they keep an explicit reference / int8dot choice.
  return impl if impl in ("reference", "int8dot") else "xla"


def attend_reference(q, cache, **kwargs):
  """The oracle: dequantize-then-attend (dense caches: plain attention)."""
  return attend(q, cache, impl="reference", **kwargs)
