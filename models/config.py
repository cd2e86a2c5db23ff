"""Decoder configuration as data: one frozen dataclass for Gemma-3, Qwen2 and Llama.

A `ModelConfig` fully describes the architecture; the model code branches only on its fields
(never on the checkpoint's file format). Presets give the real sizes; `from_hf_config` reads a
transformers `config.json` dict and `from_gguf` the metadata of a `gguf.GGUFReader`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

ARCHITECTURES = ("gemma3", "qwen2", "llama")
LOCAL = "local"    # sliding-window attention layer
GLOBAL = "global"  # full attention layer
ACTIVATIONS = ("gelu_tanh", "silu")
ROPE_SCALING_KINDS = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rescaling of RoPE inverse frequencies for long context.

  Attributes:
    kind: "linear" (every frequency divided by `factor`) or "llama3" (low frequencies divided by
      `factor`, high ones kept, a smooth blend in between).
    factor: the context extension factor.
    low_freq_factor, high_freq_factor, original_max_position_embeddings: "llama3" only.
  """

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ROPE_SCALING_KINDS:
      raise ValueError(f"RopeScaling.kind must be one of {ROPE_SCALING_KINDS}, got {self.kind!r}")
    if not self.factor > 0:
      raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor!r}")
    if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError("RopeScaling: high_freq_factor must exceed low_freq_factor, got "
                       f"{self.high_freq_factor} <= {self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only language model.

  Attributes:
    arch: "gemma3", "qwen2" or "llama".
    vocab_size, hidden_size, intermediate_size, num_layers: the usual sizes.
    num_heads, num_kv_heads, head_dim: query heads, key/value heads (GQA when fewer), channels
      per head.
    layer_types: per layer, "local" (sliding window) or "global" (full attention).
    sliding_window: window of the local layers in tokens (a query at position t sees keys at
      positions > t - sliding_window); None if there are no local layers.
    rope_theta: RoPE base of global layers; rope_local_theta: of local layers.
    rope_scaling: optional rescaling applied to the global layers' frequencies.
    rms_norm_eps: epsilon inside every RMSNorm.
    activation: gated-MLP activation, "gelu_tanh" or "silu".
    qkv_bias, o_bias, mlp_bias: whether those projections carry a bias.
    qk_norm: RMSNorm over each query/key head before RoPE (Gemma-3).
    sandwich_norm: extra RMSNorm on the outputs of attention and MLP (Gemma-3).
    scale_embeddings: multiply embeddings by sqrt(hidden_size) (Gemma).
    attn_scale: multiplier of q.k; None means head_dim ** -0.5.
    attn_logit_softcap, final_logit_softcap: tanh soft-cap of attention scores / logits, or None.
    tie_word_embeddings: the output projection is the transposed embedding table.
    bos_token_id, eos_token_ids, pad_token_id: special tokens; add_bos: prepend BOS to prompts.
    max_position_embeddings: the longest context the checkpoint was trained for.
    separate_layers: layer indices scanned as runs of their own (parameters and caches not
      stacked with their neighbours), so that `CausalLM.init_cache(layer_quant=...)` can give
      their caches a QuantConfig of their own (e.g. 8-bit keys in one sensitive layer). Empty
      (the default): layers are grouped by the repeating pattern of their types. Changes the
      layout only, never the outputs; see `kvjax.models.with_separate_layers`.
  """

  arch: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  layer_types: tuple[str, ...] = ()
  sliding_window: int | None = None
  rope_theta: float = 10_000.0
  rope_local_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  activation: str = "silu"
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sandwich_norm: bool = False
  scale_embeddings: bool = False
  attn_scale: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  add_bos: bool = False
  max_position_embeddings: int = 32_768
  separate_layers: tuple[int, ...] = ()

  def __post_init__(self):
    if self.arch not in ARCHITECTURES:
      raise ValueError(f"ModelConfig.arch must be one of {ARCHITECTURES}, got {self.arch!r}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if not self.layer_types:
      object.__setattr__(self, "layer_types", (GLOBAL,) * self.num_layers)
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
    if len(self.layer_types) != self.num_layers:
      raise ValueError(f"ModelConfig.layer_types has {len(self.layer_types)} entries, expected "
                       f"num_layers={self.num_layers}")
    bad = sorted(set(self.layer_types) - {LOCAL, GLOBAL})
    if bad:
      raise ValueError(f"ModelConfig.layer_types entries must be {LOCAL!r} or {GLOBAL!r}, got {bad}")
    if LOCAL in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
      raise ValueError("ModelConfig.sliding_window must be a positive int when some layer is "
                       f"local, got {self.sliding_window!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"ModelConfig.activation must be one of {ACTIVATIONS}, got "
                       f"{self.activation!r}")
    sep = tuple(self.separate_layers)
    if any(not isinstance(l, int) or isinstance(l, bool) or not 0 <= l < self.num_layers
           for l in sep):
      raise ValueError(f"ModelConfig.separate_layers must be layer indices in [0, "
                       f"{self.num_layers}), got {sep!r}")
    object.__setattr__(self, "separate_layers", tuple(sorted(set(sep))))

  @property
  def query_scale(self) -> float:
    """Multiplier of q.k inside attention."""
    return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

  @property
  def layer_pattern(self) -> tuple[str, ...]:
    """Shortest prefix of `layer_types` that, repeated, reproduces it (the scan group).

    With `separate_layers` the whole stack is one group (a separate layer breaks the repeat).
    """
    types = self.layer_types
    if self.separate_layers:
      return types
    for period in range(1, len(types) + 1):
      if all(types[i] == types[i % period] for i in range(len(types))):
        return types[:period]
    return types

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ----------------------------------------------------------------------------------------------
  # Presets (published sizes of the real checkpoints).

  @classmethod
  def gemma3_270m(cls) -> "ModelConfig":
    return _gemma3(vocab=262_144, hidden=640, ffn=2048, layers=18, heads=4, kv_heads=1,
                   head_dim=256, query_pre_attn_scalar=256, rope_scaling=None)

  @classmethod
  def gemma3_1b(cls) -> "ModelConfig":
    return _gemma3(vocab=262_144, hidden=1152, ffn=6912, layers=26, heads=4, kv_heads=1,
                   head_dim=256, query_pre_attn_scalar=256, rope_scaling=None)

  @classmethod
  def qwen2_5_0_5b(cls) -> "ModelConfig":
    return _qwen2(hidden=896, ffn=4864, layers=24, heads=14, kv_heads=2, tied=True)

  @classmethod
  def qwen2_5_1_5b(cls) -> "ModelConfig":
    return _qwen2(hidden=1536, ffn=8960, layers=28, heads=12, kv_heads=2, tied=True)

  @classmethod
  def qwen2_5_coder_0_5b(cls) -> "ModelConfig":
    # The Coder-Instruct GGUF ships a separate output matrix (FACTS.md), so untied here.
    return _qwen2(hidden=896, ffn=4864, layers=24, heads=14, kv_heads=2, tied=False)

  @classmethod
  def llama_tiny(cls) -> "ModelConfig":
    """A small Llama-3-style model (RoPE scaling, GQA, untied) for tests and examples."""
    return cls(arch="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4,
               num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=500_000.0,
               rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0,
                                        original_max_position_embeddings=64),
               rms_norm_eps=1e-5, activation="silu", bos_token_id=1, eos_token_ids=(2,),
               add_bos=True, max_position_embeddings=4096)

  @classmethod
  def gemma3_tiny(cls) -> "ModelConfig":
    """Gemma-3 layout at toy size: 6 layers (5 local, window 16, then 1 global)."""
    return _gemma3(vocab=512, hidden=64, ffn=128, layers=6, heads=4, kv_heads=2, head_dim=32,
                   query_pre_attn_scalar=32, rope_scaling=None, sliding_window=16)

  @classmethod
  def qwen2_tiny(cls) -> "ModelConfig":
    return _qwen2(hidden=64, ffn=128, layers=3, heads=4, kv_heads=2, tied=True, vocab=512)

  @classmethod
  def preset(cls, name: str) -> "ModelConfig":
    """The preset called `name` (see `PRESETS`)."""
    try:
      return PRESETS[name]()
    except KeyError:
      raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None

  # ----------------------------------------------------------------------------------------------
  # Readers.

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any]) -> "ModelConfig":
    """Reads a transformers `config.json` dict (Gemma3ForCausalLM, Qwen2ForCausalLM, Llama)."""
    if not isinstance(hf, Mapping):
      raise TypeError(f"from_hf_config expects a dict, got {type(hf).__name__}")
    if "text_config" in hf and hf.get("model_type") == "gemma3":
      hf = {**hf["text_config"], "model_type": "gemma3_text",
            "tie_word_embeddings": hf.get("tie_word_embeddings", True)}
    model_type = hf.get("model_type")
    arch = {"gemma3_text": "gemma3", "gemma3": "gemma3", "qwen2": "qwen2",
            "llama": "llama"}.get(model_type)
    if arch is None:
      raise ValueError(f"unsupported architecture: config.json model_type={model_type!r}; "
                       "supported: gemma3_text, qwen2, llama")

    def need(key):
      if key not in hf:
        raise ValueError(f"config.json for {model_type} is missing {key!r}")
      return hf[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    layers = int(need("num_hidden_layers"))
    head_dim = int(hf.get("head_dim") or hidden // heads)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    rope_global, rope_local, scaling = _hf_rope(hf, arch)

    common = dict(vocab_size=int(need("vocab_size")), hidden_size=hidden,
                  intermediate_size=int(need("intermediate_size")), num_layers=layers,
                  num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                  head_dim=head_dim, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  rope_theta=rope_global, rope_local_theta=rope_local, rope_scaling=scaling,
                  bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids,
                  pad_token_id=hf.get("pad_token_id"),
                  max_position_embeddings=int(hf.get("max_position_embeddings", 32_768)))

    hf_types = hf.get("layer_types")
    if arch == "gemma3":
      if hf_types is None:
        pattern = int(hf.get("sliding_window_pattern", 6))
        hf_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                    for i in range(layers)]
      activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
      if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"unsupported Gemma-3 hidden_activation {activation!r}")
      return cls(arch="gemma3", layer_types=_layer_types(hf_types),
                 sliding_window=hf.get("sliding_window"), activation="gelu_tanh",
                 qkv_bias=bool(hf.get("attention_bias", False)),
                 o_bias=bool(hf.get("attention_bias", False)), qk_norm=True, sandwich_norm=True,
                 scale_embeddings=True,
                 attn_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
                 # Gemma-3 has no attention-logit soft-cap (Gemma-2 had one): the reference
                 # implementation ignores a non-null attn_logit_softcapping, and so do we.
                 attn_logit_softcap=None,
                 final_logit_softcap=hf.get("final_logit_softcapping"),
                 tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), add_bos=True,
                 **common)

    activation = hf.get("hidden_act", "silu")
    if activation != "silu":
      raise ValueError(f"unsupported {model_type} hidden_act {activation!r}; expected 'silu'")
    if arch == "qwen2":
      window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
      if hf_types is None:
        max_window = int(hf.get("max_window_layers", layers))
        hf_types = ["sliding_attention" if window is not None and i >= max_window
                    else "full_attention" for i in range(layers)]
      return cls(arch="qwen2", layer_types=_layer_types(hf_types), sliding_window=window,
                 qkv_bias=True, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                 **common)
    return cls(arch="llama", qkv_bias=bool(hf.get("attention_bias", False)),
               o_bias=bool(hf.get("attention_bias", False)),
               mlp_bias=bool(hf.get("mlp_bias", False)),
               tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
               add_bos=hf.get("bos_token_id") is not None, **common)

  @classmethod
  def from_gguf(cls, reader) -> "ModelConfig":
    """Reads the metadata of a `gguf.GGUFReader` (architectures gemma3, qwen2, llama)."""
    meta = _GGUFMetadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
      raise ValueError(f"unsupported architecture: GGUF general.architecture={arch!r}; "
                       f"supported: {ARCHITECTURES}")

    def need(key):
      value = meta.get(f"{arch}.{key}")
      if value is None:
        raise ValueError(f"GGUF metadata is missing {arch}.{key}")
      return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    layers = int(need("block_count"))
    kv_heads = meta.get(f"{arch}.attention.head_count_kv")
    kv_heads = heads if kv_heads is None else int(kv_heads)
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
      tokens = meta.get("tokenizer.ggml.tokens")
      if tokens is None:
        raise ValueError("GGUF metadata gives neither the vocab size nor the token list")
      vocab = len(tokens)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [] if eos is None else [int(eos)]
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
      eos_ids.append(int(eot))
    # Chat models end a turn with a token the metadata does not always flag as EOS.
    tokens = meta.get("tokenizer.ggml.tokens") or []
    for i, text in enumerate(tokens):
      if text in _END_OF_TURN_TOKENS and i not in eos_ids:
        eos_ids.append(i)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    common = dict(vocab_size=int(vocab), hidden_size=hidden,
                  intermediate_size=int(need("feed_forward_length")), num_layers=layers,
                  num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                  rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
                  rope_theta=float(meta.get(f"{arch}.rope.freq_base") or 10_000.0),
                  bos_token_id=None if bos is None else int(bos), eos_token_ids=tuple(eos_ids),
                  pad_token_id=_maybe_int(meta.get("tokenizer.ggml.padding_token_id")),
                  max_position_embeddings=int(meta.get(f"{arch}.context_length") or 32_768))
    scaling = _gguf_rope_scaling(meta, arch)
    if "rope_freqs.weight" in meta.tensor_names:
      # llama.cpp stores Llama-3 RoPE scaling as per-frequency divisors in this tensor.
      raise ValueError("unsupported GGUF: per-frequency RoPE factors (tensor 'rope_freqs.weight'); "
                       "load the Hugging Face checkpoint instead")
    if arch == "gemma3":
      window = int(meta.get("gemma3.attention.sliding_window") or 512)
      # llama.cpp hard-codes this Gemma-3 layout: every sixth layer is global, local layers use
      # RoPE base 1e4; the attention scale is head_dim ** -0.5 (query_pre_attn_scalar = head_dim
      # for the text models).
      types = tuple(GLOBAL if l % 6 == 5 else LOCAL for l in range(layers))
      return cls(arch="gemma3", layer_types=types, sliding_window=window,
                 rope_local_theta=10_000.0, rope_scaling=scaling, activation="gelu_tanh",
                 qk_norm=True, sandwich_norm=True, scale_embeddings=True,
                 attn_scale=head_dim ** -0.5,
                 final_logit_softcap=_maybe_float(meta.get("gemma3.final_logit_softcapping")),
                 attn_logit_softcap=_maybe_float(meta.get("gemma3.attn_logit_softcapping")),
                 tie_word_embeddings="output.weight" not in meta.tensor_names,
                 add_bos=True if add_bos is None else bool(add_bos), **common)
    if arch == "qwen2":
      return cls(arch="qwen2", qkv_bias=True, rope_scaling=scaling,
                 tie_word_embeddings="output.weight" not in meta.tensor_names,
                 add_bos=bool(add_bos) if add_bos is not None else False, **common)
    return cls(arch="llama", rope_scaling=scaling,
               qkv_bias="blk.0.attn_q.bias" in meta.tensor_names,
               o_bias="blk.0.attn_output.bias" in meta.tensor_names,
               mlp_bias="blk.0.ffn_up.bias" in meta.tensor_names,
               tie_word_embeddings="output.weight" not in meta.tensor_names,
               add_bos=True if add_bos is None else bool(add_bos), **common)


_END_OF_TURN_TOKENS = frozenset({"<end_of_turn>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>"})


def _gemma3(*, vocab, hidden, ffn, layers, heads, kv_heads, head_dim, query_pre_attn_scalar,
            rope_scaling, sliding_window=512) -> ModelConfig:
  return ModelConfig(
      arch="gemma3", vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
      num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      layer_types=tuple(GLOBAL if l % 6 == 5 else LOCAL for l in range(layers)),
      sliding_window=sliding_window, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
      rope_scaling=rope_scaling, rms_norm_eps=1e-6, activation="gelu_tanh", qk_norm=True,
      sandwich_norm=True, scale_embeddings=True, attn_scale=query_pre_attn_scalar ** -0.5,
      tie_word_embeddings=True, bos_token_id=2, eos_token_ids=(1, 106), pad_token_id=0,
      add_bos=True, max_position_embeddings=32_768)


def _qwen2(*, hidden, ffn, layers, heads, kv_heads, tied, vocab=151_936) -> ModelConfig:
  return ModelConfig(
      arch="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
      num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
      rope_theta=1_000_000.0, rms_norm_eps=1e-6, activation="silu", qkv_bias=True,
      tie_word_embeddings=tied, bos_token_id=151_643, eos_token_ids=(151_643, 151_645),
      pad_token_id=151_643, add_bos=False, max_position_embeddings=32_768)


PRESETS = {
    "gemma3-270m": ModelConfig.gemma3_270m,
    "gemma3-1b": ModelConfig.gemma3_1b,
    "qwen2.5-0.5b": ModelConfig.qwen2_5_0_5b,
    "qwen2.5-1.5b": ModelConfig.qwen2_5_1_5b,
    "qwen2.5-coder-0.5b": ModelConfig.qwen2_5_coder_0_5b,
    "llama-tiny": ModelConfig.llama_tiny,
    "gemma3-tiny": ModelConfig.gemma3_tiny,
    "qwen2-tiny": ModelConfig.qwen2_tiny,
}


def _layer_types(hf_types) -> tuple[str, ...]:
  mapping = {"sliding_attention": LOCAL, "full_attention": GLOBAL}
  try:
    return tuple(mapping[t] for t in hf_types)
  except KeyError as e:
    raise ValueError(f"unsupported layer type {e.args[0]!r} in config.json layer_types; "
                     f"expected one of {sorted(mapping)}") from None


def _hf_rope(hf: Mapping[str, Any], arch: str):
  """(global base, local base, scaling of the global layers) from a config.json dict."""
  params = hf.get("rope_parameters")
  scaling_dict = hf.get("rope_scaling")
  if arch == "gemma3":
    glob = float(hf.get("rope_theta", 1_000_000.0))
    local = float(hf.get("rope_local_base_freq", 10_000.0))
    if isinstance(params, Mapping) and "full_attention" in params:
      full = params.get("full_attention") or {}
      slid = params.get("sliding_attention") or {}
      glob = float(full.get("rope_theta", glob))
      local = float(slid.get("rope_theta", local))
      if slid.get("rope_type", "default") != "default":
        raise ValueError("unsupported: RoPE scaling on Gemma-3 sliding-window layers")
      scaling_dict = full
  else:
    glob = float(hf.get("rope_theta", 10_000.0))
    if isinstance(params, Mapping):
      glob = float(params.get("rope_theta", glob))
      scaling_dict = params
    local = glob
  return glob, local, _rope_scaling(scaling_dict)


def _rope_scaling(d) -> RopeScaling | None:
  if not d:
    return None
  kind = d.get("rope_type", d.get("type", "default"))
  if kind == "default":
    return None
  if kind == "linear":
    return RopeScaling("linear", float(d["factor"]))
  if kind == "llama3":
    return RopeScaling("llama3", float(d["factor"]), float(d["low_freq_factor"]),
                       float(d["high_freq_factor"]), int(d["original_max_position_embeddings"]))
  raise ValueError(f"unsupported RoPE scaling type {kind!r}; supported: {ROPE_SCALING_KINDS}")


def _gguf_rope_scaling(meta, arch) -> RopeScaling | None:
  kind = meta.get(f"{arch}.rope.scaling.type")
  factor = meta.get(f"{arch}.rope.scaling.factor")
  if kind in (None, "none") or factor is None or float(factor) == 1.0:
    return None
  if kind == "linear":
    return RopeScaling("linear", float(factor))
  raise ValueError(f"unsupported GGUF RoPE scaling {kind!r}")


def _maybe_int(v):
  return None if v is None else int(v)


def _maybe_float(v):
  return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


class _GGUFMetadata:
  """Plain-Python view of a GGUFReader's key/value fields."""

  def __init__(self, reader):
    if not hasattr(reader, "fields") or not hasattr(reader, "tensors"):
      raise TypeError(f"from_gguf expects a gguf.GGUFReader, got {type(reader).__name__}")
    self._reader = reader
    self.tensor_names = frozenset(t.name for t in reader.tensors)

  def get(self, key):
    field = self._reader.fields.get(key)
    if field is None:
      return None
    return field.contents()
