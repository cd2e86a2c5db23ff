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

Error-feedback rounding (`feedback=F`, `kvjax.quantizer.feedback_levels`): y and
the abs-max scales are computed as above, then channels are rounded in order
0..D-1 and each rounding error e_j is passed on as y~_i -= F[j, i] e_j (i > j).
That is D dependent steps per block, each vectorized over the block's rows:
  * TPU: y is computed transposed, y^T = R xs^T [D, block_n] (a matmul contracting
    the minor dims), so that channel j is a row and the step's arithmetic runs on
    a lane-dense [1, block_n] row. Within a group the step extracts row j with a
    masked sublane sum and the column F[j, group] (needed along sublanes) with a
    masked lane sum over the [g, g] within-group block of F^T: no dynamic lane
    indexing and no SMEM. Errors of a finished group reach the later groups in
    one [D_rest, g] x [g, block_n] matmul. Levels and scales go back to rows by
    exact matmuls with the identity (levels are small integers, exact in bf16).
  * GPU (Triton): rows stay rows; step j extracts column j of y~ with a masked
    sum over the channel axis and loads row j of F per step (F is cut into the
    same 64-column chunks as the rotation).
Both rely on F being strictly upper triangular (the wrapper zeroes the rest):
then a channel's value is final once its step is reached, so the loop carries
y~ alone and levels and errors are recomputed from it after the loop.
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
# Feedback on TPU: the loop carries a [group_size, block_n] float32 block of y~ and each
# step makes a few more of that size; at 256 rows and g = 64 that is 16 vregs apiece of
# the 64, so larger tuned defaults are capped here (the D steps cost per row, not per block).
_FEEDBACK_BLOCK_N = 256


def _validate(x, rotation, lam, bits, group_size, scale_dtype, feedback=None):
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
  if feedback is not None and feedback.shape != (d, d):
    raise ValueError(f"feedback must be [D, D] = [{d}, {d}], got shape {feedback.shape}")


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
    # dequantization (codes * stored scale) is as accurate as the format allows. (XLA may drop
    # this narrowing round trip inside a fusion, so the jnp paths use quantizer.round_to_dtype;
    # Pallas has no lowering for reduce_precision, and here it lowers to explicit conversions.)
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


