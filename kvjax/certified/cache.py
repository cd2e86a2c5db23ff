"""The certified cache: a compressed tier read every step, an exact tier read on demand.

Layout ([batch, kv_heads, slots, ...], slots a multiple of the block size):
  tier       a `kvjax.QuantizedKVCache` (codes, scales, the basis R and λ, lengths): the
             compressed tier, on the device.
  k_exact, v_exact
             bfloat16 [B, H, S, D], the originals, in `config.memory_kind` memory (pinned host
             memory by default). Written one token at a time on the host side
             (`compute_on("device_host")`); read only by the ladder, a few blocks at a time.
  metadata   per block of `block_size` tokens, float32, each a running maximum over the
             block's written tokens, rounded up so that it bounds the exact-arithmetic
             quantity it names (docs/certified.md):
               k_err  [B, H, NB, D]  e_c = max_t |ŷ_tc - y_tc|, y = R (k / λ) as computed,
                                     ŷ its dequantized codes (rotated domain)
               k_err2 [B, H, NB]     max_t ||ŷ_t - y_t||  (the same error, as one norm)
               k_norm [B, H, NB]     max_t ||k_t / λ||
               k_qnorm[B, H, NB]     max_t ||ŷ_t||
               k_xnorm[B, H, NB]     max_t ||k_t||
               v_err  [B, H, NB]     η = max_t ||v_t - λ R^T ŷ_t||   (the block MAX of the
                                     ABSOLUTE error: what the theorem needs)
               v_norm [B, H, NB]     ν = max_t ||v_t||
               v_qnorm[B, H, NB]     max_t ||ŷ_t|| (values)
  k_offset, v_offset
             float32 [B, H, D]: what keys and values are stored minus (`config.center`: the mean
             of a sequence's first write; zeros otherwise); offset_set bool [B]. The metadata
             and the compressed tier describe k - k_offset and v - v_offset.
  defect     float32 [2]: max over heads of ||R^T R - I||_2 for the key and value rotations,
             measured in float64 when the cache is made (the stored R is orthogonal only to
             float32 rounding).
  stats      counters the caller can log: "rows" int32 [len(config.rungs)] (query rows
             returned by each rung), "host_blocks" int32 (exact blocks moved to the device),
             "max_bound" float32 (largest certified bound relative to its allowance, <= 1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on

from kvjax import cache as cache_lib
from kvjax import quantizer
from kvjax.cache import QuantizedKVCache
from kvjax.certified.config import CertifiedConfig

U = 2.0 ** -24  # float32 unit roundoff


def gamma(n) -> float:
  """γ_n = n u / (1 - n u): the relative error bound of an n-term float32 sum or dot product,
  in any summation order (Higham, Accuracy and Stability, §3.1)."""
  return n * U / (1 - n * U)


META_FIELDS = ("k_err", "k_err2", "k_norm", "k_qnorm", "k_xnorm", "v_err", "v_norm", "v_qnorm")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CertifiedKVCache:
  """See the module docstring. Built by `init_cache`; a pytree like every kvjax cache."""

  tier: QuantizedKVCache
  k_exact: jax.Array
  v_exact: jax.Array
  k_err: jax.Array
  k_err2: jax.Array
  k_norm: jax.Array
  k_qnorm: jax.Array
  k_xnorm: jax.Array
  v_err: jax.Array
  v_norm: jax.Array
  v_qnorm: jax.Array
  k_offset: jax.Array
  v_offset: jax.Array
  offset_set: jax.Array
  defect: jax.Array
  stats: dict
  config: CertifiedConfig = dataclasses.field(metadata=dict(static=True))
  window: int | None = dataclasses.field(metadata=dict(static=True))

  # The interface the rest of kvjax reads caches through.
  ring = False

  @property
  def capacity(self) -> int:
    return self.tier.capacity

  @property
  def lengths(self) -> jax.Array:
    return self.tier.lengths

  @property
  def overflow(self) -> jax.Array:
    return self.tier.overflow

  @property
  def batch(self) -> int:
    return self.tier.batch

  @property
  def num_kv_heads(self) -> int:
    return self.tier.num_kv_heads

  @property
  def head_dim(self) -> int:
    return self.tier.head_dim

  @property
  def num_blocks(self) -> int:
    return self.capacity // self.config.block_size


def _defect(r: jax.Array) -> float:
  """max over heads of ||R^T R - I||_2, in float64 (a concrete R: at cache creation)."""
  m = np.asarray(jax.device_get(r), np.float64)
  e = np.swapaxes(m, -1, -2) @ m - np.eye(m.shape[-1])
  return float(max(np.linalg.norm(x, 2) for x in e.reshape(-1, *e.shape[-2:])))


def _to_memory(x, kind: str):
  if kind == "device":
    return x
  dev = jax.devices()[0]
  return jax.device_put(x, jax.sharding.SingleDeviceSharding(dev, memory_kind=kind))


def init_cache(batch: int, num_kv_heads: int, max_len: int, head_dim: int, *,
               config: CertifiedConfig | None = None, window: int | None = None,
               key_rotation=None, value_rotation=None, key_lambda=None,
               value_lambda=None) -> CertifiedKVCache:
  """An empty certified cache for one attention layer.

  max_len is rounded up to a whole number of blocks. `window` is a sliding-window mask (the
  cache keeps every token: the exact tier is the full history, and a certified cache is never
  a ring). key_rotation / value_rotation / key_lambda / value_lambda: a calibrated basis, as
  for `kvjax.init_cache`.
  """
  config = CertifiedConfig() if config is None else config
  if not isinstance(config, CertifiedConfig):
    raise TypeError(f"config must be a kvjax.certified.CertifiedConfig, got "
                    f"{type(config).__name__}")
  cache_lib._check_positive_int(max_len, "max_len")
  bs = config.block_size
  capacity = -(-max_len // bs) * bs
  tier = cache_lib.init_cache(batch, num_kv_heads, capacity, head_dim, quant=config.quant,
                              key_rotation=key_rotation, value_rotation=value_rotation,
                              key_lambda=key_lambda, value_lambda=value_lambda)
  if window is not None:
    cache_lib._check_positive_int(window, "window")
  nb = capacity // bs
  exact = (batch, num_kv_heads, capacity, head_dim)
  blocks = (batch, num_kv_heads, nb)
  meta = {n: jnp.zeros(blocks + ((head_dim,) if n == "k_err" else ()), jnp.float32)
          for n in META_FIELDS}
  defect = jnp.asarray([_defect(tier.k_rotation), _defect(tier.v_rotation)], jnp.float32)
  stats = {"rows": jnp.zeros((len(config.rungs),), jnp.int32),
           "host_blocks": jnp.zeros((), jnp.int32), "max_bound": jnp.zeros((), jnp.float32)}
  return CertifiedKVCache(
      tier=tier, k_offset=jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32),
      v_offset=jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32),
      offset_set=jnp.zeros((batch,), bool),
      k_exact=_to_memory(jnp.zeros(exact, jnp.bfloat16), config.memory_kind),
      v_exact=_to_memory(jnp.zeros(exact, jnp.bfloat16), config.memory_kind),
      defect=defect, stats=stats, config=config, window=window, **meta)


def stacked(cache: CertifiedKVCache, lead: tuple[int, ...]) -> CertifiedKVCache:
  """`cache` repeated on leading axes `lead` (a model's stacked layers), the exact tier kept in
  its memory kind."""
  out = jax.tree.map(lambda a: jnp.broadcast_to(a, tuple(lead) + a.shape).copy(), cache)
  kind = cache.config.memory_kind
  return dataclasses.replace(out, k_exact=_to_memory(out.k_exact, kind),
                             v_exact=_to_memory(out.v_exact, kind))


def device_nbytes(caches) -> int:
  """Bytes the certified caches in a pytree hold per sequence on the device: the compressed
  tier's codes and scales (counted as `kvjax.cache.nbytes` counts them), the block metadata and
  the offsets; the exact tier lives in host memory."""
  total = 0
  for c in jax.tree_util.tree_leaves(caches, is_leaf=lambda x: isinstance(x, CertifiedKVCache)):
    if isinstance(c, CertifiedKVCache):
      total += cache_lib.nbytes(c.tier)  # codes and scales (the basis is per layer, as for int4)
      total += sum(getattr(c, f).nbytes for f in META_FIELDS + ("k_offset", "v_offset"))
  return total


# ----------------------------------------------------------------------------- write


def _norm(x):
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))


def token_metadata(cache: CertifiedKVCache, k: jax.Array, v: jax.Array, k_offset=None,
                   v_offset=None):
  """Codes, scales and each token's error metadata for keys/values [B, T, H, D] (already
  rounded to bfloat16: the exact tier's values), stored minus the offsets [B, H, D] (default:
  the cache's). Returns (codes, scales dicts, meta dict of [B, T, H, ...] float32), every
  metadata value rounded up to bound its quantity for the exactly centred k - k_offset and
  v - v_offset."""
  tier, q = cache.tier, cache.config.quant
  d = cache.head_dim
  up = 1 + gamma(d + 4)  # rounding of a D-term norm (square, sum, sqrt) and of this product
  eps_v = cache.defect[1]
  k_offset = cache.k_offset if k_offset is None else k_offset
  v_offset = cache.v_offset if v_offset is None else v_offset
  # fl(k - offset): each component within u of the exact difference (counted in the bounds).
  kf = k.astype(jnp.float32) - k_offset[:, None]
  vf = v.astype(jnp.float32) - v_offset[:, None]
  # One y per token serves both the codes and the error metadata: the bound is about the
  # codes actually stored, so they must come from the same computed y.
  yk = quantizer.rotate(kf, tier.k_rotation, tier.k_lambda)
  kc, ks = quantizer.quantize_rotated(yk, bits=q.key_bits, group_size=q.group_size,
                                      scale_dtype=q.scale_jnp_dtype)
  yk_hat = quantizer.dequantize_rotated(kc, ks, bits=q.key_bits, group_size=q.group_size)
  yv = quantizer.rotate(vf, tier.v_rotation, tier.v_lambda)
  vc, vs = quantizer.quantize_rotated(yv, bits=q.value_bits, group_size=q.group_size,
                                      scale_dtype=q.scale_jnp_dtype)
  yv_hat = quantizer.dequantize_rotated(vc, vs, bits=q.value_bits, group_size=q.group_size)
  v_hat = quantizer.unrotate(yv_hat, tier.v_rotation, tier.v_lambda)
  lam_v = jnp.max(tier.v_lambda, axis=-1)  # [Hr]
  yv_hat_norm = _norm(yv_hat)
  # ||fl(λ R^T ŷ) - λ R^T ŷ|| <= ||λ||_inf γ_D sqrt(D) (1 + ε_R) ||ŷ|| + u ||v̂||.
  v_hat_rounding = (lam_v * gamma(d) * np.sqrt(d) * (1 + eps_v) * yv_hat_norm
                    + U * _norm(v_hat))
  meta = {
      "k_err": jnp.abs(yk_hat - yk) * (1 + 2 * U),
      "k_err2": _norm(yk_hat - yk) * up * (1 + 2 * U),
      "k_norm": _norm(kf / tier.k_lambda) * up * (1 + U),
      "k_qnorm": _norm(yk_hat) * up,
      "k_xnorm": _norm(kf) * up,
      # + u ||v - offset||: the rounding of the centring subtraction itself.
      "v_err": (_norm(vf - v_hat) * up + v_hat_rounding + U * _norm(vf) * up) * (1 + 2 * U),
      "v_norm": _norm(vf) * up,
      "v_qnorm": yv_hat_norm * up,
  }
  return {"k_codes": kc, "k_scales": ks, "v_codes": vc, "v_scales": vs}, meta


def _host_scatter(buf, b_idx, slots, vals, kind):
  """buf.at[b, :, slot].set(vals), run where buf lives: on the host for a host tier, so only
  the new tokens cross to it."""
  if kind == "device":
    return buf.at[b_idx, :, slots].set(vals, mode="drop")

  @compute_on("device_host")
  @jax.jit
  def scatter(buf, b_idx, slots, vals):
    return buf.at[b_idx, :, slots].set(vals, mode="drop")

  host = jax.memory.Space.Host
  return scatter(buf, jax.device_put(b_idx, host), jax.device_put(slots, host),
                 jax.device_put(vals, host))


def write(cache: CertifiedKVCache, k: jax.Array, v: jax.Array, *,
          num_tokens=None) -> CertifiedKVCache:
  """Appends keys and values [B, T, H, D]: codes to the compressed tier, bfloat16 originals
  to the exact tier, and each token's error metadata into its block's running maxima.
  Overflow behaves as for `kvjax.append` (ValueError outside jit; dropped and flagged in
  `overflow` under jit)."""
  tier = cache.tier
  cache_lib._check_kv(tier, k, v, num_tokens)
  t = k.shape[1]
  concrete = cache_lib._concrete(tier.lengths)
  if concrete is not None:
    n = np.full(tier.batch, t) if num_tokens is None else cache_lib._concrete(num_tokens)
    if n is not None and np.any(concrete + np.clip(n, 0, t) > tier.capacity):
      raise ValueError(f"appending {t} tokens overflows the certified cache: lengths "
                       f"{concrete.tolist()} + new tokens > capacity {tier.capacity}")
  slots, new_lengths, new_overflow, valid = cache_lib._plan(tier, t, num_tokens)
  kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  k_offset, v_offset, offset_set = cache.k_offset, cache.v_offset, cache.offset_set
  if cache.config.center:
    # A sequence's offsets are the mean of its first write with tokens, then fixed.
    count = jnp.sum(valid, axis=1)                                      # [B]
    w = (valid / jnp.maximum(count, 1)[:, None])[:, :, None, None]
    first = ~offset_set & (count > 0)
    k_offset = jnp.where(first[:, None, None], jnp.sum(kb.astype(jnp.float32) * w, 1), k_offset)
    v_offset = jnp.where(first[:, None, None], jnp.sum(vb.astype(jnp.float32) * w, 1), v_offset)
    offset_set = offset_set | (count > 0)
  arrays, meta = token_metadata(cache, kb, vb, k_offset, v_offset)
  b_idx = jnp.arange(tier.batch, dtype=jnp.int32)[:, None]
  # buf[b, :, slot] is [B, T, H, ...]: the chunk's own layout (see kvjax.cache.write).
  tier_updates = {n: getattr(tier, n).at[b_idx, :, slots].set(a, mode="drop")
                  for n, a in arrays.items()}
  new_tier = dataclasses.replace(tier, lengths=new_lengths, overflow=new_overflow,
                                 **tier_updates)
  blocks = jnp.where(slots < tier.capacity, slots // cache.config.block_size, cache.num_blocks)
  meta_updates = {n: getattr(cache, n).at[b_idx, :, blocks].max(a, mode="drop")
                  for n, a in meta.items()}
  kind = cache.config.memory_kind
  return dataclasses.replace(
      cache, tier=new_tier, k_offset=k_offset, v_offset=v_offset, offset_set=offset_set,
      k_exact=_host_scatter(cache.k_exact, b_idx, slots, kb, kind),
      v_exact=_host_scatter(cache.v_exact, b_idx, slots, vb, kind),
      **meta_updates)
