"""`kvjax calibrate`: learn a rotation R and per-channel scales λ per layer and KV head.

The quantized cache stores y = R ((x - μ) / λ) as 4-bit group abs-max codes
(docs/cache_layout.md). SRFT/SRHT rotations are random; here R and λ are fitted
to the post-RoPE keys and values a model really produces, on calibration text
disjoint from the evaluation text (Emma; evaluation is Pride and Prejudice):

  R = cayley(W) @ base      orthogonal for every W (kvjax.rotations.LearnedRotation);
                            base is the SRFT matrix the cache would use, or I;
  λ = exp(log_λ)            positive for every log_λ;
  μ                         the calibration keys' per-channel mean (exact offset, optional).

The 4-bit rounding is made differentiable with a straight-through estimator
(forward: exactly the cache's quantizer, bf16 scale rounding included;
backward: identity through round), and W, log_λ are trained with Adam under a
warmup + cosine schedule (optax). Objectives:

  "mse"        relative reconstruction error of K and V;
  "attention"  relative error of the attention logits q . k over sampled
               queries, plus the relative error of the attention outputs
               softmax(q K^T) V over the calibration keys/values.

Runs are deterministic under `seed` (each step's minibatch comes from
fold_in(seed, step)), checkpointed with orbax every `checkpoint_every` steps,
and an interrupted run resumes from its last checkpoint to the same final
result. The output directory holds an orbax checkpoint `result/` with R, λ, μ
per (layer, KV head), the QuantConfig and metadata; `load_calibration` reads
it back, refusing a checkpoint made for another architecture, and
`apply_calibration` / `init_calibrated_cache` put it into a model's caches.

    python -m kvjax.calibrate --model gemma3-270m --out results/calibration/gemma3-270m
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import quantizer
from kvjax.cache import (_STATS_FIELDS, DenseKVCache, QuantizedKVCache, StatsKVCache,
                         stats_fields)
from kvjax.config import QuantConfig
from kvjax.rotations import rotation_matrix_np

FORMAT_VERSION = 1
OBJECTIVES = ("mse", "attention")
BASES = ("srft", "none")
INITS = ("identity", "closed-form")
# Fields of a ModelConfig that fix the shapes and meaning of calibrated parameters.
_ARCH_FIELDS = ("arch", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size",
                "vocab_size", "layer_types")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
  """What to learn and how.

  Attributes:
    objective: "mse" (K/V reconstruction) or "attention" (logits and outputs).
    base: fixed orthogonal start of R: "srft" (the cache's own SRFT matrices, keys
      seed `quant.seed`, values `quant.seed + 1`) or "none" (identity).
    learn_lambda: also learn per-channel λ for keys and values (else λ stays at its start).
    learn_rotation: learn R = cayley(W) @ base (else R = base, and only λ is learned).
    init: start of the key λ: "identity" (λ = 1) or "closed-form" (kvjax.smoothing's
      sqrt(rms(k - μ) / rms(q)) on the calibration data, the cache's default without
      learning). Value λ starts at 1.
    key_offset: store keys minus their calibration mean μ (exact for attention).
    steps, learning_rate, warmup_steps: Adam on W and log λ with linear warmup then
      cosine decay to 10% of the peak.
    batch_tokens: keys/values sampled per layer per step (minibatch).
    batch_queries: queries sampled per KV head per step ("attention" only).
    seed: seed of the minibatch sampling (results are a function of it).
    checkpoint_every: orbax checkpoint of the training state every N steps (0: never).
  """

  objective: str = "mse"
  base: str = "srft"
  learn_lambda: bool = True
  learn_rotation: bool = True
  init: str = "identity"
  key_offset: bool = True
  steps: int = 200
  learning_rate: float = 2e-3
  warmup_steps: int = 20
  batch_tokens: int = 512
  batch_queries: int = 256
  seed: int = 0
  checkpoint_every: int = 50

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"CalibrationConfig.objective must be one of {OBJECTIVES}, got "
                       f"{self.objective!r}")
    if self.init not in INITS:
      raise ValueError(f"CalibrationConfig.init must be one of {INITS}, got {self.init!r}")
    if not (self.learn_lambda or self.learn_rotation):
      raise ValueError("CalibrationConfig: learn_lambda and learn_rotation are both False; "
                       "there is nothing to learn")
    if self.base not in BASES:
      raise ValueError(f"CalibrationConfig.base must be one of {BASES}, got {self.base!r}")
    for name in ("steps", "batch_tokens", "batch_queries"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"CalibrationConfig.{name} must be a positive int, got {v!r}")
    if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps:
      raise ValueError(f"CalibrationConfig.warmup_steps must be an int >= 0, got "
                       f"{self.warmup_steps!r}")
    if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
      raise ValueError(f"CalibrationConfig.checkpoint_every must be an int >= 0, got "
                       f"{self.checkpoint_every!r}")
    if not self.learning_rate > 0:
      raise ValueError(f"CalibrationConfig.learning_rate must be > 0, got {self.learning_rate!r}")


# --------------------------------------------------------------------------- data collection


@dataclasses.dataclass(frozen=True)
class CalibrationData:
  """Post-RoPE vectors per layer (checkpoint order) and KV head, float32 host arrays.

  keys, values: [L, H, N, D]; only the first counts[l] tokens of layer l are real
    (sliding-window layers keep only their last window).
  counts: int [L].
  queries: [L, H, M, D], the query vectors of the query heads that read KV head h,
    at M sampled token positions (M = samples x query heads per KV head).
  """

  keys: np.ndarray
  values: np.ndarray
  counts: np.ndarray
  queries: np.ndarray

  def valid_mask(self) -> np.ndarray:
    """bool [L, 1, N, 1]: which token slots of keys/values are real."""
    n = self.keys.shape[2]
    return (np.arange(n)[None, :] < self.counts[:, None])[:, None, :, None]

  def __post_init__(self):
    l, h, n, d = self.keys.shape
    if self.values.shape != self.keys.shape:
      raise ValueError(f"values {self.values.shape} must match keys {self.keys.shape}")
    if self.counts.shape != (l,) or np.any(self.counts < 1) or np.any(self.counts > n):
      raise ValueError(f"counts must be [{l}] in [1, {n}], got {self.counts}")
    if self.queries.ndim != 4 or self.queries.shape[:2] != (l, h) or self.queries.shape[3] != d:
      raise ValueError(f"queries must be [{l}, {h}, M, {d}], got {self.queries.shape}")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "lengths", "overflow", *_STATS_FIELDS, "q_samples"],
    meta_fields=["capacity", "window", "ring", "sample_every"])
@dataclasses.dataclass(frozen=True)
class QuerySampleCache(StatsKVCache):
  """A statistics cache that also keeps the queries of every `sample_every`-th token.

  q_samples: float32 [..., M, Hq, D]; slot m holds the query at absolute position
  m * sample_every (zeros until that position is written).
  """

  q_samples: jax.Array = None
  sample_every: int = 1

  def accumulate(self, q, k, v, num_tokens=None) -> "QuerySampleCache":
    new = super().accumulate(q, k, v, num_tokens)
    b, t = q.shape[:2]
    n = (jnp.full((b,), t, jnp.int32) if num_tokens is None
         else jnp.asarray(num_tokens, jnp.int32))
    pos = self.lengths[0] + jnp.arange(t, dtype=jnp.int32)     # sequence 0 only
    m = self.q_samples.shape[-3]
    take = (jnp.arange(t) < n[0]) & (pos % self.sample_every == 0)
    slots = jnp.where(take, pos // self.sample_every, m)         # m: out of range, dropped
    samples = self.q_samples.at[slots].set(q[0].astype(jnp.float32), mode="drop")
    return dataclasses.replace(new, q_samples=samples)


def _with_query_samples(tree, num_heads: int, samples: int, every: int, rope_freq=None):
  def convert(c, freq=None):
    if isinstance(c, DenseKVCache):
      lead = c.k.shape[:-4]
      return QuerySampleCache(
          k=c.k, v=c.v, lengths=c.lengths, overflow=c.overflow, capacity=c.capacity,
          window=c.window, ring=c.ring, **stats_fields(c, freq),
          q_samples=jnp.zeros(lead + (samples, num_heads, c.k.shape[-1]), jnp.float32),
          sample_every=every)
    return c
  if rope_freq is None:
    return jax.tree_util.tree_map(convert, tree, is_leaf=_is_cache)
  return jax.tree_util.tree_map(convert, tree, rope_freq, is_leaf=_is_cache)


def _is_cache(x):
  return isinstance(x, (DenseKVCache, QuantizedKVCache))


def _layer_slots(cfg):
  """[(part, run, index tuple, layer number)] for every stacked cache slot of a model."""
  from kvjax.models.decoder import layer_index, layer_layout
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


def collect(runner, tokens: Sequence[int], *, query_samples: int = 256, chunk: int = 512,
            progress: bool = True, return_caches: bool = False):
  """Runs the model once over `tokens` (batch 1) and gathers per-layer K, V and queries.

  Returns the CalibrationData, or (data, caches) with `return_caches`: the caches are
  `kvjax.StatsKVCache`s (subclass) usable by `kvjax.smoothing.calibrate_caches`.

  `runner` is a `kvjax.eval._Runner`. A dense float32 cache of len(tokens) slots holds
  every key of the global layers and the last window of the sliding-window layers.
  """
  model = runner.model
  cfg = model.config
  n = len(tokens)
  if n < 2:
    raise ValueError(f"tokens must hold at least 2 calibration tokens, got {n}")
  every = max(1, n // query_samples)
  samples = -(-n // every)
  caches = model.init_cache(1, n, dtype=jnp.float32)
  caches = _with_query_samples(caches, cfg.num_heads, samples, every,
                               rope_freq=model.rope_frequencies())
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n, desc="calibration prefill", unit="tok", leave=False)
  from kvjax.eval import prefill  # eval imports this module lazily; keep the import local
  _, caches = prefill(runner, tokens, caches, chunk=chunk, bar=bar)
  if bar is not None:
    bar.close()
  h, d, hq = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
  rep = hq // h
  num_layers = cfg.num_layers
  keys = np.zeros((num_layers, h, n, d), np.float32)
  values = np.zeros_like(keys)
  counts = np.zeros((num_layers,), np.int64)
  queries = np.zeros((num_layers, h, samples * rep, d), np.float32)
  for part, run, index, layer in _layer_slots(cfg):
    c = caches[part][run]
    k = np.asarray(c.k[index], np.float32)[0]     # [H, S, D], batch 0
    v = np.asarray(c.v[index], np.float32)[0]
    valid = min(n, c.capacity)
    # Order inside a ring does not matter: the vectors are a sample, not a sequence.
    keys[layer, :, :valid] = k[:, :valid]
    values[layer, :, :valid] = v[:, :valid]
    counts[layer] = valid
    q = np.asarray(c.q_samples[index], np.float32)  # [M, Hq, D]
    q = q.reshape(samples, h, rep, d).transpose(1, 0, 2, 3).reshape(h, samples * rep, d)
    queries[layer] = q
  data = CalibrationData(keys=keys, values=values, counts=counts, queries=queries)
  return (data, caches) if return_caches else data


# --------------------------------------------------------------------------- differentiable quantizer


def fake_quantize_ste(x: jax.Array, rotation: jax.Array, lam: jax.Array, mean: jax.Array, *,
                      bits: int, group_size: int, scale_dtype=jnp.bfloat16) -> jax.Array:
  """What the cache returns for x [N, D] (rotation [D, D], lam, mean [D]), float32 [N, D].

  Forward: exactly `quantizer.fake_quantize(x - mean, ...) + mean` (scales rounded to
  `scale_dtype` before dividing, the cache's grid: odd levels for 4-bit, round half to
  even for 8-bit, clipped to ±qmax).
  Backward: straight-through on both roundings (the scale's and the codes'), so the
  gradient reaches R and λ through the rotation and the abs-max scale.
  """
  q = quantizer.qmax(bits)
  n, d = x.shape
  y = jnp.matmul((x - mean) / lam, rotation.T, precision=jax.lax.Precision.HIGHEST)
  yg = y.reshape(n, d // group_size, group_size)
  s = jnp.max(jnp.abs(yg), axis=-1, keepdims=True) / q
  s = s + jax.lax.stop_gradient(quantizer.round_to_dtype(s, scale_dtype) - s)
  safe = jnp.where(s > 0, s, 1.0)
  u = yg / safe
  codes = jnp.clip(u + jax.lax.stop_gradient(quantizer.round_to_grid(u, bits) - u), -q, q)
  y_hat = (codes * safe).reshape(n, d)
  return jnp.matmul(y_hat, rotation, precision=jax.lax.Precision.HIGHEST) * lam + mean


# --------------------------------------------------------------------------- training


def _bases(kind: str, dim: int, quant: QuantConfig, num_layers: int, heads: int):
  """Fixed starting rotations for keys and values, [L, H, D, D] each."""
  if kind == "none":
    eye = np.eye(dim, dtype=np.float32)
    kb = vb = eye
  else:
    kb = rotation_matrix_np("srft", dim, quant.seed)
    vb = rotation_matrix_np("srft", dim, quant.seed + 1)
  tile = lambda m: np.broadcast_to(m, (num_layers, heads, dim, dim)).copy()
  return tile(kb), tile(vb)


def cayley_host(weights) -> tuple[np.ndarray, np.ndarray]:
  """(cayley(W), (I + A)^-1) for W [..., D, D] (A = W - W^T), float32, computed with numpy.

  XLA's CPU LAPACK solve inside a jitted gradient step hung (jaxlib 0.10.2, a few
  hundred-wide matrices batched over layers), so the D x D inverse is taken on the host
  in float64, once per step, and `cayley_linearized` carries its exact gradient.
  """
  w = np.asarray(weights, np.float64)
  a = w - np.swapaxes(w, -1, -2)
  eye = np.eye(w.shape[-1])
  inv = np.linalg.inv(eye + a)
  return (inv @ (eye - a)).astype(np.float32), inv.astype(np.float32)


def cayley_linearized(weights: jax.Array, rotation: jax.Array, inverse: jax.Array) -> jax.Array:
  """cayley(weights) given its value `rotation` and (I + A)^-1 `inverse` at these weights.

  The value is exactly `rotation`; the derivative is the exact one of the Cayley map,
  dR = -(I + A)^-1 dA (R + I), so gradients equal those through `rotations.cayley`.
  """
  delta = weights - jax.lax.stop_gradient(weights)          # zero, with unit derivative
  d_a = delta - jnp.swapaxes(delta, -1, -2)
  hi = jax.lax.Precision.HIGHEST
  eye = jnp.eye(weights.shape[-1], dtype=weights.dtype)
  return rotation - jnp.matmul(jnp.matmul(inverse, d_a, precision=hi), rotation + eye,
                               precision=hi)


def _head_loss(params, fixed, batch, *, objective, quant, attn_scale):
  """Loss of one (layer, KV head). batch: k, v [Nb, D], q [Mb, D], and the host Cayley
  values k_cayley/k_inverse, v_cayley/v_inverse [D, D] at the current weights."""
  hi = jax.lax.Precision.HIGHEST
  rk = jnp.matmul(cayley_linearized(params["k_weights"], batch["k_cayley"], batch["k_inverse"]),
                  fixed["k_base"], precision=hi)
  rv = jnp.matmul(cayley_linearized(params["v_weights"], batch["v_cayley"], batch["v_inverse"]),
                  fixed["v_base"], precision=hi)
  lk, lv = jnp.exp(params["k_log_lambda"]), jnp.exp(params["v_log_lambda"])
  fq = functools.partial(fake_quantize_ste, bits=None, group_size=quant.group_size,
                         scale_dtype=quant.scale_jnp_dtype)
  k, v = batch["k"], batch["v"]
  k_hat = fq(k, rk, lk, fixed["k_mean"], bits=quant.key_bits)
  v_hat = fq(v, rv, lv, jnp.zeros_like(lv), bits=quant.value_bits)
  tiny = 1e-20
  if objective == "mse":
    k_ref = jnp.mean(jnp.sum((k - fixed["k_mean"]) ** 2, -1)) + tiny
    return (jnp.mean(jnp.sum((k - k_hat) ** 2, -1)) / k_ref
            + jnp.mean(jnp.sum((v - v_hat) ** 2, -1)) / (jnp.mean(jnp.sum(v ** 2, -1)) + tiny))
  q = batch["q"] * attn_scale
  logits = jnp.matmul(q, k.T, precision=hi)
  logits_hat = jnp.matmul(q, k_hat.T, precision=hi)
  centred = logits - jnp.mean(logits, axis=-1, keepdims=True)
  logit_err = jnp.mean((logits - logits_hat) ** 2) / (jnp.mean(centred ** 2) + tiny)
  out = jnp.matmul(jax.nn.softmax(logits, -1), v, precision=hi)
  out_hat = jnp.matmul(jax.nn.softmax(logits_hat, -1), v_hat, precision=hi)
  out_err = jnp.mean(jnp.sum((out - out_hat) ** 2, -1)) / (jnp.mean(jnp.sum(out ** 2, -1)) + tiny)
  return logit_err + out_err


def _schedule(cc: CalibrationConfig):
  import optax
  warmup = min(cc.warmup_steps, max(cc.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else cc.learning_rate, peak_value=cc.learning_rate,
      warmup_steps=warmup, decay_steps=max(cc.steps, warmup + 1), end_value=0.1 * cc.learning_rate)


def _optimizer(cc: CalibrationConfig):
  import optax
  opt = optax.adam(_schedule(cc))
  if not (cc.learn_lambda and cc.learn_rotation):
    rot = "train" if cc.learn_rotation else "frozen"
    lam = "train" if cc.learn_lambda else "frozen"
    labels = {"k_weights": rot, "v_weights": rot, "k_log_lambda": lam, "v_log_lambda": lam}
    opt = optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)
  return opt


def _sample_batch(data_dev, step_key, cc: CalibrationConfig):
  """Minibatch for one step: k, v [L, H, Nb, D], q [L, H, Mb, D]."""
  keys, values, counts, queries = data_dev
  num_layers = keys.shape[0]
  kk, kq = jax.random.split(step_key)
  u = jax.random.uniform(kk, (num_layers, cc.batch_tokens))
  idx = jnp.minimum((u * counts[:, None]).astype(jnp.int32), counts[:, None] - 1)  # [L, Nb]
  take = lambda a: jnp.take_along_axis(a, idx[:, None, :, None], axis=2)
  batch = {"k": take(keys), "v": take(values)}
  mq = queries.shape[2]
  qi = jax.random.randint(kq, (num_layers, min(cc.batch_queries, mq)), 0, mq)
  batch["q"] = jnp.take_along_axis(queries, qi[:, None, :, None], axis=2)
  return batch


def _total_loss(params, fixed, batch, *, objective, quant, attn_scale):
  per_head = functools.partial(_head_loss, objective=objective, quant=quant,
                               attn_scale=attn_scale)
  losses = jax.vmap(jax.vmap(per_head))(params, fixed, batch)   # [L, H]
  return jnp.mean(losses), losses


def closed_form_key_lambda(data: CalibrationData, mean: np.ndarray) -> np.ndarray:
  """kvjax.smoothing's λ [L, H, D] from the collected keys (minus `mean`) and queries."""
  from kvjax import smoothing
  centred = (data.keys - mean[:, :, None, :]) * data.valid_mask()
  k_rms = np.sqrt((centred.astype(np.float64) ** 2).sum(2) / data.counts[:, None, None])
  q_rms = np.sqrt((data.queries.astype(np.float64) ** 2).mean(2))
  return np.asarray(smoothing.balance_lambda(jnp.asarray(k_rms, jnp.float32),
                                             jnp.asarray(q_rms, jnp.float32)), np.float32)


