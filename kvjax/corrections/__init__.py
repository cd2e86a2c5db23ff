"""Cache corrections as values: what makes 4-bit keys and values read (nearly) exact.

    from kvjax import corrections as kc
    quant = kvjax.QuantConfig(corrections=(kc.KeyOffset(), kc.RotaryKeyOffset(16),
                                           kc.KeyFeedback(), kc.KeySink(), kc.ValueSink(),
                                           kc.RecentValues(4)))

Each correction is one module (base.py has the interface and the registry); the functions here
apply a config's corrections through that interface, for the cache (write time) and for every
attention implementation (read time). Order of registration (below) is the canonical order.
"""

from __future__ import annotations

from kvjax.corrections.base import (REGISTRY, Correction, KernelRead, Read, Write, canonical,
                                    from_dict, register)
from kvjax.corrections.key_offset import KeyOffset
from kvjax.corrections.rotary_offset import RotaryKeyOffset
from kvjax.corrections.feedback import KeyFeedback, ValueFeedback
from kvjax.corrections.sink import KeySink, ValueSink
from kvjax.corrections.recent import MAX_WINDOW, RecentValues


def param_names() -> tuple[str, ...]:
  """Every registered correction's per-layer params (calibration tensors)."""
  return tuple(n for cls in REGISTRY.values() for n in cls.params)


def find(corrections, kind) -> int | None:
  """Index of the correction of `kind` (a kind string or a Correction class), or None."""
  kind = kind if isinstance(kind, str) else kind.kind
  for i, c in enumerate(corrections):
    if c.kind == kind:
      return i
  return None


# ------------------------------------------------------------------------------- write time


def centre_keys(corrections, arrays, keys, positions):
  for c, a in zip(corrections, arrays):
    keys = c.centre_keys(keys, a, positions)
  return keys


def feedback(corrections, arrays):
  """(key feedback matrix or None, value feedback matrix or None)."""
  kf = vf = None
  for c, a in zip(corrections, arrays):
    kf = c.key_feedback(a) if kf is None else kf
    vf = c.value_feedback(a) if vf is None else vf
  return kf, vf


def write(corrections, arrays, w: Write):
  """(new arrays per correction, pending per correction) after writing a chunk."""
  new, pending = [], []
  for c, a in zip(corrections, arrays):
    state, p = c.write(w, a)
    new.append({**a, **state})
    pending.append(p)
  return tuple(new), tuple(pending)


# -------------------------------------------------------------------------------- read time


def logit_terms(corrections, arrays, r: Read, *, oracle: bool = False):
  """Sum of the corrections' unscaled logit terms ([B, H, T, R, 1 or N]) or None (with
  `oracle`, only those `restore_keys` does not already describe)."""
  total = None
  for c, a in zip(corrections, arrays):
    if oracle and c.restorable:
      continue
    term = c.logit_terms(r, a)
    if term is not None:
      total = term if total is None else total + term
  return total


def value_terms(corrections, arrays, pending, r: Read, *, oracle: bool = False):
  """None, or a list with one (slots float32 [B, T, K, N], errors float32 [B, H, T, K, D]) per
  correction that adds weighted errors to the output, in config order (with `oracle`, only
  those `restore_values` does not already describe). Applied one after another, so each
  correction's terms are summed exactly as if it were the only one."""
  pending = pending if pending is not None else (None,) * len(corrections)
  slots, errors = [], []
  for c, a, p in zip(corrections, arrays, pending):
    if oracle and c.restorable:
      continue
    terms = c.value_terms(r, a, p)
    if terms is not None:
      slots.append(terms[0])
      errors.append(terms[1])
  return list(zip(slots, errors)) or None


def restore(corrections, arrays, k, v, kv_pos):
  """The oracle's keys and values [B, H, N, D] from dequantized ones."""
  for c, a in zip(corrections, arrays):
    k = c.restore_keys(k, a, kv_pos)
    v = c.restore_values(v, a, kv_pos)
  return k, v


def kernel_args(corrections, arrays, pending, r: KernelRead) -> dict:
  pending = pending if pending is not None else (None,) * len(corrections)
  out = {}
  for c, a, p in zip(corrections, arrays, pending):
    for name, val in c.kernel_args(r, a, p).items():
      out[name] = val if name not in out else out[name] + val
  return out


__all__ = ["Correction", "REGISTRY", "register", "from_dict", "canonical", "Write", "Read",
           "KernelRead", "KeyOffset", "RotaryKeyOffset", "KeyFeedback", "ValueFeedback",
           "KeySink", "ValueSink", "RecentValues", "MAX_WINDOW"]
