"""A decoder-only language model whose layers are scanned, not unrolled.

Layers are grouped by the repeating pattern of their types (`ModelConfig.layer_pattern`): Gemma-3
repeats (5 local, 1 global), Qwen2 and Llama repeat (1 global). Parameters of each run of equal
layer types are stacked on leading axes [groups, run_length, ...], and the forward pass is one
`jax.lax.scan` over groups with a nested scan per run, so XLA compiles one local and one global
layer body however deep the model is. Layers left over when the depth is not a multiple of the
pattern (Gemma-3 1B: 26 = 4 x 6 + 2) form a "tail", scanned the same way without the group axis.

The caches mirror that structure: `{"groups": (one stacked kvjax cache per run), "tail": (...)}`,
each leaf with the same leading axes as the parameters. Local layers get ring-buffer caches of
capacity `sliding_window`, global layers full-length caches.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kvjax
from kvjax.models.config import LOCAL, ModelConfig
from kvjax.models.layers import (DecoderLayer, LayerView, Linear, RMSNorm, project,
                                 rope_inverse_frequencies)

Caches = dict[str, tuple[Any, ...]]


def layer_runs(types: tuple[str, ...], alone=()) -> tuple[tuple[str, int], ...]:
  """Consecutive runs of equal layer types: ("local",)*5 + ("global",) -> (("local", 5), ("global", 1)).

  Indices in `alone` form runs of one layer each.
  """
  runs: list[list] = []
  for i, t in enumerate(types):
    if runs and runs[-1][0] == t and i not in alone and i - 1 not in alone:
      runs[-1][1] += 1
    else:
      runs.append([t, 1])
  return tuple((t, n) for t, n in runs)


def layer_layout(cfg: ModelConfig):
  """(num_groups, group runs, tail runs); each run is (type, count, index of its first layer).

  Layer `l` of the checkpoint is, for a group run starting at offset o in the pattern,
  group l // len(pattern) and slot (l % len(pattern)) - o; tail runs count from the first tail layer.
  """
  pattern = cfg.layer_pattern
  num_groups = cfg.num_layers // len(pattern)
  tail_len = cfg.num_layers % len(pattern)

  def with_offsets(types):
    out, offset = [], 0
    for t, n in layer_runs(types, alone=cfg.separate_layers if num_groups == 1 else ()):
      out.append((t, n, offset))
      offset += n
    return tuple(out)

  group_runs = with_offsets(pattern) if num_groups else ()
  return num_groups, group_runs, with_offsets(pattern[:tail_len])


def layer_index(cfg: ModelConfig, part: str, run: int, *index: int) -> int:
  """Checkpoint layer number of stacked slot `index` ((group, slot) or (slot,)) of a run.

  part: "groups" (index = (group, slot)) or "tail" (index = (slot,)).
  """
  num_groups, group_runs, tail_runs = layer_layout(cfg)
  p = len(cfg.layer_pattern)
  if part == "groups":
    group, slot = index
    return group * p + group_runs[run][2] + slot
  if part != "tail":
    raise ValueError(f"part must be 'groups' or 'tail', got {part!r}")
  (slot,) = index
  return num_groups * p + tail_runs[run][2] + slot


def layer_slots(cfg: ModelConfig) -> list[tuple[str, int, tuple[int, ...], int]]:
  """[(part, run, index, layer)] for every stacked slot of a model's layers and caches: part
  "groups" or "tail", run its index in that part, index the slot's position on the run's
  leading axes ((group, slot) or (slot,)), layer the checkpoint layer number."""
  num_groups, group_runs, tail_runs = layer_layout(cfg)
  out = []
  for r, (_, n, _) in enumerate(group_runs):
    for g in range(num_groups):
      for s in range(n):
        out.append(("groups", r, (g, s), layer_index(cfg, "groups", r, g, s)))
  for r, (_, n, _) in enumerate(tail_runs):
    for s in range(n):
      out.append(("tail", r, (s,), layer_index(cfg, "tail", r, s)))
  return out


def _stacked_layers(cfg: ModelConfig, layer_type: str, lead: tuple[int, ...], *, dtype,
                    rngs: nnx.Rngs) -> DecoderLayer:
  """A DecoderLayer whose every parameter has the extra leading axes `lead`."""
  count = math.prod(lead)
  graphdef = None
  states = []
  for _ in range(count):
    graphdef, state = nnx.split(DecoderLayer(cfg, layer_type, dtype=dtype, rngs=rngs))
    states.append(state)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs).reshape(lead + xs[0].shape), *states)
  return nnx.merge(graphdef, stacked)


def _scan_run(run: DecoderLayer, caches, x: jax.Array, positions: jax.Array, num_tokens,
              impl: str = "auto", layout=None, group=None):
  """Applies the stacked layers of one run in order; caches have the same leading axis.

  The run's parameters are not scanned over: the loop steps a layer index and each layer sees
  its parameters as views into the stacks (`LayerView`), so a product that can read a weight
  where it lies (the native CPU one) never copies a layer's slice out of its stack. group: the
  index of the group this run belongs to (a traced int), or None for a tail run ([n, ...]
  stacks)."""
  graphdef, state = nnx.split(run)
  n = jax.tree.leaves(state)[0].shape[0 if group is None else 1]
  if jax.tree.leaves(caches)[0].shape[0] != n:
    raise ValueError(f"caches hold {jax.tree.leaves(caches)[0].shape[0]} layers for a run of {n}")

  def body(h, slot_and_cache):
    slot, cache = slot_and_cache
    indices = (slot,) if group is None else (group, slot)
    views = jax.tree.map(lambda a: LayerView(a, indices), state)
    h, cache = nnx.merge(graphdef, views)(h, cache, positions, num_tokens, impl=impl,
                                          layout=layout)
    return h, cache

  return jax.lax.scan(body, x, (jnp.arange(n, dtype=jnp.int32), caches))


class CausalLM(nnx.Module):
  """Decoder-only LM over kvjax caches.

  Call: `model(tokens [B, T] int32, caches, *, positions=None) -> (logits [B, T, V] float32,
  new caches)`. Positions default to each sequence's cache length plus 0..T-1, so a batch whose
  sequences have different lengths gets each sequence's own RoPE positions.
  """

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    if not isinstance(cfg, ModelConfig):
      raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = cfg
    self.dtype = jnp.dtype(dtype)
    # Set by kvjax.models.load: the checkpoint's name, and the calibration it was loaded with
    # (a kvjax.calibration.Calibration; static, hashed by identity under jit).
    self.checkpoint_name: str | None = None
    self.calibration = None
    # Set by kvjax.models.shard: where parameters, activations and caches live on a mesh
    # (a kvjax.models.sharding.Layout; static). None: one device.
    self.layout = None
    e = cfg.hidden_size
    self.embedding = nnx.Param(
        jax.random.normal(rngs.params(), (cfg.vocab_size, e)).astype(self.dtype))
    num_groups, group_runs, tail_runs = layer_layout(cfg)
    self.group_runs = nnx.List([
        _stacked_layers(cfg, t, (num_groups, n), dtype=self.dtype, rngs=rngs)
        for t, n, _ in group_runs])
    self.tail_runs = nnx.List([
        _stacked_layers(cfg, t, (n,), dtype=self.dtype, rngs=rngs) for t, n, _ in tail_runs])
    self.final_norm = RMSNorm(e, eps=cfg.rms_norm_eps, dtype=self.dtype)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    Linear(e, cfg.vocab_size, use_bias=False, dtype=self.dtype, rngs=rngs))

  # ----------------------------------------------------------------------------------------------

  def rope_frequencies(self) -> Caches:
    """Each layer's rotate-half RoPE frequencies [D/2] (radians per position), float32, laid out
    like `init_cache`'s caches ({"groups": ([groups, run, D/2], ...), "tail": (...)}): what
    `kvjax.with_stats(caches, rope_freq=...)` needs for the rotary key statistics."""
    cfg = self.config
    num_groups, group_runs, tail_runs = layer_layout(cfg)

    def one(layer_type, lead):
      if layer_type == LOCAL:
        freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_local_theta, None)
      else:
        freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
      return jnp.broadcast_to(jnp.asarray(freq, jnp.float32), lead + freq.shape)

    return {"groups": tuple(one(t, (num_groups, n)) for t, n, _ in group_runs),
            "tail": tuple(one(t, (n,)) for t, n, _ in tail_runs)}

  def value_output_metric(self, head_correlation: float = 0.0) -> Caches:
    """What a value error costs at each layer's output, per layer and KV head.

    A value error e [D] of one token moves the layer's attention output by
    Σ_h p_h W_h^T e over the query heads h that read its KV head (W_h [D, E]: head h's block
    of the output projection times the post-attention norm's scale, where the model has
    one; p_h: head h's attention weight on the token). Its expected square is e^T M e with

        M = (1 - ρ) Σ_h W_h W_h^T + ρ (Σ_h W_h) (Σ_h W_h)^T,

    ρ = `head_correlation` in [0, 1]: 0 treats the heads' weights on a token as independent,
    1 as equal (e.g. a token every head attends to, like the attention sink). Returns
    float32 [..., H_kv, D, D] laid out like `init_cache`'s caches (`kvjax.smoothing`,
    fact 7)."""
    if not 0.0 <= head_correlation <= 1.0:
      raise ValueError(f"head_correlation must be in [0, 1], got {head_correlation!r}")
    cfg = self.config
    d, hq, hk = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    hi = jax.lax.Precision.HIGHEST

    def one(run):
      w = jnp.asarray(run.attention.o_proj.kernel[...], jnp.float32)     # [..., Hq*D, E]
      lead = w.shape[:-2]
      if run.post_attention_norm is not None:
        w = w * jnp.asarray(run.post_attention_norm.scale[...], jnp.float32)[..., None, :]
      w = w.reshape(lead + (hk, hq // hk, d, w.shape[-1]))
      ind = jnp.einsum("...grde,...grfe->...gdf", w, w, precision=hi)
      ws = jnp.sum(w, axis=-3)
      tied = jnp.einsum("...gde,...gfe->...gdf", ws, ws, precision=hi)
      return (1.0 - head_correlation) * ind + head_correlation * tied

    return {"groups": tuple(one(r) for r in self.group_runs),
            "tail": tuple(one(r) for r in self.tail_runs)}

  def init_cache(self, batch: int, max_len: int, *, quant: kvjax.QuantConfig | None = None,
                 dtype=None, layer_quant=None, calibration=None, certified=None,
                 _unplaced: bool = False) -> Caches:
    """Empty caches for `batch` sequences of up to `max_len` tokens.

    Args:
      calibration: a `kvjax.calibration.Calibration` or an artifact directory (`kvjax
        calibrate --out DIR`): quantized caches in its per-layer formats holding its tensors
        (the calibrated cache `kvjax eval` measures). Checked against this model's fingerprint.
        `model.calibration` is the one `kvjax.models.load(..., calibration=...)` attached.
        Excludes quant, layer_quant and dtype.
      quant: None for a dense cache, or a `kvjax.QuantConfig` for a quantized one.
      dtype: dtype of the dense K/V (default: the model's parameter dtype).
      layer_quant: optional {layer index: QuantConfig or None} overriding `quant` for single
        layers; each must be one of `config.separate_layers` (layers stacked with others share
        one cache config): see `kvjax.models.with_separate_layers`.
      certified: a `kvjax.certified.CertifiedConfig`: certified caches (compressed tier on the
        device, bfloat16 originals in host memory, every attention row within the config's
        tolerance of exact or exact; docs/certified.md). Excludes the other options. Local layers
        keep every token (the window is a mask), as the exact tier holds the full history.
    Returns:
      {"groups": (...), "tail": (...)}: one kvjax cache per run of equal layer types, stacked on
      the leading axes [groups, run_length] (or [run_length] for the tail). Local layers use
      ring buffers of capacity `sliding_window` when `max_len` exceeds the window. On a model
      sharded over a mesh (`kvjax.models.shard`) the caches are placed to match it: split over
      KV heads and batch (`batch` must split over the data axis); see models/sharding.py.
    """
    if not isinstance(batch, int) or batch < 1:
      raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not isinstance(max_len, int) or max_len < 1:
      raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if certified is not None:
      if quant is not None or layer_quant or dtype is not None or calibration is not None:
        raise ValueError("init_cache: certified fixes every layer's format; give it alone, "
                         "without quant / layer_quant / dtype / calibration")
      from kvjax import certified as certified_lib
      if not isinstance(certified, certified_lib.CertifiedConfig):
        raise TypeError("certified must be a kvjax.certified.CertifiedConfig, got "
                        f"{type(certified).__name__}")
    if self.layout is not None and not _unplaced:
      if certified is not None:
        raise ValueError("init_cache: certified caches are not sharded yet; use them on an "
                         "unsharded model")
      from kvjax.models import sharding
      sharding.check_batch(self.layout, batch)
    if calibration is not None:
      if quant is not None or layer_quant or dtype is not None:
        raise ValueError("init_cache: give either calibration or quant / layer_quant / dtype, "
                         "not both (the calibration fixes every layer's format)")
      from kvjax.models import calibrated
      return self._placed(calibrated.init_cache(self, batch, max_len, calibration))
    cfg = self.config
    dtype = self.dtype if dtype is None else jnp.dtype(dtype)
    num_groups, group_runs, tail_runs = layer_layout(cfg)
    layer_quant = dict(layer_quant or {})
    for layer, q in layer_quant.items():
      if layer not in cfg.separate_layers:
        raise ValueError(f"layer_quant: layer {layer!r} is not one of the model's separate_layers "
                         f"{cfg.separate_layers}; load the model with separate_layers="
                         f"{tuple(sorted(set(cfg.separate_layers) | {layer}))!r} (or call "
                         "kvjax.models.with_separate_layers) to give it a cache config of its own")
      if q is not None and not isinstance(q, kvjax.QuantConfig):
        raise TypeError(f"layer_quant[{layer}] must be a kvjax.QuantConfig or None, got "
                        f"{type(q).__name__}")

    def one(layer_type, lead, first_layer):
      window = cfg.sliding_window if layer_type == LOCAL else None
      if window is not None and max_len <= window:
        window = None  # every cached position is inside the window: a plain cache is exact
      if certified is not None:
        cache = certified_lib.init_cache(batch, cfg.num_kv_heads, max_len, cfg.head_dim,
                                         config=certified, window=window)
        return certified_lib.stacked(cache, lead)
      q = layer_quant.get(first_layer, quant) if lead[-1] == 1 else quant
      cache = kvjax.init_cache(batch, cfg.num_kv_heads, max_len, cfg.head_dim, quant=q,
                               window=window, dtype=dtype)
      return jax.tree.map(lambda a: jnp.broadcast_to(a, lead + a.shape).copy(), cache)

    # A separate layer forms a run of one in the single group; its index is the run offset.
    caches = {"groups": tuple(one(t, (num_groups, n), off if num_groups == 1 else -1)
                              for t, n, off in group_runs),
              "tail": tuple(one(t, (n,), -1) for t, n, _ in tail_runs)}
    return caches if _unplaced else self._placed(caches)

  def _placed(self, caches: Caches) -> Caches:
    """Caches laid out for this model's mesh (`kvjax.models.shard`); as they are without one."""
    if self.layout is None:
      return caches
    from kvjax.models import sharding
    return sharding.place_caches(caches, self.layout)

  def __call__(self, tokens: jax.Array, caches: Caches, *, positions: jax.Array | None = None,
               num_tokens: jax.Array | None = None, logits_at: jax.Array | None = None,
               attention_impl: str = "auto"):
    """tokens [B, T] int -> (logits [B, T, V] float32, new caches).

    Args:
      tokens: [B, T] integer token ids.
      caches: from `init_cache` (or a previous call).
      positions: optional [B, T] RoPE positions; default: cache length + 0..T-1 per sequence.
      num_tokens: optional int [B] for right-padded ragged chunks: only the first num_tokens[b]
        tokens of sequence b enter its cache; logits at the padded tokens are unspecified.
      logits_at: optional int [B]; if given, logits are computed only at token index
        logits_at[b] of each sequence and have shape [B, 1, V] (a prefill needs just the last
        prompt token's; the full [B, T, V] of a 262K vocabulary is gigabytes).
      attention_impl: the implementation every layer's attention runs (`kvjax.attend`'s impl:
        "auto" picks by platform and step; "xla" is the exact quantized-domain path).
    """
    cfg = self.config
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be a [batch, seq] integer array, got shape {tokens.shape} "
                       f"dtype {tokens.dtype}")
    _check_caches(caches, len(self.group_runs), len(self.tail_runs))
    batch, seq = tokens.shape
    if positions is None:
      positions = cache_lengths(caches)[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
    elif positions.shape != (batch, seq):
      raise ValueError(f"positions must have shape {(batch, seq)} like tokens, got {positions.shape}")

    embedding = self.embedding[...]
    x = jnp.take(embedding, tokens, axis=0)
    if cfg.scale_embeddings:
      # The multiplier is rounded to the parameter dtype first, as the reference does
      # (sqrt(640) in bfloat16 is 25.25, not 25.298).
      x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype=embedding.dtype)

    new_group_caches: tuple = ()
    if len(self.group_runs):
      runs = tuple(self.group_runs)
      num_groups = jax.tree.leaves(nnx.state(runs[0]))[0].shape[0]
      if jax.tree.leaves(caches["groups"])[0].shape[0] != num_groups:
        raise ValueError(f"caches hold {jax.tree.leaves(caches['groups'])[0].shape[0]} layer "
                         f"groups for a model of {num_groups}")

      def group_body(h, group_xs):
        group, run_caches = group_xs
        out = []
        for run, cache in zip(runs, run_caches):
          h, cache = _scan_run(run, cache, h, positions, num_tokens, attention_impl,
                               self.layout, group=group)
          out.append(cache)
        return h, tuple(out)

      x, new_group_caches = jax.lax.scan(
          group_body, x, (jnp.arange(num_groups, dtype=jnp.int32), caches["groups"]))
    new_tail_caches = []
    for run, cache in zip(self.tail_runs, caches["tail"]):
      x, cache = _scan_run(run, cache, x, positions, num_tokens, attention_impl, self.layout)
      new_tail_caches.append(cache)

    if logits_at is not None:
      if logits_at.shape != (batch,):
        raise ValueError(f"logits_at must have shape ({batch},), got {logits_at.shape}")
      x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)
    x = self.final_norm(x)
    if self.lm_head is None:
      logits = project(x, embedding, transposed=True, native=self.layout is None)
    else:
      logits = self.lm_head(x, native=self.layout is None)
    logits = logits.astype(jnp.float32)
    if cfg.final_logit_softcap is not None:
      cap = jnp.float32(cfg.final_logit_softcap)
      logits = cap * jnp.tanh(logits / cap)
    return logits, {"groups": tuple(new_group_caches), "tail": tuple(new_tail_caches)}


