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


def _check_upper(arrays, name):
  f = np.asarray(arrays[name])
  if np.any(np.tril(f)):
    raise ValueError(f"{name} must be strictly upper triangular (error feedback only reaches "
                     "channels not yet rounded)")


@register
@dataclasses.dataclass(frozen=True)
class KeyFeedback(Correction):
  """Key codes rounded with error feedback through k_feedback [Hr, D, D]."""

  kind = "key_feedback"
  params = ("k_feedback",)

  @property
  def label(self) -> str:
    return "+fb"

  def param_shapes(self, head_dim):
    return {"k_feedback": (head_dim, head_dim)}

  def default_params(self, head_dim):
    return {"k_feedback": np.zeros((1, head_dim, head_dim), np.float32)}

  def check_params(self, arrays, head_dim):
    _check_upper(arrays, "k_feedback")

  def key_feedback(self, arrays):
    return arrays["k_feedback"]


@register
@dataclasses.dataclass(frozen=True)
class ValueFeedback(Correction):
  """Value codes rounded with error feedback through v_feedback [Hr, D, D]."""

  kind = "value_feedback"
  params = ("v_feedback",)

  @property
  def label(self) -> str:
    return "+vfb"

  def param_shapes(self, head_dim):
    return {"v_feedback": (head_dim, head_dim)}

  def default_params(self, head_dim):
    return {"v_feedback": np.zeros((1, head_dim, head_dim), np.float32)}

  def check_params(self, arrays, head_dim):
    _check_upper(arrays, "v_feedback")

  def value_feedback(self, arrays):
    return arrays["v_feedback"]
