"""Exact recent values: each new token's query reads the values of the W newest tokens exact.

A query puts much of its weight on the last few tokens, its own included, and their value
errors do not average out (`kvjax.smoothing`, fact 8). Values are stored as usual. When a chunk
is written, its tokens' value rounding errors e are computed (the one un-rotation a token
costs) and each of the chunk's queries adds sum_w p_w e_w for the W positions t - w (its own
and the W - 1 before it). The errors of the last W - 1 tokens written are kept per sequence
in float32 (`v_recent` [B, H, W - 1, D], the token at position p in row p mod (W - 1)), for
the next chunk's first queries. `kvjax.attend` over a cache alone (no new tokens) reads the
stored values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import quantizer
from kvjax.corrections.base import Correction, check_int, register

MAX_WINDOW = 64


def _rows(window: int) -> int:
  return max(window - 1, 0)


@register
@dataclasses.dataclass(frozen=True)
class RecentValues(Correction):
  """The `window` most recent values of each new query exact (1: only its own)."""

  window: int = 4

  kind = "recent_values"
  state = ("v_recent",)
  restorable = False

  def __post_init__(self):
    check_int(self.window, "RecentValues.window", 1, MAX_WINDOW)

  @property
  def label(self) -> str:
    return f"+vrec{self.window}"

  @property
  def rows(self) -> int:
    """Rows of `v_recent`: W - 1 (the newest value is in hand)."""
    return _rows(self.window)

  def state_shapes(self, head_dim):
    return {"v_recent": (self.rows, head_dim)}

  def write(self, w, arrays):
    errors = self._errors(w)                                                 # [B, T, H, D]
    ring = arrays["v_recent"]
    pending = self._recent(w, errors, ring)
    if self.rows:
      rows = self.rows
      # The chunk's last W - 1 written tokens go to rows p mod (W - 1) (distinct rows, so the
      # scatter has no duplicate indices); the other rows keep theirs.
      newest = w.valid & (w.positions >= w.new_lengths[:, None] - rows)
      row = jnp.where(newest, w.positions % rows, rows)                      # rows: dropped
      b_idx = jnp.arange(ring.shape[0], dtype=jnp.int32)[:, None]
      ring = ring.at[b_idx, :, row].set(errors, mode="drop")
    return {"v_recent": ring}, pending

  def _errors(self, w):
    """float32 [B, T, H, D]: each new value minus what the chunk stores for it (zero for
    tokens not written and, with an exact sink value, at position 0: already exact)."""
    _, _, v_rot, v_lam = w.basis
    cfg = w.config
    stored = quantizer.dequantize(w.stored["v_codes"], w.stored["v_scales"], v_rot, v_lam,
                                  bits=cfg.value_bits, group_size=cfg.group_size)
    keep = w.valid
    if any(c.exact_sink_value for c in cfg.corrections):
      keep = keep & (w.positions != 0)
    return jnp.where(keep[:, :, None, None], w.v.astype(jnp.float32) - stored, 0.0)

  def _recent(self, w, errors, ring):
    """(errors float32 [B, H, T, W, D], positions int32 [B, T, W]): for the chunk's query t and
    w < W, the rounding error of the value at position t - w, from the chunk itself or, before
    it, from the ring; position -2 (no slot) where that is < 0."""
    b, t = errors.shape[:2]
    b_idx = jnp.arange(b, dtype=jnp.int32)[:, None]
    out, positions = [], []
    for lag in range(self.window):
      pos = w.positions - lag
      from_chunk = jnp.pad(errors, ((0, 0), (lag, 0), (0, 0), (0, 0)))[:, :t]   # token t - lag
      if self.rows:
        from_ring = ring[b_idx, :, jnp.mod(pos, self.rows)]                     # [B, T, H, D]
        e = jnp.where((jnp.arange(t) >= lag)[None, :, None, None], from_chunk, from_ring)
      else:
        e = from_chunk
      out.append(jnp.where((pos >= 0)[:, :, None, None], e, 0.0))
      positions.append(jnp.where(pos >= 0, pos, -2))
    return jnp.stack(out, 2).transpose(0, 3, 1, 2, 4), jnp.stack(positions, -1)

  def value_terms(self, r, arrays, pending):
    if pending is None:  # attention over a cache alone: the stored values
      return None
    if r.kv_pos is None:
      raise ValueError("a cache that reads recent values exact needs the slot positions "
                       "(kv_pos)")
    errors, positions = pending
    slots = (r.kv_pos[:, None, None, :] == positions[..., None]).astype(jnp.float32)
    return slots, errors

  def kernel_args(self, r, arrays, pending):
    if pending is None:
      return {}
    # The single query's W errors, row w for position L - 1 - w.
    return {"recent_values": r.to_rotated(pending[0][:, :, 0])}
