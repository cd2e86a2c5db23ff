"""Rotary key offsets: a pre-RoPE key mean removed exactly, position by position.

Keys reach the cache after RoPE. A constant post-RoPE mean (`k_mean`) removes a key
offset only in channel pairs that RoPE barely turns over the context; in a pair of
frequency w the offset m of the pre-RoPE keys arrives as the rotating vector

    c_t = A(w t) m,    A(a) = [[cos a, -sin a], [sin a, cos a]]

which no constant can cancel, so per-token abs-max spends its 16 levels on it. On
Gemma-3-270M's sliding-window layers (RoPE base 1e4) the pre-RoPE mean is 50-75% of
the key energy left after the constant mean, and 4-16 pairs carry most of it.

Removing c_t is exact and costs nothing per cached token: the cache stores
k_t - c_t, and attention adds back, for each query q and slot t,

    q . c_t = sum_p a_p cos(w_p t) + b_p sin(w_p t),
    a_p = q[i] m1 + q[j] m2,   b_p = q[j] m1 - q[i] m2       (pair p = channels (i, j))

with a, b computed once per query (2P numbers) and the trigonometric terms from the
slot's position (no bytes stored per token). `freq`, `channels` and `mean` are
cache parameters: float32 [P], int32 [P, 2] and float32 [Hr, 2, P] (m1, m2 per pair,
Hr in {1, H}). A pair (i, j) turns as (x_i, x_j) -> (x_i cos - x_j sin, x_j cos + x_i sin),
which covers rotate-half RoPE (j = i + D/2) and interleaved RoPE (j = i + 1) alike.
Angles are float32(position) * freq, as the models compute them; their cosines and sines come
from `cos_sin` (XLA's CPU cos and sin are ~8x slower, and a decode step evaluates them for every
cached slot).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


def _split(x: float, bits: int, n: int) -> tuple[np.float32, ...]:
  """x as n float32 parts, all but the last with at most `bits` significant bits."""
  parts, rest = [], x
  for _ in range(n - 1):
    q = 2.0 ** (math.floor(math.log2(rest)) - bits + 1)
    parts.append(math.floor(rest / q) * q)
    rest -= parts[-1]
  return tuple(np.float32(p) for p in parts + [rest])


# pi / 2 in five parts, the first four of 7 significant bits: k * part is exact for those four
# when |k| < 2^17, and a - k * p1 cancels exactly (Cody and Waite's reduction); the later steps
# round at most half an ulp of the remainder each.
_HALF_PI_PARTS = _split(math.pi / 2, 7, 5)
# Minimax polynomials of sin and cos on [-pi/4, pi/4] (Cephes' sinf / cosf).
_SIN = tuple(np.float32(c) for c in (-1.6666654611e-1, 8.3321608736e-3, -1.9515295891e-4))
_COS = tuple(np.float32(c) for c in (4.166664568298827e-2, -1.388731625493765e-3,
                                      2.443315711809948e-5))


def cos_sin(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos(a) and sin(a) of float32 angles, as elementwise ops XLA fuses and vectorizes.

  a - k pi/2 (k the nearest integer) in five steps, then a degree-7 / degree-8 polynomial and
  the quadrant. Within 1.2e-7 of the exact values for |a| < 2^17, i.e. positions below 131,072
  at frequency 1 (measured in tests/test_rotary.py), against ~3e-8 for jnp.cos / jnp.sin, which
  XLA's CPU backend evaluates ~8x slower. Beyond 2^17 the reduction loses bits (without fused
  multiply-adds, ~1e-6 up to 2^18 and worse above).
  """
  a = a.astype(jnp.float32)
  k = jnp.round(a * np.float32(2 / math.pi))
  r = a
  for part in _HALF_PI_PARTS:
    r = r - k * part
  z = r * r
  s = r + r * z * (_SIN[0] + z * (_SIN[1] + z * _SIN[2]))
  c = 1 - np.float32(0.5) * z + z * z * (_COS[0] + z * (_COS[1] + z * _COS[2]))
  quadrant = k.astype(jnp.int32)
  odd = (quadrant & 1) == 1
  cos, sin = jnp.where(odd, s, c), jnp.where(odd, c, s)
  return (jnp.where(((quadrant + 1) & 2) == 2, -cos, cos), jnp.where((quadrant & 2) == 2, -sin, sin))


def angles(positions: jax.Array, freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin of float32(positions) * freq: [..., N] x [P] -> two [..., N, P] arrays."""
  return cos_sin(positions.astype(jnp.float32)[..., None] * freq.astype(jnp.float32))


def key_offset(positions: jax.Array, freq: jax.Array, channels: jax.Array, mean: jax.Array,
               dim: int) -> jax.Array:
  """c_t for new tokens: positions int [B, T] -> float32 [B, T, Hr, D] (zero outside the pairs).

  freq [P], channels int32 [P, 2], mean [Hr, 2, P].
  """
  b, t = positions.shape
  hr, _, p = mean.shape
  out = jnp.zeros((b, t, hr, dim), jnp.float32)
  if p == 0:
    return out
  cos, sin = angles(positions, freq)                          # [B, T, P]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  m1, m2 = mean[:, 0].astype(jnp.float32), mean[:, 1].astype(jnp.float32)   # [Hr, P]
  first = m1 * cos - m2 * sin                                  # [B, T, Hr, P]
  second = m2 * cos + m1 * sin
  out = out.at[..., channels[:, 0]].add(first)
  return out.at[..., channels[:, 1]].add(second)


def coefficients(q: jax.Array, channels: jax.Array, mean: jax.Array) -> jax.Array:
  """(a, b) of every query: q [B, H, ..., D] (grouped by KV head), mean [Hr, 2, P] -> [B, H, ..., 2P].

  The query's logit offset at a slot of position t is sum_p a_p cos(w_p t) + b_p sin(w_p t).
  """
  qf = q.astype(jnp.float32)
  qi = jnp.take(qf, channels[:, 0], axis=-1)                   # [B, H, ..., P]
  qj = jnp.take(qf, channels[:, 1], axis=-1)
  extra = qf.ndim - 3                                           # axes between H and D
  shape = (1, mean.shape[0]) + (1,) * extra + (mean.shape[-1],)
  m1 = mean[:, 0].astype(jnp.float32).reshape(shape)
  m2 = mean[:, 1].astype(jnp.float32).reshape(shape)
  return jnp.concatenate([qi * m1 + qj * m2, qj * m1 - qi * m2], axis=-1)


def logit_offsets(qg: jax.Array, kv_positions: jax.Array, freq: jax.Array, channels: jax.Array,
                  mean: jax.Array) -> jax.Array:
  """q . c_t for grouped queries qg [B, H, T, R, D] and slots at kv_positions int [B, N].

  Returns float32 [B, H, T, R, N] (unscaled logits; slots with position -1 get a finite
  value that the visibility mask discards).
  """
  coef = coefficients(qg, channels, mean)                      # [B, H, T, R, 2P]
  p = coef.shape[-1] // 2
  # Angles laid out [B, P, N] (slots minor), so the products below are plain matrix products
  # and the trigonometry a vectorized loop over slots (no transpose, no concatenation).
  cos, sin = cos_sin(freq.astype(jnp.float32)[:, None] * kv_positions.astype(jnp.float32)[:, None])
  return (jnp.einsum("bhtrp,bpn->bhtrn", coef[..., :p], cos, precision=_HI)
          + jnp.einsum("bhtrp,bpn->bhtrn", coef[..., p:], sin, precision=_HI))

