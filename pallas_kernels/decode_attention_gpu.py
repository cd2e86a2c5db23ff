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

Per block, each code byte is loaded once: a [block_s, w] byte tile (w = min(g, D/2))
holds in its low nibbles the channels of one scale group from the first half of
the split-halves layout and in its high nibbles a group from the second half
(8-bit: one group per tile). For each group j:
  scores += s[:, j] * (q~_j . codes_j^T)          keys, no dequantized K
  acc_j  += (p * s_v[:, j]) . codes_j              values, scale folded into p
Codes are exact in bfloat16, so every matmul runs on bf16 tensor cores; the f32
operand (q~ or p * s) is split into bf16 high and low parts (two matmuls), which
keeps about 16 bits of mantissa, far below the 4-bit quantization error, without
tf32 rounding of q~.

Rotary logit offsets (optional, `rope_coef`/`rope_freq`): the [R, 2P] coefficients
are loaded once per program as 2P columns of rows_pad values and the P
frequencies as scalars. Per block, for each pair p (a static loop: P need not be
a power of two, and a [*, P] matmul would need P >= 16), the kernel takes cos and
sin of float32(position) * w_p over the block's slots (libdevice `__nv_cosf` /
`__nv_sinf`, full-range argument reduction) and adds the two outer products
coef[:, p] x cos + coef[:, P + p] x sin to the scores, in float32 on the CUDA cores.
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