def init_state(data: CalibrationData, quant: QuantConfig, cc: CalibrationConfig):
  """(params, fixed, opt_state): trainable W/log λ (zeros: R = base, λ = 1) and fixed bases/μ."""
  num_layers, h, _, d = data.keys.shape
  kb, vb = _bases(cc.base, d, quant, num_layers, h)
  if cc.key_offset:
    mean = (data.keys * data.valid_mask()).sum(2) / data.counts[:, None, None]
  else:
    mean = np.zeros((num_layers, h, d), np.float32)
  fixed = {"k_base": jnp.asarray(kb), "v_base": jnp.asarray(vb),
           "k_mean": jnp.asarray(mean, jnp.float32)}
  k_log_lambda = np.zeros((num_layers, h, d), np.float32)
  if cc.init == "closed-form":
    k_log_lambda = np.log(closed_form_key_lambda(data, mean))
  params = {"k_weights": jnp.zeros((num_layers, h, d, d), jnp.float32),
            "v_weights": jnp.zeros((num_layers, h, d, d), jnp.float32),
            "k_log_lambda": jnp.asarray(k_log_lambda, jnp.float32),
            "v_log_lambda": jnp.zeros((num_layers, h, d), jnp.float32)}
  return params, fixed, _optimizer(cc).init(params)


