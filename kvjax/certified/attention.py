"""Certified attention over a `CertifiedKVCache`: one jitted step, a ladder inside it.

Rung 0 attends over the compressed tier (float32, in the rotated domain, as the "xla" path)
and certifies every row (`kvjax.certified.bound`). Rows whose bound exceeds the tolerance
climb the ladder, each rung a `lax.cond` that runs only when some row still needs it:

  promote P  the exact keys and values of the P blocks per KV head that contribute most to
             the failing rows' bounds move from the exact tier to the device; the attention
             is recomputed with those blocks exact (their Δ and η drop to rounding) and the
             failing rows take the new result and its certificate;
  exact      rows still uncertified take exact attention over the exact tier (`exact_attention`,
             bitwise), which moves that layer's exact tier to the device.

Every returned row is therefore certified within max(atol, tol ||O_exact||) or is the exact
path's output. `Certificate` reports per row what happened; the cache's `stats` accumulate it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on

from kvjax import cache as cache_lib
from kvjax import quantizer
from kvjax.attention import (_check_q, _grouped_q, _ungroup, register_cache_type,
                             visibility_mask)
from kvjax.certified import bound as bound_lib
from kvjax.certified.cache import CertifiedKVCache, U, gamma, write

_HI = jax.lax.Precision.HIGHEST


class Certificate(NamedTuple):
  """What one certified step did, per row ([B, Tq, Hq] arrays) and in total.

  bound: certified bound on ||O - O_exact||_2 (0 for exact rows); allowed: the tolerance it
  met, max(atol, tol * (||O|| - bound)); out_norm: ||O||; rung: index into `config.rungs`;
  e_key, e_val: the bound's key and value terms; host_blocks: exact blocks moved to the device.
  """

  bound: jax.Array
  allowed: jax.Array
  out_norm: jax.Array
  rung: jax.Array
  e_key: jax.Array
  e_val: jax.Array
  host_blocks: jax.Array


class _Rows(NamedTuple):
  """Per-step quantities shared by the rungs. Shapes: B, H (KV heads), T, R (query heads per
  KV head), S slots = NB blocks x bs."""

  qg: jax.Array       # [B, H, T, R, D] float32 queries
  mask: jax.Array     # [B, 1, T, 1, S] visibility
  z: jax.Array        # [B, H, T, R, S] logits over the compressed tier (masked: -inf)
  yv: jax.Array       # [B, H, S, D] dequantized values, rotated domain
  delta_q: jax.Array  # [B, H, T, R, NB] logit bound of each quantized block (before zmax terms)
  delta_x: jax.Array  # [B, H, T, R, NB] logit bound of each block if exact


def _broadcast_heads(x, h):
  return jnp.broadcast_to(x, (h,) + x.shape[1:])


def _to_device(x, kind):
  return x if kind == "device" else jax.device_put(x, jax.memory.Space.Device)


def _gather_rows(table, rows, kind):
  """table [n, L] (exact tier, flattened), rows int32 [M] -> float32 [M, L] on the device. On a
  host tier the gather runs on the host: only the M rows cross."""
  def gather(table, rows):
    dn = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                        start_index_map=(0,))
    return jax.lax.gather(table, rows.reshape(-1, 1), dn, (1, table.shape[1]),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)

  if kind == "device":
    out = gather(table, rows)
  else:
    out = compute_on("device_host")(jax.jit(gather))(
        table, jax.device_put(rows.astype(jnp.int32), jax.memory.Space.Host))
    out = _to_device(out, kind)
  return out.astype(jnp.float32)


def _gather_blocks(buf, idx, block_size, kind):
  """buf [B, H, S, D] (exact tier), idx int32 [B, H, P] -> float32 [B, H, P, bs, D]."""
  b, h, s, d = buf.shape
  nb = s // block_size
  rows = (jnp.arange(b)[:, None, None] * h + jnp.arange(h)[None, :, None]) * nb + idx
  out = _gather_rows(buf.reshape(b * h * nb, block_size * d), rows.reshape(-1), kind)
  return out.reshape(b, h, idx.shape[-1], block_size, d)


def _softcapped(x, softcap):
  return x if softcap is None else softcap * jnp.tanh(x / softcap)


def _rotated_queries(q, cache):
  """(q [B, H, T, R, D] float32, q~ = R_k (λ_k q))."""
  tier, h = cache.tier, cache.num_kv_heads
  qg = _grouped_q(q.astype(jnp.float32), h)
  k_rot = _broadcast_heads(tier.k_rotation, h)
  k_lam = _broadcast_heads(tier.k_lambda, h)
  qt = jnp.einsum("bhtrd,hed->bhtre", qg * k_lam[None, :, None, None, :], k_rot, precision=_HI)
  return qg, qt


# Relative rounding of the fused kernels' logits: q~ enters as two bfloat16 parts (|q~ - hi - lo|
# <= 2^-18 |q~|), codes are exact in bfloat16, products accumulate in float32 (γ_{D+4} with
# the scale products); 2^-17 covers the split with room.
KERNEL_DOT = 2.0 ** -17
# Relative rounding of the fused kernels' value sums: p enters as two bfloat16 parts, v̂ as two
# (exactly), and the p_lo v_lo product is dropped: |p v̂ - computed| <= 2^-16 |p v̂|.
KERNEL_VALUES = 2.0 ** -16


def _logit_bounds(qg, qt, cache, scale, *, kernel=False):
  """Logit bounds per block, (quantized, exact) [B, H, T, R, NB] (docs/certified.md, "keys"):
  the quantization term Σ_c |q~_c| e_bc, the rotation's defect and the rounding of q~ and y
  (against ||λq|| ||k/λ||), and the rounding of the D-term dot (against ||q~|| ||ŷ||; the fused
  kernels' bfloat16 splitting with `kernel`). Exact blocks keep only their own dot's
  rounding. Before the logit-size terms (`_certify`)."""
  d = cache.head_dim
  eps = cache.defect[0]
  k_lam = _broadcast_heads(cache.tier.k_lambda, cache.num_kv_heads)
  lam_q = jnp.sqrt(jnp.sum(jnp.square(qg * k_lam[None, :, None, None, :]), -1))[..., None]
  qt_norm = jnp.sqrt(jnp.sum(jnp.square(qt), -1))[..., None]
  q_norm = jnp.sqrt(jnp.sum(jnp.square(qg), -1))[..., None]
  # |q~ . (ŷ - y)| <= min(Σ_c |q~_c| e_bc, ||q~|| max_t ||ŷ_t - y_t||): the per-channel box and
  # Cauchy-Schwarz, each rigorous; the second is ~1.5x tighter for spread-out rounding errors.
  quant = jnp.minimum(jnp.einsum("bhtre,bhne->bhtrn", jnp.abs(qt), cache.k_err, precision=_HI),
                      qt_norm * cache.k_err2[:, :, None, None])
  # fl(R fl(λq)) = R λq + δ, |δ| <= γ_{D+1} |R| |λq| (a product, then a D-term dot); y the same
  # with one more rounding, the centring subtraction: γ_{D+2}.
  c_r = eps + (1 + eps) * (2 * math.sqrt(d) * gamma(d + 2) + d * gamma(d + 2) ** 2)
  rot = c_r * lam_q * cache.k_norm[:, :, None, None]
  dot_rel = (KERNEL_DOT + gamma(d + 4)) if kernel else gamma(d + 2)
  dot = dot_rel * qt_norm * cache.k_qnorm[:, :, None, None]
  up = (1 + gamma(d + 8)) * scale
  delta_q = (quant + rot + dot) * up
  delta_x = gamma(d + 3) * q_norm * cache.k_xnorm[:, :, None, None] * up
  return delta_q, delta_x


def _setup(q, cache: CertifiedKVCache, q_pos, window, scale, softcap) -> _Rows:
  """What the XLA rungs share: queries, the compressed tier's logits and values, the bounds."""
  qf = cache.config.quant
  tier = cache.tier
  qg, qt = _rotated_queries(q, cache)
  yk = quantizer.dequantize_rotated(tier.k_codes, tier.k_scales, bits=qf.key_bits,
                                    group_size=qf.group_size)
  yv = quantizer.dequantize_rotated(tier.v_codes, tier.v_scales, bits=qf.value_bits,
                                    group_size=qf.group_size)
  kv_pos = cache_lib.positions(tier)
  mask = visibility_mask(q_pos, kv_pos, window)[:, None, :, None, :]
  s = jnp.einsum("bhtre,bhse->bhtrs", qt, yk, precision=_HI)
  z = jnp.where(mask, _softcapped(scale * s, softcap), -jnp.inf)
  delta_q, delta_x = _logit_bounds(qg, qt, cache, scale)
  return _Rows(qg, mask, z, yv, delta_q, delta_x)


class _Result(NamedTuple):
  out: jax.Array      # [B, H, T, R, D] float32
  bound: jax.Array    # [B, H, T, R]
  ok: jax.Array       # [B, H, T, R] bool
  allowed: jax.Array
  out_norm: jax.Array
  e_key: jax.Array
  e_val: jax.Array
  rho: jax.Array      # [B, H, T, R, NB]
  delta: jax.Array    # [B, H, T, R, NB]


def _evaluate(cache: CertifiedKVCache, rows: _Rows, *, scale, softcap, idx=None) -> _Result:
  """Attention and its certificate with the blocks `idx` [B, H, P] exact (None: none)."""
  cfg, tier = cache.config, cache.tier
  b, h, t, r, s = rows.z.shape
  bs = cfg.block_size
  nb = s // bs
  z = rows.z.reshape(b, h, t, r, nb, bs)
  promoted = jnp.zeros((b, h, nb), bool)
  p = 0 if idx is None else idx.shape[-1]
  if idx is not None:
    kind = cfg.memory_kind
    kx = _gather_blocks(cache.k_exact, idx, bs, kind)          # [B, H, P, bs, D]
    vx = _gather_blocks(cache.v_exact, idx, bs, kind)
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    promoted = promoted.at[bi, hi, idx].set(True)
    # Exact blocks, centred like the compressed tier: their logits share its offset.
    kx = kx - cache.k_offset[:, :, None, None, :]
    vx = vx - cache.v_offset[:, :, None, None, :]
    zx = jnp.einsum("bhtrd,bhpjd->bhptrj", rows.qg, kx, precision=_HI)
    # z[b, h, :, :, idx] is [B, H, P, T, R, bs] (advanced indices first).
    vis = z[bi, hi, :, :, idx] > -jnp.inf
    z = z.at[bi, hi, :, :, idx].set(jnp.where(vis, _softcapped(scale * zx, softcap), -jnp.inf))
  zmax = jnp.max(jnp.where(z > -jnp.inf, jnp.abs(z), 0.0), axis=(-2, -1))
  m = jnp.max(z, axis=(-2, -1), keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(z - m)
  denom = jnp.sum(e, axis=(-2, -1), keepdims=True)
  pw = e / jnp.where(denom > 0, denom, 1.0)                       # [B, H, T, R, NB, bs]
  pm = promoted[:, :, None, None, :, None]
  pq = jnp.where(pm, 0.0, pw).reshape(b, h, t, r, s)
  o_rot = jnp.einsum("bhtrs,bhse->bhtre", pq, rows.yv, precision=_HI)
  v_rot = _broadcast_heads(tier.v_rotation, h)
  v_lam = _broadcast_heads(tier.v_lambda, h)
  out = jnp.einsum("bhtre,hed->bhtrd", o_rot, v_rot, precision=_HI) * v_lam[None, :, None, None]
  if idx is not None:
    px = pw[bi, hi, :, :, idx]                                   # [B, H, P, T, R, bs]
    out = out + jnp.einsum("bhptrj,bhpjd->bhtrd", px, vx, precision=_HI)
  out = out + cache.v_offset[:, :, None, None, :]               # weights sum to one

  rho = jnp.sum(pw, axis=-1)                                     # [B, H, T, R, NB]
  delta = jnp.where(promoted[:, :, None, None], rows.delta_x, rows.delta_q)
  visible = jnp.any(rows.mask.reshape(b, 1, t, 1, nb, bs), axis=-1)   # [B, 1, T, 1, NB]
  return _certify(cache, out, rho, delta, visible, zmax, promoted, softcap=softcap,
                  promoted_tokens=p * bs)


def _certify(cache, out, rho, delta, visible, zmax, promoted, *, softcap, promoted_tokens,
             kernel=False) -> _Result:
  """The certificate of computed rows (`kvjax.certified.bound`) and the acceptance test.

  out [B, H, T, R, D] float32; rho, delta [B, H, T, R, NB] (delta before the logit-size
  terms); visible [B, 1, T, 1, NB]; zmax [B, H, T, R] >= max |ẑ|; promoted [B, H, NB];
  kernel: the fused kernels' arithmetic (exp within 4 ulp, bfloat16-split value sums)."""
  cfg, tier = cache.config, cache.tier
  s = cache.capacity
  d = cache.head_dim
  h = cache.num_kv_heads
  v_lam = _broadcast_heads(tier.v_lambda, h)
  cap = 0.0 if softcap is None else 8 * U * softcap
  delta = delta + (U * zmax * (1 + U) + cap)[..., None]
  eps_v = cache.defect[1]
  pmb = promoted[:, :, None, None]
  eta = jnp.where(pmb, 0.0, cache.v_err[:, :, None, None])
  nu = jnp.broadcast_to(cache.v_norm[:, :, None, None], rho.shape)
  lam_inf = jnp.max(v_lam, axis=-1)[None, :, None, None, None]
  vhat = jnp.where(pmb, nu, jnp.maximum(lam_inf * (1 + eps_v) * cache.v_qnorm[:, :, None, None], nu))
  vmax = jnp.max(jnp.where(visible, nu, 0.0), axis=-1)
  vhat_max = jnp.max(jnp.where(visible, vhat, 0.0), axis=-1)
  theta = bound_lib.softmax_rounding(zmax, s, exp_ulps=4 if kernel else 2)
  e_fp = bound_lib.output_rounding(theta, vhat_max, num_tokens=s, head_dim=d,
                                   promoted_tokens=promoted_tokens, defect=eps_v,
                                   split=KERNEL_VALUES if kernel else 0.0)
  rho = jnp.where(visible, rho, 0.0)
  out_norm = jnp.sqrt(jnp.sum(jnp.square(out), axis=-1))
  # Adding the value offset rounds each component once: u ||O||.
  e_fp = e_fp + 2 * U * out_norm
  bound, e_key, e_val = bound_lib.certificate(rho, delta, eta, nu, vmax, e_fp, theta,
                                              visible=visible, block_size=cfg.block_size)
  # ||O|| rounded down, and the test's own rounding (the subtraction, tol, the product) against
  # acceptance.
  norm_lo = out_norm * (1 - gamma(d + 2))
  allowed = jnp.maximum(cfg.atol, cfg.tol * jnp.maximum(norm_lo - bound, 0.0))
  ok = bound * (1 + gamma(3)) <= allowed
  return _Result(out, bound, ok, allowed, out_norm, e_key, e_val, rho, delta)


def _evaluate_kernel(q, cache: CertifiedKVCache, window, scale, softcap, *, backend,
                     interpret) -> _Result:
  """Rung 0 of a decode step (one query per sequence, at position length - 1) with the fused
  decode kernel: the output and each block's log-sum-exp of the logits come from one pass over
  the codes (`block_logsumexp`); the block masses, the logit bounds (a [NB, D] product with
  the key metadata) and the certificate follow in XLA, O(NB) per row."""
  from kvjax import pallas_kernels
  tier, cfg = cache.tier, cache.config
  qf = cfg.quant
  b, t, hq, d = q.shape
  h, bs, nb = cache.num_kv_heads, cfg.block_size, cache.num_blocks
  qg, qt = _rotated_queries(q, cache)                             # [B, H, 1, R, D]
  o_rot, lse = pallas_kernels.decode_attention(
      qt.reshape(b, hq, d), tier.k_codes, tier.k_scales, tier.v_codes, tier.v_scales,
      tier.lengths, key_bits=qf.key_bits, value_bits=qf.value_bits, group_size=qf.group_size,
      window=window, scale=scale, softcap=softcap, backend=backend, interpret=interpret,
      block_logsumexp=bs)
  o_rot = o_rot.reshape(b, h, 1, hq // h, d)
  v_rot = _broadcast_heads(tier.v_rotation, h)
  v_lam = _broadcast_heads(tier.v_lambda, h)
  out = jnp.einsum("bhtre,hed->bhtrd", o_rot, v_rot, precision=_HI) * v_lam[None, :, None, None]
  out = out + cache.v_offset[:, :, None, None, :]
  lse = lse.reshape(b, h, 1, hq // h, nb)
  top = jnp.max(lse, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  mass = jnp.exp(lse - top)
  rho = mass / jnp.maximum(jnp.sum(mass, axis=-1, keepdims=True), 1e-30)
  q_pos = tier.lengths[:, None] - 1
  visible = jnp.any(visibility_mask(q_pos, cache_lib.positions(tier), window).reshape(
      b, 1, 1, 1, nb, bs), axis=-1)
  delta_q, _ = _logit_bounds(qg, qt, cache, scale, kernel=True)
  # |ẑ| <= α ||q~|| max ||ŷ|| (Cauchy-Schwarz; a soft cap bounds it too), plus log N for the
  # block log-sum-exps that carry the masses here.
  qt_norm = jnp.sqrt(jnp.sum(jnp.square(qt), -1))
  zmax = scale * qt_norm * jnp.max(jnp.where(visible[:, 0, 0, 0][:, None], cache.k_qnorm, 0.0),
                                   axis=-1)[:, :, None, None] * (1 + gamma(d + 4))
  if softcap is not None:
    zmax = jnp.minimum(zmax, softcap)
  zmax = zmax + math.log(cache.capacity)
  promoted = jnp.zeros((b, h, nb), bool)
  return _certify(cache, out, rho, delta_q, visible, zmax, promoted, softcap=softcap,
                  promoted_tokens=0, kernel=True)


def exact_attention(q, cache: CertifiedKVCache, *, scale=None, softcap=None, window=None,
                    q_positions=None) -> jax.Array:
  """Attention over the exact tier (float32 arithmetic on the bfloat16 originals): the path
  the ladder's last rung returns, bitwise. [B, Tq, Hq, D] float32."""
  scale, window, q_pos = _resolve(q, cache, scale, window, q_positions)
  b, h = cache.batch, cache.num_kv_heads
  out = _exact_heads(q, cache, q_pos, window, scale, softcap, jnp.arange(b * h))
  return _ungroup(out.reshape(b, h, *out.shape[1:]), jnp.float32)


def _exact_heads(q, cache, q_pos, window, scale, softcap, heads):
  """Exact attention of the KV heads `heads` (int32 [E], flat b * H + h): [E, T, R, D] float32.

  One head at a time (`lax.map`), so a head's result is the same bits whichever heads are
  computed with it: the exact rung of one head equals `exact_attention`'s."""
  b, h, s, d = cache.k_exact.shape
  kind = cache.config.memory_kind
  keys = _gather_rows(cache.k_exact.reshape(b * h, s * d), heads, kind).reshape(-1, s, d)
  values = _gather_rows(cache.v_exact.reshape(b * h, s * d), heads, kind).reshape(-1, s, d)
  qg = _grouped_q(q.astype(jnp.float32), h)                       # [B, H, T, R, D]
  mask = visibility_mask(q_pos, cache_lib.positions(cache.tier), window)   # [B, T, S]
  bi, hi = heads // h, heads % h

  def one(args):
    qh, k, v, m = args                                             # [T, R, D], [S, D], [T, S]
    z = _softcapped(jnp.einsum("trd,sd->trs", qh, k, precision=_HI) * scale, softcap)
    z = jnp.where(m[:, None, :], z, -jnp.inf)
    top = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - jnp.where(jnp.isfinite(top), top, 0.0))
    denom = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("trs,sd->trd", p, v, precision=_HI)

  return jax.lax.map(one, (qg[bi, hi], keys, values, mask[bi]))


def _resolve(q, cache, scale, window, q_positions):
  if not isinstance(cache, CertifiedKVCache):
    raise TypeError(f"cache must be a kvjax.certified.CertifiedKVCache, got "
                    f"{type(cache).__name__}")
  _check_q(q, cache)
  scale = 1.0 / math.sqrt(cache.head_dim) if scale is None else float(scale)
  window = cache.window if window is None else window
  if q_positions is None:
    tq = q.shape[1]
    q_positions = cache.lengths[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None, :]
  return scale, window, q_positions


IMPLS = ("auto", "xla", "pallas")


def attend(q: jax.Array, cache: CertifiedKVCache, *, scale: float | None = None,
           softcap: float | None = None, window: int | None = None,
           q_positions: jax.Array | None = None, valid: jax.Array | None = None,
           impl: str = "auto") -> tuple[jax.Array, Certificate, CertifiedKVCache]:
  """Certified attention of q [B, Tq, Hq, D] over the cache (queries at the last Tq positions
  unless `q_positions` [B, Tq] says otherwise).

  valid: optional bool [B, Tq]: rows counted in the cache's stats (padding is not).
  impl: how rung 0 reads the compressed tier for a decode step (Tq = 1 at the last position):
    "auto" the fused Pallas kernel with per-block log-sum-exps on TPU and GPU, XLA on the CPU
    (decided when the step is lowered); "xla"; "pallas" (interpret mode on the CPU). Chunks and
    the higher rungs run in XLA.
  Returns (out [B, Tq, Hq, D] in q's dtype, its `Certificate`, the cache with `stats`
  updated). Every row of `out` is within the tolerance of exact attention over the bfloat16
  originals (certified, before the cast to q's dtype) or is `exact_attention`'s row.
  """
  return _attend(q, cache, scale=scale, softcap=softcap, window=window, q_positions=q_positions,
                 valid=valid, impl=impl, at_end=q_positions is None)


def _attend(q, cache, *, scale, softcap, window, q_positions, valid, impl, at_end):
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  scale, window, q_pos = _resolve(q, cache, scale, window, q_positions)
  decode = at_end and q.shape[1] == 1
  if impl == "pallas" and not decode:
    raise ValueError("impl='pallas' is rung 0 of a decode step: one query per sequence, at its "
                     "last position (q_positions=None)")
  run = lambda backend, interpret=False: _ladder(q, cache, q_pos, window, scale, softcap,
                                                 backend=backend, interpret=interpret)
  if impl == "xla" or not decode:
    result = run(None)
  elif impl == "pallas":
    result = run(jax.default_backend() if jax.default_backend() in ("tpu", "gpu") else "tpu",
                 None)
  else:
    result = jax.lax.platform_dependent(default=lambda: run(None), cpu=lambda: run(None),
                                        tpu=lambda: run("tpu"), cuda=lambda: run("gpu"))
  out, cert = result
  b, tq, hq, _ = q.shape
  cfg = cache.config
  counted = jnp.ones((b, tq), bool) if valid is None else valid
  counted = jnp.broadcast_to(counted[:, :, None], (b, tq, hq))
  rows_per_rung = jnp.sum(jax.nn.one_hot(cert.rung, len(cfg.rungs), dtype=jnp.int32)
                          * counted[..., None], axis=(0, 1, 2))
  ratio = jnp.where(counted & (cert.rung <= len(cfg.promote)) & (cert.allowed > 0),
                    cert.bound / jnp.where(cert.allowed > 0, cert.allowed, 1.0), 0.0)
  stats = {"rows": cache.stats["rows"] + rows_per_rung,
           "host_blocks": cache.stats["host_blocks"] + cert.host_blocks,
           "max_bound": jnp.maximum(cache.stats["max_bound"], jnp.max(ratio))}
  return _ungroup(out, q.dtype), cert, dataclasses.replace(cache, stats=stats)


def _ladder(q, cache, q_pos, window, scale, softcap, *, backend, interpret):
  """The rungs (module docstring). backend None: rung 0 in XLA; "tpu" / "gpu": rung 0 with the
  fused kernel (then the XLA rungs compute their shared logits only if they run).
  Returns (out [B, H, T, R, D] float32, Certificate)."""
  cfg = cache.config
  b, tq, hq, d = q.shape
  h = cache.num_kv_heads
  nb = cache.num_blocks
  rows = None
  if backend is None:
    rows = _setup(q, cache, q_pos, window, scale, softcap)
    res = _evaluate(cache, rows, scale=scale, softcap=softcap)
  else:
    res = _evaluate_kernel(q, cache, window, scale, softcap, backend=backend,
                           interpret=interpret)
  out, bound, ok = res.out, res.bound, res.ok
  allowed, out_norm, e_key, e_val = res.allowed, res.out_norm, res.e_key, res.e_val
  rung = jnp.zeros(ok.shape, jnp.int32)
  host_blocks = jnp.zeros((), jnp.int32)
  rho, delta = res.rho, res.delta
  for i, count in enumerate(cfg.promote):
    count = min(count, nb)
    need = ~ok
    fire = jnp.any(need)

    def promote(rho=rho, delta=delta, need=need, count=count):
      # Each block's share of the failing rows' bounds: its value term and (twice) its logit
      # bound against its values' norm, weighted by its mass; unwritten blocks last.
      share = rho * (cache.v_err[:, :, None, None] + 2 * delta * cache.v_norm[:, :, None, None])
      score = jnp.sum(jnp.where(need[..., None], share, 0.0), axis=(2, 3))      # [B, H, NB]
      written = (jnp.arange(nb) * cfg.block_size)[None, None] < cache.lengths[:, None, None]
      score = jnp.where(written, score, -1.0)
      idx = jax.lax.top_k(score, count)[1].astype(jnp.int32)
      shared = rows if rows is not None else _setup(q, cache, q_pos, window, scale, softcap)
      return _evaluate(cache, shared, scale=scale, softcap=softcap, idx=idx)

    new = jax.lax.cond(fire, promote, lambda res=res: res)
    pick = lambda a, n: jnp.where(need.reshape(need.shape + (1,) * (a.ndim - need.ndim)), n, a)
    out, bound, ok = pick(out, new.out), pick(bound, new.bound), pick(ok, new.ok)
    allowed, out_norm = pick(allowed, new.allowed), pick(out_norm, new.out_norm)
    e_key, e_val = pick(e_key, new.e_key), pick(e_val, new.e_val)
    rho, delta = pick(rho, new.rho), pick(delta, new.delta)
    rung = jnp.where(need, i + 1, rung)
    host_blocks += jnp.where(fire, b * h * count, 0)
    res = new

  # The exact rung: the failing KV heads' exact tier moves to the device, up to
  # `config.exact_heads` of them, else the whole layer's.
  need = ~ok
  need_heads = jnp.any(need, axis=(2, 3)).reshape(b * h)
  count = jnp.sum(need_heads.astype(jnp.int32))
  budget = min(cfg.exact_heads, b * h)

  def some_heads():
    heads = jax.lax.top_k(need_heads.astype(jnp.int32), budget)[1]
    part = _exact_heads(q, cache, q_pos, window, scale, softcap, heads)
    full = jnp.zeros((b * h,) + part.shape[1:], part.dtype).at[heads].set(part)
    return full.reshape(out.shape)

  def all_heads():
    return _exact_heads(q, cache, q_pos, window, scale, softcap,
                        jnp.arange(b * h)).reshape(out.shape)

  branch = jnp.where(count == 0, 0, jnp.where(count <= budget, 1, 2))
  exact = jax.lax.switch(branch, [lambda: jnp.zeros_like(out), some_heads, all_heads])
  out = jnp.where(need[..., None], exact, out)
  out_norm = jnp.where(need, jnp.sqrt(jnp.sum(jnp.square(exact), -1)), out_norm)
  zero = jnp.zeros_like(bound)
  bound, e_key, e_val = (jnp.where(need, zero, x) for x in (bound, e_key, e_val))
  rung = jnp.where(need, len(cfg.promote) + 1, rung)
  host_blocks += jnp.select([branch == 1, branch == 2], [budget * nb, b * h * nb], 0)

  to_rows = lambda x: x.transpose(0, 2, 1, 3).reshape(b, tq, hq)
  cert = Certificate(*(to_rows(x) for x in (bound, allowed, out_norm, rung, e_key, e_val)),
                     host_blocks=host_blocks)
  return out, cert


def append_and_attend(cache: CertifiedKVCache, q, k, v, *, scale=None, softcap=None,
                      num_tokens=None, impl: str = "auto"):
  """Writes k, v [B, T, H, D] and attends q [B, T, Hq, D] (the same T new tokens): the call a
  model layer makes (`kvjax.append_and_attend` lands here for a certified cache: its impl
  "auto" / "xla" / "pallas" picks rung 0's path as in `attend`; any other runs "auto").
  Returns (out, new cache); the step's `Certificate` is summed into the cache's `stats`."""
  impl = impl if impl in ("xla", "pallas") else "auto"
  _resolve(q, cache, scale, None, None)
  t = q.shape[1]
  if k.shape[1] != t:
    raise ValueError(f"q and k must cover the same new tokens, got q_seq={t}, k_seq={k.shape[1]}")
  q_pos = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  n = (jnp.full((cache.batch,), t, jnp.int32) if num_tokens is None
       else jnp.asarray(num_tokens, jnp.int32))
  valid = jnp.arange(t)[None, :] < n[:, None]
  new = write(cache, k, v, num_tokens=num_tokens)
  out, _, new = _attend(q, new, scale=scale, softcap=softcap, window=None, q_positions=q_pos,
                        valid=valid, impl=impl, at_end=num_tokens is None)
  return out, new


def stats_summary(caches) -> dict:
  """Totals of the `stats` of every certified cache in a pytree (e.g. a model's caches):
  {"rows": {rung: count}, "host_blocks": int, "max_bound": float}. Host-side."""
  leaves = [c for c in jax.tree_util.tree_leaves(
      caches, is_leaf=lambda x: isinstance(x, CertifiedKVCache))
            if isinstance(c, CertifiedKVCache)]
  if not leaves:
    raise ValueError("no kvjax.certified.CertifiedKVCache in caches")
  rungs = leaves[0].config.rungs
  rows = sum(np.asarray(c.stats["rows"]).reshape(-1, len(rungs)).sum(0) for c in leaves)
  return {"rows": dict(zip(rungs, (int(x) for x in rows))),
          "host_blocks": int(sum(np.asarray(c.stats["host_blocks"]).sum() for c in leaves)),
          "max_bound": float(max(np.asarray(c.stats["max_bound"]).max() for c in leaves))}


# kvjax.attend / kvjax.append_and_attend (what model layers call) hand certified caches here.
register_cache_type(
    CertifiedKVCache,
    attend=lambda q, cache, **kw: attend(q, cache, **kw)[0],
    append_and_attend=append_and_attend)