def code_tiles(head_dim, group_size, bits):
  """How the kernel walks a packed row: byte tiles, each loaded once per block.

  Returns tuples (byte_start, width, nibbles), nibbles a tuple of (nibble, group,
  channel_start) with nibble in {"low", "high", "none" (int8)}: the tile's low
  nibbles are channels [byte_start, byte_start + width) and its high nibbles
  channels [D/2 + byte_start, ...), each inside one scale group.
  """
  if bits == 8:
    return tuple((start, group_size, (("none", start // group_size, start),))
                 for start in range(0, head_dim, group_size))
  half = head_dim // 2
  width = min(group_size, half)
  return tuple((start, width, (("low", start // group_size, start),
                               ("high", (half + start) // group_size, half + start)))
               for start in range(0, half, width))


def _load_tile(at, rows, valid_rows, byte_start, width):
  """[block_s, width] code bytes widened to int32; rows past S read as 0. `at(*index)` is the
  cache ref indexed (one indexer: Triton lowers no chained `.at`)."""
  raw = _compat.pltriton.load(at(rows, pl.ds(byte_start, width)),
                              mask=valid_rows[:, None], other=0)
  return raw.astype(jnp.int32)


def _codes(widened, nibble):
  """int32 code bytes -> bfloat16 levels (exact) of one nibble half (or int8 codes).

  A 4-bit nibble c holds the odd level 2c + 1.
  """
  if nibble == "low":
    widened = ((widened << 28) >> 28) * 2 + 1
  elif nibble == "high":
    widened = ((widened << 24) >> 28) * 2 + 1
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
    q_ref,  # [R, D] q~ of the KV head's R query heads
    k_codes_ref,  # [S, D/2] uint8 | [S, D] int8
    k_scales_ref,  # [S, G]
    v_codes_ref,  # [S, D/2] uint8 | [S, D] int8
    v_scales_ref,  # [S, G]
    lengths_ref, lo_ref, hi_ref, base_ref, write_ref,  # [B] int32 each
    *refs,  # [table_ref [P] int32,] [offset_ref [R] float32,]
    #        [coef_ref [R, 2P], freq_ref [P] float32,]
    #        acc_out_ref [R, D], m_out_ref [R], l_out_ref [R],
    #        [lse_out_ref [R, split_slots / lse_block]]
    rows_pad, key_tiles, value_tiles, block_s, split_slots, capacity, window, softcap,
    scale, has_offset, rope_pairs, lse_block, paged=False):
  # Paged: the four cache refs are the KV head's whole pool [num_pages, page, ...] and block i
  # of the sequence is page table_ref[i] (block_s == page size).
  table_ref = None
  if paged:
    table_ref, refs = refs[0], refs[1:]
  offset_ref = coef_ref = freq_ref = None
  if has_offset:
    offset_ref, refs = refs[0], refs[1:]
  if rope_pairs:
    coef_ref, freq_ref, refs = refs[0], refs[1], refs[2:]
  lse_out_ref = None
  if lse_block:
    refs, lse_out_ref = refs[:-1], refs[-1]
  acc_out_ref, m_out_ref, l_out_ref = refs
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
  for _, width, nibbles in key_tiles:
    for _, _, channel in nibbles:
      q_tile = _compat.pltriton.load(q_ref.at[pl.ds(0, rows_pad), pl.ds(channel, width)],
                                     mask=real_rows[:, None], other=0.0)
      q_segments[channel] = _split_bf16(q_tile.astype(jnp.float32) * scale)
  offset = None
  if offset_ref is not None:
    offset = _compat.pltriton.load(offset_ref.at[pl.ds(0, rows_pad)], mask=real_rows,
                                   other=0.0)
  rope_terms = []  # per pair p: (frequency, cos coefficients [rows_pad], sin coefficients)
  for p in range(rope_pairs):
    columns = [_compat.pltriton.load(coef_ref.at[pl.ds(0, rows_pad), jnp.int32(col)],
                                     mask=real_rows, other=0.0) for col in (p, rope_pairs + p)]
    rope_terms.append((freq_ref[p], *columns))

  per_block = block_s // lse_block if lse_block else 0
  if lse_out_ref is not None:
    # Blocks of the split this program never visits (past the length, outside the window)
    # read -inf; the loop below overwrites the visited ones.
    def clear(i, carry):
      _compat.pltriton.store(
          lse_out_ref.at[pl.ds(0, rows_pad), pl.ds(i * per_block, per_block)],
          jnp.full((rows_pad, per_block), -jnp.inf, jnp.float32), mask=real_rows[:, None])
      return carry
    lax.fori_loop(0, split_slots // block_s, clear, 0)

  def body(block, carry):
    m_prev, l_prev, accs = carry
    start = block * block_s
    slots = start + jnp.arange(block_s, dtype=jnp.int32)
    in_cache = slots < capacity
    if table_ref is None:
      rows = pl.ds(start, block_s)
      k_codes, k_scales, v_codes, v_scales = (
          (lambda *index, ref=ref: ref.at[index])
          for ref in (k_codes_ref, k_scales_ref, v_codes_ref, v_scales_ref))
    else:  # the block is one page, read where it lies in the pool
      page = table_ref[block]
      rows = pl.ds(0, block_s)
      k_codes, k_scales, v_codes, v_scales = (
          (lambda *index, ref=ref: ref.at[(page,) + index])
          for ref in (k_codes_ref, k_scales_ref, v_codes_ref, v_scales_ref))
    partials = {}  # scale group -> [rows_pad, block_s] unscaled partial dots
    for byte_start, width, nibbles in key_tiles:
      tile = _load_tile(k_codes, rows, in_cache, byte_start, width)
      for nibble, group, channel in nibbles:
        term = _dot_f32_codes(q_segments[channel], _codes(tile, nibble), contract_codes_dim=1)
        partials[group] = term if group not in partials else partials[group] + term
    scores = jnp.zeros((rows_pad, block_s), jnp.float32)
    for group, partial in sorted(partials.items()):
      group_scale = _compat.pltriton.load(k_scales(rows, jnp.int32(group)),
                                          mask=in_cache, other=0)
      scores += partial * group_scale.astype(jnp.float32)[None, :]
    if offset is not None:
      scores = scores + offset[:, None]
    if rope_terms:
      position = _common.slot_position(slots, base, write, capacity)  # [block_s]
      for freq, coef_cos, coef_sin in rope_terms:
        angle = _common.rope_angles(position, freq)
        scores += (coef_cos[:, None] * jnp.cos(angle)[None, :] +
                   coef_sin[:, None] * jnp.sin(angle)[None, :])
    if softcap is not None:
      scores = softcap * jnp.tanh(scores / softcap)
    visible = _common.slot_visible(slots, length, base, write, capacity, window)[None, :]
    scores = jnp.where(visible, scores, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1))
    probs = jnp.exp(scores - m_next[:, None])  # exactly 0 where masked
    correction = jnp.exp(m_prev - m_next)
    l_next = correction * l_prev + jnp.sum(probs, axis=1)
    if lse_out_ref is not None:
      # Per block of lse_block slots, log-domain against this step's running max.
      sums = jnp.sum(probs.reshape(rows_pad, per_block, lse_block), axis=2)
      offset_in_split = lax.div(start - split * split_slots, lse_block)
      _compat.pltriton.store(
          lse_out_ref.at[pl.ds(0, rows_pad), pl.ds(offset_in_split, per_block)],
          m_next[:, None] + jnp.log(sums), mask=real_rows[:, None])
    weighted = {}  # scale group -> bf16 (high, low) parts of p * s_v[:, group]
    for _, _, nibbles in value_tiles:
      for _, group, _ in nibbles:
        if group in weighted:
          continue
        group_scale = _compat.pltriton.load(v_scales(rows, jnp.int32(group)),
                                            mask=in_cache, other=0)
        # Invisible slots may hold stale or never-written scales (even NaN).
        weighted[group] = _split_bf16(
            jnp.where(visible, probs * group_scale.astype(jnp.float32)[None, :], 0.0))
    new_accs = []
    acc_iter = iter(accs)
    for byte_start, width, nibbles in value_tiles:
      tile = _load_tile(v_codes, rows, in_cache, byte_start, width)
      for nibble, group, _ in nibbles:
        new_accs.append(correction[:, None] * next(acc_iter) + _dot_f32_codes(
            weighted[group], _codes(tile, nibble), contract_codes_dim=0))
    return m_next, l_next, tuple(new_accs)

  init_accs = tuple(jnp.zeros((rows_pad, width), jnp.float32)
                    for _, width, nibbles in value_tiles for _ in nibbles)
  m0 = jnp.full((rows_pad,), _common.NO_SCORE_YET, jnp.float32)
  l0 = jnp.zeros((rows_pad,), jnp.float32)
  m, l, accs = lax.fori_loop(first_block, end_block, body, (m0, l0, init_accs))
  store = _compat.pltriton.store
  store(m_out_ref.at[pl.ds(0, rows_pad)], m, mask=real_rows)
  store(l_out_ref.at[pl.ds(0, rows_pad)], l, mask=real_rows)
  acc_iter = iter(accs)
  for _, width, nibbles in value_tiles:
    for _, _, channel in nibbles:
      store(acc_out_ref.at[pl.ds(0, rows_pad), pl.ds(channel, width)], next(acc_iter),
            mask=real_rows[:, None])


def decode_attention_gpu(q_rot, k_codes, k_scales, v_codes, v_scales, lengths, *, key_bits=4,
                         value_bits=4, group_size=32, ring=False, window=None, scale=None,
                         softcap=None, logit_offset=None, rope_coef=None, rope_freq=None,
                         sink_logit=None, sink_value=None, recent_values=None, block_s=None, num_splits=None,
                         num_warps=4, num_stages=2, block_logsumexp=None, interpret=None,
                         page_table=None):
  """Decode attention over a quantized cache with the Triton GPU kernel.

  Arguments and result as `decode_attention_reference` ([B, Hq, D] float32 in the
  rotated value domain; with `block_logsumexp`, also the per-block log-sum-exp of the logits,
  computed in the same pass). Tuning: `block_s` slots per loop step (a power of two
  >= 16), `num_splits` split-K factor (None: `tuning` heuristics), Triton's
  `num_warps` and `num_stages`. head_dim must be a power of two (Triton tiles).

  Paged caches: with `page_table` int32 [B, P] the codes and scales are a page pool
  [num_pages, H, page_size, ...] (`kvjax.paged`); each program reads its sequence's table row
  and loads block i from page table[i] in place (block_s = page_size, a power of two >= 16).
  Not with `ring` or `block_logsumexp`.
  """
  paged = page_table is not None
  logical, block_s = _common.cache_operands(page_table, k_codes, k_scales, v_codes, v_scales,
                                            ring=ring, block_s=block_s,
                                            block_logsumexp=block_logsumexp)
  shapes = _common.validate_decode_inputs(q_rot, *logical, lengths,
                                          key_bits=key_bits, value_bits=value_bits,
                                          group_size=group_size, ring=ring, window=window,
                                          softcap=softcap)
  interpret = _compat.resolve_interpret(interpret)
  scale = _common.default_scale(shapes.head_dim, scale)
  b, h, s, d = shapes.batch, shapes.kv_heads, shapes.capacity, shapes.head_dim
  n_rep = shapes.n_rep
  logit_offset = _common.validate_logit_offset(logit_offset, b, shapes.q_heads)
  rope_coef, rope_freq = _common.validate_rope(rope_coef, rope_freq, b, shapes.q_heads)
  rope_pairs = 0 if rope_freq is None else rope_freq.shape[0]
  sink_logit = _common.validate_sink_logit(sink_logit, b, shapes.q_heads)
  sink_value = _common.validate_value_delta(sink_value, b, shapes.kv_heads, shapes.head_dim,
                                            name="sink_value")
  recent_values = _common.validate_recent_values(recent_values, b, shapes.kv_heads,
                                                 shapes.head_dim)
  if d & (d - 1):
    raise ValueError(f"the GPU kernel needs a power-of-two head_dim (Triton tiles), got {d}")
  if block_s is None:
    block_s = tuning.decode_block_s("gpu", d)
  if block_s < _MIN_DOT_DIM or block_s & (block_s - 1):
    what = "page_size" if paged else "block_s"
    raise ValueError(f"{what} must be a power of two >= {_MIN_DOT_DIM}, got {block_s}")
  lse_block = block_logsumexp
  if lse_block is not None:
    _common.validate_block_logsumexp(lse_block, s, sink_logit, sink_value, recent_values,
                                     block_s=block_s)
  num_blocks = pl.cdiv(s, block_s)
  if num_splits is None:
    num_splits = tuning.default_num_splits("gpu", b, h, num_blocks, block_s)
  if num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}")
  num_splits = min(num_splits, num_blocks)
  split_slots = pl.cdiv(num_blocks, num_splits) * block_s

  rows_pad = max(_MIN_DOT_DIM, pl.next_power_of_2(n_rep))
  # A free reshape: the kernel reads q~ straight from the caller's buffer.
  q = q_rot.reshape(b, h, n_rep, d)
  lo, hi, base, write = _common.slot_bounds(lengths, s, ring=ring, window=window)

  kernel = functools.partial(
      _decode_kernel, rows_pad=rows_pad, key_tiles=code_tiles(d, group_size, key_bits),
      value_tiles=code_tiles(d, group_size, value_bits), block_s=block_s,
      split_slots=split_slots, capacity=s, window=window,
      softcap=None if softcap is None else float(softcap), scale=scale,
      has_offset=logit_offset is not None, rope_pairs=rope_pairs, lse_block=lse_block,
      paged=paged)
  per_head = lambda bi, hi_, split: (bi, hi_, 0, 0)
  per_split = lambda bi, hi_, split: (bi, hi_, split, 0)
  whole = lambda bi, hi_, split: (0,)
  g = shapes.key_groups
  stats_spec, stats_shape = [], []
  if lse_block:
    stats_spec = [pl.BlockSpec((None, None, None, n_rep, split_slots // lse_block),
                               lambda bi, hi_, sp: (bi, hi_, sp, 0, 0))]
    stats_shape = [jax.ShapeDtypeStruct((b, h, num_splits, n_rep, split_slots // lse_block),
                                        jnp.float32)]
  if paged:  # the KV head's whole pool; the kernel picks pages through its table row
    num_pages = k_codes.shape[0]
    pool_head = lambda bi, hi_, split: (0, hi_, 0, 0)
    cache_specs = [pl.BlockSpec((num_pages, None, block_s, a.shape[-1]), pool_head)
                   for a in (k_codes, k_scales, v_codes, v_scales)]
    table_spec = [pl.BlockSpec((None, page_table.shape[1]), lambda bi, hi_, split: (bi, 0))]
    table_args = [page_table.astype(jnp.int32)]
  else:
    cache_specs = [pl.BlockSpec((None, None, s, a.shape[-1]), per_head)
                   for a in (k_codes, k_scales, v_codes, v_scales)]
    table_spec, table_args = [], []
  outs = pl.pallas_call(
      kernel,
      grid=(b, h, num_splits),
      in_specs=[pl.BlockSpec((None, None, n_rep, d), per_head)] + cache_specs +
      [pl.BlockSpec((b,), whole)] * 5 + table_spec +
      ([pl.BlockSpec((None, None, n_rep), lambda bi, hi_, split: (bi, hi_, 0))]
       if logit_offset is not None else []) +
      ([pl.BlockSpec((None, None, n_rep, 2 * rope_pairs), per_head),
        pl.BlockSpec((rope_pairs,), whole)] if rope_pairs else []),
      out_specs=[
          pl.BlockSpec((None, None, None, n_rep, d), lambda bi, hi_, sp: (bi, hi_, sp, 0, 0)),
          pl.BlockSpec((None, None, None, n_rep), per_split),
          pl.BlockSpec((None, None, None, n_rep), per_split),
      ] + stats_spec,
      out_shape=[
          jax.ShapeDtypeStruct((b, h, num_splits, n_rep, d), jnp.float32),
          jax.ShapeDtypeStruct((b, h, num_splits, n_rep), jnp.float32),
          jax.ShapeDtypeStruct((b, h, num_splits, n_rep), jnp.float32),
      ] + stats_shape,
      compiler_params=_compat.TritonCompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"{'paged_' if paged else ''}decode_attention_k{key_bits}v{value_bits}_g{group_size}",
  )(q, k_codes, k_scales, v_codes, v_scales, lengths.astype(jnp.int32), lo, hi, base, write,
    *table_args, *([] if logit_offset is None else [logit_offset.reshape(b, h, n_rep)]),
    *([] if not rope_pairs else [rope_coef.reshape(b, h, n_rep, 2 * rope_pairs), rope_freq]))
  acc, m, l = outs[:3]
  lse = None
  if lse_block:
    lse = outs[3].transpose(0, 1, 3, 2, 4).reshape(b, h, n_rep, -1)[..., :s // lse_block]
    lse = lse.reshape(b, shapes.q_heads, s // lse_block)
  m, l, acc = _common.add_slot_corrections(
      (m, l, acc), q_rot, k_codes, k_scales, v_codes, v_scales, lengths, sink_logit=sink_logit,
      sink_value=sink_value, recent_values=recent_values, key_bits=key_bits, value_bits=value_bits,
      group_size=group_size, ring=ring, window=window, scale=scale, softcap=softcap,
      logit_offset=logit_offset, rope_coef=rope_coef, rope_freq=rope_freq,
      page_table=page_table)
  out = _common.combine_splits(m, l, acc).reshape(b, shapes.q_heads, d)
  return out if lse is None else (out, lse)
