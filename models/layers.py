"""Building blocks shared by the Gemma-3, Qwen2 and Llama decoders (Flax NNX).

Shapes: B = batch, T = tokens in this call, E = hidden size, F = MLP width, Hq = query heads,
H = key/value heads, D = head_dim. Every attention block reads and writes its own kvjax cache
through `kvjax.append_and_attend`; the block never looks inside the cache (codes, scales) and works
the same on a dense, quantized or ring-buffer cache.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kvjax
from kvjax.models.config import GLOBAL, LOCAL, ModelConfig, RopeScaling


class LayerView:
  """One layer's parameter inside a stack of layers: `stack[indices]`, not sliced out yet.

  A scanned model keeps each run's parameters stacked [groups, run_length, ...] (or
  [run_length, ...]); the scan hands each layer views with its (traced) position on the stack
  axes, (group, slot) or (slot,). `view[...]` is the slice, what XLA's paths multiply by;
  `project` hands the whole stack and the layer's flat index to the native CPU product instead,
  which reads the layer's weight where it lies (XLA's CPU backend would copy every slice out of
  its stack, every step)."""

  __slots__ = ("stack", "indices")

  def __init__(self, stack: jax.Array, indices: tuple):
    self.stack, self.indices = stack, tuple(indices)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.stack.shape[len(self.indices):])

  @property
  def dtype(self):
    return self.stack.dtype

  def flat(self) -> tuple[jax.Array, jax.Array]:
    """(the stack with its stack axes merged into one [S, *shape], the layer's index on it)."""
    index = jnp.int32(0)
    for axis, i in enumerate(self.indices):
      index = index * self.stack.shape[axis] + i
    return self.stack.reshape((-1,) + self.shape), index

  def __getitem__(self, key):
    a = self.stack
    for i in self.indices:  # one dynamic slice, as scanning over the stack took
      a = jax.lax.dynamic_index_in_dim(a, i, keepdims=False)
    return a[key]


def project(x: jax.Array, weight, *, transposed: bool = False, native: bool = True) -> jax.Array:
  """x @ weight ([in, out]), or x @ weight.T for a `transposed` [out, in] one (a tied embedding
  as the LM head); weight an array or a `LayerView`. Returns jnp.dot's dtype.

  On the CPU, for a bfloat16 weight and at most `kvjax.native.LINEAR_MAX_ROWS` rows (decode),
  with `native` (False for models split over a mesh: GSPMD cannot split a custom call) and the
  kernel available, the product is `kvjax.native.linear`, which reads the weight once where it
  lies; XLA's CPU backend would first write a float32 copy of it. Chosen when the step is
  lowered (`lax.platform_dependent`), so TPU and GPU steps are unchanged."""
  w_shape, w_dtype = weight.shape, weight.dtype
  in_f, out_f = (w_shape[1], w_shape[0]) if transposed else w_shape
  rows = math.prod(x.shape[:-1])
  out_dtype = jnp.result_type(x.dtype, w_dtype)

  def xla():
    w = weight[...]
    return jnp.dot(x, w.T if transposed else w)

  layout = "nk" if transposed else "kn"
  if not native or not _native_linear(rows, in_f, out_f, w_dtype, layout):
    return xla()
  from kvjax import native as native_lib

  def cpu():
    if isinstance(weight, LayerView):
      stack, index = weight.flat()
      y = native_lib.linear(x, stack, layout=layout, index=index)
    else:
      y = native_lib.linear(x, weight, layout=layout)
    return y.astype(out_dtype)

  return jax.lax.platform_dependent(cpu=cpu, default=xla)


def _native_linear(rows: int, in_f: int, out_f: int, dtype, layout: str) -> bool:
  # Only where the CPU is the backend (a TPU or GPU host never builds the library for it).
  from kvjax import native as native_lib
  return (jax.default_backend() == "cpu"
          and native_lib.linear_supported(rows, in_f, out_f, dtype, layout=layout)
          and native_lib.available())


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel [in, out] stored in the parameter dtype."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
    std = in_features ** -0.5
    self.kernel = nnx.Param(
        (std * jax.random.normal(rngs.params(), (in_features, out_features))).astype(dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

  def __call__(self, x: jax.Array, *, native: bool = True) -> jax.Array:
    """native: whether the CPU may take the native product (`project`)."""
    y = project(x, self.kernel.get_value(), native=native)
    if self.bias is not None:
      y = y + self.bias[...]
    return y


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last axis, computed in float32.

  `scale` is the effective multiplier: Gemma's checkpoints store (scale - 1) and the loaders add
  the 1 back (GGUF files already include it), so one formula serves every architecture.
  """

  def __init__(self, dim: int, *, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, base: float,
                             scaling: RopeScaling | None = None) -> np.ndarray:
  """Inverse frequencies [D/2] (radians per position) of rotate-half RoPE, float32.

  Computed in float32 like the reference implementations, so positions map to the same angles.
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  # "llama3": wavelengths longer than original_context / low_freq_factor are stretched by
  # `factor`, shorter than original_context / high_freq_factor kept, and a linear blend in
  # between (Llama 3.1's published rule).
  old_context = scaling.original_max_position_embeddings
  low_wavelen = old_context / scaling.low_freq_factor
  high_wavelen = old_context / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_context / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half (NeoX) RoPE.

  Args:
    x: [B, T, heads, D].
    positions: [B, T] int, absolute position of each token.
    inv_freq: [D/2] float32.
  Returns:
    [B, T, heads, D] in x's dtype; channel i is paired with channel i + D/2.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class GatedMLP(nnx.Module):
  """down(act(gate(x)) * up(x)): [B, T, E] -> [B, T, E]."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    e, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = Linear(e, f, use_bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
    self.up_proj = Linear(e, f, use_bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
    self.down_proj = Linear(f, e, use_bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
    self.activation = cfg.activation

  def __call__(self, x: jax.Array, *, native: bool = True) -> jax.Array:
    """native: as in `Linear`."""
    gate = self.gate_proj(x, native=native)
    if self.activation == "gelu_tanh":
      gate = jax.nn.gelu(gate, approximate=True)
    else:
      gate = jax.nn.silu(gate)
    return self.down_proj(gate * self.up_proj(x, native=native), native=native)


class Attention(nnx.Module):
  """Self-attention over a kvjax cache: project, (q/k norm), RoPE, append_and_attend, project.

  The layer's sliding window lives in the cache (a ring buffer created with `window=`), so the
  same block serves local and global layers; only the RoPE frequencies differ.
  """

  def __init__(self, cfg: ModelConfig, layer_type: str, *, dtype, rngs: nnx.Rngs):
    e, d = cfg.hidden_size, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
    self.q_proj = Linear(e, cfg.num_heads * d, use_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.k_proj = Linear(e, cfg.num_kv_heads * d, use_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.v_proj = Linear(e, cfg.num_kv_heads * d, use_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.o_proj = Linear(cfg.num_heads * d, e, use_bias=cfg.o_bias, dtype=dtype, rngs=rngs)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
      self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
    else:
      self.q_norm = self.k_norm = None
    if layer_type == LOCAL:
      self.rope_base, self.rope_scaling = cfg.rope_local_theta, None
    else:
      self.rope_base, self.rope_scaling = cfg.rope_theta, cfg.rope_scaling
    self.scale = cfg.query_scale
    self.softcap = cfg.attn_logit_softcap

  def __call__(self, x: jax.Array, cache, positions: jax.Array, num_tokens: jax.Array | None = None,
               *, impl: str = "auto", layout=None):
    """x [B, T, E], positions [B, T] -> (out [B, T, E], new cache); impl: `kvjax.attend`'s.

    num_tokens: optional int [B]; only the first num_tokens[b] tokens of sequence b are written to
    the cache (right-padded ragged chunks); outputs at padded tokens are unspecified.
    layout: a `kvjax.models.sharding.Layout` when the model is sharded over a mesh: attention
    then runs per device on its own heads and batch rows (`Layout.append_and_attend`).
    """
    b, t, _ = x.shape
    native = layout is None  # a custom call cannot be split over a mesh
    q = self.q_proj(x, native=native).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x, native=native).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x, native=native).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = rope_inverse_frequencies(self.head_dim, self.rope_base, self.rope_scaling)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    attend = kvjax.append_and_attend if layout is None else layout.append_and_attend
    out, cache = attend(cache, q, k, v, scale=self.scale, softcap=self.softcap,
                        num_tokens=num_tokens, impl=impl)
    return self.o_proj(out.astype(x.dtype).reshape(b, t, self.num_heads * self.head_dim),
                       native=native), cache


class DecoderLayer(nnx.Module):
  """Pre-norm residual block; Gemma-3 adds a norm on each branch's output ("sandwich")."""

  def __init__(self, cfg: ModelConfig, layer_type: str, *, dtype, rngs: nnx.Rngs):
    if layer_type not in (LOCAL, GLOBAL):
      raise ValueError(f"layer_type must be {LOCAL!r} or {GLOBAL!r}, got {layer_type!r}")
    e, eps = cfg.hidden_size, cfg.rms_norm_eps
    self.pre_attention_norm = RMSNorm(e, eps=eps, dtype=dtype)
    self.attention = Attention(cfg, layer_type, dtype=dtype, rngs=rngs)
    self.pre_mlp_norm = RMSNorm(e, eps=eps, dtype=dtype)
    self.mlp = GatedMLP(cfg, dtype=dtype, rngs=rngs)
    if cfg.sandwich_norm:
      self.post_attention_norm = RMSNorm(e, eps=eps, dtype=dtype)
      self.post_mlp_norm = RMSNorm(e, eps=eps, dtype=dtype)
    else:
      self.post_attention_norm = self.post_mlp_norm = None

  def __call__(self, x: jax.Array, cache, positions: jax.Array, num_tokens: jax.Array | None = None,
               *, impl: str = "auto", layout=None):
    """x [B, T, E] -> (x [B, T, E], new cache); layout as in `Attention`."""
    h, cache = self.attention(self.pre_attention_norm(x), cache, positions, num_tokens, impl=impl,
                              layout=layout)
    if self.post_attention_norm is not None:
      h = self.post_attention_norm(h)
    x = x + h
    h = self.mlp(self.pre_mlp_norm(x), native=layout is None)
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    return x + h, cache
