"""Pieces shared by the decode-attention kernels: input checks, slot ranges, split combine."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# Running max before any valid score. Finite so that exp(m_old - m_new) never
# sees (-inf) - (-inf); far below any real logit (|score| < 1e30 always).
NO_SCORE_YET = -1e30


@dataclasses.dataclass(frozen=True)
class DecodeShapes:
  batch: int
  q_heads: int
  kv_heads: int
  capacity: int  # S: slots per sequence (max_len, or the window of a ring buffer)
  head_dim: int
  n_rep: int  # query heads per KV head
  key_groups: int  # G = D // group_size
  value_groups: int


def _code_width(bits, d):
  return d // 2 if bits == 4 else d


def _code_dtype(bits):
  return jnp.dtype(jnp.uint8) if bits == 4 else jnp.dtype(jnp.int8)


def cache_operands(page_table, k_codes, k_scales, v_codes, v_scales, *, ring, block_s,
                   block_logsumexp):
  """(the cache arrays as `validate_decode_inputs` reads them, block_s) for a contiguous cache
  (page_table None: the arrays and block_s as given) or a page pool (stand-ins of the
  [B, H, P * page_size, ...] arrays the pages spell, and block_s = page_size; not with ring or
  block_logsumexp)."""
  if page_table is None:
    return (k_codes, k_scales, v_codes, v_scales), block_s
  logical = paged_view_shapes(page_table, k_codes, k_scales, v_codes, v_scales)
  if ring:
    raise ValueError("a paged cache is not a ring buffer: pass window= for the mask")
  if block_logsumexp is not None:
    raise ValueError("block_logsumexp is not available over a paged cache")
  page_size = k_codes.shape[2]
  if block_s not in (None, page_size):
    raise ValueError(f"over pages block_s is the page size {page_size}, got {block_s}")
  return logical, page_size


def paged_view_shapes(page_table, k_codes, k_scales, v_codes, v_scales):
  """Checks pages [N, H, page_size, ...] of codes and scales and a page table int [B, P];
  returns stand-ins (shape and dtype) of the contiguous [B, H, P * page_size, ...] arrays the
  sequences' pages spell, for `validate_decode_inputs`."""
  if (getattr(page_table, "ndim", None) != 2
      or not jnp.issubdtype(page_table.dtype, jnp.integer)):
    raise ValueError(f"page_table must be an int [B, P] array, got "
                     f"{getattr(page_table, 'dtype', type(page_table).__name__)}"
                     f"{list(getattr(page_table, 'shape', ()))}")
  pages = (k_codes, k_scales, v_codes, v_scales)
  if any(a.ndim != 4 for a in pages) or len({a.shape[:3] for a in pages}) != 1:
    raise ValueError("paged codes and scales must be [num_pages, H, page_size, ...] with the "
                     f"same first three axes, got {[a.shape for a in pages]}")
  b, p = page_table.shape
  return tuple(jax.ShapeDtypeStruct((b, a.shape[1], p * a.shape[2], a.shape[3]), a.dtype)
               for a in pages)