def _contract_minor(a, b, *, precision=None):
  """a [M, K] . b [N, K] -> [M, N] float32 (both minor dims contracted: one MXU matmul)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _feedback_kernel_tpu(x_ref, lam_ref, rot_ref, *refs, bits, group_size, num_groups,
                         scale_dtype):
  """One block of rows, error-feedback rounding, channels on sublanes (Mosaic).

  Refs:
    x_ref: [block_n, D] input vectors; lam_ref: [1, D] float32.
    rot_ref: [D, D] float32 R (not transposed: y^T = R xs^T).
    refs[:G]: [D, g] float32 slabs of F^T, slab k = F^T[:, k g : (k + 1) g]: entry [i, m] is
      the weight F[k g + m, i] with which the error of channel k g + m reaches channel i.
    refs[G]: codes out, [block_n, D/2] uint8 (4-bit) or [block_n, D] int8 (8-bit).
    refs[G+1]: scales out, [block_n, G] in `scale_dtype`.
  """
  slab_refs = refs[:num_groups]
  codes_ref, scales_ref = refs[num_groups], refs[num_groups + 1]
  g = group_size
  qmax = float(_QMAX[bits])
  highest = lax.Precision.HIGHEST

  xs = x_ref[...].astype(jnp.float32) / lam_ref[...]
  yt = _contract_minor(rot_ref[...], xs, precision=highest)           # [D, block_n]
  d, block_n = yt.shape
  blocks = [yt[k * g:(k + 1) * g] for k in range(num_groups)]         # [g, block_n] each
  # Scales from the original y, exactly as without feedback (the stored, rounded value).
  stored = [(jnp.max(jnp.abs(b), axis=0, keepdims=True) / qmax).astype(scale_dtype)
            .astype(jnp.float32) for b in blocks]                     # [1, block_n] each

  row_of = lax.broadcasted_iota(jnp.int32, (g, block_n), 0)
  col_of = lax.broadcasted_iota(jnp.int32, (g, g), 1)
  levels = []
  for k in range(num_groups):
    s = stored[k]
    inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)        # u = 0 where s == 0
    within = slab_refs[k][k * g:(k + 1) * g, :]                       # [g, g]: [i, m] = F[m, i]

    def step(jj, blk, s=s, inv=inv, within=within):
      # Channel jj of the group: a masked sublane sum picks the row (exact: one term).
      row = jnp.sum(jnp.where(row_of == jj, blk, 0.0), axis=0, keepdims=True)
      level = jnp.clip(round_to_level(row * inv, bits), -qmax, qmax)
      err = row - level * s                                             # [1, block_n]
      # F[jj, group] as a column [g, 1]: a masked lane sum, Mosaic has no dynamic lane index.
      coef = jnp.sum(jnp.where(col_of == jj, within, 0.0), axis=1, keepdims=True)
      # Rows <= jj get coefficient 0 (F is strictly upper triangular): they stay final.
      return blk - coef * err

    blk = lax.fori_loop(0, g, step, blocks[k])
    # Every row now holds the value its step rounded, so levels and errors are the same
    # expressions again, vectorized (bitwise what the steps computed).
    lev = jnp.clip(round_to_level(blk * inv, bits), -qmax, qmax)
    levels.append(lev)
    if k + 1 < num_groups:
      err = blk - lev * s                                               # [g, block_n]
      rest = jnp.dot(slab_refs[k][(k + 1) * g:, :], err, precision=highest,
                     preferred_element_type=jnp.float32)                # [D - (k+1) g, block_n]
      for k2 in range(k + 1, num_groups):
        off = (k2 - k - 1) * g
        blocks[k2] = blocks[k2] - rest[off:off + g]

  # Back to rows by matmuls with the identity: exact, the levels are integers |l| <= 127
  # (bf16 holds them) and each output sums one nonzero product.
  eye = (lax.broadcasted_iota(jnp.int32, (block_n, block_n), 0) ==
         lax.broadcasted_iota(jnp.int32, (block_n, block_n), 1))
  eye_bf16 = eye.astype(jnp.bfloat16)
  to_rows = lambda t: _contract_minor(eye_bf16, t.astype(jnp.bfloat16)).astype(jnp.int32)
  lt = jnp.concatenate(levels, axis=0)                                  # [D, block_n]
  if bits == 4:
    codes_ref[...] = _nibbles(to_rows(lt[:d // 2]), to_rows(lt[d // 2:]))
  else:
    codes_ref[...] = to_rows(lt).astype(jnp.int8)
  # Scales: one row per group, [G, block_n], transposed at full float32 precision.
  group_of = lax.broadcasted_iota(jnp.int32, (num_groups, block_n), 0)
  st = jnp.zeros((num_groups, block_n), jnp.float32)
  for k in range(num_groups):
    st = jnp.where(group_of == k, stored[k], st)
  scales_ref[...] = _contract_minor(eye.astype(jnp.float32), st,
                                    precision=highest).astype(scales_ref.dtype)


def _feedback_kernel_gpu(x_ref, lam_ref, *refs, bits, group_size, num_groups, part_offsets,
                         scale_dtype):
  """One block of rows, error-feedback rounding, channels on the minor axis (Triton).

  Refs:
    x_ref: [block_n, D]; lam_ref: [1, D] float32.
    refs[:P]: [D, W] float32 column slices of R.T (as in `_quantize_pack_kernel`).
    refs[P:2P]: [D, W] float32 column slices of F with the same offsets: row j of slice q
      is F[j, part_offsets[q] : part_offsets[q] + W].
    refs[2P]: codes out; refs[2P+1]: scales out [block_n, G].
  """
  num_parts = len(part_offsets)
  rot_refs, fb_refs = refs[:num_parts], refs[num_parts:2 * num_parts]
  codes_ref, scales_ref = refs[2 * num_parts], refs[2 * num_parts + 1]
  qmax = float(_QMAX[bits])

  x = x_ref[...].astype(jnp.float32) / lam_ref[...]
  parts = [jnp.dot(x, r[...], precision=lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32) for r in rot_refs]
  block_n, width = parts[0].shape
  scale_cols = lax.broadcasted_iota(jnp.int32, (block_n, num_groups), 1)
  scales_out = jnp.zeros((block_n, num_groups), jnp.float32)
  stored = []
  for gi in range(num_groups):
    amax = None
    for p, off in zip(parts, part_offsets):
      in_group = _lane_group_mask(p.shape, off, gi, group_size)
      part_max = jnp.max(jnp.where(in_group, jnp.abs(p), 0.0), axis=1, keepdims=True)
      amax = part_max if amax is None else jnp.maximum(amax, part_max)
    s = (amax / qmax).astype(scale_dtype).astype(jnp.float32)         # [block_n, 1]
    stored.append(s)
    scales_out = jnp.where(scale_cols == gi, s, scales_out)
  scales_ref[...] = scales_out.astype(scales_ref.dtype)

  lane = lax.broadcasted_iota(jnp.int32, (block_n, width), 1)
  codes = []
  for p, off in enumerate(part_offsets):
    # Static segments of the part that share a group (a part may hold several groups,
    # or a group may span several parts), so each loop's scale is a fixed [block_n, 1].
    inv_lanes = jnp.zeros((block_n, width), jnp.float32)
    starts = [off] + [c for c in range(off + 1, off + width) if c % group_size == 0]
    for start in starts:
      gi = start // group_size
      stop = min(off + width, (gi + 1) * group_size)
      s = stored[gi]
      inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
      inv_lanes = jnp.where((lane >= start - off) & (lane < stop - off), inv, inv_lanes)

      def step(jj, live, start=start, s=s, inv=inv, p=p, off=off):
        j = start + jj
        col = jnp.sum(jnp.where(lane == j - off, live[0], 0.0), axis=1, keepdims=True)
        level = jnp.clip(round_to_level(col * inv, bits), -qmax, qmax)
        err = col - level * s                                           # [block_n, 1]
        # Row j of F, chunk by chunk; lanes <= j get 0, so finished channels stay final.
        return tuple(v - err * fb_refs[q][pl.ds(j, 1), :]
                     for q, v in zip(range(p, num_parts), live))

      parts[p:] = lax.fori_loop(0, stop - start, step, tuple(parts[p:]))
    codes.append(jnp.clip(round_to_level(parts[p] * inv_lanes, bits),
                          -qmax, qmax).astype(jnp.int32))

  if bits == 4:
    pairs = num_parts // 2
    for i in range(pairs):
      packed = _nibbles(codes[i], codes[pairs + i])
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


def quantize_pack(x, rotation, lam, *, bits=4, group_size=32, scale_dtype=jnp.bfloat16,
                  feedback=None, block_n=None, backend=None, interpret=None):
  """Rotates, quantizes and packs rows of `x` into the cache layout, in one kernel.

  Args:
    x: [N, D] float array, N vectors (tokens x heads) of one rotation.
    rotation: [D, D] float32 orthogonal R; the stored vector is y = R @ (x / lam).
    lam: [D] float32 per-channel scale (ones unless calibrated).
    bits: 4 (split-halves nibbles) or 8 (int8).
    group_size: channels per scale, 32, 64 or 128.
    scale_dtype: storage dtype of scales (bfloat16 by default).
    feedback: None (nearest rounding) or float32 [D, D] error-feedback weights F:
      channels are rounded in order and the error e_j of channel j moves later
      channels as y~_i -= F[j, i] e_j (`kvjax.quantizer.feedback_levels`). Only the
      strictly upper triangle is read; F = 0 gives the nearest-rounding codes. The
      scales are the abs-max ones of y either way.
    block_n: rows per grid step (rounded up to a multiple of 32); None takes the
      tuned default for (backend, D) (at most `_FEEDBACK_BLOCK_N` with feedback).
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
  if feedback is not None:
    feedback = jnp.asarray(feedback, jnp.float32)
  _validate(x, rotation, lam, bits, group_size, scale_dtype, feedback)
  n, d = x.shape
  num_groups = d // group_size
  interpret = _compat.resolve_interpret(interpret)
  backend = tuning.resolve_backend(backend)
  if block_n is None:
    block_n = tuning.quantize_pack_block_n(backend, d)
    if feedback is not None:
      block_n = min(block_n, _FEEDBACK_BLOCK_N)
  if block_n < 1:
    raise ValueError(f"block_n must be positive, got {block_n}")
  # Small N (a decode step writes B*H rows) gets one block padded to the tile height.
  block_n = min(block_n, n)
  block_n = -(-block_n // _ROW_ALIGN) * _ROW_ALIGN
  padded_n = -(-n // block_n) * block_n
  if padded_n != n:
    x = jnp.pad(x, ((0, padded_n - n), (0, 0)))
  if feedback is not None:
    codes, scales = _feedback_call(x, rotation, lam, feedback, bits=bits, group_size=group_size,
                                   scale_dtype=jnp.dtype(scale_dtype), block_n=block_n,
                                   backend=backend, interpret=interpret)
    return (codes[:n], scales[:n]) if padded_n != n else (codes, scales)

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


def _feedback_call(x, rotation, lam, feedback, *, bits, group_size, scale_dtype, block_n,
                   backend, interpret):
  """The pallas_call of the error-feedback kernels; x is [padded_n, D], a multiple of block_n."""
  padded_n, d = x.shape
  num_groups = d // group_size
  # The kernels rely on F[j, i] = 0 for i <= j (see the module docstring).
  feedback = jnp.triu(feedback, 1)
  natural = d // 2 if bits == 4 else d
  codes_shape = jax.ShapeDtypeStruct((padded_n, natural), jnp.uint8 if bits == 4 else jnp.int8)
  rows = lambda i: (i, 0)
  whole = lambda i: (0, 0)
  if backend == "gpu":
    width = min(natural, _GPU_COLUMN_CHUNK)
    if natural % width:
      width = natural
    part_offsets = tuple(range(0, d, width))
    rot_t = rotation.T
    consts = ([rot_t[:, off:off + width] for off in part_offsets] +
              [feedback[:, off:off + width] for off in part_offsets])
    const_specs = [pl.BlockSpec((d, width), whole) for _ in consts]
    kernel = functools.partial(_feedback_kernel_gpu, bits=bits, group_size=group_size,
                               num_groups=num_groups, part_offsets=part_offsets,
                               scale_dtype=scale_dtype)
  else:
    f_t = feedback.T
    consts = [rotation] + [f_t[:, k * group_size:(k + 1) * group_size]
                           for k in range(num_groups)]
    const_specs = ([pl.BlockSpec((d, d), whole)] +
                   [pl.BlockSpec((d, group_size), whole) for _ in range(num_groups)])
    kernel = functools.partial(_feedback_kernel_tpu, bits=bits, group_size=group_size,
                               num_groups=num_groups, scale_dtype=scale_dtype)
  return pl.pallas_call(
      kernel,
      grid=(padded_n // block_n,),
      in_specs=[pl.BlockSpec((block_n, d), rows), pl.BlockSpec((1, d), whole)] + const_specs,
      out_specs=[pl.BlockSpec((block_n, natural), rows),
                 pl.BlockSpec((block_n, num_groups), rows)],
      out_shape=[codes_shape, jax.ShapeDtypeStruct((padded_n, num_groups), scale_dtype)],
      compiler_params=_compiler_params(backend),
      interpret=interpret,
      name=f"quantize_pack_int{bits}_g{group_size}_feedback",
  )(x, lam[None, :], *consts)


def _compiler_params(backend):
  if backend == "gpu":
    return _compat.TritonCompilerParams(num_warps=4, num_stages=1)
  return _compat.TPUCompilerParams(dimension_semantics=("parallel",))


def quantize_pack_reference(x, rotation, lam, *, bits=4, group_size=32,
                            scale_dtype=jnp.bfloat16, feedback=None):
  """Plain-jnp version of `quantize_pack` (same arguments and outputs).

  With `feedback` the levels are `kvjax.quantizer.feedback_levels` of y against the
  stored scales (the XLA path of the cache), whose summation order differs from the kernels'.
  """
  x = jnp.asarray(x)
  rotation = jnp.asarray(rotation, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  if feedback is not None:
    feedback = jnp.asarray(feedback, jnp.float32)
  _validate(x, rotation, lam, bits, group_size, scale_dtype, feedback)
  n, d = x.shape
  qmax = float(_QMAX[bits])
  y = jnp.dot(x.astype(jnp.float32) / lam, rotation.T, precision=lax.Precision.HIGHEST)
  groups = y.reshape(n, d // group_size, group_size)
  stored = quantizer.round_to_dtype(jnp.max(jnp.abs(groups), axis=-1) / qmax,
                                    scale_dtype).astype(scale_dtype)
  divisor = jnp.where(stored == 0, 1.0, stored.astype(jnp.float32))
  if feedback is None:
    # The core quantizer's rounding (jnp.round for 8-bit), not the kernel's floor-only version.
    codes = quantizer.round_to_grid(groups / divisor[..., None], bits).astype(jnp.int32)
    codes = codes.reshape(n, d)
  else:
    codes = quantizer.feedback_levels(y[:, None], stored[:, None], feedback[None], bits=bits,
                                      group_size=group_size)[:, 0].astype(jnp.int32)
  if bits == 8:
    return codes.astype(jnp.int8), stored
  return _nibbles(codes[:, : d // 2], codes[:, d // 2:]), stored