def cache_lengths(caches: Caches) -> jax.Array:
  """[B] int32: tokens written so far per sequence (the same in every layer)."""
  first = (caches["groups"] + caches["tail"])[0]
  lengths = first.lengths
  return lengths.reshape(-1, lengths.shape[-1])[0]


def _check_caches(caches, num_group_runs: int, num_tail_runs: int) -> None:
  if (not isinstance(caches, dict) or set(caches) != {"groups", "tail"}
      or len(caches["groups"]) != num_group_runs or len(caches["tail"]) != num_tail_runs):
    raise ValueError("caches must be the structure returned by model.init_cache(...): "
                     f"{{'groups': {num_group_runs} caches, 'tail': {num_tail_runs} caches}}")


def param_count(model: CausalLM) -> int:
  """Number of parameters (embedding counted once when tied)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def with_separate_layers(model: CausalLM, layers) -> CausalLM:
  """The same model with `layers` scanned as runs of their own (see ModelConfig.separate_layers).

  Parameters are unstacked per layer and restacked in the new layout; outputs are unchanged
  (the same per-layer computation in the same order). The point is the caches: afterwards
  `model.init_cache(..., layer_quant={layer: QuantConfig(...)})` can give each of these
  layers its own cache format. Returns a new model; `model` is not modified.
  """
  from kvjax.models.params import build_model  # params imports this module

  cfg = model.config
  layers = tuple(sorted(set(cfg.separate_layers) | {int(l) for l in layers}))
  new_cfg = cfg.replace(separate_layers=layers)  # validates the indices
  pure = nnx.to_pure_dict(nnx.state(model))
  num_groups, group_runs, tail_runs = layer_layout(cfg)
  p = len(cfg.layer_pattern)
  per_layer = [None] * cfg.num_layers
  for r, (_, n, off) in enumerate(group_runs):
    for g in range(num_groups):
      for j in range(n):
        per_layer[g * p + off + j] = jax.tree.map(lambda a: a[g, j], pure["group_runs"][r])
  for r, (_, n, off) in enumerate(tail_runs):
    for j in range(n):
      per_layer[num_groups * p + off + j] = jax.tree.map(lambda a: a[j], pure["tail_runs"][r])
  new_groups, new_runs, new_tail = layer_layout(new_cfg)
  if new_groups != 1 or new_tail:
    raise AssertionError("separate layers put the whole stack into one group")
  pure["group_runs"] = {r: jax.tree.map(lambda *xs: jnp.stack(xs)[None], *per_layer[off:off + n])
                        for r, (_, n, off) in enumerate(new_runs)}
  pure["tail_runs"] = {}
  new = build_model(new_cfg, pure, dtype=model.dtype)
  new.checkpoint_name, new.calibration = model.checkpoint_name, model.calibration
  if model.layout is not None:
    from kvjax.models.sharding import shard
    layout = model.layout
    new = shard(new, layout.mesh, data_axis=layout.data_axis, model_axis=layout.model_axis)
  return new