def validate_decode_inputs(q_rot, k_codes, k_scales, v_codes, v_scales, lengths, *, key_bits,
                           value_bits, group_size, ring, window, softcap) -> DecodeShapes:
  """Checks the cache layout (docs/cache_layout.md) and returns the problem sizes."""
  if q_rot.ndim != 3:
    raise ValueError(f"q_rot must be [B, Hq, D], got shape {q_rot.shape}")
  b, hq, d = q_rot.shape
  if key_bits not in (4, 8):
    raise ValueError(f"key_bits must be 4 or 8, got {key_bits!r}")
  if value_bits not in (4, 8):
    raise ValueError(f"value_bits must be 4 or 8, got {value_bits!r}")
  if group_size not in (32, 64, 128):
    raise ValueError(f"group_size must be 32, 64 or 128, got {group_size!r}")
  if d % group_size or d % 2:
    raise ValueError(f"head_dim D={d} must be even and a multiple of group_size={group_size}")
  if k_codes.ndim != 4:
    raise ValueError(f"k_codes must be [B, H, S, D//2 or D], got shape {k_codes.shape}")
  h, s = k_codes.shape[1], k_codes.shape[2]
  g = d // group_size
  for name, arr, bits in (("k_codes", k_codes, key_bits), ("v_codes", v_codes, value_bits)):
    want = (b, h, s, _code_width(bits, d))
    if arr.shape != want:
      raise ValueError(f"{name} must be {want} for {bits}-bit codes of head_dim {d}, "
                       f"got {arr.shape}")
    if arr.dtype != _code_dtype(bits):
      raise TypeError(f"{name} must be {_code_dtype(bits)} for {bits}-bit codes, got {arr.dtype}")
  for name, arr in (("k_scales", k_scales), ("v_scales", v_scales)):
    if arr.shape != (b, h, s, g):
      raise ValueError(f"{name} must be [B, H, S, G] = {(b, h, s, g)}, got {arr.shape}")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      raise TypeError(f"{name} must be a float array (bfloat16 by default), got {arr.dtype}")
  if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be an int32 [B] = [{b}] array, got {lengths.shape} "
                     f"{lengths.dtype}")
  if h == 0 or hq % h:
    raise ValueError(f"query heads Hq={hq} must be a multiple of KV heads H={h}")
  if s == 0:
    raise ValueError("the cache capacity S (axis 2 of k_codes) must be positive")
  if window is not None and (not isinstance(window, int) or window < 1):
    raise ValueError(f"window must be None or a positive int, got {window!r}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
  if not isinstance(ring, bool):
    raise TypeError(f"ring must be a bool, got {ring!r}")
  return DecodeShapes(b, hq, h, s, d, hq // h, g, g)


def validate_logit_offset(logit_offset, batch, q_heads):
  """None, or a float [B, Hq] array (added to every logit of a query)."""
  if logit_offset is None:
    return None
  if logit_offset.shape != (batch, q_heads) or not jnp.issubdtype(logit_offset.dtype,
                                                                 jnp.floating):
    raise ValueError(f"logit_offset must be a float [B, Hq] = {(batch, q_heads)} array, got "
                     f"{logit_offset.shape} {logit_offset.dtype}")
  return logit_offset.astype(jnp.float32)


def validate_rope(rope_coef, rope_freq, batch, q_heads):
  """None, None, or the rotary logit terms as float32 ([B, Hq, 2P] coefficients, [P] freqs).

  Both arguments or neither: the coefficients mean nothing without the frequencies.
  P >= 1 when given (a cache without rotary offsets passes None, not empty arrays).
  """
  if rope_coef is None and rope_freq is None:
    return None, None
  if rope_coef is None or rope_freq is None:
    missing = "rope_coef" if rope_coef is None else "rope_freq"
    raise ValueError(f"rope_coef and rope_freq must be given together (both or neither); "
                     f"{missing} is None")
  if rope_freq.ndim != 1 or rope_freq.shape[0] < 1 or not jnp.issubdtype(rope_freq.dtype,
                                                                          jnp.floating):
    raise ValueError(f"rope_freq must be a float [P] array with P >= 1 pairs, got "
                     f"{rope_freq.shape} {rope_freq.dtype}")
  p = rope_freq.shape[0]
  want = (batch, q_heads, 2 * p)
  if rope_coef.shape != want or not jnp.issubdtype(rope_coef.dtype, jnp.floating):
    raise ValueError(f"rope_coef must be a float [B, Hq, 2P] = {want} array (cos then sin "
                     f"coefficients of the P = {p} pairs of rope_freq), got {rope_coef.shape} "
                     f"{rope_coef.dtype}")
  return rope_coef.astype(jnp.float32), rope_freq.astype(jnp.float32)


def validate_sink_logit(sink_logit, batch, q_heads):
  """None, or a float [B, Hq] array (added to the logit of the key at position 0)."""
  if sink_logit is None:
    return None
  if sink_logit.shape != (batch, q_heads) or not jnp.issubdtype(sink_logit.dtype, jnp.floating):
    raise ValueError(f"sink_logit must be a float [B, Hq] = {(batch, q_heads)} array, got "
                     f"{sink_logit.shape} {sink_logit.dtype}")
  return sink_logit.astype(jnp.float32)


def validate_value_delta(value, batch, kv_heads, head_dim, *, name):
  """None, or a float [B, H, D] array `name` (added to one slot's value, rotated domain)."""
  if value is None:
    return None
  want = (batch, kv_heads, head_dim)
  if value.shape != want or not jnp.issubdtype(value.dtype, jnp.floating):
    raise ValueError(f"{name} must be a float [B, H, D] = {want} array, got "
                     f"{value.shape} {value.dtype}")
  return value.astype(jnp.float32)


def validate_recent_values(values, batch, kv_heads, head_dim):
  """None, or a float [B, H, W, D] array, W >= 1 (rows added to the values at L - 1 - w)."""
  if values is None:
    return None
  if (values.ndim != 4 or values.shape[:2] != (batch, kv_heads) or values.shape[2] < 1
      or values.shape[3] != head_dim or not jnp.issubdtype(values.dtype, jnp.floating)):
    raise ValueError(f"recent_values must be a float [B, H, W, D] = [{batch}, {kv_heads}, W >= 1, "
                     f"{head_dim}] array, got {values.shape} {values.dtype}")
  return values.astype(jnp.float32)


def slot_split(q_rot, k_codes, k_scales, v_codes, v_scales, lengths, position, *,
               logit_delta=None, value_delta=None, logit_base=None, key_bits, value_bits,
               group_size, ring, window, scale, softcap, logit_offset, rope_coef, rope_freq,
               page_table=None):
  """A correction to one slot's logit and value as one more split-K state (m, l, acc) for
  `combine_splits`.

  position: int32 [B], the absolute position of the corrected slot (0 for the sink, L - 1
  for the query's own token). The kernels score that slot like any other, with logit z'
  (after the offsets, before the soft-cap). With logit_delta [B, Hq] its logit is
  z = z' + logit_delta, so its softmax weight moves from exp(cap(z') - m) to
  exp(cap(z) - m): this state carries the difference, exp(cap(z) - m) - exp(cap(z') - m)
  in l and that times the slot's value in acc (it may be negative; the merged sum is the
  corrected one). value_delta e [B, H, D] (rotated domain) adds exp(cap(z) - m) e to acc and
  nothing to l: the merged output gains p e, p the slot's final weight. Either may be None.
  logit_base: None or [B, Hq], a correction to the same slot's logit that another state
  already carries (the sink logit when L = 1 puts the query's own token at position 0):
  part of z' here, so the weight is the corrected one, and not moved again.
  O(B Hq D) work outside the kernel: one slot's codes are read again. z' is recomputed in
  float32; the kernels' bf16-split products carry ~16 bits, so the merge is exact to ~2^-16
  of the slot's weight.
  page_table: None, or int32 [B, P] when the codes and scales are pages [N, H, page, ...]
  (`paged_view_shapes`): the slot is read from its page.
  Returns m, l [B, H, 1, R] and acc [B, H, 1, R, D] (m = NO_SCORE_YET, l = acc = 0 where
  the position is not visible to the query).
  """
  from kvjax.pallas_kernels import reference  # reference imports this module

  b, hq, d = q_rot.shape
  h = k_codes.shape[1]
  r = hq // h
  lengths = lengths.astype(jnp.int32)
  position = position.astype(jnp.int32)
  if page_table is None:
    s = k_codes.shape[2]
    slot = jnp.mod(jnp.maximum(position, 0), s)                                 # [B]
    take = lambda a: jnp.take_along_axis(a, slot[:, None, None, None], axis=2)
  else:  # pages [N, H, page, ...]: the slot's page from the table, then its row in the page
    page_size = k_codes.shape[2]
    s = page_table.shape[1] * page_size
    slot = jnp.mod(jnp.maximum(position, 0), s)
    page = jnp.take_along_axis(page_table, (slot // page_size)[:, None], axis=1)[:, 0]
    take = lambda a: a[page, :, slot % page_size][:, :, None]
  k0 = reference.dequantize_codes(take(k_codes), take(k_scales), bits=key_bits,
                                  group_size=group_size)[:, :, 0]              # [B, H, D]
  v0 = reference.dequantize_codes(take(v_codes), take(v_scales), bits=value_bits,
                                  group_size=group_size)[:, :, 0]
  q = q_rot.astype(jnp.float32).reshape(b, h, r, d)
  z = jnp.einsum("bhrd,bhd->bhr", q, k0, precision=jax.lax.Precision.HIGHEST) * scale
  if logit_offset is not None:
    z = z + logit_offset.reshape(b, h, r)
  if logit_base is not None:
    z = z + logit_base.reshape(b, h, r)
  if rope_coef is not None:
    angle = rope_angles(position[:, None], rope_freq)                          # [B, P]
    trig = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)          # [B, 2P]
    z = z + jnp.einsum("bhrp,bp->bhr", rope_coef.reshape(b, h, r, -1), trig,
                       precision=jax.lax.Precision.HIGHEST)
  cap = (lambda x: x) if softcap is None else (lambda x: softcap * jnp.tanh(x / softcap))
  old = cap(z)
  new = old if logit_delta is None else cap(z + logit_delta.reshape(b, h, r))
  _, _, base, write = slot_bounds(lengths, s, ring=ring, window=window)
  seen = (slot_visible(slot, lengths, base, write, s, window)
          & (slot_position(slot, base, write, s) == position))[:, None, None]   # [B, 1, 1]
  m = jnp.where(seen, jnp.maximum(old, new), NO_SCORE_YET)
  l = jnp.where(seen, jnp.exp(new - m) - jnp.exp(old - m), 0.0)
  # An invisible slot may hold stale or never-written (even NaN) scales: keep them out.
  acc = l[..., None] * v0[:, :, None, :]
  if value_delta is not None:
    acc = acc + jnp.exp(new - m)[..., None] * value_delta[:, :, None, :]
  acc = jnp.where(seen[..., None], acc, 0.0)
  return m[:, :, None], l[:, :, None], acc[:, :, None]


def add_slot_corrections(states, q_rot, k_codes, k_scales, v_codes, v_scales, lengths, *,
                         sink_logit=None, sink_value=None, recent_values=None, **kwargs):
  """(m, l, acc) of the kernel's splits with `slot_split` states appended on the split axis:
  one for the sink (position 0: sink_logit, sink_value) and one per row w of recent_values
  (position L - 1 - w), each only when given. kwargs: those of `slot_split`."""
  args = (q_rot, k_codes, k_scales, v_codes, v_scales, lengths)
  extra = []
  if sink_logit is not None or sink_value is not None:
    extra.append(slot_split(*args, jnp.zeros_like(lengths, jnp.int32), logit_delta=sink_logit,
                            value_delta=sink_value, **kwargs))
  for w in range(0 if recent_values is None else recent_values.shape[2]):
    position = lengths.astype(jnp.int32) - 1 - w
    # At position 0 the slot is the sink slot: its weight is the one with the sink logit.
    base = None if sink_logit is None else jnp.where((position == 0)[:, None], sink_logit, 0.0)
    extra.append(slot_split(*args, position, value_delta=recent_values[:, :, w],
                            logit_base=base, **kwargs))
  for e in extra:
    states = tuple(jnp.concatenate([a, x], axis=2) for a, x in zip(states, e))
  return states


def validate_block_logsumexp(block, capacity, sink_logit, sink_value, recent_values, *,
                             block_s=None):
  """Checks a `block_logsumexp` request (see `decode_attention_reference`)."""
  if isinstance(block, bool) or not isinstance(block, int) or block < 1 or capacity % block:
    raise ValueError(f"block_logsumexp must be an int >= 1 dividing the cache's S={capacity}, "
                     f"got {block!r}")
  if block_s is not None and block_s % block:
    raise ValueError(f"block_logsumexp={block} must divide the kernel's block_s={block_s}")
  if sink_logit is not None or sink_value is not None or recent_values is not None:
    raise ValueError("block_logsumexp covers the kernel's slots only: it does not combine with "
                     "sink_logit / sink_value / recent_values")


def default_scale(head_dim, scale):
  return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def slot_bounds(lengths, capacity, *, ring, window):
  """Per-sequence slot range [lo, hi) that can hold visible keys, plus ring bookkeeping.

  Slots outside [lo, hi) are never read. Inside it the kernels still mask per slot
  (ring buffers with a window shorter than the capacity).

  Returns int32 [B] arrays (lo, hi, base, write): a ring slot s holds absolute
  position base + s - S * (s >= write), i.e. L-1 - ((L-1-s) mod S); for a non-ring
  cache base = 0 and write = S, so the position is s.
  """
  lengths = lengths.astype(jnp.int32)
  hi = jnp.minimum(lengths, capacity)
  if ring:
    write = lengths % capacity
    base = lengths - write
    lo = jnp.zeros_like(lengths)
  else:
    write = jnp.full_like(lengths, capacity)
    base = jnp.zeros_like(lengths)
    lo = jnp.zeros_like(lengths) if window is None else jnp.clip(lengths - window, 0, capacity)
  return lo, hi, base, write


def slot_position(slot, base, write, capacity):
  """Absolute position of int32 slots (any shape) with `slot_bounds`' base and write.

  Meaningful only where `slot_visible`; elsewhere a finite int (negative or stale).
  """
  return base + slot - jnp.where(slot >= write, capacity, 0)


def rope_angles(position, rope_freq):
  """float32(position) * freq, the rotary angle of a slot as the models compute it."""
  return position.astype(jnp.float32) * rope_freq


def slot_visible(slot, length, base, write, capacity, window):
  """Mask of slots whose key the query at position length-1 attends to (any shape)."""
  position = slot_position(slot, base, write, capacity)
  visible = (position >= 0) & (position < length) & (slot < capacity)
  if window is not None:
    visible &= position > length - 1 - window
  return visible


def combine_splits(m, l, acc):
  """Merges split-K partial softmax states.

  m, l: [B, H, splits, R] running max and sum of exp; acc: [B, H, splits, R, D]
  unnormalized outputs. Returns [B, H, R, D] float32; rows without any visible
  key (l == 0 in every split) come out as zeros.
  """
  m_all = jnp.max(m, axis=2, keepdims=True)
  weight = jnp.exp(m - m_all)
  l_all = jnp.sum(weight * l, axis=2)
  acc_all = jnp.sum(weight[..., None] * acc, axis=2)
  safe_l = jnp.where(l_all > 0, l_all, 1.0)
  return jnp.where((l_all > 0)[..., None], acc_all / safe_l[..., None], 0.0)
