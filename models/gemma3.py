"""Gemma-3 text decoder on kvjax caches.

Gemma-3 specifics, all carried by `ModelConfig` and implemented in the shared blocks
(`kvjax.models.layers`): embeddings multiplied by sqrt(hidden) rounded to the parameter dtype;
RMSNorm on every query and key head before RoPE; norms before and after both attention and MLP;
GELU-tanh gated MLP; local (sliding-window, RoPE base 1e4) and global (RoPE base 1e6, optional
scaling) layers in a repeating pattern, by default five local then one global; attention scale
query_pre_attn_scalar ** -0.5; tied embeddings; optional final logit soft-cap.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from kvjax.models.config import ModelConfig
from kvjax.models.decoder import CausalLM


class Gemma3ForCausalLM(CausalLM):
  """Gemma-3 (text) language model. See `CausalLM` for the call and cache contract."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    if not isinstance(cfg, ModelConfig) or cfg.arch != "gemma3":
      raise ValueError(f"Gemma3ForCausalLM needs a ModelConfig with arch='gemma3', got "
                       f"{getattr(cfg, 'arch', type(cfg).__name__)!r}")
    super().__init__(cfg, dtype=dtype, rngs=rngs)
