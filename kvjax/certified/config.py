"""What a certified cache stores and what it promises: a format, a tolerance, a ladder."""

from __future__ import annotations

import dataclasses

from kvjax.config import QuantConfig

MEMORY_KINDS = ("pinned_host", "unpinned_host", "device")


@dataclasses.dataclass(frozen=True)
class CertifiedConfig:
  """A two-tier cache whose attention is certified per head and step (docs/certified.md).

  The compressed tier (codes and scales, on the device) is read every step; the exact tier
  (bfloat16 originals, in `memory_kind` memory) only for the blocks, or the rows, whose
  certificate the compressed tier cannot meet.

  Attributes:
    tol: relative tolerance. A returned row (one query token, one query head) is either
      exact or carries a certificate ||O - O_exact||_2 <= max(atol, tol * ||O_exact||_2)
      (the norm of the exact output bounded from below by ||O|| - bound).
    atol: absolute floor of the tolerance (0: relative only).
    quant: the compressed tier's format (`QuantConfig` without corrections: the certificate
      is stated for plain rotated group-quantized codes). Default K8V4, group 32, SRFT.
    block_size: tokens per block, the unit of the per-block error metadata and of promotion
      (16, as in the paper).
    promote: the ladder's promotion rungs: rung i fetches the exact keys and values of the
      `promote[i]` blocks with the largest contribution to the bound, per KV head, and only
      runs when a row is still uncertified. Strictly increasing.
    exact_heads: the exact rung's budget: when at most this many KV heads (of the batch) still
      hold an uncertified row, only their exact tier moves to the device; beyond it, the whole
      layer's.
    center: store keys and values minus a per-sequence, per-head offset, the mean of the
      sequence's first write (a prefill chunk). Softmax ignores a key offset shared by every
      token and a convex combination carries a value offset exactly, so the certificate loses
      nothing while the codes' range shrinks to the spread around the mean (keys with a large
      shared offset, as Qwen's k_proj bias makes them, would otherwise spend their 8 or 4 bits
      on the offset).
    memory_kind: where the exact tier lives ("pinned_host" by default; "device" keeps it
      beside the codes, e.g. to measure the compressed path alone).
  """

  tol: float = 0.01
  atol: float = 0.0
  quant: QuantConfig = QuantConfig(key_bits=8, value_bits=4, group_size=32, rotation="srft")
  block_size: int = 16
  promote: tuple[int, ...] = (4, 32)
  exact_heads: int = 1
  center: bool = True
  memory_kind: str = "pinned_host"

  def __post_init__(self):
    for name in ("tol", "atol"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
        raise ValueError(f"CertifiedConfig.{name} must be a finite number >= 0, got {v!r}")
      object.__setattr__(self, name, float(v))
    if self.tol == 0 and self.atol == 0:
      raise ValueError("CertifiedConfig: tol and atol are both 0: every row would need exact "
                       "attention; use a dense cache instead")
    if not isinstance(self.quant, QuantConfig):
      raise TypeError(f"CertifiedConfig.quant must be a kvjax.QuantConfig, got "
                      f"{type(self.quant).__name__}")
    if self.quant.corrections:
      raise ValueError("CertifiedConfig.quant must have no corrections (the certificate is "
                       "stated for plain rotated group-quantized codes), got "
                       f"{[c.kind for c in self.quant.corrections]}")
    if (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
        or self.block_size < 1):
      raise ValueError(f"CertifiedConfig.block_size must be an int >= 1, got {self.block_size!r}")
    promote = tuple(self.promote)
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in promote) or any(
        a >= b for a, b in zip(promote, promote[1:])):
      raise ValueError("CertifiedConfig.promote must be strictly increasing ints >= 1, got "
                       f"{self.promote!r}")
    object.__setattr__(self, "promote", promote)
    if (isinstance(self.exact_heads, bool) or not isinstance(self.exact_heads, int)
        or self.exact_heads < 1):
      raise ValueError(f"CertifiedConfig.exact_heads must be an int >= 1, got {self.exact_heads!r}")
    if not isinstance(self.center, bool):
      raise ValueError(f"CertifiedConfig.center must be a bool, got {self.center!r}")
    if self.memory_kind not in MEMORY_KINDS:
      raise ValueError(f"CertifiedConfig.memory_kind must be one of {MEMORY_KINDS}, got "
                       f"{self.memory_kind!r}")

  @property
  def rungs(self) -> tuple[str, ...]:
    """Names of the ladder's rungs, in order: what `rows` statistics count."""
    return ("accept",) + tuple(f"promote{p}" for p in self.promote) + ("exact",)
