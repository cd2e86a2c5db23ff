"""Closed-form key calibration: a key offset and per-channel scales λ from statistics.

Two facts make 4-bit keys cheap to fix without touching attention's cost:

1. Offset. Softmax ignores a constant added to all logits of one query, and
   q . (k_t - μ) + q . μ = q . k_t. So keys can be stored minus a per-channel
   mean μ (the cache adds q . μ back once per query; exact). Per-token abs-max
   then spends its 16 levels on what varies between tokens, not on a shared
   offset (Qwen2's k_proj bias, Gemma's un-centred RMS-normed keys).

2. Balance. With a rotation after λ, the quantization error of k / λ is about
   isotropic with variance proportional to Σ_c E[k_c²] / λ_c², and the logit
   error is q . (λ ∘ e), with variance proportional to Σ_c E[q_c²] λ_c². Their
   product is minimal (Cauchy-Schwarz) at λ_c² ∝ rms(k_c) / rms(q_c): the
   SmoothAttention rule with α = 1/2, here derived for rotated per-group
   quantization. q~ = R(λ ∘ q) absorbs λ on the query side once per query.

Statistics come from running the model once over calibration text with
`kvjax.with_stats` caches (post-RoPE q, k, v as the cache receives them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.cache import DenseKVCache, QuantizedKVCache, StatsKVCache


@dataclasses.dataclass(frozen=True)
class KeyCalibration:
  """What to derive from statistics. alpha: exponent of rms(k)/rms(q) (0 disables λ)."""

  offset: bool = True
  alpha: float = 0.5
  clip: float = 32.0  # bound λ to [1/clip, clip] relative to its geometric mean


def key_params(stats: StatsKVCache, calib: KeyCalibration = KeyCalibration()):
  """(key_mean, key_lambda), each float32 [..., H, D], from one (possibly stacked) stats cache."""
  count = jnp.maximum(stats.count, 1.0)[..., None, None]
  mean = stats.k_sum / count
  centred_sq = jnp.maximum(stats.k_sq / count - (mean ** 2 if calib.offset else 0.0), 0.0)
  if not calib.offset:
    mean = jnp.zeros_like(mean)
  if calib.alpha == 0:
    return mean, jnp.ones_like(mean)
  return mean, balance_lambda(jnp.sqrt(centred_sq), jnp.sqrt(stats.q_sq / count), calib)


def balance_lambda(k_rms, q_rms, calib: KeyCalibration = KeyCalibration()):
  """λ = (rms(k) / rms(q)) ** alpha per channel (last axis), geometric mean 1, clipped."""
  tiny = 1e-6 * jnp.maximum(jnp.max(k_rms, axis=-1, keepdims=True), 1e-30)
  ratio = (k_rms + tiny) / (q_rms + 1e-6 * jnp.max(q_rms, axis=-1, keepdims=True) + 1e-30)
  lam = ratio ** calib.alpha
  # Only relative scales matter (the per-group abs-max absorbs a global factor).
  log_lam = jnp.log(lam)
  lam = jnp.exp(log_lam - jnp.mean(log_lam, axis=-1, keepdims=True))
  return jnp.clip(lam, 1.0 / calib.clip, calib.clip)


def calibrate_caches(quant_caches, stats_caches, calib: KeyCalibration = KeyCalibration()):
  """Copies calibrated key offsets and scales into every quantized cache of a pytree.

  `quant_caches` and `stats_caches` must have the same structure (e.g. both from
  `model.init_cache(...)`, the second wrapped with `kvjax.with_stats` and run
  over calibration text). Layer-stacked caches keep their stacking.
  """
  is_cache = lambda x: isinstance(x, (DenseKVCache, QuantizedKVCache))

  def one(qc, sc):
    if not isinstance(qc, QuantizedKVCache):
      raise TypeError(f"expected a QuantizedKVCache, got {type(qc).__name__}")
    if not isinstance(sc, StatsKVCache):
      raise TypeError(f"expected a StatsKVCache (kvjax.with_stats), got {type(sc).__name__}")
    mean, lam = key_params(sc, calib)
    if mean.shape != qc.k_codes.shape[:-4] + qc.k_codes.shape[-3:-2] + (qc.head_dim,):
      raise ValueError(f"statistics of shape {mean.shape} do not match the quantized cache "
                       f"{qc.k_codes.shape}")
    return dataclasses.replace(qc, k_mean=mean.astype(jnp.float32), k_lambda=lam.astype(jnp.float32))

  return jax.tree_util.tree_map(one, quant_caches, stats_caches, is_leaf=is_cache)