def _checkpoint_manager(directory: pathlib.Path, cc: CalibrationConfig):
  import orbax.checkpoint as ocp
  # Synchronous saves: the state is small, and a run interrupted right after a save
  # must find that save complete on disk.
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory.absolute(), options=options)


def train(data: CalibrationData, quant: QuantConfig, cc: CalibrationConfig, *,
          attn_scale: float, checkpoint_dir: str | pathlib.Path | None = None,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None):
  """Fits R and λ for every layer and KV head; returns (params, fixed, losses per step).

  With `checkpoint_dir`, the training state is saved there every `cc.checkpoint_every`
  steps and a run finding a checkpoint there resumes from it (same final result as an
  uninterrupted run: each step's minibatch is a function of (seed, step) only).
  `on_step(step, loss)` is called after every step (progress reporting, tests).
  """
  import optax
  import orbax.checkpoint as ocp
  if not isinstance(quant, QuantConfig):
    raise TypeError(f"quant must be a kvjax.QuantConfig, got {type(quant).__name__}")
  quant.check_head_dim(data.keys.shape[-1])
  params, fixed, opt_state = init_state(data, quant, cc)
  opt = _optimizer(cc)
  data_dev = (jnp.asarray(data.keys), jnp.asarray(data.values),
              jnp.asarray(data.counts, jnp.int32), jnp.asarray(data.queries))
  loss_fn = functools.partial(_total_loss, objective=cc.objective, quant=quant,
                              attn_scale=float(attn_scale))

  # Sampling is its own jitted call: fused into the attention objective's gradient step,
  # XLA's CPU runtime (jax 0.10.2) was seen to hang at run time.
  sample_fn = jax.jit(lambda step, data_dev: _sample_batch(
      data_dev, jax.random.fold_in(jax.random.key(cc.seed), step), cc))

  @jax.jit
  def step_fn(params, opt_state, batch):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, fixed, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start, losses = 0, []
  frozen = {}  # host Cayley values (refreshed every step while R is learned)
  manager = None
  if checkpoint_dir is not None and cc.checkpoint_every:
    manager = _checkpoint_manager(pathlib.Path(checkpoint_dir), cc)
    latest = manager.latest_step()
    if latest is not None:
      target = {"params": params, "opt_state": opt_state}
      restored = manager.restore(latest, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()))
      saved = restored["progress"]
      if saved.get("config") != dataclasses.asdict(cc):
        raise ValueError(f"checkpoint_dir {checkpoint_dir} holds a run with another "
                         f"CalibrationConfig ({saved.get('config')}); use a fresh directory")
      params, opt_state = restored["state"]["params"], restored["state"]["opt_state"]
      start, losses = int(latest), list(saved["losses"])
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=cc.steps, initial=start, desc=f"calibrate ({cc.objective})", unit="step")
  try:
    for step in range(start, cc.steps):
      batch = dict(sample_fn(jnp.int32(step), data_dev))
      for which in ("k", "v"):
        if cc.learn_rotation or f"{which}_cayley" not in frozen:  # frozen W: computed once
          rot, inv = cayley_host(jax.device_get(params[f"{which}_weights"]))
          frozen[f"{which}_cayley"], frozen[f"{which}_inverse"] = jnp.asarray(rot), jnp.asarray(inv)
        batch[f"{which}_cayley"] = frozen[f"{which}_cayley"]
        batch[f"{which}_inverse"] = frozen[f"{which}_inverse"]
      params, opt_state, loss = step_fn(params, opt_state, batch)
      loss = float(loss)
      losses.append(loss)
      if manager is not None and (step + 1) % cc.checkpoint_every == 0:
        manager.save(step + 1, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            progress=ocp.args.JsonSave({"losses": losses, "config": dataclasses.asdict(cc)})))
      if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)
      if on_step is not None:
        on_step(step, loss)
  finally:
    if bar is not None:
      bar.close()
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  return params, fixed, losses


