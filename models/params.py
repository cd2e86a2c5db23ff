"""Checkpoints -> model parameters: Hugging Face safetensors directories and GGUF files.

Both readers go through one table (`_layer_tensors`) that names, for every parameter of a layer,
its tensor in each format and its expected shape, so a missing tensor or a wrong shape is reported
by its checkpoint name. Parameters are assembled in float32 numpy, stacked in the layout of
`kvjax.models.decoder` (runs of equal layer types, [groups, run_length, ...]) and cast to the
requested dtype once.

Format quirks handled here:
  * HF Gemma stores RMSNorm weights as (scale - 1); GGUF Gemma-3 files already include the +1.
  * HF and GGUF store linear weights [out, in]; the model keeps kernels [in, out].
  * llama.cpp permutes the rows of Q and K (weights and biases) of `llama` GGUFs so that its
    interleaved RoPE matches the rotate-half one; `qwen2` and `gemma3` files are not permuted.
    The permutation is undone here.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.models.config import LOCAL, ModelConfig
from kvjax.models.decoder import CausalLM, layer_layout
from kvjax.models.gemma3 import Gemma3ForCausalLM
from kvjax.models.qwen2 import LlamaForCausalLM, Qwen2ForCausalLM

_MODEL_CLASSES = {"gemma3": Gemma3ForCausalLM, "qwen2": Qwen2ForCausalLM, "llama": LlamaForCausalLM}


def model_class(cfg: ModelConfig) -> type[CausalLM]:
  """The model class for `cfg.arch`."""
  try:
    return _MODEL_CLASSES[cfg.arch]
  except KeyError:
    raise ValueError(f"unknown architecture {cfg.arch!r}; known: {sorted(_MODEL_CLASSES)}") from None


# --------------------------------------------------------------------------------------------
# The tensor table.

# (parameter path inside a DecoderLayer, HF name after "layers.N.", GGUF name after "blk.N.")
_LINEARS = (
    ("attention.q_proj", "self_attn.q_proj", "attn_q"),
    ("attention.k_proj", "self_attn.k_proj", "attn_k"),
    ("attention.v_proj", "self_attn.v_proj", "attn_v"),
    ("attention.o_proj", "self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "mlp.down_proj", "ffn_down"),
)


def _layer_tensors(cfg: ModelConfig):
  """[(param path, hf name, gguf name, shape in the model, kind)] for one layer.

  kind: "kernel" (checkpoint [out, in], transposed), "bias" or "norm".
  """
  e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
  dims = {"attention.q_proj": (e, q), "attention.k_proj": (e, kv), "attention.v_proj": (e, kv),
          "attention.o_proj": (q, e), "mlp.gate_proj": (e, f), "mlp.up_proj": (e, f),
          "mlp.down_proj": (f, e)}
  has_bias = {"attention.q_proj": cfg.qkv_bias, "attention.k_proj": cfg.qkv_bias,
              "attention.v_proj": cfg.qkv_bias, "attention.o_proj": cfg.o_bias,
              "mlp.gate_proj": cfg.mlp_bias, "mlp.up_proj": cfg.mlp_bias,
              "mlp.down_proj": cfg.mlp_bias}
  out = []
  for path, hf, gg in _LINEARS:
    out.append((f"{path}.kernel", f"{hf}.weight", f"{gg}.weight", dims[path], "kernel"))
    if has_bias[path]:
      out.append((f"{path}.bias", f"{hf}.bias", f"{gg}.bias", (dims[path][1],), "bias"))
  out.append(("pre_attention_norm.scale", "input_layernorm.weight", "attn_norm.weight", (e,), "norm"))
  if cfg.sandwich_norm:
    out += [("post_attention_norm.scale", "post_attention_layernorm.weight",
             "post_attention_norm.weight", (e,), "norm"),
            ("pre_mlp_norm.scale", "pre_feedforward_layernorm.weight", "ffn_norm.weight", (e,),
             "norm"),
            ("post_mlp_norm.scale", "post_feedforward_layernorm.weight", "post_ffw_norm.weight",
             (e,), "norm")]
  else:
    out.append(("pre_mlp_norm.scale", "post_attention_layernorm.weight", "ffn_norm.weight", (e,),
                "norm"))
  if cfg.qk_norm:
    out += [("attention.q_norm.scale", "self_attn.q_norm.weight", "attn_q_norm.weight", (d,), "norm"),
            ("attention.k_norm.scale", "self_attn.k_norm.weight", "attn_k_norm.weight", (d,), "norm")]
  return out


def _global_tensors(cfg: ModelConfig):
  e, v = cfg.hidden_size, cfg.vocab_size
  out = [("embedding", "embed_tokens.weight", "token_embd.weight", (v, e), "embedding"),
         ("final_norm.scale", "norm.weight", "output_norm.weight", (e,), "norm")]
  if not cfg.tie_word_embeddings:
    out.append(("lm_head.kernel", "lm_head.weight", "output.weight", (e, v), "kernel"))
  return out


# --------------------------------------------------------------------------------------------
# Assembly.


def _nest(flat: Mapping[str, np.ndarray]) -> dict:
  nested: dict = {}
  for path, value in flat.items():
    node = nested
    *parents, leaf = path.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return nested


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if tuple(array.shape) != tuple(shape):
    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(array.shape)}, expected "
                     f"{tuple(shape)} for this model config")
  return array


def _stack_layers(cfg: ModelConfig, layers: list[dict[str, np.ndarray]]) -> dict:
  """Per-layer flat dicts -> {"group_runs": {r: nested [G, n, ...]}, "tail_runs": {...}}."""
  num_groups, group_runs, tail_runs = layer_layout(cfg)
  p = len(cfg.layer_pattern)
  out = {"group_runs": {}, "tail_runs": {}}
  for r, (_, n, offset) in enumerate(group_runs):
    flat = {}
    for key in layers[0]:
      flat[key] = np.stack([np.stack([layers[g * p + offset + j][key] for j in range(n)])
                            for g in range(num_groups)])
    out["group_runs"][r] = _nest(flat)
  for r, (_, n, offset) in enumerate(tail_runs):
    flat = {key: np.stack([layers[num_groups * p + offset + j][key] for j in range(n)])
            for key in layers[0]}
    out["tail_runs"][r] = _nest(flat)
  return out


def _convert(cfg: ModelConfig, fmt: str, get: Callable[[str], np.ndarray | None],
             layer_name: Callable[[int, str], str], global_name: Callable[[str], str],
             norm_offset: float, unpermute_qk: bool) -> dict:
  """Reads every tensor through `get` (None when absent) and returns the pure parameter dict."""
  column = 1 if fmt == "hf" else 2

  def read(name, shape, kind, path):
    array = get(name)
    if array is None:
      raise ValueError(f"checkpoint is missing tensor {name!r} (needed for {path})")
    array = np.asarray(array, np.float32)
    if kind == "kernel":
      array = _check_shape(name, array, shape[::-1]).T
    elif kind == "norm":
      array = _check_shape(name, array, shape) + np.float32(norm_offset)
    else:
      array = _check_shape(name, array, shape)
    return array

  layers = []
  for l in range(cfg.num_layers):
    flat = {}
    for entry in _layer_tensors(cfg):
      path, shape, kind = entry[0], entry[3], entry[4]
      name = layer_name(l, entry[column])
      array = read(name, shape, kind, f"layer {l} {path}")
      if unpermute_qk and path.startswith(("attention.q_proj", "attention.k_proj")):
        heads = cfg.num_heads if path.startswith("attention.q_proj") else cfg.num_kv_heads
        array = _unpermute_rope_rows(array, heads)
      flat[path] = array
    layers.append(flat)
  pure = _stack_layers(cfg, layers)
  for entry in _global_tensors(cfg):
    path, shape, kind = entry[0], entry[3], entry[4]
    pure.update(_nest({path: read(global_name(entry[column]), shape, kind, path)}))
  return pure


def _unpermute_rope_rows(array: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (interleaved RoPE -> rotate-half).

  llama.cpp's converter puts, within each head of d output rows, original row j*(d/2)+i
  (i < d/2, j < 2) at row 2*i+j, pairing channels i and i + d/2 as neighbours. `array` is a kernel [in, heads*d] (output axis
  last) or a bias [heads*d].
  """
  out_axis = array.shape[-1]
  d = out_axis // heads
  lead = array.shape[:-1]
  return array.reshape(*lead, heads, d // 2, 2).swapaxes(-1, -2).reshape(*lead, out_axis)


def permute_rope_rows(array: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's Q/K permutation (the inverse of `_unpermute_rope_rows`), same layout."""
  out_axis = array.shape[-1]
  d = out_axis // heads
  lead = array.shape[:-1]
  return array.reshape(*lead, heads, 2, d // 2).swapaxes(-1, -2).reshape(*lead, out_axis)


def build_model(cfg: ModelConfig, pure: dict, *, dtype=jnp.float32) -> CausalLM:
  """Instantiates `model_class(cfg)` with the parameters of `pure` (no random init is run)."""
  cls = model_class(cfg)
  abstract = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = nnx.to_pure_dict(state)
  exp_paths = {jax.tree_util.keystr(k): v for k, v in
               jax.tree_util.tree_flatten_with_path(expected)[0]}
  got_paths = {jax.tree_util.keystr(k): v for k, v in
               jax.tree_util.tree_flatten_with_path(pure)[0]}
  if exp_paths.keys() != got_paths.keys():
    missing = sorted(exp_paths.keys() - got_paths.keys())
    extra = sorted(got_paths.keys() - exp_paths.keys())
    raise ValueError(f"parameters do not match {cls.__name__}: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}")
  for path, want in exp_paths.items():
    if tuple(got_paths[path].shape) != tuple(want.shape):
      raise ValueError(f"parameter {path} has shape {tuple(got_paths[path].shape)}, expected "
                       f"{tuple(want.shape)}")
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, dtype), pure))
  return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------
