"""`kvjax calibrate`: the calibration artifact of a model's int4 KV cache.

    kvjax calibrate --model gemma3-270m --out cal/gemma3-270m            # closed form (default)
    kvjax calibrate --model gemma3-270m --out cal/learned --learned      # + learned R and λ
    kvjax calibrate --model qwen2.5-coder-0.5b --text my.txt --out cal/q # your own text

    cal = kvjax.calibrate.calibrate(model, tokens)     # -> kvjax.calibration.Calibration

By default this writes the closed-form recipe that `kvjax eval`'s `int4` row measures
(`kvjax.models.calibrated`, `kvjax.smoothing`): key offsets (constant and rotary), λ, feedback
rounding, exact sink key and value, exact recent values, from one pass over calibration windows
of 1,024, 1,024 and 4,096 tokens of *Emma* (disjoint from the evaluation text) or of `--text`.
The artifact (`kvjax.calibration`: a JSON manifest and Orbax tensors, written atomically) is what
`kvjax.models.load(..., calibration=DIR)`, `model.init_cache(..., calibration=DIR)`,
`kvjax.generate(..., calibration=DIR)` and `kvjax eval|bench|passkey --calibration DIR` read.

`--learned` is the ablation of the learned rotation: on top of the closed form, R and λ per
layer and KV head are fitted to the post-RoPE keys and values the model really produces:

  R = cayley(W) @ base      orthogonal for every W (kvjax.rotations.LearnedRotation);
                            base is the SRFT matrix the cache would use, or I;
  λ = exp(log_λ)            positive for every log_λ;
  μ                         the calibration keys' per-channel mean (exact offset).

The 4-bit rounding is made differentiable with a straight-through estimator
(forward: exactly the cache's quantizer, bf16 scale rounding included;
backward: identity through round), and W, log_λ are trained with Adam under a
warmup + cosine schedule (optax). Objectives:

  "mse"        relative reconstruction error of K and V;
  "attention"  relative error of the attention logits q . k over sampled
               queries, plus the relative error of the attention outputs
               softmax(q K^T) V over the calibration keys/values.

The learned R and λ replace the closed form's; its key offsets stay, and the key feedback
matrix is recomputed for the new R and λ from the same statistics. Training runs are
deterministic under `seed` (each step's minibatch comes from fold_in(seed, step)) and
checkpointed with Orbax every `checkpoint_every` steps; an interrupted run resumes from its
last checkpoint to the same final result.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import calibration as artifact
from kvjax import quantizer, smoothing
from kvjax.cache import (_STATS_FIELDS, DenseKVCache, QuantizedKVCache, StatsKVCache,
                         stats_fields)
from kvjax.config import QuantConfig
from kvjax.models import calibrated
from kvjax.models.runner import Runner
from kvjax.rotations import rotation_matrix_np

OBJECTIVES = ("mse", "attention")
BASES = ("srft", "none")
INITS = ("identity", "closed-form")


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
  from kvjax.models.decoder import layer_slots
  return layer_slots(cfg)


def collect(runner, tokens: Sequence[int], *, query_samples: int = 256, chunk: int = 512,
            progress: bool = True, return_caches: bool = False):
  """Runs the model once over `tokens` (batch 1) and gathers per-layer K, V and queries.

  Returns the CalibrationData, or (data, caches) with `return_caches`: the caches are
  `kvjax.StatsKVCache`s (subclass) usable by `kvjax.smoothing.calibrate_caches`.

  `runner` is a `kvjax.models.Runner`. A dense float32 cache of len(tokens) slots holds
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
  from kvjax.models.runner import prefill
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


def learned_tensors(closed_layers, arrays: dict, stats_per_layer: list, recipe) -> tuple:
  """Per-layer tensors of a learned calibration: the closed form's, with the learned R and λ
  (`finalize`'s [L, H, ...] arrays) and the key feedback matrix recomputed for them from each
  layer's query second moment (`stats_per_layer[l]`: qq [H, D, D])."""
  out = []
  for layer, t in enumerate(closed_layers):
    new = dict(t)
    for name in ("k_rotation", "v_rotation", "k_lambda", "v_lambda"):
      new[name] = np.asarray(arrays[name][layer], np.float32)
    if recipe.feedback:
      qq = stats_per_layer[layer]
      new["k_feedback"] = smoothing._feedback_from_moment(qq, new["k_lambda"], new["k_rotation"],
                                                          (), recipe.damping)
    out.append(new)
  return tuple(out)