# --------------------------------------------------------------------------- result


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Learned cache parameters per layer (checkpoint order) and KV head.

  k_rotation, v_rotation: float32 [L, H, D, D] (orthogonal); k_lambda, v_lambda,
  k_mean: float32 [L, H, D]; quant: the QuantConfig they were fitted for (rotation
  "learned"); metadata: model, corpus slice, steps, losses, shapes (JSON-able dict).
  """

  k_rotation: np.ndarray
  v_rotation: np.ndarray
  k_lambda: np.ndarray
  v_lambda: np.ndarray
  k_mean: np.ndarray
  quant: QuantConfig
  metadata: dict

  def arrays(self) -> dict:
    return {n: getattr(self, n) for n in ("k_rotation", "v_rotation", "k_lambda", "v_lambda",
                                          "k_mean")}


def finalize(params, fixed) -> dict:
  """Dense R = cayley(W) @ base, λ = exp(log λ) and μ as host float32 arrays."""
  out = {}
  for which in ("k", "v"):
    rot, _ = cayley_host(jax.device_get(params[f"{which}_weights"]))
    base = np.asarray(fixed[f"{which}_base"], np.float64)
    out[f"{which}_rotation"] = (rot.astype(np.float64) @ base).astype(np.float32)
    out[f"{which}_lambda"] = np.exp(np.asarray(params[f"{which}_log_lambda"], np.float32))
  out["k_mean"] = np.asarray(fixed["k_mean"], np.float32)
  return out


def architecture(model_config) -> dict:
  """The fields of a ModelConfig that a calibration must match, as JSON-able values."""
  out = {}
  for f in _ARCH_FIELDS:
    v = getattr(model_config, f)
    out[f] = list(v) if isinstance(v, tuple) else v
  return out


def save_calibration(directory: str | pathlib.Path, calibration: Calibration) -> pathlib.Path:
  """Writes `calibration` as an orbax checkpoint at `directory` (must not exist yet)."""
  import orbax.checkpoint as ocp
  path = pathlib.Path(directory).absolute()
  meta = dict(calibration.metadata)
  meta["quant"] = dataclasses.asdict(calibration.quant)
  meta["format_version"] = FORMAT_VERSION
  ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  ckpt.save(path, args=ocp.args.Composite(
      params=ocp.args.StandardSave({k: jnp.asarray(v) for k, v in calibration.arrays().items()}),
      metadata=ocp.args.JsonSave(meta)))
  ckpt.close()
  return path


def _result_path(directory) -> pathlib.Path:
  path = pathlib.Path(directory).absolute()
  if (path / "result").is_dir():
    return path / "result"
  return path


def load_calibration(directory: str | pathlib.Path, *, model_config) -> Calibration:
  """Reads a calibration written by `calibrate` / `save_calibration`.

  `directory` is the run's output directory or its `result/` checkpoint. Raises
  ValueError if it was made for a model whose architecture (layers, heads,
  head_dim, ...) differs from `model_config`, or if its arrays have the wrong shapes.
  """
  import orbax.checkpoint as ocp
  path = _result_path(directory)
  if not path.is_dir():
    raise FileNotFoundError(f"no calibration checkpoint at {directory}")
  ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  meta = ckpt.restore(path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
  if meta is None or "architecture" not in meta:
    raise ValueError(f"{path} is not a kvjax calibration checkpoint (no metadata)")
  want = architecture(model_config)
  got = meta["architecture"]
  diff = {k: (got.get(k), want[k]) for k in want if got.get(k) != want[k]}
  if diff:
    details = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
    raise ValueError(f"calibration at {path} was made for model {meta.get('model')!r} and does "
                     f"not match this model's architecture ({details})")
  arrays = ckpt.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
  ckpt.close()
  arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
  l, h, d = model_config.num_layers, model_config.num_kv_heads, model_config.head_dim
  for name, shape in (("k_rotation", (l, h, d, d)), ("v_rotation", (l, h, d, d)),
                      ("k_lambda", (l, h, d)), ("v_lambda", (l, h, d)), ("k_mean", (l, h, d))):
    if arrays[name].shape != shape:
      raise ValueError(f"calibration {name} has shape {arrays[name].shape}, expected {shape}")
  quant = QuantConfig(**meta["quant"])
  return Calibration(quant=quant, metadata=meta, **arrays)


def apply_calibration(caches, calibration: Calibration, model_config):
  """Puts learned R, λ, μ into the quantized caches of `model.init_cache(...)`.

  Layer-stacked leaves [groups, run, Hr, ...] become [groups, run, H, ...] holding each
  layer's own parameters (layer order from `kvjax.models.decoder.layer_index`). The
  caches' bit widths and group size must match the ones the calibration was fitted for.
  """
  from kvjax.models.decoder import layer_layout
  if not isinstance(caches, dict) or set(caches) != {"groups", "tail"}:
    raise ValueError("caches must be the {'groups': ..., 'tail': ...} structure of "
                     "model.init_cache(...)")
  cq = calibration.quant
  slots = _layer_slots(model_config)
  arrays = calibration.arrays()

  def stacked(part, run, lead, name):
    out = np.zeros(lead + arrays[name].shape[1:], np.float32)
    for p, r, index, layer in slots:
      if p == part and r == run:
        out[index] = arrays[name][layer]
    return jnp.asarray(out)

  new = {"groups": [], "tail": []}
  for part in ("groups", "tail"):
    for run, c in enumerate(caches[part]):
      if not isinstance(c, QuantizedKVCache):
        raise TypeError(f"caches[{part!r}][{run}] is a {type(c).__name__}; a calibration "
                        "applies to quantized caches (model.init_cache(..., quant=...))")
      qc = c.config
      if (qc.key_bits, qc.value_bits, qc.group_size) != (cq.key_bits, cq.value_bits,
                                                          cq.group_size):
        raise ValueError(f"the calibration was fitted for {cq.name}, the caches are {qc.name}: "
                         "bit widths and group size must match")
      lead = c.lengths.shape[:-1]
      fields = {n: stacked(part, run, lead, n) for n in arrays}
      new[part].append(dataclasses.replace(
          c, config=dataclasses.replace(qc, rotation="learned"), **fields))
  return {"groups": tuple(new["groups"]), "tail": tuple(new["tail"])}


def init_calibrated_cache(model, batch: int, max_len: int, calibration: Calibration, *,
                          attention_impl: str | None = None):
  """`model.init_cache(batch, max_len, quant=calibration.quant)` holding the learned parameters."""
  quant = dataclasses.replace(calibration.quant, rotation="srft")
  if attention_impl is not None:
    quant = dataclasses.replace(quant, attention_impl=attention_impl)
  caches = model.init_cache(batch, max_len, quant=quant)
  return apply_calibration(caches, calibration, model.config)


# --------------------------------------------------------------------------- evaluation helpers


def reconstruction_mse(data: CalibrationData, arrays: dict, quant: QuantConfig) -> dict:
  """Relative K and V reconstruction error through the cache's quantizer, per layer.

  arrays: k_rotation/v_rotation [L, H, D, D] (or [D, D]), k_lambda/v_lambda/k_mean
  [L, H, D] (or [D]). Returns {"key": [L], "value": [L]}: Σ||x - x̂||² / Σ||x||² over
  all calibration tokens and heads of each layer (x̂ through `quantizer.fake_quantize`).
  """
  num_layers, h, _, d = data.keys.shape
  full = lambda a, tail: np.broadcast_to(np.asarray(a, np.float32), (num_layers, h) + tail)
  rk, rv = full(arrays["k_rotation"], (d, d)), full(arrays["v_rotation"], (d, d))
  lk, lv = full(arrays["k_lambda"], (d,)), full(arrays["v_lambda"], (d,))
  mk = full(arrays.get("k_mean", np.zeros(d, np.float32)), (d,))

  @functools.partial(jax.jit, static_argnames="bits")
  def err(x, rot, lam, mean, bits):
    x_hat = quantizer.fake_quantize(x - mean, rot, lam, bits=bits, group_size=quant.group_size,
                                    scale_dtype=quant.scale_jnp_dtype) + mean
    return jnp.sum((x - x_hat) ** 2), jnp.sum(x ** 2)

  out = {"key": [], "value": []}
  for layer in range(num_layers):
    n = int(data.counts[layer])
    for which, x, rot, lam, mean, bits in (
        ("key", data.keys, rk, lk, mk, quant.key_bits),
        ("value", data.values, rv, lv, np.zeros_like(mk), quant.value_bits)):
      xs = jnp.asarray(x[layer, :, :n].transpose(1, 0, 2))    # [n, H, D]
      e, ref = err(xs, jnp.asarray(rot[layer]), jnp.asarray(lam[layer]),
                   jnp.asarray(mean[layer]), bits=bits)
      out[which].append(float(e) / max(float(ref), 1e-30))
  return {k: np.asarray(v) for k, v in out.items()}


# --------------------------------------------------------------------------- the job


def calibrate(model_name: str = "gemma3-270m", *, out_dir: str | pathlib.Path,
              quant: QuantConfig | None = None, config: CalibrationConfig = CalibrationConfig(),
              calibration_tokens: int = 2048, query_samples: int = 256, chunk: int = 512,
              progress: bool = True, model=None, tokens: Sequence[int] | None = None,
              corpus_name: str | None = None, log=print) -> Calibration:
  """The whole job: collect K/V/queries on calibration text, train, save, return the result.

  `model` / `tokens` may be given directly (tests: a random model and random tokens);
  by default the named checkpoint is loaded and the first `calibration_tokens` tokens of
  the calibration book are used. Writes `out_dir/train/` (resumable training state) and
  `out_dir/result/` (the calibration checkpoint).
  """
  from kvjax.eval import _Runner
  t0 = time.time()
  quant = QuantConfig() if quant is None else quant
  quant = dataclasses.replace(quant, rotation="learned")
  out = pathlib.Path(out_dir)
  if (out / "result").exists():
    raise ValueError(f"{out / 'result'} already exists; choose another out_dir or remove it")
  if model is None:
    from kvjax import corpus
    from kvjax.models import load
    log(f"loading {model_name} ...")
    model, tokenizer = load(model_name)
    if tokenizer is None:
      raise ValueError(f"{model_name} has no tokenizer; calibration needs one to read text")
    ids = tokenizer.encode(corpus.calibration_text(), add_bos=model.config.add_bos)
    tokens = ids[:calibration_tokens]
    corpus_name = f"austen:{corpus.CALIBRATION_BOOK}"
  elif tokens is None:
    raise ValueError("tokens must be given together with model")
  cfg = model.config
  quant.check_head_dim(cfg.head_dim)
  corpus_slice = {"corpus": corpus_name or "tokens given by the caller", "first_token": 0,
                  "num_tokens": len(tokens)}
  log(f"collecting post-RoPE K/V/queries on {len(tokens)} tokens of {corpus_slice['corpus']}")
  runner = _Runner(model)
  data = collect(runner, list(tokens), query_samples=query_samples, chunk=chunk,
                 progress=progress)
  log(f"training R and λ: {cfg.num_layers} layers x {cfg.num_kv_heads} KV heads, "
      f"head_dim {cfg.head_dim}, objective {config.objective}, base {config.base}, "
      f"{config.steps} steps")
  params, fixed, losses = train(data, quant, config, attn_scale=cfg.query_scale,
                                checkpoint_dir=out / "train", progress=progress)
  arrays = finalize(params, fixed)
  mse = reconstruction_mse(data, arrays, quant)
  meta = {"model": model_name, "architecture": architecture(cfg), "corpus": corpus_slice,
          "config": dataclasses.asdict(config), "steps": config.steps, "losses": losses,
          "head_dim": cfg.head_dim, "num_layers": cfg.num_layers,
          "num_kv_heads": cfg.num_kv_heads,
          "key_mse_per_layer": mse["key"].tolist(), "value_mse_per_layer": mse["value"].tolist(),
          "seconds": round(time.time() - t0, 1), "jax": jax.__version__}
  result = Calibration(quant=quant, metadata=meta, **arrays)
  save_calibration(out / "result", result)
  log(f"final loss {losses[-1]:.5f} (first {losses[0]:.5f}); key rel. MSE "
      f"{mse['key'].mean():.5f}, value rel. MSE {mse['value'].mean():.5f}; wrote "
      f"{out / 'result'} in {time.time() - t0:.0f} s")
  meta["quant"] = dataclasses.asdict(quant)
  return dataclasses.replace(result, metadata=meta)


def add_arguments(p) -> None:
  """The command-line flags of `kvjax calibrate` / `python -m kvjax.calibrate`."""
  d = CalibrationConfig()
  p.add_argument("--model", default="gemma3-270m", help="checkpoint name or path "
                 "(default: %(default)s)")
  p.add_argument("--out", required=True, help="output directory (train/ and result/ inside)")
  p.add_argument("--objective", choices=OBJECTIVES, default=d.objective)
  p.add_argument("--base", choices=BASES, default=d.base,
                 help="fixed rotation R starts from and multiplies (default: %(default)s)")
  p.add_argument("--no-lambda", action="store_true", help="learn R only (λ stays at --init)")
  p.add_argument("--no-rotation", action="store_true", help="learn λ only (R = --base)")
  p.add_argument("--init", choices=INITS, default=d.init,
                 help="start of the key λ (default: %(default)s)")
  p.add_argument("--no-key-offset", action="store_true", help="do not remove the key mean")
  p.add_argument("--steps", type=int, default=d.steps)
  p.add_argument("--learning-rate", type=float, default=d.learning_rate)
  p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
  p.add_argument("--batch-tokens", type=int, default=d.batch_tokens)
  p.add_argument("--batch-queries", type=int, default=d.batch_queries)
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
  p.add_argument("--calibration-tokens", type=int, default=2048)
  p.add_argument("--query-samples", type=int, default=256)
  p.add_argument("--group-size", type=int, default=32)
  p.add_argument("--key-bits", type=int, default=4)
  p.add_argument("--value-bits", type=int, default=4)
  p.add_argument("--chunk", type=int, default=512)
  p.add_argument("--no-progress", action="store_true")


def run_from_args(a) -> Calibration:
  config = CalibrationConfig(
      objective=a.objective, base=a.base, learn_lambda=not a.no_lambda,
      learn_rotation=not a.no_rotation, init=a.init,
      key_offset=not a.no_key_offset, steps=a.steps, learning_rate=a.learning_rate,
      warmup_steps=a.warmup_steps, batch_tokens=a.batch_tokens, batch_queries=a.batch_queries,
      seed=a.seed, checkpoint_every=a.checkpoint_every)
  quant = QuantConfig(key_bits=a.key_bits, value_bits=a.value_bits, group_size=a.group_size,
                      rotation="learned")
  return calibrate(a.model, out_dir=a.out, quant=quant, config=config,
                   calibration_tokens=a.calibration_tokens, query_samples=a.query_samples,
                   chunk=a.chunk, progress=not a.no_progress)


def main(argv=None) -> int:
  import argparse
  import sys
  p = argparse.ArgumentParser(prog="python -m kvjax.calibrate",
                              description="learn rotations R and scales λ for a 4-bit KV cache")
  add_arguments(p)
  a = p.parse_args(argv)
  try:
    run_from_args(a)
  except (ValueError, FileNotFoundError) as e:
    print(f"kvjax calibrate: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
