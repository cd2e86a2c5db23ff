"""Rotary key offset: a pre-RoPE key mean that RoPE turns with position, removed exactly.

A constant pre-RoPE key offset m in a channel pair (i, j) reaches the cache rotated by the
token's angle: c_t = rot(w t) m. The cache stores k - c_t in P chosen pairs, and attention adds
q . c_t back per slot, from 2P coefficients per query and cos / sin of each slot's position:
nothing per slot is stored (`kvjax.rotary`). Params: k_rope_freq [P] and k_rope_channels
[P, 2] (shared by the layer's heads), k_rope_mean [Hr, 2, P]; zero frequency and mean by
default (a no-op).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from kvjax import rotary
from kvjax.corrections.base import Correction, check_int, register


@register
@dataclasses.dataclass(frozen=True)
class RotaryKeyOffset(Correction):
  """Keys stored minus c_t in `pairs` RoPE channel pairs; q . c_t goes back per slot."""

  pairs: int = 16

  kind = "rotary_key_offset"
  params = ("k_rope_freq", "k_rope_channels", "k_rope_mean")
  shared = ("k_rope_freq", "k_rope_channels")

  def __post_init__(self):
    check_int(self.pairs, "RotaryKeyOffset.pairs", 1)

  @property
  def label(self) -> str:
    return f"+rope{self.pairs}"

  def check(self, head_dim, *, name="head_dim"):
    if self.pairs > head_dim // 2:
      raise ValueError(f"RotaryKeyOffset.pairs={self.pairs} exceeds the {head_dim // 2} channel "
                       f"pairs of {name}={head_dim}")

  def param_shapes(self, head_dim):
    p = self.pairs
    return {"k_rope_freq": (p,), "k_rope_channels": (p, 2), "k_rope_mean": (2, p)}

  def param_dtype(self, name):
    return np.int32 if name == "k_rope_channels" else np.float32

  def default_params(self, head_dim):
    p = self.pairs
    return {"k_rope_freq": np.zeros((p,), np.float32),
            "k_rope_channels": np.stack([np.arange(p), np.arange(p) + head_dim // 2],
                                        1).astype(np.int32),
            "k_rope_mean": np.zeros((1, 2, p), np.float32)}

  def check_params(self, arrays, head_dim):
    ch = np.asarray(arrays["k_rope_channels"])
    if ch.size and (ch.min() < 0 or ch.max() >= head_dim):
      raise ValueError(f"k_rope_channels must lie in [0, {head_dim}), got {ch.tolist()}")

  def centre_keys(self, keys, arrays, positions):
    return keys - rotary.key_offset(positions, arrays["k_rope_freq"], arrays["k_rope_channels"],
                                    arrays["k_rope_mean"], keys.shape[-1])

  def logit_terms(self, r, arrays):
    if r.kv_pos is None:
      raise ValueError("a cache with rotary key offsets needs the slot positions (kv_pos)")
    return rotary.logit_offsets(r.qg, r.kv_pos, arrays["k_rope_freq"], arrays["k_rope_channels"],
                                arrays["k_rope_mean"])

  def restore_keys(self, k, arrays, kv_pos):
    off = rotary.key_offset(kv_pos, arrays["k_rope_freq"], arrays["k_rope_channels"],
                            arrays["k_rope_mean"], k.shape[-1])           # [B, N, Hr, D]
    return k + off.transpose(0, 2, 1, 3)

  def kernel_args(self, r, arrays, pending):
    # Per query 2P coefficients, scaled like the logits; the kernel adds
    # sum_p a_p cos(w_p t) + b_p sin(w_p t) at each slot's position t.
    b, h, rr, _ = r.qg.shape
    coef = rotary.coefficients(r.qg, arrays["k_rope_channels"], arrays["k_rope_mean"])
    return {"rope_coef": r.scale * coef.reshape(b, h * rr, -1),
            "rope_freq": jnp.asarray(arrays["k_rope_freq"], jnp.float32)}
