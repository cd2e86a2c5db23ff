"""Flax NNX decoders (Gemma-3, Qwen2/2.5, Llama) running on kvjax caches, with checkpoint loading
and batched generation.

    model, tokenizer = kvjax.models.load("gemma3-270m")
    texts = kvjax.generate(model, tokenizer, ["Once upon a time"], max_new_tokens=32)
"""

from kvjax.models.config import ModelConfig, RopeScaling, PRESETS
from kvjax.models.decoder import CausalLM, cache_lengths, with_separate_layers
from kvjax.models.gemma3 import Gemma3ForCausalLM
from kvjax.models.qwen2 import LlamaForCausalLM, Qwen2ForCausalLM
from kvjax.models.params import model_class, build_model, params_from_hf, params_from_gguf
from kvjax.models.runner import Runner, prefill, collect_stats, windows
from kvjax.models.sharding import Layout, shard


def __getattr__(name):
  # load / generate pull in tokenizers and checkpoint download code: import on first use.
  if name in ("load", "attach_calibration"):
    from kvjax.models import loading
    return getattr(loading, name)
  if name == "generate":
    from kvjax.models.generate import generate
    return generate
  raise AttributeError(f"module 'kvjax.models' has no attribute {name!r}")


__all__ = [
    "ModelConfig", "RopeScaling", "PRESETS", "CausalLM", "Gemma3ForCausalLM", "Qwen2ForCausalLM",
    "LlamaForCausalLM", "cache_lengths", "model_class", "build_model", "params_from_hf",
    "params_from_gguf", "load", "attach_calibration", "generate", "with_separate_layers", "Runner", "prefill",
    "collect_stats", "windows", "Layout", "shard",
]
