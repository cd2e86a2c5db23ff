"""Bridges the cache API to the Pallas kernels in kvjax.pallas_kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _kernels():
  try:
    from kvjax import pallas_kernels
  except ImportError as e:  # pragma: no cover - the package ships with kvjax
    raise RuntimeError("impl='pallas' needs kvjax.pallas_kernels, which failed to import") from e
  return pallas_kernels


def quantize_heads(x, rotation, lam, *, bits, group_size, scale_dtype, feedback=None,
                   backend=None):
  """Fused rotate+quantize+pack of x [B, T, H, D] with per-head params [Hr, D, D], [Hr, D].

  feedback: None (nearest rounding) or the error-feedback matrices [Hr, D, D] of
  `kvjax.quantizer.feedback_levels`, per head like the rotation (Hr in {1, H}).
  backend: None (the default device's kernel; interpret mode on the CPU) or "tpu" / "gpu":
  that target's kernel, compiled (for a step lowered for that platform).
  """
  kernel_kw = {} if backend is None else {"backend": backend, "interpret": False}
  pk = _kernels()
  b, t, h, d = x.shape
  if rotation.shape[0] == 1 and lam.shape[0] == 1 and (feedback is None or
                                                       feedback.shape[0] == 1):
    codes, scales = pk.quantize_pack(x.reshape(b * t * h, d), rotation[0], lam[0], bits=bits,
                                     group_size=group_size, scale_dtype=scale_dtype,
                                     feedback=None if feedback is None else feedback[0],
                                     **kernel_kw)
    return codes.reshape(b, t, h, -1), scales.reshape(b, t, h, -1)
  rotation = jnp.broadcast_to(rotation, (h, d, d))
  lam = jnp.broadcast_to(lam, (h, d))
  if feedback is not None:
    feedback = jnp.broadcast_to(feedback, (h, d, d))
  # One launch for all heads: vmap over the head axis of x, rotation, lambda and feedback
  # (None is an empty pytree, so vmap passes it through).
  per_head = jax.vmap(lambda xh, rh, lh, fh: pk.quantize_pack(xh, rh, lh, bits=bits,
                                                              group_size=group_size,
                                                              scale_dtype=scale_dtype,
                                                              feedback=fh, **kernel_kw))
  codes, scales = per_head(x.transpose(2, 0, 1, 3).reshape(h, b * t, d), rotation, lam, feedback)
  return (codes.reshape(h, b, t, -1).transpose(1, 2, 0, 3),
          scales.reshape(h, b, t, -1).transpose(1, 2, 0, 3))


def decode(q, cache, *, scale, softcap, window, pending=None, backend=None, page_table=None):
  """Single-token decode over a QuantizedKVCache with the fused kernel. q: [B, 1, Hq, D].

  The cache's corrections become the kernel's extra split-K states through their
  `kernel_args` (`kvjax.corrections`); pending: what each correction's write of this token
  handed over (None when attending over a cache alone). backend: as in `quantize_heads`.
  page_table: None, or int32 [B, P] when the cache's codes and scales are a page pool
  [num_pages, H, page_size, ...] (`kvjax.paged`; lengths and corrections per row as usual)."""
  from kvjax import corrections as corrections_lib
  pk = _kernels()
  b, _, hq, d = q.shape
  h = cache.num_kv_heads
  r = hq // h
  qg = q[:, 0].astype(jnp.float32).reshape(b, h, r, d)
  lam_k = jnp.broadcast_to(cache.k_lambda, (h, d))[None, :, None, :]
  rot_k = jnp.broadcast_to(cache.k_rotation, (h, d, d))
  q_rot = jnp.einsum("bhrd,hed->bhre", qg * lam_k, rot_k,
                     precision=jax.lax.Precision.HIGHEST).reshape(b, hq, d)
  cfg = cache.config
  rot_v = jnp.broadcast_to(cache.v_rotation, (h, d, d))
  lam_v = jnp.broadcast_to(cache.v_lambda, (h, d))
  to_rotated = lambda e: jnp.einsum(  # value errors into the kernel's (rotated) value domain
      "bh...d,hed->bh...e", e / lam_v[None, :, None], rot_v,
      precision=jax.lax.Precision.HIGHEST)
  extra = corrections_lib.kernel_args(cfg.corrections, cache.corrections, pending,
                                      corrections_lib.KernelRead(qg, scale, to_rotated))
  o_rot = pk.decode_attention(
      q_rot, cache.k_codes, cache.k_scales, cache.v_codes, cache.v_scales, cache.lengths,
      key_bits=cfg.key_bits, value_bits=cfg.value_bits, group_size=cfg.group_size,
      ring=cache.ring, window=window, scale=scale, softcap=softcap, page_table=page_table,
      **extra,
      **({} if backend is None else {"backend": backend, "interpret": False}))
  o = jnp.einsum("bhre,hed->bhrd", o_rot.reshape(b, h, r, d), rot_v,
                 precision=jax.lax.Precision.HIGHEST) * lam_v[None, :, None, :]
  return o.reshape(b, 1, hq, d).astype(q.dtype)
