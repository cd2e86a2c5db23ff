"""Fused int4/int8 decode attention for TPU (Pallas -> Mosaic).

One decode step: every query head attends over its sequence's cached keys and
values, read straight from the packed codes and bf16 scales. Nothing
dequantized ever leaves VMEM.

Grid: (batch, kv_head, split, block). Each (batch, kv_head, split) program owns
a contiguous range of cache slots (split-K / flash decoding) and walks it one
`block_s`-slot block at a time, keeping the online-softmax state (m, l, acc) of
all n_rep query heads of that KV head in VMEM scratch. Partial states of the
splits are merged by a small jnp combine step after the kernel.

Scores from codes without dequantizing (per block, all on the MXU):
  * q~ of the n_rep heads is expanded once per (batch, head, split), in VMEM, to
    a block-diagonal [n_rep*G, D] matrix Q_bd (row r*G+j holds head r's channels
    of group j, zeros elsewhere), so  P = Q_bd . codes^T  is [n_rep*G, block_s]:
    every per-group partial dot product of every head in one matmul (one per
    nibble half). Only the [n_rep, D] queries come from HBM; the 0/1 expansion
    matrices are shared by all grid points and fetched once.
  * Scales [block_s, G] are tiled to [n_rep*G, block_s] by an exact 0/1 matmul,
    multiplied into P, and the groups of each head are summed by another 0/1
    matmul, giving scores [n_rep, block_s] with slots along the 128 lanes.
  * Values are dequantized per block in VMEM (codes * scales expanded to channels
    by a 0/1 matmul) and accumulated as p @ v_hat in the rotated value domain.
Precision without 6-pass float32 matmuls: codes are exact in bfloat16, so scores
use the bf16 high and low parts of q~ (two single-pass matmuls, ~16 significant
bits); v_hat (code x bf16 scale, <= 15 significant bits) is exactly the sum of
two bf16 parts, and p @ v_hat takes three single-pass matmuls. The 0/1
bookkeeping matmuls are exact at HIGHEST precision and tiny.
All index arithmetic is 32-bit: codes are widened from uint8/int8 to int32
before the nibble shifts (Mosaic cannot shift 8-bit vectors), and the two
nibble halves of the split-halves layout come out as two contiguous
[block_s, D/2] operands, so no lane shuffles are needed.

Rotary logit offsets (optional, `rope_coef`/`rope_freq`): per block the kernel
builds the angles float32(position) * w of the block's slots as a [P, block_s]
array (positions from the same arithmetic as the mask, frequencies as a [P, 1]
column, so the P pairs fill sublanes and the slots the 128 lanes), takes cos and
sin on the VPU, and adds coef_cos . cos + coef_sin . sin ([n_rep, P] x [P, block_s],
two small HIGHEST-precision matmuls) to the scores. Only the [n_rep, 2P]
coefficients and the [P] frequencies come from HBM, once per program; the cos
and sin coefficients arrive as two inputs so that no lane slice at offset P is
needed.

Ragged lengths: the per-sequence slot range is scalar-prefetched into SMEM. The
block index maps clamp to the last visible block, so blocks past a sequence's
end repeat the previous block index and Pallas skips their DMA; their compute
is skipped with `pl.when`.
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

_HIGHEST = lax.Precision.HIGHEST


def _unpack_parts(codes, bits, dtype):
  """[block_s, W] uint8 / int8 codes -> list of [block_s, W'] code parts in `dtype`.

  4-bit: [low nibbles (channels 0..D/2), high nibbles (channels D/2..D)], each
  nibble c read as its odd level 2c + 1. Levels (|level| <= 127) are exact in bfloat16.
  """
  widened = codes.astype(jnp.int32)
  if bits == 8:
    parts = [widened]
  else:
    parts = [((widened << 28) >> 28) * 2 + 1, ((widened << 24) >> 28) * 2 + 1]
  return [p.astype(jnp.float32).astype(dtype) for p in parts]


def _group_expansion(num_groups, width, channel_offset, group_size, dtype=jnp.float32):
  """[G, width] 0/1 matrix: row j is 1 on the lanes whose channel is in group j."""
  row = lax.broadcasted_iota(jnp.int32, (num_groups, width), 0)
  channel = lax.broadcasted_iota(jnp.int32, (num_groups, width), 1) + channel_offset
  start = row * group_size
  in_group = (channel >= start) & (channel < start + group_size)
  return in_group.astype(jnp.float32).astype(dtype)


def _dot_nt(a, b, precision=_HIGHEST):
  """a [M, K] . b [N, K]^T -> [M, N] in float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _decode_kernel(
    # scalar prefetch (SMEM), each [B] int32
    lengths_ref, lo_ref, hi_ref, base_ref, write_ref,
    # inputs
    tile_ref,  # [n_rep*G, G] 0/1: row r*G+j selects group j
    head_sum_ref,  # [n_rep, n_rep*G] 0/1: sums the G groups of head r
    replicate_ref,  # [n_rep*G, n_rep] 0/1: row r*G+j copies head r
    *refs,
    key_bits, value_bits, group_size, block_s, blocks_per_split, capacity, window, softcap,
    scale, n_rep, head_dim, has_offset, rope_pairs, lse_block):
  num_key_parts = 2 if key_bits == 4 else 1
  num_value_parts = 2 if value_bits == 4 else 1
  q_refs = refs[:num_key_parts]  # each [n_rep, Wk] q~ channels
  refs = refs[num_key_parts:]
  offset_ref = None
  if has_offset:
    offset_ref, refs = refs[0], refs[1:]  # [n_rep, 1] logit offsets
  rope_refs = None
  if rope_pairs:
    # [n_rep, P] cos coefficients, [n_rep, P] sin coefficients, [P, 1] frequencies.
    rope_refs, refs = refs[:3], refs[3:]
  (k_codes_ref,  # [block_s, D/2] uint8 | [block_s, D] int8
   k_scales_ref,  # [block_s, G]
   v_codes_ref,  # [block_s, D/2] uint8 | [block_s, D] int8
   v_scales_ref,  # [block_s, G]
  ) = refs[:4]
  rest = refs[4:]
  block_sum_ref = None
  if lse_block:
    block_sum_ref, rest = rest[0], rest[1:]  # [block_s, block_s / lse_block] 0/1
  m_out_ref, l_out_ref = rest[0], rest[1]  # [n_rep, 1] each
  acc_out_refs = rest[2:2 + num_value_parts]  # [n_rep, Wv] each
  rest = rest[2 + num_value_parts:]
  lse_out_ref = None
  if lse_block:
    lse_out_ref, rest = rest[0], rest[1:]  # [n_rep, block_s / lse_block]: this step's blocks
  scratch = rest
  m_ref, l_ref = scratch[0], scratch[1]  # [n_rep, 1] f32
  acc_refs = scratch[2:2 + num_value_parts]  # [n_rep, Wv] f32 each
  # Block-diagonal queries as bfloat16 high and low parts, [n_rep*G, Wk] each:
  # (high_0, low_0, high_1, low_1) for the two nibble halves.
  q_bd_refs = scratch[2 + num_value_parts:]

  b = pl.program_id(0)
  split = pl.program_id(2)
  step = pl.program_id(3)
  num_groups = head_dim // group_size

  @pl.when(step == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, _common.NO_SCORE_YET, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    for acc_ref in acc_refs:
      acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    key_width = q_refs[0].shape[1]
    for part, q_ref in enumerate(q_refs):
      # Row r*G+j keeps head r's lanes of group j: [nG, G] @ [G, Wk] 0/1 matmul.
      expand = _group_expansion(num_groups, key_width, part * key_width, group_size)
      in_group = jnp.dot(tile_ref[...], expand, precision=_HIGHEST,
                         preferred_element_type=jnp.float32)
      # The logit scale is folded in here, once per program.
      q_bd = jnp.dot(replicate_ref[...], q_ref[...].astype(jnp.float32),
                     precision=_HIGHEST, preferred_element_type=jnp.float32) * (in_group * scale)
      # Codes are exact in bfloat16, so two single-pass bf16 matmuls against the
      # high and low parts of q carry ~16 significant bits (vs 6 passes for f32).
      q_high = q_bd.astype(jnp.bfloat16)
      q_bd_refs[2 * part][...] = q_high
      q_bd_refs[2 * part + 1][...] = (q_bd - q_high.astype(jnp.float32)).astype(jnp.bfloat16)

  length = lengths_ref[b]
  slot_lo, slot_hi = lo_ref[b], hi_ref[b]
  block_start = (split * blocks_per_split + step) * block_s

  in_range = (block_start < slot_hi) & (block_start + block_s > slot_lo)
  if lse_out_ref is not None:
    @pl.when(jnp.logical_not(in_range))
    def _no_blocks():
      lse_out_ref[...] = jnp.full(lse_out_ref.shape, -jnp.inf, jnp.float32)

  @pl.when(in_range)
  def _compute():
    base, write = base_ref[b], write_ref[b]
    # Scores [n_rep, block_s].
    key_parts = _unpack_parts(k_codes_ref[...], key_bits, jnp.bfloat16)
    partial = None
    for part, codes in enumerate(key_parts):
      for q_piece_ref in q_bd_refs[2 * part:2 * part + 2]:
        term = _dot_nt(q_piece_ref[...], codes, precision=None)  # [n_rep*G, block_s]
        partial = term if partial is None else partial + term
    scales_t = _dot_nt(tile_ref[...], k_scales_ref[...].astype(jnp.float32))
    scores = jnp.dot(head_sum_ref[...], partial * scales_t, precision=_HIGHEST,
                     preferred_element_type=jnp.float32)
    if offset_ref is not None:
      scores = scores + offset_ref[...]
    if rope_refs is not None:
      coef_cos_ref, coef_sin_ref, freq_ref = rope_refs
      # The block's slots as for the mask below (built here as well so that the
      # kernel without rotary offsets lowers exactly as before; CSE merges the two).
      rope_slots = block_start + lax.broadcasted_iota(jnp.int32, (1, block_s), 1)
      position_row = _common.slot_position(rope_slots, base, write, capacity)  # [1, block_s]
      angle = _common.rope_angles(position_row, freq_ref[...])  # [P, block_s]
      scores = scores + (
          jnp.dot(coef_cos_ref[...], jnp.cos(angle), precision=_HIGHEST,
                  preferred_element_type=jnp.float32) +
          jnp.dot(coef_sin_ref[...], jnp.sin(angle), precision=_HIGHEST,
                  preferred_element_type=jnp.float32))
    if softcap is not None:
      scores = softcap * jnp.tanh(scores / softcap)

    slots_row = block_start + lax.broadcasted_iota(jnp.int32, (1, block_s), 1)
    visible_row = _common.slot_visible(slots_row, length, base, write, capacity, window)
    scores = jnp.where(visible_row, scores, -jnp.inf)

    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    probs = jnp.exp(scores - m_next)  # exactly 0 where masked (-inf)
    correction = jnp.exp(m_prev - m_next)
    m_ref[...] = m_next
    l_ref[...] = correction * l_ref[...] + jnp.sum(probs, axis=1, keepdims=True)
    if lse_out_ref is not None:
      # Per block of lse_block slots: an exact 0/1 matmul sums the block's weights (slots along
      # lanes stay along lanes); log-domain against this step's running max.
      sums = jnp.dot(probs, block_sum_ref[...], precision=_HIGHEST,
                     preferred_element_type=jnp.float32)
      lse_out_ref[...] = m_next + jnp.log(sums)

    # Invisible slots may hold stale or never-written scales (even NaN): zero them
    # before they meet the zero probabilities.
    slots_col = block_start + lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)
    visible_col = _common.slot_visible(slots_col, length, base, write, capacity, window)
    v_scales = jnp.where(visible_col, v_scales_ref[...].astype(jnp.float32), 0.0)
    value_parts = _unpack_parts(v_codes_ref[...], value_bits, jnp.float32)
    width = value_parts[0].shape[1]
    probs_high = probs.astype(jnp.bfloat16)
    probs_low = (probs - probs_high.astype(jnp.float32)).astype(jnp.bfloat16)
    for i, (acc_ref, codes) in enumerate(zip(acc_refs, value_parts)):
      expand = _group_expansion(num_groups, width, i * width, group_size)
      v_hat = codes * jnp.dot(v_scales, expand, precision=_HIGHEST,
                              preferred_element_type=jnp.float32)  # [block_s, Wv]
      # code * bf16 scale has at most 7 + 8 significant bits, so v_hat is exactly
      # v_high + v_low in bfloat16; with p split the same way, three single-pass
      # bf16 matmuls (dropping p_low . v_low, ~2^-16 relative) replace a 6-pass f32 one.
      v_high = v_hat.astype(jnp.bfloat16)
      v_low = (v_hat - v_high.astype(jnp.float32)).astype(jnp.bfloat16)
      update = (jnp.dot(probs_high, v_high, preferred_element_type=jnp.float32) +
                jnp.dot(probs_high, v_low, preferred_element_type=jnp.float32) +
                jnp.dot(probs_low, v_high, preferred_element_type=jnp.float32))
      acc_ref[...] = correction * acc_ref[...] + update

  @pl.when(step == blocks_per_split - 1)
  def _store():
    m_out_ref[...] = m_ref[...]
    l_out_ref[...] = l_ref[...]
    for acc_out_ref, acc_ref in zip(acc_out_refs, acc_refs):
      acc_out_ref[...] = acc_ref[...]


def decode_attention_tpu(q_rot, k_codes, k_scales, v_codes, v_scales, lengths, *, key_bits=4,
                         value_bits=4, group_size=32, ring=False, window=None, scale=None,
                         softcap=None, logit_offset=None, rope_coef=None, rope_freq=None,
                         sink_logit=None, sink_value=None, recent_values=None, block_s=None, num_splits=None,
                         block_logsumexp=None, interpret=None, page_table=None):
  """Decode attention over a quantized cache with the Mosaic TPU kernel.

  Arguments and result as `decode_attention_reference` ([B, Hq, D] float32 in the
  rotated value domain; with `block_logsumexp`, also the per-block log-sum-exp of the logits,
  computed in the same pass). Tuning: `block_s` cached slots per grid step (a multiple
  of 32, or S itself), `num_splits` split-K factor (None: `tuning` heuristics).
  `interpret` may be a bool or a `pltpu.InterpretParams` (TPU-semantics
  interpretation on the CPU).

  Paged caches: with `page_table` int32 [B, P], the codes and scales are a page pool
  [num_pages, H, page_size, ...] (`kvjax.paged`) and sequence b's slot t lives in page
  page_table[b, t // page_size]; the table is scalar-prefetched with the lengths and each grid
  step DMAs one page straight from the pool (block_s = page_size, a multiple of 32 unless a
  sequence has one page). Nothing is gathered outside the kernel. Not with `ring` (pages keep
  every position; a window is a mask) or `block_logsumexp`.
  """
  paged = page_table is not None
  logical, block_s = _common.cache_operands(page_table, k_codes, k_scales, v_codes, v_scales,
                                            ring=ring, block_s=block_s,
                                            block_logsumexp=block_logsumexp)
  if paged:
    table_width = page_table.shape[1]
    if block_s % 32 and table_width > 1:
      raise ValueError(f"page_size must be a multiple of 32 (int8 tile height) for the TPU "
                       f"kernel, got {block_s}")
  shapes = _common.validate_decode_inputs(q_rot, *logical, lengths,
                                          key_bits=key_bits, value_bits=value_bits,
                                          group_size=group_size, ring=ring, window=window,
                                          softcap=softcap)
  interpret = _compat.resolve_interpret(interpret)
  scale = _common.default_scale(shapes.head_dim, scale)
  b, h, s, d = shapes.batch, shapes.kv_heads, shapes.capacity, shapes.head_dim
  n_rep, g = shapes.n_rep, shapes.key_groups
  logit_offset = _common.validate_logit_offset(logit_offset, b, shapes.q_heads)
  rope_coef, rope_freq = _common.validate_rope(rope_coef, rope_freq, b, shapes.q_heads)
  rope_pairs = 0 if rope_freq is None else rope_freq.shape[0]
  sink_logit = _common.validate_sink_logit(sink_logit, b, shapes.q_heads)
  sink_value = _common.validate_value_delta(sink_value, b, shapes.kv_heads, shapes.head_dim,
                                            name="sink_value")
  recent_values = _common.validate_recent_values(recent_values, b, shapes.kv_heads,
                                                 shapes.head_dim)
  if block_s is None:
    block_s = tuning.decode_block_s("tpu", d)
  block_s = min(block_s, s)
  if block_s != s and block_s % 32:
    raise ValueError(f"block_s must be a multiple of 32 (int8 tile height) or equal S={s}, "
                     f"got {block_s}")
  lse_block = block_logsumexp
  if lse_block is not None:
    _common.validate_block_logsumexp(lse_block, s, sink_logit, sink_value, recent_values,
                                     block_s=block_s)
  num_blocks = pl.cdiv(s, block_s)
  if num_splits is None:
    num_splits = tuning.default_num_splits("tpu", b, h, num_blocks, block_s)
  if num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}")
  num_splits = min(num_splits, num_blocks)
  blocks_per_split = pl.cdiv(num_blocks, num_splits)

  # A free reshape: the kernel reads q~ straight from the caller's buffer.
  q = q_rot.reshape(b, h, n_rep, d)
  rows = jnp.arange(n_rep * g)
  q_parts = [q[..., : d // 2], q[..., d // 2:]] if key_bits == 4 else [q]
  tile = (rows[:, None] % g == jnp.arange(g)[None, :]).astype(jnp.float32)  # [nG, G]
  head_sum = (rows[None, :] // g == jnp.arange(n_rep)[:, None]).astype(jnp.float32)  # [R, nG]
  replicate = head_sum.T  # [nG, R]
  lo, hi, base, write = _common.slot_bounds(lengths, s, ring=ring, window=window)

  def visible_block(bi, split, step, lo_ref, hi_ref):
    # Clamp into the sequence's visible blocks: repeated indices skip the DMA.
    # lax.div (truncating) on non-negative ints: jnp's floor division lowers through
    # lax.sign, which Mosaic can only lower when it knows the TPU generation.
    first = lax.div(lo_ref[bi], block_s)
    last = jnp.maximum(lax.div(hi_ref[bi] + block_s - 1, block_s) - 1, first)
    return jnp.clip(split * blocks_per_split + step, first, last)

  if paged:
    def kv_index(bi, hi_, split, step, lengths_ref, lo_ref, hi_ref, base_ref, write_ref,
                 table_ref):
      # The block is one page: its pool index comes from the scalar-prefetched table.
      return table_ref[bi * table_width + visible_block(bi, split, step, lo_ref, hi_ref)], \
          hi_, 0, 0
  else:
    def kv_index(bi, hi_, split, step, lengths_ref, lo_ref, hi_ref, base_ref, write_ref):
      return bi, hi_, visible_block(bi, split, step, lo_ref, hi_ref), 0

  def per_head(bi, hi_, split, step, *_):
    return bi, hi_, 0, 0

  def per_split(bi, hi_, split, step, *_):
    return bi, hi_, split, 0, 0

  def whole(*_):
    return 0, 0

  kw = d // 2 if key_bits == 4 else d
  vw = d // 2 if value_bits == 4 else d
  constants = [tile, head_sum, replicate]
  in_specs = [pl.BlockSpec(c.shape, whole) for c in constants]
  in_specs += [pl.BlockSpec((None, None, n_rep, qp.shape[-1]), per_head) for qp in q_parts]
  offsets = []
  if logit_offset is not None:
    offsets = [logit_offset.reshape(b, h, n_rep, 1)]
    in_specs.append(pl.BlockSpec((None, None, n_rep, 1), per_head))
  rope_inputs = []
  if rope_pairs:
    coef = rope_coef.reshape(b, h, n_rep, 2 * rope_pairs)
    rope_inputs = [coef[..., :rope_pairs], coef[..., rope_pairs:], rope_freq.reshape(-1, 1)]
    in_specs += [pl.BlockSpec((None, None, n_rep, rope_pairs), per_head)] * 2
    in_specs.append(pl.BlockSpec((rope_pairs, 1), whole))
  in_specs += [
      pl.BlockSpec((None, None, block_s, kw), kv_index),
      pl.BlockSpec((None, None, block_s, g), kv_index),
      pl.BlockSpec((None, None, block_s, vw), kv_index),
      pl.BlockSpec((None, None, block_s, g), kv_index),
  ]
  stats_inputs = []
  if lse_block:
    per_step = block_s // lse_block
    block_sum = (jnp.arange(block_s)[:, None] // lse_block
                 == jnp.arange(per_step)[None, :]).astype(jnp.float32)  # [block_s, per_step]
    stats_inputs = [block_sum]
    in_specs.append(pl.BlockSpec(block_sum.shape, whole))
  num_value_parts = 2 if value_bits == 4 else 1
  value_width = d // num_value_parts
  out_shape = [jax.ShapeDtypeStruct((b, h, num_splits, n_rep, 1), jnp.float32)] * 2
  out_shape += [jax.ShapeDtypeStruct((b, h, num_splits, n_rep, value_width), jnp.float32)
                ] * num_value_parts
  out_specs = [pl.BlockSpec((None, None, None, n_rep, o.shape[-1]), per_split)
               for o in out_shape]
  if lse_block:
    # One [n_rep, block_s / lse_block] tile per grid step, each written once.
    out_shape.append(jax.ShapeDtypeStruct(
        (b, h, num_splits * blocks_per_split, n_rep, block_s // lse_block), jnp.float32))
    out_specs.append(pl.BlockSpec(
        (None, None, None, n_rep, block_s // lse_block),
        lambda bi, hi_, split, step, *_: (bi, hi_, split * blocks_per_split + step, 0, 0)))
  scratch = [_compat.VMEM((n_rep, 1), jnp.float32), _compat.VMEM((n_rep, 1), jnp.float32)]
  scratch += [_compat.VMEM((n_rep, value_width), jnp.float32)] * num_value_parts
  scratch += [_compat.VMEM((n_rep * g, qp.shape[-1]), jnp.bfloat16)
              for qp in q_parts for _ in ("high", "low")]

  kernel = functools.partial(
      _decode_kernel, key_bits=key_bits, value_bits=value_bits, group_size=group_size,
      block_s=block_s, blocks_per_split=blocks_per_split, capacity=s, window=window,
      softcap=None if softcap is None else float(softcap), scale=scale, n_rep=n_rep,
      head_dim=d, has_offset=logit_offset is not None, rope_pairs=rope_pairs,
      lse_block=lse_block)
  prefetch = [lengths.astype(jnp.int32), lo, hi, base, write]
  if paged:
    # The page table is read by the index maps only; the kernel body never sees it.
    body = kernel
    kernel = lambda l, lo_, hi_, base_, write_, table, *refs: body(l, lo_, hi_, base_, write_,
                                                                    *refs)
    prefetch.append(page_table.astype(jnp.int32).reshape(-1))
  outs = pl.pallas_call(
      kernel,
      grid_spec=_compat.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(b, h, num_splits, blocks_per_split),
          in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=_compat.TPUCompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name=f"{'paged_' if paged else ''}decode_attention_k{key_bits}v{value_bits}_g{group_size}",
  )(*prefetch, *constants, *q_parts, *offsets,
    *rope_inputs, k_codes, k_scales, v_codes, v_scales, *stats_inputs)
  lse = None
  if lse_block:
    outs, lse = outs[:-1], outs[-1]
    lse = lse.transpose(0, 1, 3, 2, 4).reshape(b, h, n_rep, -1)[..., :s // lse_block]
    lse = lse.reshape(b, shapes.q_heads, s // lse_block)
  m, l = outs[0][..., 0], outs[1][..., 0]
  acc = jnp.concatenate(outs[2:], axis=-1) if num_value_parts == 2 else outs[2]
  m, l, acc = _common.add_slot_corrections(
      (m, l, acc), q_rot, k_codes, k_scales, v_codes, v_scales, lengths, sink_logit=sink_logit,
      sink_value=sink_value, recent_values=recent_values, key_bits=key_bits, value_bits=value_bits,
      group_size=group_size, ring=ring, window=window, scale=scale, softcap=softcap,
      logit_offset=logit_offset, rope_coef=rope_coef, rope_freq=rope_freq,
      page_table=page_table)
  out = _common.combine_splits(m, l, acc).reshape(b, shapes.q_heads, d)  # [B, Hq, D]
  return out if lse is None else (out, lse)
