"""Runs in its own process with 8 simulated CPU devices (started by test_foe_sharded.py).

Usage: python foe_sharded_worker.py CLUSTERS OUT_JSON

Builds a (CLUSTERS, 8 // CLUSTERS) mesh and measures, on fresh random inputs, the worst
per-row error of each sharded block against its single-device reference: outputs, router
losses, gradients (every parameter and the input), and prefill + decode through a dense and
an int4 kvjax cache. On the 2x4 mesh it also reads the collectives of both compiled blocks.
The test process applies the bounds; this script only measures.
"""

import functools
import json
import os
import sys

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kvjax  # noqa: E402
from kvjax import foe  # noqa: E402
from kvjax import corrections as kc  # noqa: E402
from kvjax.foe import hlo  # noqa: E402


def row_error(got, want) -> float:
  """Worst over rows (last axis) of max|got - want| / max(1, max|want|) in that row."""
  got = np.asarray(got, np.float64).reshape(-1, np.shape(want)[-1] if np.ndim(want) else 1)
  want = np.asarray(want, np.float64).reshape(got.shape)
  scale = np.maximum(1.0, np.max(np.abs(want), axis=-1))
  return float(np.max(np.max(np.abs(got - want), axis=-1) / scale))


def tree_errors(got, want) -> dict:
  flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
  flat_want = jax.tree.leaves(want)
  return {jax.tree_util.keystr(path): row_error(g, w)
          for (path, g), w in zip(flat_got, flat_want)}


def cache_kinds(clusters):
  # The int4 cache on every mesh (the FoE decode path); the dense one on the 2x4 mesh only,
  # to keep the number of compilations down (its math is also checked on one device).
  # Exact float32 attention ("xla"): the CPU default for chunks rounds to bf16, whose matmul
  # blocking differs between shardings; this test compares shardings, not attention paths.
  # The int4 cache carries the calibrated recipe's per-layer fields (key mean, rotary offset in
  # 4 channel pairs, feedback rounding, exact sink key) with random per-head values, so that
  # their sharding (per-head fields split with the heads, per-layer ones replicated, the
  # per-sequence sink error split by batch and head) is exercised too.
  kinds = [("int4", kvjax.QuantConfig(corrections=(kc.KeyOffset(), kc.RotaryKeyOffset(4),
                                                   kc.KeyFeedback(), kc.KeySink())))]
  return [("dense", None)] + kinds if clusters == 2 else kinds


def make_cache(batch, num_kv_heads, head_dim, quant, seed=0):
  """An empty cache of 16 slots; a quantized one gets random per-head calibration fields."""
  if quant is None:
    return kvjax.init_cache(batch, num_kv_heads, 16, head_dim, dtype=jnp.float32)
  rng = np.random.default_rng(seed)
  pairs = quant.correction(kc.RotaryKeyOffset).pairs
  half = head_dim // 2
  channels = np.stack([np.arange(pairs), np.arange(pairs) + half], 1)
  params = {"k_rope_freq": rng.uniform(0.05, 1.0, pairs).astype(np.float32),
            "k_rope_channels": channels,
            "k_rope_mean": rng.normal(size=(num_kv_heads, 2, pairs)).astype(np.float32)}
  feedback = np.triu(0.2 * rng.normal(size=(num_kv_heads, head_dim, head_dim)), 1)
  return kvjax.init_cache(batch, num_kv_heads, 16, head_dim, quant=quant, dtype=jnp.float32,
                          key_lambda=rng.uniform(0.5, 2.0, (num_kv_heads, head_dim)).astype(
                              np.float32),
                          params={**params, "k_feedback": feedback.astype(np.float32),
                                  "k_mean": rng.normal(size=(num_kv_heads, head_dim)).astype(
                                      np.float32)})


def loss_of(out, aux, cotangent):
  return jnp.sum(out * cotangent) + aux["load_balancing_loss"] + 0.1 * aux["z_loss"]


