"""Constant key offset: a per-channel key mean removed before quantization, added back exactly.

Keys with a large shared offset (Qwen's k_proj bias, Gemma's mean key direction) spend the 16
levels of every group on the offset. The cache stores k - μ; attention adds q . μ to every
logit of the query, so the scores are those of the unshifted keys (softmax alone would not
notice a per-query constant; a soft-cap would). μ [Hr, D] comes from calibration
(`kvjax.smoothing.key_params`); the default 0 makes this a no-op.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.corrections.base import Correction, register

_HI = jax.lax.Precision.HIGHEST


@register
@dataclasses.dataclass(frozen=True)
class KeyOffset(Correction):
  """Keys stored minus k_mean [Hr, D]; q . k_mean goes back into every logit."""

  kind = "key_offset"
  params = ("k_mean",)

  @property
  def label(self) -> str:
    return "+mean"

  def param_shapes(self, head_dim):
    return {"k_mean": (head_dim,)}

  def default_params(self, head_dim):
    return {"k_mean": np.zeros((1, head_dim), np.float32)}

  def centre_keys(self, keys, arrays, positions):
    return keys - arrays["k_mean"]

  def logit_terms(self, r, arrays):
    return jnp.einsum("bhtrd,hd->bhtr", r.qg, arrays["k_mean"], precision=_HI)[..., None]

  def restore_keys(self, k, arrays, kv_pos):
    return k + arrays["k_mean"][None, :, None, :]

  def kernel_args(self, r, arrays, pending):
    b, h, rr, d = r.qg.shape
    mean = jnp.broadcast_to(arrays["k_mean"], (h, d))
    off = jnp.einsum("bhrd,hd->bhr", r.qg, mean, precision=_HI)
    return {"logit_offset": r.scale * off.reshape(b, h * rr)}