# Hugging Face safetensors.


def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{directory!r} has no config.json: not a Hugging Face checkpoint directory")
  return _read_json(path)


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is corrupted: not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path} is corrupted: expected a JSON object, got {type(data).__name__}")
  return data


def _safe_open(path: str):
  """safetensors' reader, its errors (truncated or damaged files) named by file."""
  from safetensors import SafetensorError, safe_open
  try:
    return safe_open(path, framework="flax")
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): "
                     f"{e}") from None


def _hf_tensor_reader(directory: str) -> Callable[[str], np.ndarray | None]:
  """name -> float32 numpy array (None if absent), over one or several safetensors files."""
  index_path = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(index_path):
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index_path} is corrupted: no 'weight_map' object")
  else:
    single = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(single):
      raise ValueError(f"{directory!r} has neither model.safetensors nor "
                       "model.safetensors.index.json")
    with _safe_open(single) as f:
      weight_map = {k: "model.safetensors" for k in f.keys()}
  handles = {}

  def get(name):
    filename = weight_map.get(name)
    if filename is None:
      return None
    path = os.path.join(directory, filename)
    if filename not in handles:
      handles[filename] = _safe_open(path)
    # framework="flax" reads bfloat16 tensors too (numpy has no bfloat16).
    from safetensors import SafetensorError
    try:
      return np.asarray(handles[filename].get_tensor(name).astype(jnp.float32))
    except (SafetensorError, OSError, ValueError) as e:
      raise ValueError(f"{path}: cannot read tensor {name!r} (truncated or damaged?): "
                       f"{e}") from None

  get.names = frozenset(weight_map)
  return get


