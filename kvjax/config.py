"""Configuration of a quantized KV cache, as data."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

ROTATIONS = ("none", "srht", "srft", "householder", "learned")
GROUP_SIZES = (32, 64, 128)
BITS = (4, 8)
_SCALE_DTYPES = ("bfloat16", "float16", "float32")
MAX_VALUE_RECENT = 64


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How keys and values are stored in a quantized cache.

  Attributes:
    key_bits: bits per key code, 4 or 8 (K8V4 keeps keys at 8 bits, values at 4).
    value_bits: bits per value code, 4 or 8.
    group_size: channels sharing one abs-max scale (32, 64 or 128). Bits per
      value = bits + 16 / group_size with bfloat16 scales.
    rotation: orthogonal rotation applied before quantization: "none", "srht"
      (sign-randomized Walsh-Hadamard, power-of-two head_dim), "srft"
      (sign-randomized real FFT, any even head_dim), "householder" (k random
      reflectors) or "learned" (parameters supplied by calibration).
    seed: seed of the random rotation (keys use `seed`, values `seed + 1`).
    householder_reflectors: number of reflectors for "householder";
      None means head_dim // 2.
    scale_dtype: storage dtype of the per-group scales, by name.
    key_rope_pairs: number P of RoPE channel pairs whose pre-RoPE key mean the cache
      removes position by position (`kvjax.rotary`; the cache holds P frequencies, channel
      pairs and means, filled in by `kvjax.smoothing.calibrate_caches`). 0: none.
    key_feedback: choose key codes with error feedback through the cache's `k_feedback`
      matrix (`kvjax.quantizer.feedback_levels`; GPTQ-style rounding for the queries'
      second moment, filled in by calibration) instead of nearest rounding.
    value_feedback: choose value codes with error feedback through the cache's `v_feedback`
      matrix: the same rounding for the error a value's codes put into the attention
      output after the output projection (`kvjax.smoothing`, fact 6).
    key_sink: keep the key at absolute position 0 (the attention sink: BOS, or whatever token
      opens the sequence, draws much of every query's attention) exact. Its codes are written
      as usual and its rounding error e_0 is kept in float32 (`k_sink`, one [D] vector per
      sequence and KV head); attention adds q . e_0 to that slot's logit.
    value_sink: keep the value at absolute position 0 exact the same way (`v_sink`, its
      rounding error in float32; attention adds p_0 e_0, p_0 the slot's attention weight).
      The sink's weight is large in every query head at once, so its value error does not
      average out.
    value_recent: W >= 0. Each new token's query reads the values of the W most recent tokens
      (its own included) exact. Values are stored as usual; `kvjax.append_and_attend` adds
      sum_w p_w e_w to each new query's output (e_w the rounding error of the value at
      position t - w, p_w the weight the query gives that slot). The query's own error is in
      hand; those of the W - 1 tokens before it are kept per sequence in float32 (`v_recent`
      [B, H, W - 1, D], a ring by position). Older positions, and `kvjax.attend` over a cache
      alone, read the stored values. 0: off.
    attention_impl: the implementation `kvjax.attend(..., impl="auto")` uses
      over this cache: "auto" (Pallas kernel on TPU/GPU decode, "int8dot" on
      CPU decode, "dequant" for CPU chunks, "xla" for TPU/GPU chunks), or a fixed
      "xla", "int8dot", "dequant", "pallas" or "reference". Part of the static
      config, so it is part of jit's cache key.
  """

  key_bits: int = 4
  value_bits: int = 4
  group_size: int = 32
  rotation: str = "srft"
  seed: int = 0
  householder_reflectors: int | None = None
  scale_dtype: str = "bfloat16"
  key_rope_pairs: int = 0
  key_feedback: bool = False
  value_feedback: bool = False
  key_sink: bool = False
  value_sink: bool = False
  value_recent: int = 0
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.attention_impl not in ("auto", "xla", "int8dot", "dequant", "pallas", "reference"):
      raise ValueError("QuantConfig.attention_impl must be 'auto', 'xla', 'int8dot', 'dequant', "
                       f"'pallas' or 'reference', got {self.attention_impl!r}")
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
      raise ValueError(f"QuantConfig.rotation must be one of {ROTATIONS}, got {self.rotation!r}")
    if self.scale_dtype not in _SCALE_DTYPES:
      raise ValueError(
          f"QuantConfig.scale_dtype must be one of {_SCALE_DTYPES}, got {self.scale_dtype!r}")
    if (not isinstance(self.key_rope_pairs, int) or isinstance(self.key_rope_pairs, bool)
        or self.key_rope_pairs < 0):
      raise ValueError("QuantConfig.key_rope_pairs must be an int >= 0, got "
                       f"{self.key_rope_pairs!r}")
    if not isinstance(self.key_feedback, bool):
      raise ValueError(f"QuantConfig.key_feedback must be a bool, got {self.key_feedback!r}")
    if not isinstance(self.value_feedback, bool):
      raise ValueError(f"QuantConfig.value_feedback must be a bool, got {self.value_feedback!r}")
    if not isinstance(self.key_sink, bool):
      raise ValueError(f"QuantConfig.key_sink must be a bool, got {self.key_sink!r}")
    if not isinstance(self.value_sink, bool):
      raise ValueError(f"QuantConfig.value_sink must be a bool, got {self.value_sink!r}")
    if (not isinstance(self.value_recent, int) or isinstance(self.value_recent, bool)
        or not 0 <= self.value_recent <= MAX_VALUE_RECENT):
      raise ValueError(f"QuantConfig.value_recent must be an int in [0, {MAX_VALUE_RECENT}], "
                       f"got {self.value_recent!r}")
    if self.householder_reflectors is not None and (
        not isinstance(self.householder_reflectors, int)
        or isinstance(self.householder_reflectors, bool) or self.householder_reflectors < 1):
      raise ValueError("QuantConfig.householder_reflectors must be >= 1 or None, got "
                       f"{self.householder_reflectors!r}")

  @property
  def scale_jnp_dtype(self):
    return jnp.dtype(self.scale_dtype)

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
    if self.key_rope_pairs > head_dim // 2:
      raise ValueError(f"QuantConfig.key_rope_pairs={self.key_rope_pairs} exceeds the "
                       f"{head_dim // 2} channel pairs of {name}={head_dim}")
    if self.rotation == "srht" and head_dim & (head_dim - 1):
      raise ValueError(
          f"rotation='srht' needs a power-of-two {name}, got {head_dim}; use 'srft' instead")

  @property
  def name(self) -> str:
    """Short label such as 'K4V4-g32-srft' ('+rope16', '+fb', '+vfb', '+sink' for rotary
    offsets, key and value feedback rounding, an exact position-0 key / value; '+vrec<W>' for
    the W most recent values exact)."""
    extra = ((f"+rope{self.key_rope_pairs}" if self.key_rope_pairs else "")
             + ("+fb" if self.key_feedback else "") + ("+vfb" if self.value_feedback else "")
             + ("+sink" if self.key_sink else "") + ("+vsink" if self.value_sink else "")
             + (f"+vrec{self.value_recent}" if self.value_recent else ""))
    return f"K{self.key_bits}V{self.value_bits}-g{self.group_size}-{self.rotation}{extra}"