def calibrate(model, tokens: Sequence[int], *, quant: QuantConfig | None = None,
              layer_quant=None, recipe: smoothing.KeyCalibration = smoothing.KeyCalibration(),
              learned: CalibrationConfig | None = None,
              window_lengths: Sequence[int] = calibrated.DEFAULT_WINDOWS,
              text_name: str | None = None, query_samples: int = 256, chunk: int = 512,
              checkpoint_dir: str | pathlib.Path | None = None, progress: bool = True,
              stats=None, log=print) -> "artifact.Calibration":
  """The calibration of `model` on `tokens` (ids of a calibration text, BOS first when the model
  adds one): the closed-form recipe (`kvjax.models.calibrated.calibrate`), and with `learned`
  the Optax R + λ ablation on top (trained on the longest calibration window; its resumable
  state under `checkpoint_dir` when given). stats: statistics already gathered over these
  windows (`kvjax.models.calibrated.collect_window_stats`), to calibrate several variants from
  one pass."""
  if learned is not None and not isinstance(learned, CalibrationConfig):
    raise TypeError(f"learned must be a CalibrationConfig or None, got {type(learned).__name__}")
  if learned is not None and layer_quant:
    raise ValueError("the learned ablation fits one format for every layer; give no layer_quant")
  if learned is not None and recipe.calibrates_values:
    raise ValueError("the learned ablation replaces the value λ and rotation, which a recipe with "
                     "value_alpha != 0 or value_feedback calibrates against the output "
                     "projection; use the default recipe (value_alpha=0, value_feedback=False)")
  if stats is not None and not (isinstance(stats, dict) and stats
                                and all(isinstance(k, int) for k in stats)):
    raise ValueError("stats must be {window length: statistics} as "
                     "kvjax.models.calibrated.collect_window_stats returns")
  t0 = time.time()
  quant = QuantConfig() if quant is None else quant
  cfg = model.config
  if layer_quant:
    from kvjax.models.decoder import with_separate_layers
    model = with_separate_layers(model, tuple(sorted(set(cfg.separate_layers) | set(layer_quant))))
  ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
  wins = calibrated.calibration_windows(ids, window_lengths, bos=cfg.add_bos)  # checks length
  log(f"closed-form calibration: statistics over windows of {[len(w) for w in wins]} tokens "
      f"of {text_name or 'the given tokens'}")
  runner = Runner(model)
  if stats is None:
    stats = calibrated.collect_window_stats(model, wins, chunk=chunk, progress=progress,
                                            runner=runner)
  text = {"name": text_name or "tokens given by the caller",
          "tokens": int(sum(len(w) for w in wins)), "windows": [len(w) for w in wins]}
  closed = calibrated.from_stats(model, stats, quant=quant, layer_quant=layer_quant,
                                 recipe=recipe, manifest={"text": text})
  if learned is None:
    log(f"closed form done in {time.time() - t0:.0f} s")
    return closed
  longest = max(wins, key=len)
  lq = closed.configs[0]  # the format; the learned R replaces its rotation as a value
  log(f"learned ablation: collecting K/V/queries on {len(longest)} tokens, then {learned.steps} "
      f"Adam steps ({learned.objective} objective, base {learned.base})")
  data = collect(runner, list(longest), query_samples=query_samples, chunk=chunk,
                 progress=progress)
  params, fixed, losses = train(data, lq, learned, attn_scale=cfg.query_scale,
                                checkpoint_dir=checkpoint_dir, progress=progress)
  arrays = finalize(params, fixed)
  mse = reconstruction_mse(data, arrays, lq)
  def query_moments(tree):
    qq = [None] * cfg.num_layers
    for part, run, index, layer in _layer_slots(cfg):
      qq[layer] = np.asarray(tree[part][run].qq[index], np.float64)
    return qq

  longest_len = max(stats)
  tensors = learned_tensors(closed.tensors, arrays, query_moments(stats[longest_len]), recipe)
  bands = tuple((limit, learned_tensors(layers, arrays, query_moments(stats[limit]), recipe))
                for limit, layers in closed.bands)
  manifest = dict(closed.manifest)
  manifest.update({
      "method": "closed-form (kvjax.smoothing) + learned R and λ (Optax, kvjax.calibrate)",
      "learned": {"config": dataclasses.asdict(learned), "losses": losses,
                  "tokens": len(longest),
                  "key_mse_per_layer": mse["key"].tolist(),
                  "value_mse_per_layer": mse["value"].tolist()}})
  log(f"learned R and λ: loss {losses[0]:.5f} -> {losses[-1]:.5f}; key rel. MSE "
      f"{mse['key'].mean():.5f}, value rel. MSE {mse['value'].mean():.5f} "
      f"({time.time() - t0:.0f} s)")
  # The formats are the closed form's: a learned rotation is a value in the tensors.
  return artifact.Calibration(configs=closed.configs, tensors=tensors, manifest=manifest,
                              bands=bands)


def _check_out(out: pathlib.Path, overwrite: bool) -> None:
  """Fails before any slow work if `out` cannot become the artifact."""
  if out.exists() and not overwrite:
    raise ValueError(f"--out {out} already exists; choose another directory or pass --overwrite")
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out} is a file, not a directory")
  parent = out.parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"--out {out}: cannot create it ({parent} is not a writable directory)")