def params_from_hf(directory: str, cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict]:
  """(config, pure parameter dict) from a transformers `save_pretrained` directory."""
  cfg = ModelConfig.from_hf_config(read_hf_config(directory)) if cfg is None else cfg
  get = _hf_tensor_reader(directory)
  prefix = next((p for p in ("model.", "model.language_model.", "language_model.model.", "")
                 if f"{p}embed_tokens.weight" in get.names), None)
  if prefix is None:
    raise ValueError(f"checkpoint in {directory!r} is missing tensor 'model.embed_tokens.weight'")

  def global_name(name):
    return name if name == "lm_head.weight" else prefix + name

  pure = _convert(cfg, "hf", get, lambda l, n: f"{prefix}layers.{l}.{n}", global_name,
                  norm_offset=1.0 if cfg.arch == "gemma3" else 0.0, unpermute_qk=False)
  return cfg, pure


# --------------------------------------------------------------------------------------------
# GGUF.


def params_from_gguf(path_or_reader, cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict]:
  """(config, pure parameter dict) from a GGUF file (every tensor dequantized to float32)."""
  import gguf

  reader = path_or_reader
  if isinstance(path_or_reader, (str, os.PathLike)):
    if not os.path.isfile(path_or_reader):
      raise ValueError(f"GGUF file {os.fspath(path_or_reader)!r} does not exist")
    reader = gguf.GGUFReader(path_or_reader)
  cfg = ModelConfig.from_gguf(reader) if cfg is None else cfg
  tensors = {t.name: t for t in reader.tensors}

  def get(name):
    t = tensors.get(name)
    if t is None:
      return None
    array = gguf.quants.dequantize(t.data, t.tensor_type)
    # GGML lists dimensions fastest-first; numpy order is the reverse.
    return np.asarray(array, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))

  pure = _convert(cfg, "gguf", get, lambda l, n: f"blk.{l}.{n}", lambda n: n, norm_offset=0.0,
                  unpermute_qk=cfg.arch == "llama")
  return cfg, pure
