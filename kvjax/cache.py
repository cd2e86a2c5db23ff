"""KV caches as JAX values: a dense cache and a rotated int4/int8 cache.

Both are pytrees of arrays with their configuration as static metadata, so they
pass through `jit` (donate them for in-place updates), `scan`, `vmap` (e.g. over
a stacked layer axis) and checkpointing without adapters. `append` returns a new
cache; nothing is mutated.

Layout (docs/cache_layout.md): buffers are [batch, kv_heads, slots, ...];
`lengths[b]` counts the tokens written to sequence b, which is also the
absolute position of its next token. A cache made with `window=W` (W < max_len)
is a ring buffer of W slots: slot s holds the newest position p with
p % W == s.

Overflow of a non-ring cache (appending past `max_len`) is never a silent wrap
or overwrite:
  * outside `jit` (concrete lengths) `append` raises ValueError;
  * under `jit` the tokens that do not fit are dropped, `lengths` stops at
    `max_len`, and `overflow[b]` becomes True and stays True. Call
    `check_overflow(cache)` on the host (or read `cache.overflow`) after a
    jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import corrections as corrections_lib
from kvjax import quantizer, rotary
from kvjax.config import QuantConfig
from kvjax.rotations import rotation_matrix_np


def _register(data_fields, meta_fields):
  def wrap(cls):
    return jax.tree_util.register_dataclass(
        cls, data_fields=list(data_fields), meta_fields=list(meta_fields))
  return wrap


_COMMON_META = ("capacity", "window", "ring")


@_register(("k", "v", "lengths", "overflow"), _COMMON_META)
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
  """Keys and values stored as they are.

  k, v: [B, H, S, D] in the cache dtype; lengths: int32 [B]; overflow: bool [B].
  capacity: S; window: sliding-window length for the mask (None = full causal);
  ring: True if the buffer is a ring of `capacity` == window slots.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  overflow: jax.Array
  capacity: int
  window: int | None
  ring: bool

  @property
  def head_dim(self) -> int:
    return self.k.shape[-1]

  @property
  def num_kv_heads(self) -> int:
    return self.k.shape[-3]

  @property
  def batch(self) -> int:
    return self.k.shape[-4]

  @property
  def dtype(self):
    return self.k.dtype


@_register(("k_codes", "k_scales", "v_codes", "v_scales", "k_rotation", "v_rotation",
            "k_lambda", "v_lambda", "corrections", "lengths", "overflow"),
           ("config",) + _COMMON_META)
@dataclasses.dataclass(frozen=True)
class QuantizedKVCache:
  """Keys and values as rotated, per-group abs-max int4/int8 codes, plus their corrections.

  k_codes: uint8 [B, H, S, D//2] (4-bit, split-halves nibbles) or int8 [B, H, S, D];
  k_scales: [B, H, S, D // group_size] (bfloat16 by default); v_* the same for values.
  The basis the codes live in: k_rotation, v_rotation float32 [Hr, D, D] (orthogonal) and
  k_lambda, v_lambda float32 [Hr, D] (per-channel scales, > 0), Hr in {1, H}: a key k is
  stored as codes of R_k (k / λ_k).
  corrections: one dict of arrays per `config.corrections` entry, in that order: the
  correction's per-layer params (e.g. "k_mean" [Hr, D]) and per-sequence state (e.g.
  "k_sink" [B, H, D]); see `kvjax.corrections` and `correction_arrays`.
  lengths int32 [B]; overflow bool [B].
  """

  k_codes: jax.Array
  k_scales: jax.Array
  v_codes: jax.Array
  v_scales: jax.Array
  k_rotation: jax.Array
  v_rotation: jax.Array
  k_lambda: jax.Array
  v_lambda: jax.Array
  corrections: tuple
  lengths: jax.Array
  overflow: jax.Array
  config: QuantConfig
  capacity: int
  window: int | None
  ring: bool

  @property
  def head_dim(self) -> int:
    return self.k_rotation.shape[-1]

  @property
  def num_kv_heads(self) -> int:
    return self.k_codes.shape[-3]

  @property
  def batch(self) -> int:
    return self.k_codes.shape[-4]

  @property
  def basis(self) -> tuple:
    """(k_rotation, k_lambda, v_rotation, v_lambda)."""
    return self.k_rotation, self.k_lambda, self.v_rotation, self.v_lambda

  def array(self, name: str) -> jax.Array:
    """A basis field or a correction's array, by name ("k_rotation", "k_mean", "k_sink", ...)."""
    if name in BASIS_FIELDS:
      return getattr(self, name)
    for arrays in self.corrections:
      if name in arrays:
        return arrays[name]
    raise KeyError(f"{name!r} is neither a basis field {BASIS_FIELDS} nor an array of this "
                   f"cache's corrections {[c.kind for c in self.config.corrections]}")

  def correction_arrays(self, kind) -> dict | None:
    """The arrays of the correction of `kind` (a kind string or class), or None if the
    config has no such correction."""
    i = corrections_lib.find(self.config.corrections, kind)
    return None if i is None else self.corrections[i]


