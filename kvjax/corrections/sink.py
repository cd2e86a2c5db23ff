"""Exact sink: the key and value at absolute position 0 read as if stored exactly.

The token that opens a sequence (BOS, or whatever comes first) draws much of every query's
attention, in every head at once, so its rounding error does not average out. Its codes are
written as usual; its rounding error e_0 is kept in float32 per sequence and KV head
(`k_sink` / `v_sink` [B, H, D]), set when position 0 is written. Attention adds q . e_0 to that
slot's logit (key) and p_0 e_0 to the output (value, p_0 the slot's weight).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import quantizer
from kvjax.corrections.base import Correction, register

_HI = jax.lax.Precision.HIGHEST


def starts(w) -> jax.Array:
  """bool [B]: the chunk writes position 0 of the sequence (always as its first token)."""
  return (w.lengths == 0) & w.valid[:, 0]


def first_token_error(w, which: str) -> jax.Array:
  """float32 [B, H, D]: the first new token's key ("k", after centring) or value ("v") minus
  what its codes hold."""
  k_rot, k_lam, v_rot, v_lam = w.basis
  cfg = w.config
  if which == "k":
    exact, rot, lam, bits = w.keys[:, :1], k_rot, k_lam, cfg.key_bits
  else:
    exact, rot, lam, bits = w.v[:, :1].astype(jnp.float32), v_rot, v_lam, cfg.value_bits
  stored = quantizer.dequantize(w.stored[f"{which}_codes"][:, :1],
                                w.stored[f"{which}_scales"][:, :1], rot, lam, bits=bits,
                                group_size=cfg.group_size)
  return (exact - stored)[:, 0]


def _sink_update(w, old, which):
  # Decode steps almost never start a sequence: the un-rotation of the first token is skipped
  # (a cond) unless some sequence of the batch does.
  first = starts(w)
  return jax.lax.cond(jnp.any(first),
                      lambda: jnp.where(first[:, None, None], first_token_error(w, which), old),
                      lambda: old)


class _Sink(Correction):
  """Position 0's rounding error of one side ("k" or "v"), kept as per-sequence state."""

  side = ""

  def state_shapes(self, head_dim):
    return {self.state[0]: (head_dim,)}

  def write(self, w, arrays):
    name = self.state[0]
    return {name: _sink_update(w, arrays[name], self.side)}, None


@register
@dataclasses.dataclass(frozen=True)
class KeySink(_Sink):
  """The key at position 0 exact: its rounding error k_sink [B, H, D] goes into its logit."""

  kind = "key_sink"
  state = ("k_sink",)
  side = "k"

  @property
  def label(self) -> str:
    return "+sink"

  def logit_terms(self, r, arrays):
    if r.kv_pos is None:
      raise ValueError("a cache with an exact sink key needs the slot positions (kv_pos)")
    sink = jnp.einsum("bhtrd,bhd->bhtr", r.qg, arrays["k_sink"], precision=_HI)[..., None]
    return jnp.where((r.kv_pos == 0)[:, None, None, None, :], sink, 0.0)

  def restore_keys(self, k, arrays, kv_pos):
    return k + jnp.where((kv_pos == 0)[:, None, :, None], arrays["k_sink"][:, :, None, :], 0.0)

  def kernel_args(self, r, arrays, pending):
    b, h, rr, _ = r.qg.shape
    logit = jnp.einsum("bhrd,bhd->bhr", r.qg, arrays["k_sink"], precision=_HI)
    return {"sink_logit": r.scale * logit.reshape(b, h * rr)}


@register
@dataclasses.dataclass(frozen=True)
class ValueSink(_Sink):
  """The value at position 0 exact: its rounding error v_sink [B, H, D], times the slot's
  weight, goes into the output."""

  kind = "value_sink"
  state = ("v_sink",)
  side = "v"
  exact_sink_value = True

  @property
  def label(self) -> str:
    return "+vsink"

  def value_terms(self, r, arrays, pending):
    if r.kv_pos is None:
      raise ValueError("a cache with an exact sink value needs the slot positions (kv_pos)")
    b, t = r.q_pos.shape
    slots = jnp.broadcast_to((r.kv_pos == 0)[:, None, None, :].astype(jnp.float32),
                             (b, t, 1, r.kv_pos.shape[1]))
    e = arrays["v_sink"]
    return slots, jnp.broadcast_to(e[:, :, None, None, :], e.shape[:2] + (t, 1, e.shape[-1]))

  def restore_values(self, v, arrays, kv_pos):
    return v + jnp.where((kv_pos == 0)[:, None, :, None], arrays["v_sink"][:, :, None, :], 0.0)

  def kernel_args(self, r, arrays, pending):
    return {"sink_value": r.to_rotated(arrays["v_sink"][:, :, None])[:, :, 0]}
