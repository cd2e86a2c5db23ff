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
            "k_lambda", "v_lambda", "k_mean", "k_rope_freq", "k_rope_channels", "k_rope_mean",
            "k_feedback", "v_feedback", "k_sink", "v_sink", "v_recent", "lengths", "overflow"),
           ("config",) + _COMMON_META)
@dataclasses.dataclass(frozen=True)
class QuantizedKVCache:
  """Keys and values as rotated, per-group abs-max int4/int8 codes.

  k_codes: uint8 [B, H, S, D//2] (4-bit, split-halves nibbles) or int8 [B, H, S, D];
  k_scales: [B, H, S, D // group_size] (bfloat16 by default); v_* the same for
  values; k_rotation, v_rotation: float32 [Hr, D, D]; k_lambda, v_lambda:
  float32 [Hr, D] with Hr in {1, H}; k_mean: float32 [Hr, D], a per-channel key
  offset removed before quantization (attention adds q . k_mean back, exactly);
  k_rope_freq float32 [P], k_rope_channels int32 [P, 2], k_rope_mean float32 [Hr, 2, P]:
  a pre-RoPE key mean removed at each token's position in P channel pairs (attention adds
  q . c_t back per slot, exactly; `kvjax.rotary`), P = config.key_rope_pairs;
  k_feedback float32 [Hr, D, D]: the error-feedback matrix of key rounding when
  config.key_feedback (`kvjax.quantizer.feedback_levels`); v_feedback float32 [Hr, D, D]: the
  same for value rounding when config.value_feedback; k_sink float32 [B, H, D] when
  config.key_sink (else [B, H, 0]): the rounding error k_0 - k^_0 of each sequence's key at
  position 0, set when that position is written (attention adds q . k_sink to its logit, so
  the sink key is exact); v_sink float32 [B, H, D] when config.value_sink (else [B, H, 0]): the
  same for the value (attention adds p_0 v_sink, p_0 the slot's weight); v_recent float32
  [B, H, W - 1, D] for config.value_recent = W >= 2 (else [B, H, 0, D]): the value rounding
  errors of the last W - 1 tokens written, the token at position p in row p mod (W - 1)
  (`kvjax.append_and_attend` adds them, times their weights, to the next queries' outputs);
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
  k_mean: jax.Array
  k_rope_freq: jax.Array
  k_rope_channels: jax.Array
  k_rope_mean: jax.Array
  k_feedback: jax.Array
  v_feedback: jax.Array
  k_sink: jax.Array
  v_sink: jax.Array
  v_recent: jax.Array
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

_PARAM_FIELDS = ("k_rotation", "v_rotation", "k_lambda", "v_lambda", "k_mean", "k_rope_freq",
                 "k_rope_channels", "k_rope_mean", "k_feedback", "v_feedback")
# Parameters shared by every KV head of a layer (no leading [Hr] axis): replicate when sharding.
SHARED_PARAM_FIELDS = ("k_rope_freq", "k_rope_channels")


def _check_positive_int(value, name):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


_ORTHOGONALITY_TOL = 1e-3


def _per_head_param(value, default, shape, name, *, check=None):
  """Broadcasts a rotation / lambda argument to [Hr, ...] float32, Hr in {1, H}.

  check: "orthogonal", "positive" or "upper" (strictly upper triangular), verified (with
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
    elif check == "upper" and np.any(np.tril(conc)):
      raise ValueError(f"{name} must be strictly upper triangular")
  return arr


def init_cache(batch: int, num_kv_heads: int, max_len: int, head_dim: int, *,
               quant: QuantConfig | None = None, window: int | None = None,
               dtype=jnp.bfloat16, key_rotation=None, value_rotation=None,
               key_lambda=None, value_lambda=None, key_mean=None, key_rope=None,
               key_feedback=None, value_feedback=None) -> KVCache:
  """Creates an empty cache for one attention layer.

  Args:
    batch, num_kv_heads, max_len, head_dim: sizes. `max_len` is the longest
      sequence the cache can hold (ignored beyond `window` for ring buffers).
    quant: None for a dense cache in `dtype`; a `QuantConfig` for a quantized one.
    window: sliding-window length. If window < max_len the cache is a ring
      buffer of `window` slots; otherwise a full cache with a window mask.
    dtype: storage dtype of the dense cache (bfloat16, float16 or float32).
    key_rotation, value_rotation: optional rotation matrices [D, D] or
      [Hr, D, D] (Hr in {1, num_kv_heads}) overriding the config's random ones,
      e.g. from calibration.
    key_lambda, value_lambda: optional per-channel scales [D] or [Hr, D].
    key_mean: optional per-channel key offset [D] or [Hr, D] (post-RoPE), removed
      from every key before quantization. Softmax is unchanged by a logit
      constant per query, and attention adds q . key_mean back anyway, so this
      is exact; it frees the 16 levels from a large shared offset.
    key_rope: optional (freq [P], channels [P, 2], mean [2, P] or [Hr, 2, P]) with
      P = quant.key_rope_pairs: the rotary key offset (`kvjax.rotary`). Default: the pairs
      (i, i + D/2), i < P, with zero frequency and mean (no offset).
    key_feedback: optional error-feedback matrix [D, D] or [Hr, D, D] for
      quant.key_feedback (strictly upper triangular; default zeros = nearest rounding).
    value_feedback: the same for values (quant.value_feedback).
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
    shape = (batch, num_kv_heads, capacity, head_dim)
    return DenseKVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=lengths,
                        overflow=overflow, capacity=capacity, window=window, ring=ring)
  if not isinstance(quant, QuantConfig):
    raise TypeError(f"quant must be a kvjax.QuantConfig or None, got {type(quant).__name__}")
  quant.check_head_dim(head_dim)
  if quant.rotation == "learned" and key_rotation is None:
    raise ValueError("rotation='learned' needs key_rotation/value_rotation matrices "
                     "(from kvjax.calibrate); none were given")
  g = quant.group_size

  def codes(bits):
    if bits == 4:
      return jnp.zeros((batch, num_kv_heads, capacity, head_dim // 2), jnp.uint8)
    return jnp.zeros((batch, num_kv_heads, capacity, head_dim), jnp.int8)

  def scales():
    # A fresh buffer per field: a shared one could not be donated twice under jit.
    return jnp.zeros((batch, num_kv_heads, capacity, head_dim // g), quant.scale_jnp_dtype)

  npairs = quant.key_rope_pairs
  if key_rope is None:
    rope_freq = np.zeros((npairs,), np.float32)
    rope_channels = np.stack([np.arange(npairs), np.arange(npairs) + head_dim // 2], 1)
    rope_mean = np.zeros((1, 2, npairs), np.float32)
  else:
    try:
      rope_freq, rope_channels, rope_mean = key_rope
    except (TypeError, ValueError):
      raise ValueError("key_rope must be a (freq, channels, mean) triple") from None
  rope_freq = jnp.asarray(rope_freq, jnp.float32)
  rope_channels = jnp.asarray(rope_channels, jnp.int32)
  if rope_freq.shape != (npairs,) or rope_channels.shape != (npairs, 2):
    raise ValueError(f"key_rope freq and channels must be [{npairs}] and [{npairs}, 2] "
                     f"(QuantConfig.key_rope_pairs={npairs}), got {rope_freq.shape} and "
                     f"{rope_channels.shape}")
  conc = _concrete(rope_channels)
  if conc is not None and conc.size and (conc.min() < 0 or conc.max() >= head_dim):
    raise ValueError(f"key_rope channels must lie in [0, {head_dim}), got {conc.tolist()}")
  kind = "srft" if quant.rotation == "learned" else quant.rotation
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
      k_mean=_per_head_param(key_mean, np.zeros_like(ones), lam_shape, "key_mean"),
      k_rope_freq=rope_freq, k_rope_channels=rope_channels,
      k_rope_mean=_per_head_param(rope_mean, np.zeros((2, npairs), np.float32),
                                  (num_kv_heads, 2, npairs), "key_rope mean"),
      k_feedback=_per_head_param(key_feedback, np.zeros((head_dim, head_dim), np.float32),
                                 rot_shape, "key_feedback", check="upper"),
      v_feedback=_per_head_param(value_feedback, np.zeros((head_dim, head_dim), np.float32),
                                 rot_shape, "value_feedback", check="upper"),
      k_sink=jnp.zeros((batch, num_kv_heads, head_dim if quant.key_sink else 0), jnp.float32),
      v_sink=jnp.zeros((batch, num_kv_heads, head_dim if quant.value_sink else 0), jnp.float32),
      v_recent=jnp.zeros((batch, num_kv_heads, recent_rows(quant), head_dim), jnp.float32),
      lengths=lengths, overflow=overflow, config=quant, capacity=capacity, window=window,
      ring=ring)


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
  value_errors: jax.Array | None = None  # float32 [B, T, H, D] with config.value_recent


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
  else:
    positions = cache.lengths[:, None] + jnp.arange(k.shape[1], dtype=jnp.int32)[None, :]
    arrays = _quantize_chunk(cache, k, v, positions, impl=impl)
    if cache.config.key_sink or cache.config.value_sink:
      arrays.update(_sink_errors(cache, k, v, positions, arrays, valid))
    if cache.config.value_recent:
      errors = value_errors(cache, arrays, v, positions, valid)
      if recent_rows(cache.config):
        arrays["v_recent"] = _recent_ring(cache, errors, positions, valid, new_lengths)
      return _Chunk(arrays, slots, new_lengths, new_overflow, valid, errors)
  return _Chunk(arrays, slots, new_lengths, new_overflow, valid)


def recent_rows(config: QuantConfig) -> int:
  """Rows of `v_recent`: W - 1 for value_recent = W >= 1 (the newest value is in hand)."""
  return max(config.value_recent - 1, 0)


def value_errors(cache: QuantizedKVCache, arrays: dict, v, positions, valid) -> jax.Array:
  """float32 [B, T, H, D]: each new value minus what the chunk stores for it (zero for tokens
  not written and, with the exact sink value, at position 0, already exact through v_sink)."""
  cfg = cache.config
  stored = quantizer.dequantize(arrays["v_codes"], arrays["v_scales"], cache.v_rotation,
                                cache.v_lambda, bits=cfg.value_bits, group_size=cfg.group_size)
  keep = valid
  if cfg.value_sink:
    keep = keep & (positions != 0)
  return jnp.where(keep[:, :, None, None], v.astype(jnp.float32) - stored, 0.0)


def _recent_ring(cache: QuantizedKVCache, errors, positions, valid, new_lengths) -> jax.Array:
  """The new `v_recent`: the chunk's last W - 1 written tokens' errors into rows p mod (W - 1)
  (distinct rows, so the scatter has no duplicate indices); the other rows keep theirs."""
  rows = recent_rows(cache.config)
  newest = valid & (positions >= new_lengths[:, None] - rows)
  row = jnp.where(newest, positions % rows, rows)                             # rows: dropped
  b_idx = jnp.arange(cache.batch, dtype=jnp.int32)[:, None]
  return cache.v_recent.at[b_idx, :, row].set(errors, mode="drop")


def centred_keys(cache: QuantizedKVCache, k: jax.Array, positions: jax.Array) -> jax.Array:
  """What the codes of keys k [B, T, H, D] at `positions` [B, T] hold before rotation:
  k - k_mean - c_t (the rotary offset, `kvjax.rotary`), float32."""
  k = k.astype(jnp.float32) - cache.k_mean
  if cache.config.key_rope_pairs:
    k = k - rotary.key_offset(positions, cache.k_rope_freq, cache.k_rope_channels,
                              cache.k_rope_mean, cache.head_dim)
  return k


def _sink_errors(cache: QuantizedKVCache, k, v, positions, arrays, valid) -> dict:
  """The new `k_sink` / `v_sink` [B, H, D] (those the config keeps): x_0 - x^_0 for sequences
  whose position 0 is in this chunk (always its first token), the old value for the others.

  Decode steps almost never start a sequence: the un-rotation of the first token is skipped
  (a `cond`) unless some sequence of the batch does."""
  cfg = cache.config
  first = (cache.lengths == 0) & valid[:, 0]
  old = {}
  if cfg.key_sink:
    old["k_sink"] = cache.k_sink
  if cfg.value_sink:
    old["v_sink"] = cache.v_sink

  def error():
    out = {}
    if cfg.key_sink:
      exact = centred_keys(cache, k[:, :1], positions[:, :1])                 # [B, 1, H, D]
      stored = quantizer.dequantize(arrays["k_codes"][:, :1], arrays["k_scales"][:, :1],
                                    cache.k_rotation, cache.k_lambda, bits=cfg.key_bits,
                                    group_size=cfg.group_size)
      out["k_sink"] = jnp.where(first[:, None, None], (exact - stored)[:, 0], cache.k_sink)
    if cfg.value_sink:
      stored = quantizer.dequantize(arrays["v_codes"][:, :1], arrays["v_scales"][:, :1],
                                    cache.v_rotation, cache.v_lambda, bits=cfg.value_bits,
                                    group_size=cfg.group_size)
      err = v[:, :1].astype(jnp.float32) - stored
      out["v_sink"] = jnp.where(first[:, None, None], err[:, 0], cache.v_sink)
    return out

  return jax.lax.cond(jnp.any(first), error, lambda: old)


def _quantize_chunk(cache: QuantizedKVCache, k, v, positions, *, impl: str):
  cfg = cache.config
  sd = cfg.scale_jnp_dtype
  k = centred_keys(cache, k, positions)
  feedback = cache.k_feedback if cfg.key_feedback else None
  v_feedback = cache.v_feedback if cfg.value_feedback else None
  if impl == "pallas":
    from kvjax import _pallas_dispatch
    kc, ks = _pallas_dispatch.quantize_heads(k, cache.k_rotation, cache.k_lambda,
                                             bits=cfg.key_bits, group_size=cfg.group_size,
                                             scale_dtype=sd, feedback=feedback)
    vc, vs = _pallas_dispatch.quantize_heads(v, cache.v_rotation, cache.v_lambda,
                                             bits=cfg.value_bits, group_size=cfg.group_size,
                                             scale_dtype=sd, feedback=v_feedback)
  elif impl in ("xla", "reference"):
    kc, ks = quantizer.quantize(k, cache.k_rotation, cache.k_lambda, bits=cfg.key_bits,
                                group_size=cfg.group_size, scale_dtype=sd, feedback=feedback)
    vc, vs = quantizer.quantize(v, cache.v_rotation, cache.v_lambda, bits=cfg.value_bits,
                                group_size=cfg.group_size, scale_dtype=sd, feedback=v_feedback)
  else:
    raise ValueError(f"impl must be 'xla', 'reference' or 'pallas', got {impl!r}")
  return {"k_codes": kc, "k_scales": ks, "v_codes": vc, "v_scales": vs}


def write(cache: KVCache, chunk: _Chunk) -> KVCache:
  """Scatters an encoded chunk into the cache; returns the new cache."""
  b_idx = jnp.arange(cache.batch, dtype=jnp.int32)[:, None]
  updates = {}
  for name, vals in chunk.arrays.items():
    if name in ("k_sink", "v_sink", "v_recent"):  # per sequence: already the new value
      updates[name] = vals
      continue
    buf = getattr(cache, name)
    # buf[b, :, slot] has shape [B, T, H, ...] (advanced indices split by a slice
    # go first), which is exactly the chunk's layout: no transpose needed.
    updates[name] = buf.at[b_idx, :, chunk.slots].set(vals, mode="drop")
  return dataclasses.replace(cache, lengths=chunk.new_lengths, overflow=chunk.new_overflow,
                             **updates)


def append(cache: KVCache, k: jax.Array, v: jax.Array, *, num_tokens=None,
           impl: str = "auto") -> KVCache:
  """Appends keys and values [B, T, H, D] to every sequence; returns the new cache.

  num_tokens: optional int [B]; only the first num_tokens[b] tokens of sequence b
    are written (ragged chunks, e.g. right-padded prompts).
  impl: "auto"/"xla" (jnp), "pallas" (fused write kernel; interpret mode on CPU).
  """
  return write(cache, encode(cache, k, v, num_tokens=num_tokens, impl=_append_impl(impl)))


def _append_impl(impl: str) -> str:
  if impl == "auto":
    return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
  if impl not in ("xla", "reference", "pallas"):
    raise ValueError(f"impl must be 'auto', 'xla', 'reference' or 'pallas', got {impl!r}")
  return impl


# ----------------------------------------------------------------------------- accounting


def nbytes(cache: KVCache, *, include_params: bool = False) -> int:
  """Bytes of real storage held by the cache's per-token buffers and lengths.

  Packed int4 codes count half a byte per value, scales their storage dtype.
  The quantizer's parameters (rotation matrices and lambda, O(head_dim^2) per
  layer, independent of batch and length, shared by every sequence a server
  holds) are excluded unless `include_params=True`.
  """
  total = 0
  for field in dataclasses.fields(cache):
    if field.name in ("config", "capacity", "window", "ring"):
      continue
    if field.name in _STATS_FIELDS:
      continue
    if field.name in _PARAM_FIELDS and not include_params:
      continue
    leaf = getattr(cache, field.name)
    total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


def check_overflow(cache) -> None:
  """Raises OverflowError on the host if any cache in the pytree `cache` overflowed."""
  leaves = jax.tree_util.tree_leaves(
      cache, is_leaf=lambda x: isinstance(x, (DenseKVCache, QuantizedKVCache)))
  for i, c in enumerate(leaves):
    if isinstance(c, (DenseKVCache, QuantizedKVCache)):
      flags = np.asarray(c.overflow)
      if flags.any():
        raise OverflowError(
            f"cache {i} overflowed for sequences {np.nonzero(flags.reshape(-1))[0].tolist()}: "
            f"appends past max_len={c.capacity} were dropped")