def compare_block(sharded, reference, sharded_args, args, cotangent):
  """Forward, router losses and gradients of one block, sharded vs reference.

  One compilation per side: value_and_grad returns the outputs as its aux.
  """

  def forward_and_grad(block):
    def loss(p, x):
      out, _, aux = block(p, x)
      return loss_of(out, aux, cotangent), (out, aux)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  (_, (out, aux)), grads = forward_and_grad(sharded)(*sharded_args)
  (_, (ref, aux_ref)), grads_ref = forward_and_grad(reference)(*args)
  return {"forward": row_error(out, ref),
          "aux": {k: abs(float(aux[k]) - float(aux_ref[k])) for k in aux_ref},
          "dropped_fraction": float(aux_ref["dropped_fraction"]),
          "grad": tree_errors({"params": grads[0], "input": grads[1]},
                              {"params": grads_ref[0], "input": grads_ref[1]})}


def prefill_then_decode(block):
  """jit(params, chunk, step, cache) -> (chunk output, step output, final lengths)."""

  @jax.jit
  def run(params, chunk, step, cache):
    out1, cache, _ = block(params, chunk, cache=cache)
    out2, cache, _ = block(params, step, cache=cache)
    return out1, out2, cache.lengths

  return run


def compare_cached(sharded, reference, sharded_args, args):
  out1, out2, lengths = prefill_then_decode(sharded)(*sharded_args)
  ref1, ref2, _ = prefill_then_decode(reference)(*args)
  return {"prefill": row_error(out1, ref1), "decode": row_error(out2, ref2),
          "lengths": np.asarray(lengths).tolist()}


def check_foe(mesh, clusters, experts_axis, keys):
  cfg = foe.FoEConfig(d_model=64, num_q_heads=2 * clusters, num_kv_heads=clusters,
                      head_dim=32, num_clusters=clusters, experts_per_cluster=2 * experts_axis,
                      top_k=2, d_ff=48, capacity_factor=1.0)
  batch, seq = 2 * experts_axis, 8
  params = foe.init_foe_params(keys[0], cfg)
  residual = jax.random.normal(keys[1], (clusters, batch, seq, cfg.d_model))
  cotangent = jax.random.normal(keys[2], residual.shape)
  step = jax.random.normal(keys[3], (clusters, batch, 1, cfg.d_model))
  reference = functools.partial(foe.foe_block_reference, cfg=cfg, token_groups=experts_axis,
                                attention_impl="xla")
  result = compare_block(foe.make_foe_block(cfg, mesh), reference,
                         foe.shard_foe_inputs(mesh, params, residual)[:2], (params, residual),
                         cotangent)
  result["cache"] = {}
  cached_block = foe.make_foe_block(cfg, mesh, with_cache=True, attention_impl="xla")
  for name, quant in cache_kinds(clusters):
    cache = make_cache(batch, clusters, cfg.head_dim, quant)
    p_sh, r_sh, c_sh = foe.shard_foe_inputs(mesh, params, residual, cache)
    s_sh = foe.shard_foe_inputs(mesh, params, step)[1]
    result["cache"][name] = compare_cached(cached_block, reference, (p_sh, r_sh, s_sh, c_sh),
                                           (params, residual, step, cache))
  return result


def check_baseline(mesh, clusters, experts_axis, keys):
  devices = clusters * experts_axis
  cfg = foe.MoEConfig(d_model=64, num_q_heads=4, num_kv_heads=2, head_dim=32,
                      num_experts=2 * devices, top_k=2, d_ff=48, capacity_factor=1.0)
  batch, seq = devices, 8
  params = foe.init_moe_params(keys[0], cfg)
  x = jax.random.normal(keys[1], (batch, seq, cfg.d_model))
  cotangent = jax.random.normal(keys[2], x.shape)
  step = jax.random.normal(keys[3], (batch, 1, cfg.d_model))
  reference = functools.partial(foe.moe_block_reference, cfg=cfg, token_groups=devices,
                                attention_impl="xla")
  result = compare_block(foe.make_moe_block(cfg, mesh), reference,
                         foe.shard_moe_inputs(mesh, params, x)[:2], (params, x), cotangent)
  result["cache"] = {}
  cached_block = foe.make_moe_block(cfg, mesh, with_cache=True, attention_impl="xla")
  for name, quant in cache_kinds(clusters):
    cache = make_cache(batch, cfg.num_kv_heads, cfg.head_dim, quant)
    p_sh, x_sh, c_sh = foe.shard_moe_inputs(mesh, params, x, cache)
    s_sh = foe.shard_moe_inputs(mesh, params, step)[1]
    result["cache"][name] = compare_cached(cached_block, reference, (p_sh, x_sh, s_sh, c_sh),
                                           (params, x, step, cache))
  return result


