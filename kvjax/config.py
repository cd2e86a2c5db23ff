"""Configuration of a quantized KV cache, as data: a format, a rotation and corrections."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax import corrections as corrections_lib
from kvjax.corrections import Correction

# Rotations the cache can generate. Any other (a learned one) is a value: pass the matrices to
# `kvjax.init_cache(key_rotation=..., value_rotation=...)` or load them with a calibration.
ROTATIONS = ("none", "srht", "srft", "householder")
GROUP_SIZES = (32, 64, 128)
BITS = (4, 8)
_SCALE_DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How keys and values are stored in a quantized cache.

  A format (bits, group size, scale dtype), the rotation the cache starts from, and a tuple of
  corrections (`kvjax.corrections`: key offsets, rotary key offsets, feedback rounding, exact
  sink key and value, exact recent values, ...), each a value with its own module. Which
  attention implementation reads the cache is chosen per call (`kvjax.attend(impl=...)`), not
  here.

  Attributes:
    key_bits: bits per key code, 4 or 8 (K8V4 keeps keys at 8 bits, values at 4).
    value_bits: bits per value code, 4 or 8.
    group_size: channels sharing one abs-max scale (32, 64 or 128). Bits per
      value = bits + 16 / group_size with bfloat16 scales.
    rotation: the orthogonal rotation a new cache generates: "none", "srht"
      (sign-randomized Walsh-Hadamard, power-of-two head_dim), "srft"
      (sign-randomized real FFT, any even head_dim) or "householder" (k random
      reflectors). A learned rotation is not a name but a value: matrices given to
      `kvjax.init_cache` (or held by a calibration) replace the generated ones.
    seed: seed of the random rotation (keys use `seed`, values `seed + 1`).
    householder_reflectors: number of reflectors for "householder";
      None means head_dim // 2.
    scale_dtype: storage dtype of the per-group scales, by name.
    corrections: `kvjax.corrections.Correction` values, at most one of each kind; kept in
      the registry's canonical order.
  """

  key_bits: int = 4
  value_bits: int = 4
  group_size: int = 32
  rotation: str = "srft"
  seed: int = 0
  householder_reflectors: int | None = None
  scale_dtype: str = "bfloat16"
  corrections: tuple[Correction, ...] = ()

  def __post_init__(self):
    for name in ("key_bits", "value_bits", "group_size", "seed"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"QuantConfig.{name} must be an int, got {v!r}")
    if self.key_bits not in BITS:
      raise ValueError(f"QuantConfig.key_bits must be one of {BITS}, got {self.key_bits!r}")
    if self.value_bits not in BITS:
      raise ValueError(f"QuantConfig.value_bits must be one of {BITS}, got {self.value_bits!r}")
    if self.group_size not in GROUP_SIZES:
      raise ValueError(
          f"QuantConfig.group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")
    if self.rotation not in ROTATIONS:
      hint = (" (a learned rotation is a value: pass key_rotation / value_rotation matrices to "
              "kvjax.init_cache, or a calibration)" if self.rotation == "learned" else "")
      raise ValueError(f"QuantConfig.rotation must be one of {ROTATIONS}, got "
                       f"{self.rotation!r}{hint}")
    if self.scale_dtype not in _SCALE_DTYPES:
      raise ValueError(
          f"QuantConfig.scale_dtype must be one of {_SCALE_DTYPES}, got {self.scale_dtype!r}")
    if self.householder_reflectors is not None and (
        not isinstance(self.householder_reflectors, int)
        or isinstance(self.householder_reflectors, bool) or self.householder_reflectors < 1):
      raise ValueError("QuantConfig.householder_reflectors must be >= 1 or None, got "
                       f"{self.householder_reflectors!r}")
    try:
      object.__setattr__(self, "corrections", corrections_lib.canonical(self.corrections))
    except (TypeError, ValueError) as e:
      raise type(e)(f"QuantConfig.{e}") from None

  @property
  def scale_jnp_dtype(self):
    return jnp.dtype(self.scale_dtype)

  def correction(self, kind):
    """The correction of `kind` (a kind string or class), or None."""
    i = corrections_lib.find(self.corrections, kind)
    return None if i is None else self.corrections[i]

  def with_corrections(self, *corrections) -> "QuantConfig":
    """This config with `corrections` added (replacing any of the same kind)."""
    kinds = {c.kind for c in corrections}
    kept = tuple(c for c in self.corrections if c.kind not in kinds)
    return dataclasses.replace(self, corrections=kept + tuple(corrections))

  def to_dict(self) -> dict:
    """JSON-able form (`from_dict` inverts it)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["corrections"] = [c.to_dict() for c in self.corrections]
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "QuantConfig":
    """The config a `to_dict()` describes; ValueError naming an unknown field or correction."""
    if not isinstance(d, dict):
      raise ValueError(f"a QuantConfig description must be a dict, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown QuantConfig fields {unknown}")
    d = dict(d)
    d["corrections"] = tuple(corrections_lib.from_dict(c) for c in d.get("corrections", ()))
    return cls(**d)

  def bits_per_value(self, which: str = "mean") -> float:
    """Storage bits per cached scalar, scales included ("key", "value" or "mean")."""
    scale_bits = 8 * self.scale_jnp_dtype.itemsize / self.group_size
    k = self.key_bits + scale_bits
    v = self.value_bits + scale_bits
    return {"key": k, "value": v, "mean": (k + v) / 2}[which]

  def check_head_dim(self, head_dim: int, *, name: str = "head_dim") -> None:
    """Raises ValueError if `head_dim` cannot be stored with this config."""
    if head_dim % 2:
      raise ValueError(f"{name} must be even to pack two 4-bit codes per byte, got {head_dim}")
    if head_dim % self.group_size:
      raise ValueError(
          f"{name}={head_dim} is not divisible by QuantConfig.group_size={self.group_size}")
    if self.rotation == "srht" and head_dim & (head_dim - 1):
      raise ValueError(
          f"rotation='srht' needs a power-of-two {name}, got {head_dim}; use 'srft' instead")
    for c in self.corrections:
      c.check(head_dim, name=name)

  @property
  def name(self) -> str:
    """Short label such as 'K4V4-g32-srft', then each correction's label ('+mean', '+rope16',
    '+fb', '+vfb', '+sink', '+vsink', '+vrec4', ...)."""
    extra = "".join(c.label for c in self.corrections)
    return f"K{self.key_bits}V{self.value_bits}-g{self.group_size}-{self.rotation}{extra}"
