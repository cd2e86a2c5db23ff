"""The interface every cache correction implements, and the registry of correction kinds.

A quantized cache stores each key and value as rotated 4- or 8-bit codes; a correction makes
some part of attention over those codes exact (or nearly), at a small fixed cost. Each one:

  * names the arrays it owns: `params` (per layer, filled in by calibration, [Hr, ...] with
    Hr in {1, kv_heads}, or `shared` ones with no head axis) and `state` (per sequence and KV
    head, [B, H, ...], written by the cache itself);
  * does its write-time work: `centre_keys` (remove an offset before quantization),
    `key_feedback` / `value_feedback` (how codes are rounded), `write` (update its state from
    a chunk of new tokens, and hand the step's queries what they need: `pending`);
  * adds its read-time terms: `logit_terms` (unscaled additions to q . k per slot),
    `value_terms` (errors added to the output with the weight of given slots), the same for
    the oracle (`restore_keys`, `restore_values`), and for the fused decode kernel
    (`kernel_args`: extra split-K states the kernel already understands).

Attention implementations call these hooks through `kvjax.corrections.apply`, once, whatever
the corrections are; nothing outside a correction's module knows what it does. A correction
is a frozen dataclass: its fields are static hyperparameters (part of `QuantConfig`, hence of
jit's cache key); its arrays live in the cache (`QuantizedKVCache.corrections`, one dict per
correction, in the config's order).

A new correction is one module: subclass `Correction`, decorate with `@register`, import the
module in `kvjax/corrections/__init__.py`.

The per-channel scales λ are not a correction: they are part of the basis the codes live in
(x' = R (x / λ)), which the rotated-domain attention folds into the query and the output like
the rotation itself (`kvjax.attention`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np

# kind -> class, in registration order, which is also the canonical order of a config's
# corrections (and of the '+...' labels in its name).
REGISTRY: dict[str, type] = {}


def register(cls):
  """Class decorator: adds a Correction subclass to the registry under `cls.kind`."""
  if not (isinstance(cls, type) and issubclass(cls, Correction)):
    raise TypeError(f"register takes a Correction subclass, got {cls!r}")
  if not cls.kind or cls.kind in REGISTRY:
    raise ValueError(f"correction kind {cls.kind!r} is empty or already registered")
  for read, restore in (("logit_terms", "restore_keys"), ("value_terms", "restore_values")):
    if cls.restorable and _overrides(cls, read) and not _overrides(cls, restore):
      raise TypeError(f"correction {cls.kind!r} defines {read} but not {restore}: give the "
                      f"oracle its restored vectors, or set restorable = False (the oracle then "
                      "applies its read-time terms as they are)")
  names = cls.params + cls.state
  for other in REGISTRY.values():
    clash = set(names) & set(other.params + other.state)
    if clash:
      raise ValueError(f"correction {cls.kind!r}: arrays {sorted(clash)} already belong to "
                       f"{other.kind!r}")
  REGISTRY[cls.kind] = cls
  return cls


def _overrides(cls, name: str) -> bool:
  return getattr(cls, name) is not getattr(Correction, name)


class Write(NamedTuple):
  """What a correction sees of a chunk of new tokens being written (all inside one layer).

  k, v: the new keys and values [B, T, H, D] as given; keys: the keys after every
  correction's `centre_keys` (float32: what the key codes hold before rotation); positions:
  int32 [B, T] absolute positions; valid: bool [B, T], token t of sequence b is real;
  lengths, new_lengths: int32 [B] before and after the write; stored: the chunk's codes and
  scales ("k_codes", "k_scales", "v_codes", "v_scales", each [B, T, H, ...]); basis: the
  cache's (k_rotation, k_lambda, v_rotation, v_lambda); config: its QuantConfig.
  """

  k: jax.Array
  v: jax.Array
  keys: jax.Array
  positions: jax.Array
  valid: jax.Array
  lengths: jax.Array
  new_lengths: jax.Array
  stored: dict
  basis: tuple
  config: Any


class Read(NamedTuple):
  """What a correction sees of one attention call: grouped queries qg float32
  [B, H, T, R, D] (query head h * R + r reads KV head h); kv_pos int32 [B, N], the absolute
  position of each slot attended over (-1 empty); q_pos int32 [B, T]."""

  qg: jax.Array
  kv_pos: jax.Array
  q_pos: jax.Array


class KernelRead(NamedTuple):
  """What a correction sees of one fused decode step: qg float32 [B, H, R, D] (the single
  query token, grouped), scale (the logit scale), and to_rotated(e) mapping value errors
  [B, H, ..., D] into the kernel's rotated value domain, R_v (e / λ_v)."""

  qg: jax.Array
  scale: float
  to_rotated: Any