def run(model_name: str = "gemma3-270m", *, out: str | pathlib.Path,
        text_file: str | None = None, learned: CalibrationConfig | None = None,
        quant: QuantConfig | None = None,
        window_lengths: Sequence[int] = calibrated.DEFAULT_WINDOWS, chunk: int = 512,
        overwrite: bool = False, progress: bool = True, log=print) -> "artifact.Calibration":
  """The whole `kvjax calibrate` job: load the model, read the text, calibrate, save to `out`
  (atomically: an interrupted run leaves no `out`). Returns the calibration."""
  from kvjax import corpus
  from kvjax.models import load
  from kvjax.models.generate import encode
  out = pathlib.Path(out).expanduser().absolute()
  _check_out(out, overwrite)
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"--chunk must be a positive int, got {chunk!r}")
  text = corpus.load_text(text_file) if text_file is not None else None  # checked up front
  log(f"loading {model_name} ...")
  model, tokenizer = load(model_name, progress=progress)
  if tokenizer is None:
    raise ValueError(f"{model_name} has no tokenizer; calibration needs one to read text")
  if text is None:
    text, text_name = corpus.calibration_text(), f"austen:{corpus.CALIBRATION_BOOK}"
  else:
    text_name = str(text_file)
  ids = encode(tokenizer, text, model.config)
  ckpt = out.parent / f".{out.name}.train" if learned is not None else None
  cal = calibrate(model, ids, quant=quant, learned=learned, window_lengths=window_lengths,
                  text_name=text_name, chunk=chunk, checkpoint_dir=ckpt, progress=progress,
                  log=log)
  path = artifact.save(cal, out, overwrite=overwrite)
  if ckpt is not None:
    import shutil
    shutil.rmtree(ckpt, ignore_errors=True)
  log(f"wrote {path}: {cal.configs[0].name}, {cal.num_layers} layers")
  return cal


def add_arguments(p) -> None:
  """The command-line flags of `kvjax calibrate` / `python -m kvjax.calibrate`."""
  d = CalibrationConfig()
  p.add_argument("--model", default="gemma3-270m", help="checkpoint name or path "
                 "(default: %(default)s)")
  p.add_argument("--out", required=True, help="the artifact directory to write (must not exist)")
  p.add_argument("--text", default=None, metavar="FILE",
                 help="calibrate on this UTF-8 text instead of Emma")
  p.add_argument("--windows", type=int, nargs="+", default=list(calibrated.DEFAULT_WINDOWS),
                 help="calibration window lengths in tokens, consecutive and disjoint "
                      "(default: %(default)s)")
  p.add_argument("--group-size", type=int, default=32)
  p.add_argument("--key-bits", type=int, default=4)
  p.add_argument("--value-bits", type=int, default=4)
  p.add_argument("--chunk", type=int, default=512)
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument("--no-progress", action="store_true")
  g = p.add_argument_group("learned ablation (--learned)")
  g.add_argument("--learned", action="store_true",
                 help="fit R and λ with Optax on top of the closed form")
  g.add_argument("--objective", choices=OBJECTIVES, default=d.objective)
  g.add_argument("--base", choices=BASES, default=d.base,
                 help="fixed rotation R starts from and multiplies (default: %(default)s)")
  g.add_argument("--no-lambda", action="store_true", help="learn R only (λ stays at --init)")
  g.add_argument("--no-rotation", action="store_true", help="learn λ only (R = --base)")
  g.add_argument("--init", choices=INITS, default="closed-form",
                 help="start of the key λ (default: %(default)s)")
  g.add_argument("--steps", type=int, default=d.steps)
  g.add_argument("--learning-rate", type=float, default=d.learning_rate)
  g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
  g.add_argument("--batch-tokens", type=int, default=d.batch_tokens)
  g.add_argument("--batch-queries", type=int, default=d.batch_queries)
  g.add_argument("--seed", type=int, default=d.seed)
  g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)


def run_from_args(a) -> "artifact.Calibration":
  # Every argument is checked here, before the model loads.
  quant = QuantConfig(key_bits=a.key_bits, value_bits=a.value_bits, group_size=a.group_size)
  learned = None
  if a.learned:
    learned = CalibrationConfig(
        objective=a.objective, base=a.base, learn_lambda=not a.no_lambda,
        learn_rotation=not a.no_rotation, init=a.init, steps=a.steps,
        learning_rate=a.learning_rate, warmup_steps=a.warmup_steps,
        batch_tokens=a.batch_tokens, batch_queries=a.batch_queries, seed=a.seed,
        checkpoint_every=a.checkpoint_every)
  if any(w < 2 for w in a.windows):
    raise ValueError(f"--windows must be token counts >= 2, got {a.windows}")
  if a.text is not None and not os.path.isfile(a.text):
    raise FileNotFoundError(f"--text {a.text}: no such file")
  return run(a.model, out=a.out, text_file=a.text, learned=learned, quant=quant,
             window_lengths=tuple(a.windows), chunk=a.chunk, overwrite=a.overwrite,
             progress=not a.no_progress)


def main(argv=None) -> int:
  import argparse
  import sys
  p = argparse.ArgumentParser(prog="python -m kvjax.calibrate",
                              description="calibrate a model's 4-bit KV cache; write the artifact")
  add_arguments(p)
  a = p.parse_args(argv)
  try:
    run_from_args(a)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"kvjax calibrate: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
