"""Fused write kernel: rotate, scale, quantize and pack cached vectors in one pass.

For each row x (one key or value vector of one KV head) the kernel computes

    y = (x / lam) @ R.T                      (one MXU / tensor-core matmul)
    s = bf16(max|y_group| / qmax)            (per group of `group_size` channels)
    levels = round_to_level(y / s)           (s == 0 -> 1)
      4-bit: nearest odd integer in [-15, 15], 2 floor(y / 2s) + 1 (qmax = 15)
      8-bit: round half to even, clipped to [-127, 127] (qmax = 127)

and writes 4-bit levels as split-halves nibbles c = (level - 1) / 2 (byte j =
channel j in the low nibble, channel j + D/2 in the high nibble) or 8-bit codes
as int8, exactly as docs/cache_layout.md specifies. One HBM read of x, one write of codes + scales.

Why the kernel is shaped the way it is (Mosaic TPU constraints, also fine on GPU):
  * The rotation is split by columns into the two halves of the packed layout
    (R.T[:, :D/2] and R.T[:, D/2:]), so the low- and high-nibble channels come
    out of two matmuls already separated: no lane slicing at offset D/2, which
    Mosaic only handles well when D/2 is a multiple of 128. On GPU the halves
    are further cut into 64-column chunks, so that one matmul operand (D x 64
    float32) fits shared memory even at D = 256.
  * Group maxima are computed with full-width masked reductions (one per group)
    instead of a [N, G, g] reshape, which Mosaic cannot relayout for g < 128.
  * Codes are widened to int32 before shifting and packing (Mosaic cannot shift
    int8 vectors) and narrowed to uint8 / int8 once at the store.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kvjax import quantizer
from kvjax.pallas_kernels import _compat
from kvjax.pallas_kernels import tuning

_QMAX = {4: 15, 8: 127}  # largest level (4-bit levels are the odd integers -15..15)
# 8-bit outputs use (32, 128) tiles on TPU, so row blocks are multiples of 32.
_ROW_ALIGN = 32
# GPU: rotation columns per matmul, so that a [D, chunk] float32 operand stays
# well inside shared memory (64 KiB at D = 256).
_GPU_COLUMN_CHUNK = 64


def _validate(x, rotation, lam, bits, group_size, scale_dtype):
  if x.ndim != 2:
    raise ValueError(f"x must be [N, D], got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
  n, d = x.shape
  if rotation.shape != (d, d):
    raise ValueError(f"rotation must be [D, D] = [{d}, {d}], got shape {rotation.shape}")
  if lam.shape != (d,):
    raise ValueError(f"lam must be [D] = [{d}], got shape {lam.shape}")
  if bits not in _QMAX:
    raise ValueError(f"bits must be 4 or 8, got {bits!r}")
  if group_size not in (32, 64, 128):
    raise ValueError(f"group_size must be 32, 64 or 128, got {group_size!r}")
  if d % group_size:
    raise ValueError(f"head_dim D={d} must be a multiple of group_size={group_size}")
  if bits == 4 and d % 2:
    raise ValueError(f"4-bit packing needs an even head_dim, got D={d}")
  if jnp.dtype(scale_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                    jnp.dtype(jnp.float32)):
    raise TypeError(f"scale_dtype must be bfloat16, float16 or float32, got {scale_dtype}")


def _lane_group_mask(shape, channel_offset, group_index, group_size):
  """Boolean [rows, width] mask of lanes whose channel (lane + offset) is in the group."""
  channel = lax.broadcasted_iota(jnp.int32, shape, 1) + channel_offset
  start = group_index * group_size
  return (channel >= start) & (channel < start + group_size)


def round_half_even(v):
  """Rounds to the nearest integer, ties to even, from floor and compares only.

  Same result as `jnp.round` for |v| < 2**22; written out because Triton has no
  lowering for `lax.round_p`, and the TPU and GPU kernels must agree bit for bit.
  """
  below = jnp.floor(v)
  frac = v - below  # exact: below <= v < below + 1
  below_is_odd = (below - 2.0 * jnp.floor(below * 0.5)) != 0.0
  round_up = (frac > 0.5) | ((frac == 0.5) & below_is_odd)
  return jnp.where(round_up, below + 1.0, below)


def round_to_level(v, bits):
  """Nearest level of the `bits`-bit grid (unclipped): odd integers for 4-bit, else integers."""
  if bits == 4:
    return 2.0 * jnp.floor(v * 0.5) + 1.0
  return round_half_even(v)


def _nibbles(low, high):
  """int32 odd levels of the two halves -> packed uint8 bytes (nibble = level >> 1)."""
  return (((low >> 1) & 0xF) | (((high >> 1) & 0xF) << 4)).astype(jnp.uint8)


def _quantize_pack_kernel(x_ref, lam_ref, *refs, bits, group_size, num_groups, part_offsets,
                          scale_dtype):
  """One block of rows.

  Refs:
    x_ref: [block_n, D] input vectors (any float dtype).
    lam_ref: [1, D] float32 per-channel scale.
    refs[:P]: [D, W] float32 column slices of R.T, one per output part: channels
      [part_offsets[i], part_offsets[i] + W). 4-bit: the first P/2 parts tile the
      low-nibble half, the last P/2 the high-nibble half.
    refs[P]: codes out, [block_n, D/2] uint8 (4-bit) or [block_n, D] int8 (8-bit).
    refs[P+1]: scales out, [block_n, G] in `scale_dtype`.
  """
  num_parts = len(part_offsets)
  rot_refs = refs[:num_parts]
  codes_ref, scales_ref = refs[num_parts], refs[num_parts + 1]
  qmax = float(_QMAX[bits])

  x = x_ref[...].astype(jnp.float32) / lam_ref[...]
  parts = [jnp.dot(x, r[...], precision=lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32) for r in rot_refs]

  block_n = x.shape[0]
  scale_cols = lax.broadcasted_iota(jnp.int32, (block_n, num_groups), 1)
  scales_out = jnp.zeros((block_n, num_groups), jnp.float32)
  divisors = [jnp.zeros_like(p) for p in parts]
  for gi in range(num_groups):
    amax = None
    for p, off in zip(parts, part_offsets):
      in_group = _lane_group_mask(p.shape, off, gi, group_size)
      part_max = jnp.max(jnp.where(in_group, jnp.abs(p), 0.0), axis=1, keepdims=True)
      amax = part_max if amax is None else jnp.maximum(amax, part_max)
    # The stored scale is the rounded one; codes are computed against it so that
    # dequantization (codes * stored scale) is as accurate as the format allows.
    stored = (amax / qmax).astype(scale_dtype).astype(jnp.float32)  # [block_n, 1]
    scales_out = jnp.where(scale_cols == gi, stored, scales_out)
    divisor = jnp.where(stored == 0.0, 1.0, stored)
    divisors = [jnp.where(_lane_group_mask(p.shape, off, gi, group_size), divisor, dv)
                for p, off, dv in zip(parts, part_offsets, divisors)]

  codes = [jnp.clip(round_to_level(p / dv, bits), -qmax, qmax).astype(jnp.int32)
           for p, dv in zip(parts, divisors)]
  width = parts[0].shape[1]
  if bits == 4:
    pairs = num_parts // 2  # low-half part i and high-half part i share bytes
    for i in range(pairs):
      low, high = codes[i], codes[pairs + i]
      packed = _nibbles(low, high)
      if pairs == 1:
        codes_ref[...] = packed
      else:
        codes_ref[:, pl.ds(part_offsets[i], width)] = packed
  else:
    for i, code in enumerate(codes):
      if num_parts == 1:
        codes_ref[...] = code.astype(jnp.int8)
      else:
        codes_ref[:, pl.ds(part_offsets[i], width)] = code.astype(jnp.int8)
  scales_ref[...] = scales_out.astype(scales_ref.dtype)


def quantize_pack(x, rotation, lam, *, bits=4, group_size=32, scale_dtype=jnp.bfloat16,
                  block_n=None, backend=None, interpret=None):
  """Rotates, quantizes and packs rows of `x` into the cache layout, in one kernel.

  Args:
    x: [N, D] float array, N vectors (tokens x heads) of one rotation.
    rotation: [D, D] float32 orthogonal R; the stored vector is y = R @ (x / lam).
    lam: [D] float32 per-channel scale (ones unless calibrated).
    bits: 4 (split-halves nibbles) or 8 (int8).
    group_size: channels per scale, 32, 64 or 128.
    scale_dtype: storage dtype of scales (bfloat16 by default).
    block_n: rows per grid step (rounded up to a multiple of 32); None takes the
      tuned default for (backend, D).
    backend: "tpu" (Mosaic) or "gpu" (Triton); None picks from
      `jax.default_backend()` (the TPU variant when interpreting on the CPU).
    interpret: run the Pallas interpreter; None means "on CPU only". A
      `pltpu.InterpretParams` object selects TPU-semantics interpretation.

  Returns:
    (codes, scales): codes [N, D//2] uint8 (4-bit) or [N, D] int8 (8-bit);
    scales [N, D // group_size] in `scale_dtype`.
  """
  x = jnp.asarray(x)
  rotation = jnp.asarray(rotation, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  _validate(x, rotation, lam, bits, group_size, scale_dtype)
  n, d = x.shape
  num_groups = d // group_size
  interpret = _compat.resolve_interpret(interpret)
  backend = tuning.resolve_backend(backend)
  if block_n is None:
    block_n = tuning.quantize_pack_block_n(backend, d)
  if block_n < 1:
    raise ValueError(f"block_n must be positive, got {block_n}")
  # Small N (a decode step writes B*H rows) gets one block padded to the tile height.
  block_n = min(block_n, n)
  block_n = -(-block_n // _ROW_ALIGN) * _ROW_ALIGN
  padded_n = -(-n // block_n) * block_n
  if padded_n != n:
    x = jnp.pad(x, ((0, padded_n - n), (0, 0)))

  rot_t = rotation.T
  natural = d // 2 if bits == 4 else d  # one part per nibble half (int8: one part)
  width = min(natural, _GPU_COLUMN_CHUNK) if backend == "gpu" else natural
  if natural % width:
    width = natural
  part_offsets = tuple(range(0, d, width))  # 4-bit: low-half chunks, then high-half chunks
  rot_parts = [rot_t[:, off:off + width] for off in part_offsets]
  codes_shape = jax.ShapeDtypeStruct((padded_n, natural),
                                     jnp.uint8 if bits == 4 else jnp.int8)

  kernel = functools.partial(_quantize_pack_kernel, bits=bits, group_size=group_size,
                             num_groups=num_groups, part_offsets=part_offsets,
                             scale_dtype=jnp.dtype(scale_dtype))
  rows = lambda i: (i, 0)
  whole = lambda i: (0, 0)
  codes, scales = pl.pallas_call(
      kernel,
      grid=(padded_n // block_n,),
      in_specs=[pl.BlockSpec((block_n, d), rows),
                pl.BlockSpec((1, d), whole)] +
               [pl.BlockSpec((d, width), whole) for _ in rot_parts],
      out_specs=[pl.BlockSpec((block_n, codes_shape.shape[1]), rows),
                 pl.BlockSpec((block_n, num_groups), rows)],
      out_shape=[codes_shape,
                 jax.ShapeDtypeStruct((padded_n, num_groups), jnp.dtype(scale_dtype))],
      compiler_params=_compiler_params(backend),
      interpret=interpret,
      name=f"quantize_pack_int{bits}_g{group_size}",
  )(x, lam[None, :], *rot_parts)
  if padded_n != n:
    codes, scales = codes[:n], scales[:n]
  return codes, scales


def _compiler_params(backend):
  if backend == "gpu":
    return _compat.TritonCompilerParams(num_warps=4, num_stages=1)
  return _compat.TPUCompilerParams(dimension_semantics=("parallel",))


def quantize_pack_reference(x, rotation, lam, *, bits=4, group_size=32,
                            scale_dtype=jnp.bfloat16):
  """Plain-jnp version of `quantize_pack` (same arguments and outputs)."""
  x = jnp.asarray(x)
  rotation = jnp.asarray(rotation, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  _validate(x, rotation, lam, bits, group_size, scale_dtype)
  n, d = x.shape
  qmax = float(_QMAX[bits])
  y = jnp.dot(x.astype(jnp.float32) / lam, rotation.T, precision=lax.Precision.HIGHEST)
  groups = y.reshape(n, d // group_size, group_size)
  stored = (jnp.max(jnp.abs(groups), axis=-1) / qmax).astype(scale_dtype)
  divisor = jnp.where(stored == 0, 1.0, stored.astype(jnp.float32))
  # The core quantizer's rounding (jnp.round for 8-bit), not the kernel's floor-only version.
  codes = quantizer.round_to_grid(groups / divisor[..., None], bits).astype(jnp.int32)
  codes = codes.reshape(n, d)
  if bits == 8:
    return codes.astype(jnp.int8), stored
  return _nibbles(codes[:, : d // 2], codes[:, d // 2:]), stored
