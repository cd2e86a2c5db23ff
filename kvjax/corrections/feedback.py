"""Feedback rounding: codes chosen with error feedback instead of nearest rounding.

Rounding channel j's rotated coordinate leaves an error that the next channels absorb,
y~_i -= F[j, i] e_j, with F strictly upper triangular (`kvjax.quantizer.feedback_levels`).
With F from the upper Cholesky factor of the inverse second moment of what reads the vector
(the queries for keys; the output projection for values), this is GPTQ's rounding for the
error attention actually sees (`kvjax.smoothing`, facts 5 and 7). Write-time only: attention
reads the codes as always. F = 0 (the default) is nearest rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvjax.corrections.base import Correction, register


class _Feedback(Correction):
  """Rounding of one side (keys or values) with error feedback through its one param."""

  side = ""  # "key" or "value"

  def param_shapes(self, head_dim):
    return {self.params[0]: (head_dim, head_dim)}

  def default_params(self, head_dim):
    return {self.params[0]: np.zeros((1, head_dim, head_dim), np.float32)}

  def check_params(self, arrays, head_dim):
    name = self.params[0]
    if np.any(np.tril(np.asarray(arrays[name]))):
      raise ValueError(f"{name} must be strictly upper triangular (error feedback only reaches "
                       "channels not yet rounded)")

  def key_feedback(self, arrays):
    return arrays[self.params[0]] if self.side == "key" else None

  def value_feedback(self, arrays):
    return arrays[self.params[0]] if self.side == "value" else None


@register
@dataclasses.dataclass(frozen=True)
class KeyFeedback(_Feedback):
  """Key codes rounded with error feedback through k_feedback [Hr, D, D]."""

  kind = "key_feedback"
  params = ("k_feedback",)
  side = "key"

  @property
  def label(self) -> str:
    return "+fb"


@register
@dataclasses.dataclass(frozen=True)
class ValueFeedback(_Feedback):
  """Value codes rounded with error feedback through v_feedback [Hr, D, D]."""

  kind = "value_feedback"
  params = ("v_feedback",)
  side = "value"

  @property
  def label(self) -> str:
    return "+vfb"