def collectives_2x4(mesh):
  """Collective rows of the compiled inference blocks (no aux) on the 2x4 mesh."""
  cfg = foe.FoEConfig(d_model=64, num_q_heads=4, num_kv_heads=2, head_dim=32, num_clusters=2,
                      experts_per_cluster=8, top_k=2, d_ff=48)
  batch, seq = 8, 8
  residual = jax.random.normal(jax.random.key(7), (2, batch, seq, cfg.d_model))
  x = residual[0]
  params = foe.init_foe_params(jax.random.key(8), cfg)
  foe_in = foe.shard_foe_inputs(mesh, params, residual)
  base_cfg = cfg.matched_baseline()
  base_in = foe.shard_moe_inputs(mesh, foe.init_moe_params(jax.random.key(9), base_cfg), x)
  texts = {
      "foe": foe.make_foe_block(cfg, mesh, with_aux=False).lower(*foe_in[:2]).compile().as_text(),
      "baseline": foe.make_moe_block(base_cfg, mesh, with_aux=False).lower(
          *base_in[:2]).compile().as_text()}
  rows = {name: hlo.table_rows(hlo.collectives(text, 8), 4) for name, text in texts.items()}
  # One cluster per device (8x1), the paper's single-node layout: no all-to-all should remain.
  mesh8 = foe.make_foe_mesh(8, 8)
  cfg8 = foe.FoEConfig(d_model=64, num_q_heads=8, num_kv_heads=8, head_dim=32, num_clusters=8,
                       experts_per_cluster=2, top_k=1, d_ff=48)
  residual8 = jax.random.normal(jax.random.key(10), (8, 2, seq, cfg8.d_model))
  foe8_in = foe.shard_foe_inputs(mesh8, foe.init_foe_params(jax.random.key(11), cfg8), residual8)
  text8 = foe.make_foe_block(cfg8, mesh8, with_aux=False).lower(*foe8_in[:2]).compile().as_text()
  rows["foe_8x1"] = hlo.table_rows(hlo.collectives(text8, 8), 1)
  # The same block inside a sharded model's mesh vocabulary: clusters along "data", experts
  # along "model" (same devices, same order). Its outputs must be bitwise those of the
  # (cluster, expert) mesh, its collectives the same.
  model_mesh = jax.sharding.Mesh(np.asarray(mesh.devices), ("data", "model"))
  axes = ("data", "model")
  named_in = foe.shard_foe_inputs(model_mesh, params, residual, axes=axes)
  named = foe.make_foe_block(cfg, model_mesh, with_aux=False, axes=axes)
  default = foe.make_foe_block(cfg, mesh, with_aux=False)
  rows["model_mesh_max_abs_difference"] = float(np.max(np.abs(
      np.asarray(named(*named_in[:2])[0]) - np.asarray(default(*foe_in[:2])[0]))))
  rows["foe_model_mesh"] = hlo.table_rows(
      hlo.collectives(named.lower(*named_in[:2]).compile().as_text(), 8), 4)
  return rows | {"residual_bytes_per_device": batch // 4 * seq * cfg.d_model * 4,
                 "residual_bytes_per_device_8x1": 2 * seq * cfg8.d_model * 4}


def main():
  clusters, out_path = int(sys.argv[1]), sys.argv[2]
  mesh = foe.make_foe_mesh(8, clusters)
  experts_axis = 8 // clusters
  keys = jax.random.split(jax.random.key(100 + clusters), 8)
  result = {"devices": jax.device_count(),
            "foe": check_foe(mesh, clusters, experts_axis, keys[:4]),
            "baseline": check_baseline(mesh, clusters, experts_axis, keys[4:])}
  if clusters == 2:
    result["collectives"] = collectives_2x4(mesh)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
