"""Per-group abs-max quantization of rotated vectors, and 4-bit packing.

The math, for one vector x in R^D (see docs/cache_layout.md):

    y      = R (x / lam)                            rotation after per-channel scale
    s      = bf16(max|y_group| / qmax)              one scale per group of g channels
    codes  = clip(round(y / s), -qmax, qmax)        qmax = 7 (4-bit) or 127 (8-bit)
    x_hat  = lam * (R^T (codes * s))

Codes are symmetric (no -8 for 4-bit), so packing and the quantized-domain dot
products need no zero points. The scale is rounded to its storage dtype
*before* dividing, so the codes are exact for the scale that is stored and the
error per element is at most half a step of that scale. A group of zeros gets
scale 0 and codes 0 (never 0/0); subnormal and huge inputs stay finite.

4-bit nibble layout ("split halves"): byte j of a packed row holds channel j in
its low nibble and channel j + D/2 in its high nibble. Unpacking is two
whole-vector arithmetic shifts on int8 (`(b << 4) >> 4` and `b >> 4`) that
give the two halves as contiguous blocks, with no lane shuffles on TPU, GPU or
CPU SIMD, and no dependence on the group size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QMAX = {4: 7, 8: 127}


def qmax(bits: int) -> int:
  if bits not in QMAX:
    raise ValueError(f"bits must be 4 or 8, got {bits!r}")
  return QMAX[bits]


def pack_int4(codes: jax.Array) -> jax.Array:
  """Packs int8 codes in [-8, 7], shape [..., D], into uint8 [..., D // 2] (split halves)."""
  d = codes.shape[-1]
  if d % 2:
    raise ValueError(f"pack_int4 needs an even last axis, got shape {codes.shape}")
  c = codes.astype(jnp.int32)
  lo, hi = c[..., : d // 2], c[..., d // 2:]
  return ((lo & 0xF) | ((hi & 0xF) << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array) -> jax.Array:
  """Inverse of `pack_int4`: uint8 [..., D // 2] -> int8 codes [..., D]."""
  if packed.dtype != jnp.uint8:
    raise TypeError(f"unpack_int4 expects uint8 packed codes, got {packed.dtype}")
  b = jax.lax.bitcast_convert_type(packed, jnp.int8)
  lo = jnp.right_shift(jnp.left_shift(b, jnp.int8(4)), jnp.int8(4))  # arithmetic: sign-extends
  hi = jnp.right_shift(b, jnp.int8(4))
  return jnp.concatenate([lo, hi], axis=-1)


def group_absmax_scales(y: jax.Array, *, bits: int, group_size: int,
                        scale_dtype=jnp.bfloat16) -> jax.Array:
  """Per-group scales max|y| / qmax, [..., D] -> [..., D // group_size] in `scale_dtype`."""
  d = y.shape[-1]
  if d % group_size:
    raise ValueError(f"last axis {d} is not divisible by group_size={group_size}")
  yg = y.astype(jnp.float32).reshape(*y.shape[:-1], d // group_size, group_size)
  s = jnp.max(jnp.abs(yg), axis=-1) / qmax(bits)
  return s.astype(scale_dtype)


def quantize_rotated(y: jax.Array, *, bits: int, group_size: int,
                     scale_dtype=jnp.bfloat16) -> tuple[jax.Array, jax.Array]:
  """Quantizes already-rotated vectors y [..., D].

  Returns (codes, scales): codes uint8 [..., D//2] (4-bit, packed) or int8
  [..., D] (8-bit); scales [..., D // group_size] in `scale_dtype`.
  """
  q = qmax(bits)
  d = y.shape[-1]
  scales = group_absmax_scales(y, bits=bits, group_size=group_size, scale_dtype=scale_dtype)
  s = scales.astype(jnp.float32)
  # Rounding of s to bf16 can shrink it by 2^-9 relative, so |y / s| <= 7.02 and
  # still rounds into range; the clip only guards against inf/nan inputs.
  safe = jnp.where(s > 0, s, 1.0)
  yg = y.astype(jnp.float32).reshape(*y.shape[:-1], d // group_size, group_size)
  codes = jnp.clip(jnp.round(yg / safe[..., None]), -q, q).astype(jnp.int8)
  codes = codes.reshape(y.shape)
  if bits == 4:
    codes = pack_int4(codes)
  return codes, scales


def dequantize_rotated(codes: jax.Array, scales: jax.Array, *, bits: int,
                       group_size: int) -> jax.Array:
  """Inverse of `quantize_rotated`, float32 [..., D] in the rotated domain."""
  c = unpack_int4(codes) if bits == 4 else codes
  d = c.shape[-1]
  cg = c.astype(jnp.float32).reshape(*c.shape[:-1], d // group_size, group_size)
  return (cg * scales.astype(jnp.float32)[..., None]).reshape(c.shape)


def rotate(x: jax.Array, rotation: jax.Array, lam: jax.Array) -> jax.Array:
  """y = R (x / lam) over the last axis, float32.

  x: [..., H, D]; rotation: [Hr, D, D]; lam: [Hr, D], Hr in {1, H}.
  """
  xf = x.astype(jnp.float32) / lam
  return jnp.einsum("...hd,hed->...he", xf, rotation, precision=jax.lax.Precision.HIGHEST)


def unrotate(y: jax.Array, rotation: jax.Array, lam: jax.Array) -> jax.Array:
  """x = lam * (R^T y), inverse of `rotate`. y: [..., H, D]."""
  x = jnp.einsum("...he,hed->...hd", y.astype(jnp.float32), rotation,
                 precision=jax.lax.Precision.HIGHEST)
  return x * lam


def quantize(x: jax.Array, rotation: jax.Array, lam: jax.Array, *, bits: int, group_size: int,
             scale_dtype=jnp.bfloat16) -> tuple[jax.Array, jax.Array]:
  """Rotates and quantizes head vectors x [..., H, D] (rotation [Hr, D, D], lam [Hr, D])."""
  return quantize_rotated(rotate(x, rotation, lam), bits=bits, group_size=group_size,
                          scale_dtype=scale_dtype)


def dequantize(codes: jax.Array, scales: jax.Array, rotation: jax.Array, lam: jax.Array, *,
               bits: int, group_size: int) -> jax.Array:
  """Inverse of `quantize`: float32 [..., H, D] in the original (unrotated) domain."""
  y = dequantize_rotated(codes, scales, bits=bits, group_size=group_size)
  return unrotate(y, rotation, lam)


def fake_quantize(x: jax.Array, rotation: jax.Array, lam: jax.Array, *, bits: int,
                  group_size: int, scale_dtype=jnp.bfloat16) -> jax.Array:
  """dequantize(quantize(x)): what attention sees of x through the cache, float32."""
  codes, scales = quantize(x, rotation, lam, bits=bits, group_size=group_size,
                           scale_dtype=scale_dtype)
  return dequantize(codes, scales, rotation, lam, bits=bits, group_size=group_size)