_STATS_FIELDS = ("q_sq", "k_sum", "k_sq", "v_sq", "count", "qq", "k_cos", "k_sin", "trig",
                 "rope_freq")


@_register(("k", "v", "lengths", "overflow") + _STATS_FIELDS, _COMMON_META)
@dataclasses.dataclass(frozen=True)
class StatsKVCache(DenseKVCache):
  """A dense cache that also accumulates statistics of what attention sees.

  Every `append_and_attend` adds, over the tokens it writes (post-RoPE, as the cache
  receives them; per KV head h, query heads pooled over the heads that read h):
    q_sq [H, D]: sum of q^2;  qq [H, D, D]: sum of q q^T;
    k_sum, k_sq [H, D]: sum of k and k^2;  v_sq [H, D]: sum of v^2;
    k_cos, k_sin [H, D]: sum of k_c cos(w_c t) and k_c sin(w_c t), t the token's position
      and w_c = rope_freq[c mod D/2] the RoPE frequency of channel c's pair (i, i + D/2);
    trig [D/2, 5]: sums of cos, sin, cos^2, sin^2, cos sin of w_i t over the tokens;
    count: number of tokens (float32 scalar).
  rope_freq [D/2] is the layer's rotate-half RoPE frequencies (zeros if unknown: the
  rotary statistics then reduce to the plain ones). Calibration (kvjax.smoothing) turns
  them into a key offset, a rotary key offset, per-channel scales λ and the key-rounding
  feedback. Make one with `with_stats(cache_or_pytree_of_caches, rope_freq=...)`.
  """

  q_sq: jax.Array = None
  k_sum: jax.Array = None
  k_sq: jax.Array = None
  v_sq: jax.Array = None
  count: jax.Array = None
  qq: jax.Array = None
  k_cos: jax.Array = None
  k_sin: jax.Array = None
  trig: jax.Array = None
  rope_freq: jax.Array = None

  def accumulate(self, q, k, v, num_tokens=None) -> "StatsKVCache":
    """Adds the statistics of new tokens (q [B, T, Hq, D], k, v [B, T, H, D]).

    `append_and_attend` calls this (through `accumulate_stats`) before writing k, v.
    Subclasses that gather more (e.g. sampled queries for calibration) override it,
    call `super().accumulate(...)` and add their own fields.
    """
    b, t, hq, d = q.shape
    h = k.shape[2]
    n = (jnp.full((b,), t, jnp.int32) if num_tokens is None
         else jnp.asarray(num_tokens, jnp.int32))
    valid = (jnp.arange(t)[None, :] < n[:, None]).astype(jnp.float32)         # [B, T]
    vk = valid[..., None, None]
    qf = q.astype(jnp.float32).reshape(b, t, h, hq // h, d) * vk[..., None]
    kf, vf = k.astype(jnp.float32) * vk, v.astype(jnp.float32) * vk
    positions = self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    cos, sin = rotary.angles(positions, self.rope_freq)                        # [B, T, D/2]
    cos_c = jnp.concatenate([cos, cos], -1)[:, :, None, :]                     # per channel
    sin_c = jnp.concatenate([sin, sin], -1)[:, :, None, :]
    w = valid[..., None]
    trig = jnp.stack([cos * w, sin * w, cos * cos * w, sin * sin * w, cos * sin * w], -1)
    hp = jax.lax.Precision.HIGHEST
    return dataclasses.replace(
        self,
        q_sq=self.q_sq + jnp.sum(qf ** 2, axis=(0, 1, 3)),
        qq=self.qq + jnp.einsum("bthrd,bthre->hde", qf, qf, precision=hp),
        k_sum=self.k_sum + jnp.sum(kf, axis=(0, 1)),
        k_sq=self.k_sq + jnp.sum(kf ** 2, axis=(0, 1)),
        k_cos=self.k_cos + jnp.sum(kf * cos_c, axis=(0, 1)),
        k_sin=self.k_sin + jnp.sum(kf * sin_c, axis=(0, 1)),
        trig=self.trig + jnp.sum(trig, axis=(0, 1)),
        v_sq=self.v_sq + jnp.sum(vf ** 2, axis=(0, 1)),
        count=self.count + jnp.sum(valid))


def stats_fields(cache: DenseKVCache, rope_freq=None) -> dict:
  """Zeroed statistics for a (possibly layer-stacked) dense cache: the StatsKVCache fields.

  rope_freq: None (zeros) or [D/2] / [..., D/2] with the cache's leading axes.
  """
  lead = cache.k.shape[:-4]
  h, d = cache.k.shape[-3], cache.k.shape[-1]
  z = lambda shape: jnp.zeros(lead + shape, jnp.float32)
  if rope_freq is None:
    freq = z((d // 2,))
  else:
    freq = jnp.broadcast_to(jnp.asarray(rope_freq, jnp.float32), lead + (d // 2,))
  return dict(q_sq=z((h, d)), k_sum=z((h, d)), k_sq=z((h, d)), v_sq=z((h, d)), count=z(()),
              qq=z((h, d, d)), k_cos=z((h, d)), k_sin=z((h, d)), trig=z((d // 2, 5)),
              rope_freq=freq)


def with_stats(tree, rope_freq=None):
  """Replaces every DenseKVCache in a pytree by a StatsKVCache with zeroed statistics.

  rope_freq: None, or a pytree of the same structure with each layer's RoPE frequencies
  [..., D/2] (`model.rope_frequencies()`), for the rotary key statistics.
  """
  is_cache = lambda x: isinstance(x, (DenseKVCache, QuantizedKVCache))

  def convert(c, freq=None):
    if isinstance(c, DenseKVCache) and not isinstance(c, StatsKVCache):
      return StatsKVCache(k=c.k, v=c.v, lengths=c.lengths, overflow=c.overflow,
                          capacity=c.capacity, window=c.window, ring=c.ring,
                          **stats_fields(c, freq))
    return c
  if rope_freq is None:
    return jax.tree_util.tree_map(convert, tree, is_leaf=is_cache)
  return jax.tree_util.tree_map(convert, tree, rope_freq, is_leaf=is_cache)


def accumulate_stats(cache: StatsKVCache, q, k, v, num_tokens=None) -> StatsKVCache:
  """Adds the statistics of new tokens (q [B, T, Hq, D], k, v [B, T, H, D]); see
  `StatsKVCache.accumulate`."""
  if not isinstance(cache, StatsKVCache):
    raise TypeError(f"accumulate_stats needs a StatsKVCache, got {type(cache).__name__}")
  return cache.accumulate(q, k, v, num_tokens)


KVCache = Union[DenseKVCache, QuantizedKVCache]

# The basis the codes live in (per layer, [Hr, ...]). The corrections' arrays are named by their
# classes: `params` ([Hr, ...]; `shared` ones have no head axis) and `state` ([B, H, ...]).
BASIS_FIELDS = ("k_rotation", "v_rotation", "k_lambda", "v_lambda")


def _check_positive_int(value, name):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


_ORTHOGONALITY_TOL = 1e-3


def _per_head_param(value, default, shape, name, *, check=None):
  """Broadcasts a rotation / lambda argument to [Hr, ...] float32, Hr in {1, H}.

  check: "orthogonal" or "positive", verified (with
  finiteness) when the value is concrete: a bad one would silently give wrong or NaN attention.
  """
  if value is None:
    return jnp.asarray(default, jnp.float32)[None]
  arr = jnp.asarray(value, jnp.float32)
  if arr.shape == shape[1:]:
    arr = arr[None]
  if arr.ndim != len(shape) or arr.shape[1:] != shape[1:] or arr.shape[0] not in (1, shape[0]):
    raise ValueError(f"{name} must have shape {shape[1:]}, [1, *{shape[1:]}] or {shape}, "
                     f"got {arr.shape}")
  conc = _concrete(arr)
  if conc is not None:
    if not np.all(np.isfinite(conc)):
      raise ValueError(f"{name} holds non-finite values (NaN or inf)")
    if check == "orthogonal":
      r = conc.astype(np.float64)
      err = float(np.abs(r @ np.swapaxes(r, -1, -2) - np.eye(r.shape[-1])).max())
      if err > _ORTHOGONALITY_TOL:
        raise ValueError(f"{name} must be orthogonal (max |R R^T - I| = {err:.3g} > "
                         f"{_ORTHOGONALITY_TOL}): attention runs in the rotated domain")
    elif check == "positive" and np.any(conc <= 0):
      raise ValueError(f"{name} must be > 0 in every channel (it divides the cached vectors), "
                       f"min {float(conc.min())!r}")
  return arr


def init_cache(batch: int, num_kv_heads: int, max_len: int, head_dim: int, *,
               quant: QuantConfig | None = None, window: int | None = None,
               dtype=jnp.bfloat16, key_rotation=None, value_rotation=None,
               key_lambda=None, value_lambda=None, params=None) -> KVCache:
  """Creates an empty cache for one attention layer.

  Args:
    batch, num_kv_heads, max_len, head_dim: sizes. `max_len` is the longest
      sequence the cache can hold (ignored beyond `window` for ring buffers).
    quant: None for a dense cache in `dtype`; a `QuantConfig` for a quantized one.
    window: sliding-window length. If window < max_len the cache is a ring
      buffer of `window` slots; otherwise a full cache with a window mask.
    dtype: storage dtype of the dense cache (bfloat16, float16 or float32).
    key_rotation, value_rotation: optional orthogonal rotation matrices [D, D] or
      [Hr, D, D] (Hr in {1, num_kv_heads}) replacing the config's generated ones: a learned
      rotation is such a value.
    key_lambda, value_lambda: optional per-channel scales [D] or [Hr, D] (> 0).
    params: optional {name: array} of the corrections' per-layer params (e.g. "k_mean" for
      `kvjax.corrections.KeyOffset`, "k_rope_freq" / "k_rope_channels" / "k_rope_mean" for
      `RotaryKeyOffset`, "k_feedback" for `KeyFeedback`), as calibration gives them; each
      must belong to one of `quant.corrections`. Per-head params take [...] or [Hr, ...].
      Params not given take the correction's defaults (a no-op).
  """
  for name, val in (("batch", batch), ("num_kv_heads", num_kv_heads), ("max_len", max_len),
                    ("head_dim", head_dim)):
    _check_positive_int(val, name)
  if window is not None:
    _check_positive_int(window, "window")
  ring = window is not None and window < max_len
  capacity = window if ring else max_len
  lengths = jnp.zeros((batch,), jnp.int32)
  overflow = jnp.zeros((batch,), bool)
  if quant is None:
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                jnp.dtype(jnp.float32)):
      raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    if params:
      raise ValueError("params apply to a quantized cache's corrections; a dense cache has none")
    shape = (batch, num_kv_heads, capacity, head_dim)
    return DenseKVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=lengths,
                        overflow=overflow, capacity=capacity, window=window, ring=ring)
  if not isinstance(quant, QuantConfig):
    raise TypeError(f"quant must be a kvjax.QuantConfig or None, got {type(quant).__name__}")
  quant.check_head_dim(head_dim)
  g = quant.group_size

  def codes(bits):
    if bits == 4:
      return jnp.zeros((batch, num_kv_heads, capacity, head_dim // 2), jnp.uint8)
    return jnp.zeros((batch, num_kv_heads, capacity, head_dim), jnp.int8)

  def scales():
    # A fresh buffer per field: a shared one could not be donated twice under jit.
    return jnp.zeros((batch, num_kv_heads, capacity, head_dim // g), quant.scale_jnp_dtype)

  kind = quant.rotation
  hk = quant.householder_reflectors
  rot_shape = (num_kv_heads, head_dim, head_dim)
  lam_shape = (num_kv_heads, head_dim)
  ones = np.ones((head_dim,), np.float32)
  return QuantizedKVCache(
      k_codes=codes(quant.key_bits), k_scales=scales(),
      v_codes=codes(quant.value_bits), v_scales=scales(),
      k_rotation=_per_head_param(key_rotation, rotation_matrix_np(kind, head_dim, quant.seed, hk),
                                 rot_shape, "key_rotation", check="orthogonal"),
      v_rotation=_per_head_param(value_rotation,
                                 rotation_matrix_np(kind, head_dim, quant.seed + 1, hk),
                                 rot_shape, "value_rotation", check="orthogonal"),
      k_lambda=_per_head_param(key_lambda, ones, lam_shape, "key_lambda", check="positive"),
      v_lambda=_per_head_param(value_lambda, ones, lam_shape, "value_lambda", check="positive"),
      corrections=new_correction_arrays(quant, batch, num_kv_heads, head_dim, params),
      lengths=lengths, overflow=overflow, config=quant, capacity=capacity, window=window,
      ring=ring)


def new_correction_arrays(quant: QuantConfig, batch: int, num_kv_heads: int, head_dim: int,
                      params=None) -> tuple:
  """The `corrections` of a new cache: per correction of `quant`, its params (from `params`,
  checked, or its defaults) and zeroed per-sequence state."""
  params = dict(params or {})
  owners = {n: c for c in quant.corrections for n in c.params}
  stray = sorted(set(params) - set(owners))
  if stray:
    known = {n: cls.kind for cls in corrections_lib.REGISTRY.values() for n in cls.params}
    why = "; ".join(f"{n} belongs to {known[n]!r}, which the config does not have" if n in known
                    else f"{n} is no correction's param" for n in stray)
    raise ValueError(f"params: {why} (config corrections: "
                     f"{[c.kind for c in quant.corrections]})")
  out = []
  for c in quant.corrections:
    arrays = {}
    shapes = c.param_shapes(head_dim)
    defaults = c.default_params(head_dim)
    for name in c.params:
      dtype = c.param_dtype(name)
      if name not in params:
        arrays[name] = jnp.asarray(defaults[name], dtype)
      elif name in c.shared:
        arr = jnp.asarray(params[name], dtype)
        if arr.shape != shapes[name]:
          raise ValueError(f"params[{name!r}] must have shape {shapes[name]} ({c.label[1:]}), "
                           f"got {arr.shape}")
        arrays[name] = arr
      else:
        shape = (num_kv_heads,) + shapes[name]
        arrays[name] = _per_head_param(params[name], defaults[name][0], shape,
                                       f"params[{name!r}]")
    conc = {n: _concrete(a) for n, a in arrays.items()}
    if all(v is not None for v in conc.values()):
      for n, v in conc.items():
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
          raise ValueError(f"params[{n!r}] holds non-finite values (NaN or inf)")
      try:
        c.check_params(conc, head_dim)
      except ValueError as e:
        raise ValueError(f"params: {e}") from None
    for name, tail in c.state_shapes(head_dim).items():
      arrays[name] = jnp.zeros((batch, num_kv_heads) + tail, jnp.float32)
    out.append(arrays)
  return tuple(out)


def with_config(cache: QuantizedKVCache, config: QuantConfig, **arrays) -> QuantizedKVCache:
  """`cache` (possibly layer-stacked) under another config of the same format, its basis
  fields and correction arrays replaced by `arrays` (by name: "k_lambda", "k_mean",
  "k_sink", ...). A correction the old config also had keeps its arrays unless given; a new
  one starts from its defaults (params) and zeros (state). The arrays are taken as given (shapes
  with the cache's leading axes): `init_cache(params=...)` is the checked way in."""
  if not isinstance(cache, QuantizedKVCache):
    raise TypeError(f"with_config needs a QuantizedKVCache, got {type(cache).__name__}")
  old = cache.config
  for f in ("key_bits", "value_bits", "group_size", "scale_dtype"):
    if getattr(old, f) != getattr(config, f):
      raise ValueError(f"with_config changes the storage format ({f}: {getattr(old, f)!r} -> "
                       f"{getattr(config, f)!r}); make a new cache instead")
  basis = {n: arrays.pop(n) for n in BASIS_FIELDS if n in arrays}
  lead = cache.lengths.shape[:-1]
  b, h, d = cache.batch, cache.num_kv_heads, cache.head_dim
  states = []
  for c in config.corrections:
    i = corrections_lib.find(old.corrections, c.kind)
    mine = dict(cache.corrections[i]) if i is not None and old.corrections[i] == c else None
    if mine is None:
      mine = {}
      for n, v in c.default_params(d).items():
        mine[n] = jnp.broadcast_to(jnp.asarray(v, c.param_dtype(n)), lead + v.shape)
      for n, tail in c.state_shapes(d).items():
        mine[n] = jnp.zeros(lead + (b, h) + tail, jnp.float32)
    for n in c.params + c.state:
      if n in arrays:
        mine[n] = arrays.pop(n)
    states.append(mine)
  if arrays:
    raise ValueError(f"with_config: {sorted(arrays)} are neither basis fields {BASIS_FIELDS} nor "
                     f"arrays of the config's corrections {[c.kind for c in config.corrections]}")
  return dataclasses.replace(cache, config=config, corrections=tuple(states), **basis)


# ----------------------------------------------------------------------------- positions


def slot_positions(lengths: jax.Array, capacity: int, ring: bool) -> jax.Array:
  """Absolute position held by each slot, int32 [B, capacity]; -1 for empty slots."""
  s = jnp.arange(capacity, dtype=jnp.int32)[None, :]
  length = lengths.astype(jnp.int32)[:, None]
  if ring:
    last = length - 1
    pos = last - jnp.mod(last - s, capacity)
    return jnp.where(pos >= 0, pos, -1)
  return jnp.where(s < length, s, -1)


def positions(cache: KVCache) -> jax.Array:
  """Absolute position of every slot of `cache`, int32 [B, S], -1 where empty."""
  return slot_positions(cache.lengths, cache.capacity, cache.ring)


# ----------------------------------------------------------------------------- append


def _check_kv(cache: KVCache, k, v, num_tokens):
  for name, x in (("k", k), ("v", v)):
    if not hasattr(x, "shape") or x.ndim != 4:
      raise ValueError(f"{name} must be [batch, seq, kv_heads, head_dim], got "
                       f"{getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be a floating dtype, got {x.dtype}")
    want = (cache.batch, cache.num_kv_heads, cache.head_dim)
    got = (x.shape[0], x.shape[2], x.shape[3])
    if got != want:
      raise ValueError(f"{name} has [batch, _, kv_heads, head_dim] = {list(got)}, the cache "
                       f"expects {list(want)}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
  if num_tokens is not None:
    nt = jnp.asarray(num_tokens)
    if nt.shape != (cache.batch,) or not jnp.issubdtype(nt.dtype, jnp.integer):
      raise ValueError(f"num_tokens must be integer [batch={cache.batch}], got "
                       f"{nt.dtype}{list(nt.shape)}")


def _concrete(x):
  """x as a numpy array if it is concrete (outside jit), else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """New tokens in storage form: per-token arrays [B, T, H, ...] and their write plan."""

  arrays: dict
  slots: jax.Array        # int32 [B, T]; == capacity (out of range) for tokens not written
  new_lengths: jax.Array  # int32 [B]
  new_overflow: jax.Array  # bool [B]
  valid: jax.Array        # bool [B, T]: token t of sequence b is real (t < num_tokens[b])
  corrections: tuple = ()  # quantized caches: each correction's arrays after the write
  pending: tuple = ()      # what each correction hands this step's queries (or None)


def _plan(cache: KVCache, seq: int, num_tokens) -> tuple[jax.Array, ...]:
  lengths = cache.lengths
  n = (jnp.full_like(lengths, seq) if num_tokens is None
       else jnp.clip(jnp.asarray(num_tokens, jnp.int32), 0, seq))
  t = jnp.arange(seq, dtype=jnp.int32)[None, :]
  valid = t < n[:, None]
  pos = lengths[:, None] + t
  cap = cache.capacity
  if cache.ring:
    # Of a chunk longer than the ring only the last `cap` tokens survive; writing
    # just those keeps the scatter's slots unique.
    keep = valid & (t >= n[:, None] - cap)
    slots = jnp.where(keep, jnp.mod(pos, cap), cap)
    return slots, lengths + n, cache.overflow, valid
  fits = pos < cap
  slots = jnp.where(valid & fits, pos, cap)
  overflow = cache.overflow | (lengths + n > cap)
  return slots, jnp.minimum(lengths + n, cap), overflow, valid


def encode(cache: KVCache, k: jax.Array, v: jax.Array, *, num_tokens=None,
           impl: str = "xla") -> _Chunk:
  """Turns new keys/values [B, T, H, D] into the cache's storage form (no write)."""
  _check_kv(cache, k, v, num_tokens)
  slots, new_lengths, new_overflow, valid = _plan(cache, k.shape[1], num_tokens)
  if not cache.ring:
    concrete_len = _concrete(cache.lengths)
    if concrete_len is not None:
      n = k.shape[1] if num_tokens is None else np.asarray(num_tokens)
      need = concrete_len + n
      if np.any(need > cache.capacity):
        raise ValueError(
            f"append overflows the cache: lengths {concrete_len.tolist()} + {np.asarray(n).tolist()}"
            f" new tokens > max_len={cache.capacity}. Create the cache with a larger max_len "
            "(or a window for sliding-window layers).")
  if isinstance(cache, DenseKVCache):
    arrays = {"k": k.astype(cache.dtype), "v": v.astype(cache.dtype)}
    return _Chunk(arrays, slots, new_lengths, new_overflow, valid)
  cfg = cache.config
  positions = cache.lengths[:, None] + jnp.arange(k.shape[1], dtype=jnp.int32)[None, :]
  keys = corrections_lib.centre_keys(cfg.corrections, cache.corrections,
                                     k.astype(jnp.float32), positions)
  arrays = _quantize_chunk(cache, keys, v, impl=impl)
  w = corrections_lib.Write(k=k, v=v, keys=keys, positions=positions, valid=valid,
                            lengths=cache.lengths, new_lengths=new_lengths, stored=arrays,
                            basis=cache.basis, config=cfg)
  states, pending = corrections_lib.write(cfg.corrections, cache.corrections, w)
  return _Chunk(arrays, slots, new_lengths, new_overflow, valid, states, pending)


def _quantize_chunk(cache: QuantizedKVCache, keys, v, *, impl: str):
  """Codes and scales of a chunk. impl: "xla" / "reference" (jnp), "pallas" (the fused write
  kernel for the default device; interpret mode on the CPU), or "auto": decided when the step is
  lowered (`lax.platform_dependent`): the fused kernel compiled for TPU / CUDA, jnp elsewhere,
  so a step exported from a CPU host for an accelerator carries the kernel."""
  cfg = cache.config
  sd = cfg.scale_jnp_dtype
  feedback, v_feedback = corrections_lib.feedback(cfg.corrections, cache.corrections)

  def fused(backend=None):
    from kvjax import _pallas_dispatch
    kc, ks = _pallas_dispatch.quantize_heads(keys, cache.k_rotation, cache.k_lambda,
                                             bits=cfg.key_bits, group_size=cfg.group_size,
                                             scale_dtype=sd, feedback=feedback, backend=backend)
    vc, vs = _pallas_dispatch.quantize_heads(v, cache.v_rotation, cache.v_lambda,
                                             bits=cfg.value_bits, group_size=cfg.group_size,
                                             scale_dtype=sd, feedback=v_feedback,
                                             backend=backend)
    return {"k_codes": kc, "k_scales": ks, "v_codes": vc, "v_scales": vs}

  def plain():
    kc, ks = quantizer.quantize(keys, cache.k_rotation, cache.k_lambda, bits=cfg.key_bits,
                                group_size=cfg.group_size, scale_dtype=sd, feedback=feedback)
    vc, vs = quantizer.quantize(v, cache.v_rotation, cache.v_lambda, bits=cfg.value_bits,
                                group_size=cfg.group_size, scale_dtype=sd, feedback=v_feedback)
    return {"k_codes": kc, "k_scales": ks, "v_codes": vc, "v_scales": vs}

  if impl == "pallas":
    return fused()
  if impl in ("xla", "reference"):
    return plain()
  if impl == "auto":
    return jax.lax.platform_dependent(tpu=lambda: fused("tpu"), cuda=lambda: fused("gpu"),
                                      default=plain)
  raise ValueError(f"impl must be 'auto', 'xla', 'reference' or 'pallas', got {impl!r}")


def write(cache: KVCache, chunk: _Chunk) -> KVCache:
  """Scatters an encoded chunk into the cache; returns the new cache."""
  b_idx = jnp.arange(cache.batch, dtype=jnp.int32)[:, None]
  updates = {}
  for name, vals in chunk.arrays.items():
    buf = getattr(cache, name)
    # buf[b, :, slot] has shape [B, T, H, ...] (advanced indices split by a slice
    # go first), which is exactly the chunk's layout: no transpose needed.
    updates[name] = buf.at[b_idx, :, chunk.slots].set(vals, mode="drop")
  if isinstance(cache, QuantizedKVCache):
    updates["corrections"] = chunk.corrections
  return dataclasses.replace(cache, lengths=chunk.new_lengths, overflow=chunk.new_overflow,
                             **updates)


def append(cache: KVCache, k: jax.Array, v: jax.Array, *, num_tokens=None,
           impl: str = "auto") -> KVCache:
  """Appends keys and values [B, T, H, D] to every sequence; returns the new cache.

  num_tokens: optional int [B]; only the first num_tokens[b] tokens of sequence b
    are written (ragged chunks, e.g. right-padded prompts).
  impl: "auto" (the fused write kernel on TPU / GPU, jnp elsewhere, decided when the step is
    lowered), "xla" (jnp), "pallas" (the fused kernel; interpret mode on CPU).
  """
  if impl not in ("auto", "xla", "reference", "pallas"):
    raise ValueError(f"impl must be 'auto', 'xla', 'reference' or 'pallas', got {impl!r}")
  return write(cache, encode(cache, k, v, num_tokens=num_tokens, impl=impl))


# ----------------------------------------------------------------------------- accounting


def nbytes(cache: KVCache, *, include_params: bool = False) -> int:
  """Bytes of real storage held by the cache's per-token buffers, per-sequence correction
  state and lengths.

  Packed int4 codes count half a byte per value, scales their storage dtype.
  The quantizer's parameters (rotation matrices, lambda and the corrections' params,
  O(head_dim^2) per layer, independent of batch and length, shared by every sequence a server
  holds) are excluded unless `include_params=True`.
  """
  size = lambda leaf: int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  total = 0
  for field in dataclasses.fields(cache):
    if field.name in ("config", "capacity", "window", "ring") or field.name in _STATS_FIELDS:
      continue
    if field.name == "corrections":
      for c, arrays in zip(cache.config.corrections, cache.corrections):
        total += sum(size(a) for n, a in arrays.items() if include_params or n not in c.params)
      continue
    if field.name in BASIS_FIELDS and not include_params:
      continue
    total += size(getattr(cache, field.name))
  return total


def partition_specs(cache: KVCache, batch_axes=None, head_axis=None):
  """A pytree like `cache` holding a `jax.sharding.PartitionSpec` in place of each array.

  Batch axes go over `batch_axes` (a mesh axis name, a tuple of names, or None), KV-head axes
  over `head_axis` (None: replicated): [B, H, ...] storage (dense k/v, codes, scales) and the
  corrections' per-sequence state on both; lengths and overflow [B] on the batch; per-head
  parameters [Hr, ...] (rotations, λ, a correction's params) on the heads when Hr is the head
  count, replicated when Hr == 1; parameters shared by all heads replicated. Leading stacked
  axes (a model's [groups, run] layer axes) are not split. Used with `shard_map` / `NamedSharding`
  by `kvjax.models.sharding` and `kvjax.foe`.
  """
  if isinstance(cache, StatsKVCache):
    raise TypeError("statistics caches (kvjax.with_stats) are not sharded; collect calibration "
                    "statistics on one device")
  if not isinstance(cache, (DenseKVCache, QuantizedKVCache)):
    raise TypeError(f"cache must be a kvjax DenseKVCache or QuantizedKVCache, got "
                    f"{type(cache).__name__}")
  P = jax.sharding.PartitionSpec
  lead = (None,) * (cache.lengths.ndim - 1)
  rows = P(*lead, batch_axes)
  per_head = P(*lead, batch_axes, head_axis)
  if isinstance(cache, DenseKVCache):
    return dataclasses.replace(cache, k=per_head, v=per_head, lengths=rows, overflow=rows)
  heads = cache.num_kv_heads

  def param(name, a):  # [lead..., Hr, ...], Hr in {1, H}
    hr = a.shape[len(lead)]
    if hr == heads and heads > 1:
      return P(*lead, head_axis)
    if hr == 1:
      return P()
    raise ValueError(f"cache field {name!r} has shape {a.shape}; expected a per-head axis of 1 "
                     f"or num_kv_heads={heads} after {len(lead)} stacked axes")

  corrections = []
  for c, arrays in zip(cache.config.corrections, cache.corrections):
    corrections.append({name: (P() if name in c.shared else per_head if name in c.state
                               else param(name, a)) for name, a in arrays.items()})
  return dataclasses.replace(
      cache, k_codes=per_head, k_scales=per_head, v_codes=per_head, v_scales=per_head,
      **{f: param(f, getattr(cache, f)) for f in BASIS_FIELDS},
      corrections=tuple(corrections), lengths=rows, overflow=rows)


def check_overflow(cache) -> None:
  """Raises OverflowError on the host if any cache in the pytree `cache` overflowed."""
  leaves = jax.tree_util.tree_leaves(
      cache, is_leaf=lambda x: isinstance(x, (DenseKVCache, QuantizedKVCache)))
  for i, c in enumerate(leaves):
    if isinstance(c, (DenseKVCache, QuantizedKVCache)):
      flags = c.overflow
      if isinstance(flags, jax.Array) and not flags.is_fully_addressable:
        # A cache split across processes: every process calls this, so every one gathers.
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(flags, tiled=True)
      flags = np.asarray(flags)
      if flags.any():
        raise OverflowError(
            f"cache {i} overflowed for sequences {np.nonzero(flags.reshape(-1))[0].tolist()}: "
            f"appends past max_len={c.capacity} were dropped")
