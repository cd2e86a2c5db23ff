"""Per-group abs-max quantization of rotated vectors, and 4-bit packing.

The math, for one vector x in R^D (see docs/cache_layout.md):

    y      = R (x / lam)                            rotation after per-channel scale
    s      = bf16(max|y_group| / L)                 one scale per group of g channels
    levels = nearest level of y / s in the grid     L = 15 (4-bit) or 127 (8-bit)
    x_hat  = lam * (R^T (levels * s))

4-bit grid: the 16 odd integers -15, -13, ..., 13, 15 ("mid-rise"), stored as
the nibble c = (level - 1) / 2 in [-8, 7] and read back as level = 2c + 1. All
16 codes are used and the grid is symmetric, so a group's range is cut into 16
equal steps of 2s instead of the 15 of the mid-tread grid {-7, ..., 7}: 7%
smaller steps, 13% less mean-square error, and no zero points anywhere (a level
is an integer, so the quantized-domain dot products stay integer dot products).
Rounding to the nearest odd level is 2 floor(y / 2s) + 1. 8-bit: the integers
-127..127 (round half to even), stored as int8.

The scale is rounded to its storage dtype *before* dividing, so the levels are
exact for the scale that is stored and the error per element is at most half a
step of that scale (s for 4-bit, s / 2 for 8-bit). A group of zeros gets scale
0 (never 0/0); subnormal and huge inputs stay finite.

4-bit nibble layout ("split halves"): byte j of a packed row holds channel j in
its low nibble and channel j + D/2 in its high nibble. Unpacking is two
whole-vector arithmetic shifts on int8 (`(b << 4) >> 4` and `b >> 4`) that
give the two halves as contiguous blocks, with no lane shuffles on TPU, GPU or
CPU SIMD, and no dependence on the group size, then `2c + 1`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

QMAX = {4: 15, 8: 127}  # largest level: 4-bit odd levels +-1..15, 8-bit integers -127..127


def qmax(bits: int) -> int:
  """The largest level of the grid (levels are in [-qmax, qmax])."""
  if bits not in QMAX:
    raise ValueError(f"bits must be 4 or 8, got {bits!r}")
  return QMAX[bits]


def pack_int4(levels: jax.Array) -> jax.Array:
  """Packs odd 4-bit levels in [-15, 15], shape [..., D], into uint8 [..., D // 2] (split halves).

  Each level is stored as its nibble c = (level - 1) / 2 (an arithmetic shift right by one).
  """
  d = levels.shape[-1]
  if d % 2:
    raise ValueError(f"pack_int4 needs an even last axis, got shape {levels.shape}")
  c = jnp.right_shift(levels.astype(jnp.int32), 1)
  lo, hi = c[..., : d // 2], c[..., d // 2:]
  return ((lo & 0xF) | ((hi & 0xF) << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array) -> jax.Array:
  """Inverse of `pack_int4`: uint8 [..., D // 2] -> int8 odd levels [..., D] in [-15, 15]."""
  if packed.dtype != jnp.uint8:
    raise TypeError(f"unpack_int4 expects uint8 packed codes, got {packed.dtype}")
  b = jax.lax.bitcast_convert_type(packed, jnp.int8)
  lo = jnp.right_shift(jnp.left_shift(b, jnp.int8(4)), jnp.int8(4))  # arithmetic: sign-extends
  hi = jnp.right_shift(b, jnp.int8(4))
  c = jnp.concatenate([lo, hi], axis=-1)
  return jnp.left_shift(c, jnp.int8(1)) | jnp.int8(1)


def round_to_grid(u: jax.Array, bits: int) -> jax.Array:
  """Nearest level of the `bits`-bit grid to u (float, in units of the scale), clipped; float32.

  4-bit: nearest odd integer, 2 floor(u / 2) + 1, in [-15, 15]. 8-bit: round half to
  even, in [-127, 127]. NaN stays NaN (callers never pass it: scales of empty groups are 0).
  """
  q = qmax(bits)
  r = 2.0 * jnp.floor(u * 0.5) + 1.0 if bits == 4 else jnp.round(u)
  return jnp.clip(r, -q, q)


def group_absmax_scales(y: jax.Array, *, bits: int, group_size: int,
                        scale_dtype=jnp.bfloat16) -> jax.Array:
  """Per-group scales max|y| / qmax(bits), [..., D] -> [..., D // group_size] in `scale_dtype`.

  A scale beyond the largest finite value of `scale_dtype` (float16: 65504, i.e. activations
  above ~1e6 at 4 bits) saturates there instead of becoming inf, so the codes clip at ±qmax
  and attention stays finite (and wrong by the clipping) rather than turning NaN.
  """
  d = y.shape[-1]
  if d % group_size:
    raise ValueError(f"last axis {d} is not divisible by group_size={group_size}")
  yg = y.astype(jnp.float32).reshape(*y.shape[:-1], d // group_size, group_size)
  s = jnp.max(jnp.abs(yg), axis=-1) / qmax(bits)
  s = jnp.minimum(s, float(jnp.finfo(jnp.dtype(scale_dtype)).max))
  return round_to_dtype(s, scale_dtype).astype(scale_dtype)


def round_to_dtype(x: jax.Array, dtype) -> jax.Array:
  """float32 x rounded to the nearest value of `dtype` (bfloat16, float16 or float32), kept in
  float32.

  Codes must be computed with exactly the scale that is stored. `x.astype(bf16).astype(f32)`
  does not guarantee that: XLA (allow_excess_precision, on by default) may drop such a round
  trip inside a fusion, and then whether codes see the rounded or the unrounded scale depends
  on how the program was fused — chunked and token-by-token writes of the same keys gave
  different codes for ~0.5% of them. `reduce_precision` is an explicit rounding XLA keeps.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.dtype(jnp.float32):
    return x.astype(jnp.float32)
  info = jnp.finfo(dtype)
  return jax.lax.reduce_precision(x.astype(jnp.float32), exponent_bits=info.nexp,
                                  mantissa_bits=info.nmant)


def feedback_levels(y: jax.Array, scales: jax.Array, feedback: jax.Array, *, bits: int,
                    group_size: int) -> jax.Array:
  """Grid levels of rotated vectors y [..., H, D] chosen with error feedback; float32 [..., H, D].

  Channels are rounded in order 0..D-1; the rounding error e_j = y~_j - level_j s_j of
  channel j is passed on to every later channel i as y~_i -= feedback[h, j, i] e_j
  (`feedback` float32 [Hr, D, D], Hr in {1, H}, strictly upper triangular). With
  feedback = U / diag(U) for the upper Cholesky factor U of H^-1 this is GPTQ's (LDLQ's)
  rounding for the quadratic error e^T H e, H = E[q~ q~^T] the second moment of the
  rotated queries that will read the key: the error moves into directions that queries
  do not look along (kvjax.smoothing). feedback = 0 gives nearest rounding. Scales stay
  the abs-max ones of y, so a channel pushed past its group's range is clipped to the
  extreme level; the error per element is then not bounded by half a step, e^T H e is
  what shrinks.

  The sequential part runs per group of `group_size` channels (a loop of group_size steps);
  the errors of a finished group reach the later groups in one matmul.
  """
  *lead, h, d = y.shape
  hr = feedback.shape[0]
  if feedback.shape[1:] != (d, d) or hr not in (1, h):
    raise ValueError(f"feedback must be [1 or {h}, {d}, {d}], got {feedback.shape}")
  g = group_size
  n = math.prod(lead)
  yh = jnp.moveaxis(y.astype(jnp.float32).reshape(n, h, d), 1, 0)               # [H, N, D]
  s = jnp.repeat(scales.astype(jnp.float32).reshape(n, h, d // g), g, axis=-1)  # [N, H, D]
  s = jnp.moveaxis(s, 1, 0)
  f = jnp.broadcast_to(feedback.astype(jnp.float32), (h, d, d))

  def one_head(yv, sv, fv):
    levels = []
    for g0 in range(0, d, g):
      sb = sv[:, g0:g0 + g]
      inv = jnp.where(sb > 0, 1.0 / jnp.where(sb > 0, sb, 1.0), 0.0)
      fb = fv[g0:g0 + g, g0:g0 + g]

      def step(j, carry):
        blk, lev, err = carry
        yj = jax.lax.dynamic_index_in_dim(blk, j, 1, keepdims=False)
        sj = jax.lax.dynamic_index_in_dim(sb, j, 1, keepdims=False)
        lj = round_to_grid(yj * jax.lax.dynamic_index_in_dim(inv, j, 1, keepdims=False), bits)
        ej = yj - lj * sj
        row = jax.lax.dynamic_index_in_dim(fb, j, 0, keepdims=False)
        blk = blk - ej[:, None] * row[None, :]
        return (blk, jax.lax.dynamic_update_index_in_dim(lev, lj, j, 1),
                jax.lax.dynamic_update_index_in_dim(err, ej, j, 1))

      zeros = jnp.zeros_like(sb)
      _, lev, err = jax.lax.fori_loop(0, g, step, (yv[:, g0:g0 + g], zeros, zeros))
      levels.append(lev)
      if g0 + g < d:
        yv = yv.at[:, g0 + g:].add(-jnp.dot(err, fv[g0:g0 + g, g0 + g:],
                                            precision=jax.lax.Precision.HIGHEST))
    return jnp.concatenate(levels, axis=-1)

  out = jax.vmap(one_head)(yh, s, f)                                             # [H, N, D]
  return jnp.moveaxis(out, 0, 1).reshape(y.shape)


def quantize_rotated(y: jax.Array, *, bits: int, group_size: int,
                     scale_dtype=jnp.bfloat16, feedback: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """Quantizes already-rotated vectors y [..., D] ([..., H, D] with `feedback`).

  feedback: None (nearest rounding) or float32 [Hr, D, D] for `feedback_levels`.
  Returns (codes, scales): codes uint8 [..., D//2] (4-bit, packed) or int8
  [..., D] (8-bit); scales [..., D // group_size] in `scale_dtype`.
  """
  d = y.shape[-1]
  scales = group_absmax_scales(y, bits=bits, group_size=group_size, scale_dtype=scale_dtype)
  if feedback is not None:
    codes = feedback_levels(y, scales, feedback, bits=bits, group_size=group_size)
    codes = codes.astype(jnp.int8)
  else:
    s = scales.astype(jnp.float32)
    # Rounding of s to bf16 can shrink it by 2^-9 relative, so |y / s| <= qmax (1 + 2^-9)
    # still lands on the extreme level; the clip in round_to_grid keeps inf/nan inputs in range.
    safe = jnp.where(s > 0, s, 1.0)
    yg = y.astype(jnp.float32).reshape(*y.shape[:-1], d // group_size, group_size)
    codes = round_to_grid(yg / safe[..., None], bits).astype(jnp.int8).reshape(y.shape)
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
             scale_dtype=jnp.bfloat16, feedback: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
  """Rotates and quantizes head vectors x [..., H, D] (rotation [Hr, D, D], lam [Hr, D];
  optional error feedback [Hr, D, D], see `feedback_levels`)."""
  return quantize_rotated(rotate(x, rotation, lam), bits=bits, group_size=group_size,
                          scale_dtype=scale_dtype, feedback=feedback)


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
