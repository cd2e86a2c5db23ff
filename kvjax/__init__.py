"""kvjax: rotated 4-bit KV caches, fused attention kernels and Flax models in JAX.

The core surface:

    cfg = kvjax.QuantConfig(key_bits=4, value_bits=4, group_size=32, rotation="srft",
                            corrections=(kvjax.corrections.KeyOffset(), ...))
    cache = kvjax.init_cache(batch, kv_heads, max_len, head_dim, quant=cfg)
    cache = kvjax.append(cache, k, v)          # k, v: [batch, seq, kv_heads, head_dim]
    out = kvjax.attend(q, cache)               # q: [batch, q_seq, q_heads, head_dim]
    out, cache = kvjax.append_and_attend(cache, q, k, v)   # what a model layer calls
    kvjax.nbytes(cache)
"""

from kvjax.config import QuantConfig
from kvjax.cache import (DenseKVCache, QuantizedKVCache, StatsKVCache, KVCache, init_cache,
                         append, nbytes, positions, check_overflow, with_stats)
from kvjax.attention import attend, append_and_attend, attend_reference
from kvjax import corrections, rotations, quantizer

__version__ = "0.1.0"


def __getattr__(name):
  # Heavy, optional parts load on first use.
  if name == "generate":
    from kvjax.models.generate import generate
    return generate
  if name == "models":
    import importlib
    return importlib.import_module("kvjax.models")
  raise AttributeError(f"module 'kvjax' has no attribute {name!r}")


__all__ = [
    "QuantConfig", "DenseKVCache", "QuantizedKVCache", "StatsKVCache", "with_stats", "KVCache", "init_cache", "append",
    "attend", "append_and_attend", "attend_reference", "nbytes", "positions", "check_overflow",
    "corrections", "rotations", "quantizer", "generate",
]
