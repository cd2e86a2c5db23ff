"""Grouped-query attention for the FoE and baseline blocks, with or without a kvjax cache.

The one switch point to the library's cache is `cached_attention`: the blocks call it with
the (local) cache and post-RoPE q, k, v, and it calls `kvjax.append_and_attend`, so a dense
or an int4 (`quant=kvjax.QuantConfig()`) cache works unchanged, inside `shard_map` too.
Without a cache (training on whole sequences) `causal_attention` is used: plain jnp,
differentiable, the same math as attending from an empty cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, computed in float32; `scale` broadcasts against `x`."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half convention.

  Args:
    x: [B, T, heads, head_dim].
    positions: int [B, T] absolute positions.
    theta: base.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
  cos = jnp.cos(angle)[:, :, None, :]
  sin = jnp.sin(angle)[:, :, None, :]
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Causal grouped-query attention over one whole sequence (no cache).

  Args:
    q: [B, T, Hq, D]; query head j reads KV head j // (Hq // H).
    k, v: [B, T, H, D].

  Returns:
    [B, T, Hq, D].
  """
  batch, seq, q_heads, dim = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(batch, seq, kv_heads, q_heads // kv_heads, dim)
  scores = jnp.einsum("bqhrd,bkhd->bhrqk", qg, k).astype(jnp.float32) / jnp.sqrt(
      jnp.float32(dim))
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
  scores = jnp.where(causal, scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhrqk,bkhd->bqhrd", probs, v)
  return out.reshape(batch, seq, q_heads, dim)


def cached_attention(cache, q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto"):
  """Appends k, v to `cache` and attends causally with q: `kvjax.append_and_attend`.

  Args:
    cache: a kvjax cache (dense or quantized) with H KV heads.
    q: [B, T, Hq, D] post-RoPE queries; k, v: [B, T, H, D] (k post-RoPE).
    impl: the attention implementation (`kvjax.attend`'s impl).

  Returns:
    ([B, T, Hq, D] output, new cache).
  """
  import kvjax  # the core package; imported late so kvjax.foe stays importable on its own.

  return kvjax.append_and_attend(cache, q, k, v, impl=impl)


def cache_positions(cache, batch: int, seq: int) -> jax.Array:
  """Absolute positions [B, T] of a chunk of `seq` tokens about to be appended."""
  offsets = jnp.arange(seq, dtype=jnp.int32)[None, :]
  if cache is None:
    return jnp.broadcast_to(offsets, (batch, seq))
  return cache.lengths.astype(jnp.int32)[:, None] + offsets