@dataclasses.dataclass(frozen=True)
class Correction:
  """Base class: every hook defaults to "nothing to do". See the module docstring."""

  kind: ClassVar[str] = ""
  params: ClassVar[tuple[str, ...]] = ()
  shared: ClassVar[tuple[str, ...]] = ()
  state: ClassVar[tuple[str, ...]] = ()
  # True when restore_keys / restore_values describe the correction completely (the oracle
  # then needs no logit_terms / value_terms from it); False for query-dependent corrections.
  restorable: ClassVar[bool] = True
  # True when the value at position 0 reads exact through this correction (others that
  # correct values leave that slot to it rather than count its error twice).
  exact_sink_value: ClassVar[bool] = False

  # ---- description

  @property
  def label(self) -> str:
    """Suffix of the cache format's name, e.g. '+sink'."""
    return ""

  def to_dict(self) -> dict:
    return {"kind": self.kind, **dataclasses.asdict(self)}

  def check(self, head_dim: int, *, name: str = "head_dim") -> None:
    """Raises ValueError if this correction cannot apply to vectors of `head_dim`."""

  # ---- arrays

  def param_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
    """Shape of each param: for per-head ones the shape after the leading [Hr] axis; for
    `shared` ones the whole shape."""
    return {}

  def default_params(self, head_dim: int) -> dict[str, np.ndarray]:
    """The params' values when calibration gave none (per-head ones with Hr = 1): the
    correction is then a no-op."""
    return {}

  def param_dtype(self, name: str):
    return np.float32

  def check_params(self, arrays: dict, head_dim: int) -> None:
    """Raises ValueError if concrete param values are unusable (beyond shape and finiteness,
    which the caller checks)."""

  def state_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
    """Shape of each per-sequence state array after its [B, H] axes (float32, zeros)."""
    return {}

  # ---- write time

  def centre_keys(self, keys: jax.Array, arrays: dict, positions: jax.Array) -> jax.Array:
    """Keys float32 [B, T, H, D] at `positions` [B, T] -> what the codes should hold."""
    return keys

  def key_feedback(self, arrays: dict):
    """None, or the error-feedback matrix [Hr, D, D] key rounding uses."""
    return None

  def value_feedback(self, arrays: dict):
    """None, or the error-feedback matrix [Hr, D, D] value rounding uses."""
    return None

  def write(self, w: Write, arrays: dict) -> tuple[dict, Any]:
    """(new state arrays, pending) for a chunk of new tokens; pending is handed to this
    step's `value_terms` / `kernel_args` (None when the correction needs nothing)."""
    return {name: arrays[name] for name in self.state}, None

  # ---- read time

  def logit_terms(self, r: Read, arrays: dict):
    """None, or unscaled terms added to q . k: float32 [B, H, T, R, 1] or [..., N]."""
    return None

  def value_terms(self, r: Read, arrays: dict, pending):
    """None, or (slots float32 [B, T, K, N] one-hot, errors float32 [B, H, T, K, D]): the
    output gains sum_k weight(slot k) * errors[k] (original value domain)."""
    return None

  def restore_keys(self, k: jax.Array, arrays: dict, kv_pos: jax.Array) -> jax.Array:
    """Dequantized keys [B, H, N, D] -> the keys this correction makes them (the oracle)."""
    return k

  def restore_values(self, v: jax.Array, arrays: dict, kv_pos: jax.Array) -> jax.Array:
    return v

  def kernel_args(self, r: KernelRead, arrays: dict, pending) -> dict:
    """Extra arguments of `kvjax.pallas_kernels.decode_attention` (summed where two
    corrections give the same one). A correction with read-time terms must give them here, or
    the fused kernel refuses it (rather than drop its terms)."""
    if _overrides(type(self), "logit_terms") or _overrides(type(self), "value_terms"):
      raise NotImplementedError(
          f"correction {self.kind!r} has read-time terms but no kernel_args: the fused decode "
          "kernel cannot apply it; use another attention implementation (impl='xla')")
    return {}


def from_dict(d: dict) -> Correction:
  """The correction a `to_dict()` describes; ValueError naming an unknown kind or field."""
  if not isinstance(d, dict) or "kind" not in d:
    raise ValueError(f"a correction must be a dict with a 'kind', got {d!r}")
  kind = d["kind"]
  cls = REGISTRY.get(kind)
  if cls is None:
    raise ValueError(f"unknown correction kind {kind!r}; known: {sorted(REGISTRY)}")
  fields = {k: v for k, v in d.items() if k != "kind"}
  known = {f.name for f in dataclasses.fields(cls)}
  if set(fields) - known:
    raise ValueError(f"correction {kind!r}: unknown fields {sorted(set(fields) - known)}")
  return cls(**fields)


def canonical(corrections) -> tuple:
  """The corrections as a tuple in registry order; TypeError / ValueError for anything that is
  not a registered Correction, or two of one kind."""
  try:
    items = tuple(corrections)
  except TypeError:
    raise TypeError(f"corrections must be a tuple of kvjax.corrections.Correction, got "
                    f"{type(corrections).__name__}") from None
  for c in items:
    if not isinstance(c, Correction) or type(c) not in REGISTRY.values():
      raise TypeError(f"corrections must hold registered kvjax.corrections.Correction values, "
                      f"got {c!r}")
  kinds = [c.kind for c in items]
  dup = sorted({k for k in kinds if kinds.count(k) > 1})
  if dup:
    raise ValueError(f"corrections holds {dup} more than once")
  order = list(REGISTRY)
  return tuple(sorted(items, key=lambda c: order.index(c.kind)))


def check_int(value, name: str, lo: int, hi: int | None = None) -> None:
  if (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo
      or (hi is not None and value > hi)):
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise ValueError(f"{name} must be an int {rng}, got {value!r}")
