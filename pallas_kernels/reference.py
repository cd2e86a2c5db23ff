"""Plain-jnp decode attention over a quantized cache: the oracle the kernels are tested against.

It dequantizes the whole cache (which the kernels never do) and runs a masked
softmax in float32, following docs/cache_layout.md step by step.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kvjax.pallas_kernels import _common


def unpack_codes(codes, bits):
  """uint8 [..., D/2] split-halves nibbles -> int32 odd levels [..., D]; int8 [..., D] -> int32."""
  widened = codes.astype(jnp.int32)
  if bits == 8:
    return widened
  low = (widened << 28) >> 28  # arithmetic shift sign-extends the nibble c
  high = (widened << 24) >> 28
  return jnp.concatenate([low, high], axis=-1) * 2 + 1  # the level 2c + 1


def dequantize_codes(codes, scales, *, bits, group_size):
  """[B, H, S, D/2 or D] codes and [B, H, S, G] scales -> float32 [B, H, S, D] (rotated domain)."""
  values = unpack_codes(codes, bits).astype(jnp.float32)
  *lead, d = values.shape
  grouped = values.reshape(*lead, d // group_size, group_size)
  return (grouped * scales.astype(jnp.float32)[..., None]).reshape(*lead, d)


def decode_attention_reference(q_rot, k_codes, k_scales, v_codes, v_scales, lengths, *,
                               key_bits=4, value_bits=4, group_size=32, ring=False, window=None,
                               scale=None, softcap=None, logit_offset=None, rope_coef=None,
                               rope_freq=None, sink_logit=None, sink_value=None,
                               recent_values=None, block_logsumexp=None):
  """One decode step of attention in the rotated domain.

  Args:
    q_rot: [B, Hq, D] float32 rotated, lambda-scaled queries (q~ = R_k(lam_k * q)).
    k_codes, v_codes: [B, H, S, D/2] uint8 (4-bit) or [B, H, S, D] int8 (8-bit).
    k_scales, v_scales: [B, H, S, D // group_size] float (bfloat16 in the cache).
    lengths: [B] int32 tokens written; the query sits at absolute position L - 1.
    ring: the cache is a ring buffer of capacity S.
    window: sliding window (keys at positions > L - 1 - window are visible).
    scale: logit scale, default D ** -0.5. softcap: c * tanh(logit / c) if set.
    logit_offset: None or [B, Hq] float added to every logit of a query after the
      scale and before the soft-cap (e.g. scale * q . k_mean when keys are stored
      minus a per-channel mean: softmax ignores it, a soft-cap does not).
    rope_coef, rope_freq: None, or float [B, Hq, 2P] and [P] (P >= 1, both or
      neither): rotary logit offsets (kvjax.rotary). A slot at absolute position t
      gets, with the logit offset, after the scale and before the soft-cap,
        sum_p rope_coef[..., p] cos(float32(t) w_p) + rope_coef[..., P + p] sin(float32(t) w_p)
      with w = rope_freq; the caller has already multiplied rope_coef by the scale.
    sink_logit: None or [B, Hq] float added (after the scale, before the soft-cap) to the
      logit of the slot holding absolute position 0, when visible: scale * q . e_0 for a
      cache that keeps the rounding error e_0 of its sink key (`kvjax.corrections.KeySink`).
    sink_value: None or [B, H, D] float added (rotated domain) to the value of the slot
      holding absolute position 0: the sink value's rounding error (`kvjax.corrections.ValueSink`).
    recent_values: None or [B, H, W, D] float: row w added (rotated domain) to the value of
      the slot holding position L - 1 - w (w = 0 is the query's own token): the recent values'
      rounding errors (`kvjax.corrections.RecentValues`). Added to the sink value where a position
      is 0.
    block_logsumexp: None, or a block size n dividing S: also return, per query head and block
      of n slots, log sum_t exp(logit_t) over the block's visible slots (the logits the
      softmax sees: scaled, offset, soft-capped); -inf for a block with no visible slot. Block
      b's share of the attention is exp(lse_b - logsumexp_b' lse_b'): what a certificate of the
      step's error needs (`kvjax.certified`). Not with sink or recent-value corrections.

  Returns:
    [B, Hq, D] float32 output in the rotated value domain; zeros for rows that see
    no key (length 0). With block_logsumexp, (that output, [B, Hq, S // n] float32).
  """
  shapes = _common.validate_decode_inputs(q_rot, k_codes, k_scales, v_codes, v_scales, lengths,
                                          key_bits=key_bits, value_bits=value_bits,
                                          group_size=group_size, ring=ring, window=window,
                                          softcap=softcap)
  scale = _common.default_scale(shapes.head_dim, scale)
  b, hq, d = q_rot.shape
  h, s = shapes.kv_heads, shapes.capacity
  keys = dequantize_codes(k_codes, k_scales, bits=key_bits, group_size=group_size)
  values = dequantize_codes(v_codes, v_scales, bits=value_bits, group_size=group_size)
  q = q_rot.astype(jnp.float32).reshape(b, h, shapes.n_rep, d)
  logits = jnp.einsum("bhrd,bhsd->bhrs", q, keys, precision=lax.Precision.HIGHEST) * scale
  logit_offset = _common.validate_logit_offset(logit_offset, b, hq)
  if logit_offset is not None:
    logits = logits + logit_offset.reshape(b, h, shapes.n_rep, 1)
  rope_coef, rope_freq = _common.validate_rope(rope_coef, rope_freq, b, hq)
  _, _, base, write = _common.slot_bounds(lengths, s, ring=ring, window=window)
  slots = jnp.arange(s, dtype=jnp.int32)[None, :]
  if rope_coef is not None:
    # Every slot's own position (invisible slots get a finite value, masked below).
    position = _common.slot_position(slots, base[:, None], write[:, None], s)  # [B, S]
    angle = _common.rope_angles(position[..., None], rope_freq)  # [B, S, P]
    trig = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)  # [B, S, 2P]
    coef = rope_coef.reshape(b, h, shapes.n_rep, -1)
    logits = logits + jnp.einsum("bhrp,bsp->bhrs", coef, trig, precision=lax.Precision.HIGHEST)
  sink_logit = _common.validate_sink_logit(sink_logit, b, hq)
  sink_value = _common.validate_value_delta(sink_value, b, h, d, name="sink_value")
  recent_values = _common.validate_recent_values(recent_values, b, h, d)
  position = _common.slot_position(slots, base[:, None], write[:, None], s)  # [B, S]
  if sink_logit is not None:
    logits = logits + jnp.where((position == 0)[:, None, None, :],
                                sink_logit.reshape(b, h, shapes.n_rep, 1), 0.0)
  if sink_value is not None:
    values = values + jnp.where((position == 0)[:, None, :, None], sink_value[:, :, None, :], 0.0)
  if recent_values is not None:
    for w in range(recent_values.shape[2]):
      at = position == lengths.astype(jnp.int32)[:, None] - 1 - w                # [B, S]
      values = values + jnp.where(at[:, None, :, None], recent_values[:, :, w, None, :], 0.0)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  visible = _common.slot_visible(slots, lengths.astype(jnp.int32)[:, None], base[:, None],
                                 write[:, None], s, window)  # [B, S]
  # Slots that are not visible may hold anything (stale or never-written scales);
  # zero them so that 0 * garbage cannot reach the output.
  values = jnp.where(visible[:, None, :, None], values, 0.0)
  visible = visible[:, None, None, :]
  logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("bhrs,bhsd->bhrd", probs, values, precision=lax.Precision.HIGHEST)
  out = out.reshape(b, hq, d)
  if block_logsumexp is None:
    return out
  _common.validate_block_logsumexp(block_logsumexp, s, sink_logit, sink_value, recent_values)
  n = block_logsumexp
  blocks = logits.reshape(b, h, shapes.n_rep, s // n, n)
  top = jnp.max(blocks, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  lse = jnp.log(jnp.sum(jnp.exp(blocks - top), axis=-1)) + top[..., 0]
  return out, lse.reshape(b, hq, s // n)
