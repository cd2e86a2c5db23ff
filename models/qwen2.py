"""Qwen2 / Qwen2.5 and Llama-family decoders on kvjax caches.

Both are pre-norm decoders with a SiLU gated MLP and rotate-half RoPE. Qwen2 adds biases to the
query, key and value projections (its large key bias is what makes 4-bit keys hard; the cache,
not the model, deals with that). Llama is Qwen2 without those biases, with optional Llama-3 RoPE
frequency scaling. Every layer is global unless the config says otherwise, so the forward pass is
a single scan over all layers.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from kvjax.models.config import ModelConfig
from kvjax.models.decoder import CausalLM


class Qwen2ForCausalLM(CausalLM):
  """Qwen2 / Qwen2.5 language model. See `CausalLM` for the call and cache contract."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    if not isinstance(cfg, ModelConfig) or cfg.arch != "qwen2":
      raise ValueError(f"Qwen2ForCausalLM needs a ModelConfig with arch='qwen2', got "
                       f"{getattr(cfg, 'arch', type(cfg).__name__)!r}")
    super().__init__(cfg, dtype=dtype, rngs=rngs)


class LlamaForCausalLM(CausalLM):
  """Llama-family language model (Llama 2/3, and look-alikes). See `CausalLM`."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    if not isinstance(cfg, ModelConfig) or cfg.arch != "llama":
      raise ValueError(f"LlamaForCausalLM needs a ModelConfig with arch='llama', got "
                       f"{getattr(cfg, 'arch', type(cfg).__name__)!r}")
    super().__init__(cfg, dtype=dtype, rngs=rngs)
