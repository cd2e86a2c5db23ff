"""Tiny byte-level language models, FoE vs standard MoE, trained with Optax on the CPU.

`python -m kvjax.foe train --out DIR` trains both models on the Austen corpus
(`kvjax.corpus.load_austen()`) with the same data order, optimizer, step count, width, depth,
attention, expert count and size, and active experts per token, and writes
DIR/losses.json, DIR/loss_curves.png and DIR/summary.md.

The models run the single-device reference blocks (`foe_block_reference`,
`moe_block_reference`), whose equality with the sharded blocks is tested separately: on a
2-core CPU, 8 simulated devices would only make training slower.

FoE LM: every cluster's residual stream starts as the token embedding; the logits read the
mean of the streams after the last block. Baseline LM: one residual stream.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import jax
import jax.numpy as jnp
import optax

from kvjax.foe.attention import rms_norm
from kvjax.foe.blocks import (foe_block_reference, init_foe_params, init_moe_params,
                              moe_block_reference)
from kvjax.foe.config import FoEConfig

VOCAB = 256  # bytes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Sizes and optimizer settings shared by the two models."""

  block: FoEConfig
  num_layers: int
  seq_len: int
  batch: int
  steps: int
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  weight_decay: float = 0.01
  balance_weight: float = 0.01
  z_weight: float = 1e-3
  eval_every: int = 50
  eval_batches: int = 16
  seed: int = 0


PRESETS = {
    "default": TrainConfig(
        block=FoEConfig(d_model=128, num_q_heads=4, num_kv_heads=2, head_dim=32,
                        num_clusters=2, experts_per_cluster=4, top_k=1, d_ff=256,
                        capacity_factor=1.25),
        num_layers=2, seq_len=128, batch=16, steps=600),
    "test": TrainConfig(
        block=FoEConfig(d_model=32, num_q_heads=2, num_kv_heads=2, head_dim=16,
                        num_clusters=2, experts_per_cluster=2, top_k=1, d_ff=32),
        num_layers=1, seq_len=32, batch=4, steps=6, warmup_steps=2, eval_every=3,
        eval_batches=2),
}


