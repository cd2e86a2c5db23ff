"""Fused int4/int8 decode attention for NVIDIA GPUs (Pallas -> Triton).

Backend choice: Triton (`pallas.triton.CompilerParams`), not Mosaic GPU.
  * Decode attention is a bandwidth kernel: per block a program loads a few KB of
    codes and scales and does small matmuls ([16, g] x [g, block_s]). Triton's
    pointer-style loads, masked loads for the ragged tail and automatic software
    pipelining (`num_stages`) fit that directly, and it runs on every CUDA GPU
    from Ampere on (and on ROCm), where users of this library decode.
  * Mosaic GPU targets Hopper/Blackwell warpgroup programming (TMA, wgmma,
    explicit barriers): more control for large compute-bound tiles, but sm90+
    only and far more code for a kernel whose matmuls are tiny; there is no gain
    to take in a memory-bound loop that Triton already pipelines.

Grid: (batch, kv_head, split). Each program owns one contiguous slot range of
one sequence (split-K / flash decoding) and loops over it `block_s` slots at a
time with a dynamic trip count, so blocks past a sequence's length are never
loaded. The n_rep query heads of the KV head are processed together (rows of
the matmuls, padded to 16 for the tensor cores).

Per block and per scale group j (g channels, contiguous in the split-halves
layout: low nibbles of bytes [j*g, (j+1)*g) for the first half of the channels,
high nibbles for the second):
  scores += s[:, j] * (q~_j . codes_j^T)          keys, no dequantized K
  acc_j  += (p * s_v[:, j]) . codes_j              values, scale folded into p
Codes are exact in bfloat16, so every matmul runs on bf16 tensor cores; the f32
operand (q~ or p * s) is split into bf16 high and low parts (two matmuls), which
keeps about 16 bits of mantissa, far below the 4-bit quantization error, without
tf32 rounding of q~.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kvjax.pallas_kernels import _common
from kvjax.pallas_kernels import _compat
from kvjax.pallas_kernels import tuning

# Triton's tensor-core matmuls need every dimension >= 16.
_MIN_DOT_DIM = 16


def group_segments(head_dim, group_size, bits):
  """Where each scale group's codes live in a packed row.

  Returns one tuple per group j: segments (nibble, byte_start, width,
  channel_start), nibble in {"low", "high", None (int8)}. A group lies in one
  half of the split-halves layout unless group_size > D/2 (then it is both halves).
  """
  half = head_dim // 2
  groups = []
  for j in range(head_dim // group_size):
    start, stop = j * group_size, (j + 1) * group_size
    if bits == 8:
      groups.append((("none", start, group_size, start),))
      continue
    segments = []
    if start < half:
      segments.append(("low", start, min(stop, half) - start, start))
    if stop > half:
      lo = max(start, half)
      segments.append(("high", lo - half, stop - lo, lo))
    groups.append(tuple(segments))
  return tuple(groups)


def _load_codes(ref, rows, valid_rows, nibble, byte_start, width):
  """[block_s, width] codes as bfloat16 (exact), rows past S read as 0."""
  raw = _compat.pltriton.load(ref.at[rows, pl.ds(byte_start, width)],
                              mask=valid_rows[:, None], other=0)
  widened = raw.astype(jnp.int32)
  if nibble == "low":
    widened = (widened << 28) >> 28
  elif nibble == "high":
    widened = (widened << 24) >> 28
  return widened.astype(jnp.float32).astype(jnp.bfloat16)


def _split_bf16(x):
  high = x.astype(jnp.bfloat16)
  low = (x - high.astype(jnp.float32)).astype(jnp.bfloat16)
  return high, low


def _dot_f32_codes(x_parts, codes, contract_codes_dim):
  """(x_high + x_low) . codes with bf16 tensor-core matmuls and f32 accumulation."""
  dims = (((1,), (contract_codes_dim,)), ((), ()))
  out = None
  for part in x_parts:
    term = lax.dot_general(part, codes, dims, preferred_element_type=jnp.float32)
    out = term if out is None else out + term
  return out


def _decode_kernel(
    q_ref,  # [R, D] float32: scaled q~ of the KV head's R query heads
    k_codes_ref,  # [S, D/2] uint8 | [S, D] int8
    k_scales_ref,  # [S, G]
    v_codes_ref,  # [S, D/2] uint8 | [S, D] int8
    v_scales_ref,  # [S, G]
    lengths_ref, lo_ref, hi_ref, base_ref, write_ref,  # [B] int32 each
    acc_out_ref,  # [R, D] float32
    m_out_ref,  # [R] float32
    l_out_ref,  # [R] float32
    *, rows_pad, key_groups, value_groups, block_s, split_slots, capacity, window, softcap):
  b = pl.program_id(0)
  split = pl.program_id(2)
  length = lengths_ref[b]
  base, write = base_ref[b], write_ref[b]
  slot_lo = jnp.maximum(lo_ref[b], split * split_slots)
  slot_hi = jnp.minimum(hi_ref[b], (split + 1) * split_slots)
  first_block = lax.div(slot_lo, block_s)
  end_block = jnp.where(slot_hi > slot_lo, lax.div(slot_hi + block_s - 1, block_s), first_block)

  # The R query heads are padded to rows_pad >= 16 matmul rows in registers only:
  # masked loads and stores never touch memory for the padding rows.
  n_rep = q_ref.shape[0]
  real_rows = jnp.arange(rows_pad) < n_rep
  q_segments = {}
  for segments in key_groups:
    for _, _, width, channel in segments:
      q_tile = _compat.pltriton.load(q_ref.at[pl.ds(0, rows_pad), pl.ds(channel, width)],
                                     mask=real_rows[:, None], other=0.0)
      q_segments[channel] = _split_bf16(q_tile)

  def body(block, carry):
    m_prev, l_prev, accs = carry
    start = block * block_s
    slots = start + jnp.arange(block_s, dtype=jnp.int32)
    rows = pl.ds(start, block_s)
    in_cache = slots < capacity
    scores = jnp.zeros((rows_pad, block_s), jnp.float32)
    for j, segments in enumerate(key_groups):
      partial = None
      for nibble, byte_start, width, channel in segments:
        codes = _load_codes(k_codes_ref, rows, in_cache, nibble, byte_start, width)
        term = _dot_f32_codes(q_segments[channel], codes, contract_codes_dim=1)
        partial = term if partial is None else partial + term
      group_scale = _compat.pltriton.load(k_scales_ref.at[rows, jnp.int32(j)], mask=in_cache, other=0)
      scores += partial * group_scale.astype(jnp.float32)[None, :]
    if softcap is not None:
      scores = softcap * jnp.tanh(scores / softcap)
    visible = _common.slot_visible(slots, length, base, write, capacity, window)[None, :]
    scores = jnp.where(visible, scores, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1))
    probs = jnp.exp(scores - m_next[:, None])  # exactly 0 where masked
    correction = jnp.exp(m_prev - m_next)
    l_next = correction * l_prev + jnp.sum(probs, axis=1)
    new_accs = []
    acc_iter = iter(accs)
    for j, segments in enumerate(value_groups):
      group_scale = _compat.pltriton.load(v_scales_ref.at[rows, jnp.int32(j)], mask=in_cache, other=0)
      # Invisible slots may hold stale or never-written scales (even NaN).
      weighted = jnp.where(visible, probs * group_scale.astype(jnp.float32)[None, :], 0.0)
      weighted_parts = _split_bf16(weighted)
      for nibble, byte_start, width, _ in segments:
        codes = _load_codes(v_codes_ref, rows, in_cache, nibble, byte_start, width)
        new_accs.append(correction[:, None] * next(acc_iter) +
                        _dot_f32_codes(weighted_parts, codes, contract_codes_dim=0))
    return m_next, l_next, tuple(new_accs)

  init_accs = tuple(jnp.zeros((rows_pad, width), jnp.float32)
                    for segments in value_groups for _, _, width, _ in segments)
  m0 = jnp.full((rows_pad,), _common.NO_SCORE_YET, jnp.float32)
  l0 = jnp.zeros((rows_pad,), jnp.float32)
  m, l, accs = lax.fori_loop(first_block, end_block, body, (m0, l0, init_accs))
  store = _compat.pltriton.store
  store(m_out_ref.at[pl.ds(0, rows_pad)], m, mask=real_rows)
  store(l_out_ref.at[pl.ds(0, rows_pad)], l, mask=real_rows)
  acc_iter = iter(accs)
  for segments in value_groups:
    for _, _, width, channel in segments:
      store(acc_out_ref.at[pl.ds(0, rows_pad), pl.ds(channel, width)], next(acc_iter),
            mask=real_rows[:, None])


def decode_attention_gpu(q_rot, k_codes, k_scales, v_codes, v_scales, lengths, *, key_bits=4,
                         value_bits=4, group_size=32, ring=False, window=None, scale=None,
                         softcap=None, block_s=None, num_splits=None, num_warps=4, num_stages=2,
                         interpret=None):
  """Decode attention over a quantized cache with the Triton GPU kernel.

  Arguments and result as `decode_attention_reference` ([B, Hq, D] float32 in the
  rotated value domain). Tuning: `block_s` slots per loop step (a power of two
  >= 16), `num_splits` split-K factor (None: `tuning` heuristics), Triton's
  `num_warps` and `num_stages`. head_dim must be a power of two (Triton tiles).
  """
  shapes = _common.validate_decode_inputs(q_rot, k_codes, k_scales, v_codes, v_scales, lengths,
                                          key_bits=key_bits, value_bits=value_bits,
                                          group_size=group_size, ring=ring, window=window,
                                          softcap=softcap)
  interpret = _compat.resolve_interpret(interpret)
  scale = _common.default_scale(shapes.head_dim, scale)
  b, h, s, d = shapes.batch, shapes.kv_heads, shapes.capacity, shapes.head_dim
  n_rep = shapes.n_rep
  if d & (d - 1):
    raise ValueError(f"the GPU kernel needs a power-of-two head_dim (Triton tiles), got {d}")
  if block_s is None:
    block_s = tuning.decode_block_s("gpu", d)
  if block_s < _MIN_DOT_DIM or block_s & (block_s - 1):
    raise ValueError(f"block_s must be a power of two >= {_MIN_DOT_DIM}, got {block_s}")
  num_blocks = pl.cdiv(s, block_s)
  if num_splits is None:
    num_splits = tuning.default_num_splits("gpu", b, h, num_blocks, block_s)
  if num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}")
  num_splits = min(num_splits, num_blocks)
  split_slots = pl.cdiv(num_blocks, num_splits) * block_s

  rows_pad = max(_MIN_DOT_DIM, pl.next_power_of_2(n_rep))
  q = (q_rot.astype(jnp.float32) * scale).reshape(b, h, n_rep, d)
  lo, hi, base, write = _common.slot_bounds(lengths, s, ring=ring, window=window)

  kernel = functools.partial(
      _decode_kernel, rows_pad=rows_pad, key_groups=group_segments(d, group_size, key_bits),
      value_groups=group_segments(d, group_size, value_bits), block_s=block_s,
      split_slots=split_slots, capacity=s, window=window,
      softcap=None if softcap is None else float(softcap))
  per_head = lambda bi, hi_, split: (bi, hi_, 0, 0)
  per_split = lambda bi, hi_, split: (bi, hi_, split, 0)
  whole = lambda bi, hi_, split: (0,)
  g = shapes.key_groups
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(b, h, num_splits),
      in_specs=[
          pl.BlockSpec((None, None, n_rep, d), per_head),
          pl.BlockSpec((None, None, s, k_codes.shape[-1]), per_head),
          pl.BlockSpec((None, None, s, g), per_head),
          pl.BlockSpec((None, None, s, v_codes.shape[-1]), per_head),
          pl.BlockSpec((None, None, s, g), per_head),
      ] + [pl.BlockSpec((b,), whole)] * 5,
      out_specs=[
          pl.BlockSpec((None, None, None, n_rep, d), lambda bi, hi_, sp: (bi, hi_, sp, 0, 0)),
          pl.BlockSpec((None, None, None, n_rep), per_split),
          pl.BlockSpec((None, None, None, n_rep), per_split),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((b, h, num_splits, n_rep, d), jnp.float32),
          jax.ShapeDtypeStruct((b, h, num_splits, n_rep), jnp.float32),
          jax.ShapeDtypeStruct((b, h, num_splits, n_rep), jnp.float32),
      ],
      compiler_params=_compat.TritonCompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"decode_attention_k{key_bits}v{value_bits}_g{group_size}",
  )(q, k_codes, k_scales, v_codes, v_scales, lengths.astype(jnp.int32), lo, hi, base, write)
  out = _common.combine_splits(m, l, acc)
  return out.reshape(b, shapes.q_heads, d)