def encode_bytes(text: str) -> np.ndarray:
  """UTF-8 bytes of `text` as uint8 token ids (vocabulary of 256)."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def init_lm(key, cfg: TrainConfig, kind: str):
  """Parameters of a byte LM: {'embed' [V, D], 'layers': [block params], 'final_norm' [D],
  'unembed' [D, V]}; kind is 'foe' or 'baseline'."""
  d = cfg.block.d_model
  keys = jax.random.split(key, cfg.num_layers + 2)
  if kind == "foe":
    layers = [init_foe_params(k, cfg.block) for k in keys[:cfg.num_layers]]
  elif kind == "baseline":
    layers = [init_moe_params(k, cfg.block.matched_baseline()) for k in keys[:cfg.num_layers]]
  else:
    raise ValueError(f"kind must be 'foe' or 'baseline', got {kind!r}")
  return {"embed": jax.random.normal(keys[-2], (VOCAB, d)) * 0.02, "layers": layers,
          "final_norm": jnp.ones((d,)),
          "unembed": jax.random.normal(keys[-1], (d, VOCAB)) / jnp.sqrt(d)}


def lm_loss(params, tokens: jax.Array, cfg: TrainConfig, kind: str):
  """Next-byte cross-entropy (nats/byte) plus weighted router losses.

  Args:
    tokens: int [B, T + 1].

  Returns:
    (total loss, dict with 'ce', 'load_balancing_loss', 'z_loss', 'dropped_fraction').
  """
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  x = params["embed"][inputs]  # [B, T, D]
  aux_sum = {"load_balancing_loss": 0.0, "z_loss": 0.0, "dropped_fraction": 0.0}
  if kind == "foe":
    residual = jnp.broadcast_to(x, (cfg.block.num_clusters,) + x.shape)
    for layer in params["layers"]:
      residual, _, aux = foe_block_reference(layer, residual, cfg.block)
      aux_sum = {k: aux_sum[k] + aux[k] for k in aux_sum}
    x = jnp.mean(residual, axis=0)
  else:
    base = cfg.block.matched_baseline()
    for layer in params["layers"]:
      x, _, aux = moe_block_reference(layer, x, base)
      aux_sum = {k: aux_sum[k] + aux[k] for k in aux_sum}
  logits = rms_norm(x, params["final_norm"], cfg.block.norm_eps) @ params["unembed"]
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
  layers = len(params["layers"])
  aux_mean = {k: v / layers for k, v in aux_sum.items()}
  total = (ce + cfg.balance_weight * aux_mean["load_balancing_loss"]
           + cfg.z_weight * aux_mean["z_loss"])
  return total, {"ce": ce, **aux_mean}


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _batches(data: np.ndarray, cfg: TrainConfig, rng: np.random.Generator, count: int):
  starts = rng.integers(0, len(data) - cfg.seq_len - 1, size=(count, cfg.batch))
  offsets = np.arange(cfg.seq_len + 1)
  return data[starts[..., None] + offsets].astype(np.int32)  # [count, B, T + 1]


def train_one(kind: str, cfg: TrainConfig, train_data: np.ndarray, eval_data: np.ndarray,
              *, log=print) -> dict:
  """Trains one model; returns its curves, final losses, parameter count and step time."""
  params = init_lm(jax.random.key(cfg.seed), cfg, kind)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                max(cfg.steps, cfg.warmup_steps + 1))
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, weight_decay=cfg.weight_decay))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, tokens):
    (loss, metrics), grads = jax.value_and_grad(lm_loss, has_aux=True)(params, tokens, cfg, kind)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  @jax.jit
  def evaluate(params, batches):
    return jnp.mean(jax.vmap(lambda t: lm_loss(params, t, cfg, kind)[1]["ce"])(batches))

  # The same data order for both models: the batch stream depends only on the seed.
  train_batches = _batches(train_data, cfg, np.random.default_rng(cfg.seed), cfg.steps)
  eval_batches = jnp.asarray(_batches(eval_data, cfg, np.random.default_rng(cfg.seed + 1),
                                      cfg.eval_batches))
  curve, eval_curve = [], []
  start = time.perf_counter()
  compile_end = None
  for i in range(cfg.steps):
    params, opt_state, loss, metrics = step(params, opt_state, jnp.asarray(train_batches[i]))
    if i == 0:
      jax.block_until_ready(loss)
      compile_end = time.perf_counter()
    curve.append({k: float(v) for k, v in metrics.items()} | {"step": i + 1})
    if (i + 1) % cfg.eval_every == 0 or i + 1 == cfg.steps:
      eval_curve.append({"step": i + 1, "eval_ce": float(evaluate(params, eval_batches))})
      log(f"{kind}: step {i + 1}/{cfg.steps} train ce {curve[-1]['ce']:.4f} "
          f"eval ce {eval_curve[-1]['eval_ce']:.4f} dropped {curve[-1]['dropped_fraction']:.3f}")
  elapsed = time.perf_counter() - compile_end if cfg.steps > 1 else 0.0
  tail = curve[-min(50, len(curve)):]
  return {"kind": kind, "params": count_params(params), "curve": curve, "eval": eval_curve,
          "final_train_ce": float(np.mean([c["ce"] for c in tail])),
          "final_eval_ce": eval_curve[-1]["eval_ce"],
          "seconds_per_step": elapsed / max(1, cfg.steps - 1),
          "compile_seconds": compile_end - start}


def _plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for res in results:
    steps = [c["step"] for c in res["curve"]]
    ce = np.array([c["ce"] for c in res["curve"]])
    window = min(20, len(ce))
    smooth = np.convolve(ce, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, label=f"{res['kind']} train (moving avg {window})")
    ax.plot([e["step"] for e in res["eval"]], [e["eval_ce"] for e in res["eval"]], "o--",
            label=f"{res['kind']} held-out")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / byte)")
  ax.set_title("Tiny byte LMs on Austen: FoE vs standard MoE")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_training(out_dir: str, *, steps: int | None = None, seconds: float | None = None,
                 preset: str = "default", text: str | None = None, seed: int | None = None,
                 log=print) -> dict:
  """Trains the FoE and baseline LMs and writes losses.json, loss_curves.png, summary.md.

  Args:
    out_dir: output directory.
    steps: optimizer steps per model (overrides the preset).
    seconds: if given (and `steps` is not), the FoE model trains for about this many seconds
      and the baseline then runs the same number of steps.
    preset: a key of PRESETS.
    seed: overrides the preset's seed (parameters and batch order of both models).
    text: training text, of which the last 10% is held out. When None: the Austen corpus
      (`kvjax.corpus.load_austen()`), training on five novels and holding out the
      project's evaluation book (Pride and Prejudice).
  """
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
  cfg = PRESETS[preset]
  if seed is not None:
    cfg = dataclasses.replace(cfg, seed=seed)
  if steps is not None:
    if steps < 1:
      raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = dataclasses.replace(cfg, steps=steps)
  if text is None:
    from kvjax import corpus
    books = corpus.load_austen()
    train_data = encode_bytes("\n".join(t for b, t in books.items() if b != corpus.EVAL_BOOK))
    eval_data = encode_bytes(books[corpus.EVAL_BOOK])
    data_name = f"Austen: 5 novels for training, {corpus.EVAL_BOOK} held out"
  else:
    data = encode_bytes(text)
    split = int(0.9 * len(data))
    train_data, eval_data = data[:split], data[split:]
    data_name = "given text, last 10% held out"
  for name, part in (("training", train_data), ("held-out", eval_data)):
    if len(part) < 2 * (cfg.seq_len + 1):
      raise ValueError(f"the {name} text has {len(part)} bytes; need at least "
                       f"{2 * (cfg.seq_len + 1)} for sequences of {cfg.seq_len}")
  os.makedirs(out_dir, exist_ok=True)

  if seconds is not None and steps is None:
    # Time a short FoE run to turn the budget into a step count shared by both models.
    probe = train_one("foe", dataclasses.replace(cfg, steps=10, eval_every=10), train_data,
                      eval_data, log=lambda *_: None)
    cfg = dataclasses.replace(cfg, steps=max(1, int(seconds / probe["seconds_per_step"])))
    log(f"{cfg.steps} steps per model for a {seconds:.0f} s budget")

  results = [train_one(kind, cfg, train_data, eval_data, log=log)
             for kind in ("foe", "baseline")]
  foe, base = results
  rel = abs(foe["final_eval_ce"] - base["final_eval_ce"]) / base["final_eval_ce"]
  summary = {
      "seed": cfg.seed, "data": data_name, "train_bytes": int(len(train_data)),
      "eval_bytes": int(len(eval_data)), "steps": cfg.steps, "batch": cfg.batch,
      "seq_len": cfg.seq_len, "layers": cfg.num_layers, "block": dataclasses.asdict(cfg.block),
      **{f"{r['kind']}_{k}": r[k] for r in results
         for k in ("params", "final_train_ce", "final_eval_ce", "seconds_per_step")},
      "eval_ce_relative_difference": rel,
  }
  with open(os.path.join(out_dir, "losses.json"), "w") as f:
    json.dump({"summary": summary, "results": results}, f, indent=1)
  _plot(results, os.path.join(out_dir, "loss_curves.png"))
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(
        "| model | parameters | final train CE (last 50 steps) | held-out CE | s/step (CPU) |\n"
        "|---|---:|---:|---:|---:|\n" + "".join(
            f"| {r['kind']} | {r['params']} | {r['final_train_ce']:.4f} | "
            f"{r['final_eval_ce']:.4f} | {r['seconds_per_step']:.3f} |\n" for r in results)
        + f"\nHeld-out CE relative difference: {rel:.2%} ({cfg.steps} steps, batch "
        f"{cfg.batch} x {cfg.seq_len} bytes, nats/byte; {data_name}).\n")
  return {"summary": summary, "results": results}
