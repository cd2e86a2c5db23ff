"""Single-device properties of the FoE and baseline reference blocks, and bad-input errors."""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

import kvjax
from kvjax import foe


def worst_row_error(got, want):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  scale = np.maximum(1.0, np.abs(want).max(-1))
  return float((np.abs(got - want).max(-1) / scale).max())


def small_foe(**overrides):
  kwargs = dict(d_model=32, num_q_heads=4, num_kv_heads=2, head_dim=16, num_clusters=2,
                experts_per_cluster=4, top_k=2, d_ff=24, capacity_factor=1.0)
  return foe.FoEConfig(**(kwargs | overrides))


def test_one_cluster_foe_is_the_standard_block():
  # With one cluster, FoE's sum over clusters is the identity and its router is global:
  # the block must equal the baseline block with the same weights.
  cfg = small_foe(num_q_heads=2, num_kv_heads=1, num_clusters=1, top_k=2)
  base_cfg = cfg.matched_baseline()
  params = foe.init_foe_params(jax.random.key(0), cfg)
  base_params = {k: v[0] for k, v in params.items()}
  base_params["wq"] = params["wq"][0][:, None]       # [D, H=1, R, hd]
  base_params["wk"] = params["wk"][0][:, None]
  base_params["wv"] = params["wv"][0][:, None]
  base_params["wo"] = params["wo"][0][None]          # [H=1, R, hd, D]
  x = jax.random.normal(jax.random.key(1), (4, 6, cfg.d_model))
  got, _, aux = jax.jit(functools.partial(foe.foe_block_reference, cfg=cfg, token_groups=2))(
      params, x[None])
  want, _, aux_want = jax.jit(functools.partial(foe.moe_block_reference, cfg=base_cfg,
                                                token_groups=2))(base_params, x)
  assert aux["dropped_fraction"] > 0  # the capacity path is exercised
  assert worst_row_error(got[0], want) <= 1e-5
  for name in aux_want:
    np.testing.assert_allclose(float(aux[name]), float(aux_want[name]), rtol=1e-5)


@pytest.mark.parametrize("quant", [None, "int4"])
def test_foe_decode_through_cache_matches_whole_sequence(quant):
  # No token is dropped when every expert has a slot for every assignment, so routing is
  # per token and decoding one token at a time must equal the whole-sequence pass.
  cfg = small_foe(head_dim=32, capacity_factor=8.0)
  batch, seq = 2, 5
  params = foe.init_foe_params(jax.random.key(2), cfg)
  residual = jax.random.normal(jax.random.key(3), (cfg.num_clusters, batch, seq, cfg.d_model))
  block = jax.jit(functools.partial(foe.foe_block_reference, cfg=cfg))
  whole, _, aux = block(params, residual)
  assert float(aux["dropped_fraction"]) == 0.0
  cache = kvjax.init_cache(batch, cfg.num_kv_heads, 8, cfg.head_dim,
                           quant=None if quant is None else kvjax.QuantConfig(),
                           dtype=jnp.float32)
  steps = []
  for t in range(seq):
    out, cache, _ = block(params, residual[:, :, t:t + 1], cache=cache)
    steps.append(out)
  stepped = jnp.concatenate(steps, axis=2)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [seq] * batch)
  if quant is None:
    # Same math, different reduction order: a few float32 ulps.
    assert worst_row_error(stepped, whole) <= 1e-5
  else:
    # 4-bit keys/values perturb the attention output by a few percent of its scale; the
    # block output (residual + attention + experts) stays within 0.25 of the dense result
    # per row unless a token's top-2 choice flips, which these seeds do not hit.
    assert worst_row_error(stepped, whole) <= 0.25
    assert worst_row_error(stepped, whole) > 1e-6  # the int4 cache is really used


def test_token_groups_only_matter_through_capacity():
  cfg = small_foe(capacity_factor=16.0)
  params = foe.init_foe_params(jax.random.key(4), cfg)
  residual = jax.random.normal(jax.random.key(5), (2, 4, 6, cfg.d_model))
  one, _, _ = jax.jit(functools.partial(foe.foe_block_reference, cfg=cfg, token_groups=1))(
      params, residual)
  four, _, _ = jax.jit(functools.partial(foe.foe_block_reference, cfg=cfg, token_groups=4))(
      params, residual)
  assert worst_row_error(four, one) <= 1e-5


# ------------------------------------------------------------------------------ bad input

def test_config_errors():
  with pytest.raises(ValueError, match="num_kv_heads=4 must equal num_clusters=2"):
    small_foe(num_kv_heads=4, num_q_heads=4)
  with pytest.raises(ValueError, match="top_k=5 must be <= experts_per_cluster=4"):
    small_foe(top_k=5)
  with pytest.raises(ValueError, match="top_k=9 must be <= num_experts=8"):
    foe.MoEConfig(d_model=8, num_q_heads=2, num_kv_heads=1, head_dim=8, num_experts=8,
                  top_k=9, d_ff=8)
  with pytest.raises(ValueError, match="num_q_heads=3 must be a multiple of num_kv_heads=2"):
    small_foe(num_q_heads=3)
  with pytest.raises(ValueError, match="capacity_factor"):
    small_foe(capacity_factor=0)
  with pytest.raises(ValueError, match="experts_per_cluster"):
    small_foe(experts_per_cluster=0)


def test_mesh_helper_errors():
  with pytest.raises(ValueError, match="num_clusters=3 must divide num_devices=8"):
    foe.make_foe_mesh(8, 3)
  with pytest.raises(ValueError, match="num_devices=16 but only"):
    foe.make_foe_mesh(16, 2, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="num_clusters must be a positive int"):
    foe.make_foe_mesh(8, 0)
  mesh = foe.make_foe_mesh(1, 1)
  assert mesh.axis_names == (foe.CLUSTER_AXIS, foe.EXPERT_AXIS)


def test_sharded_block_errors_on_mesh_mismatch():
  mesh = AbstractMesh((2, 4), (foe.CLUSTER_AXIS, foe.EXPERT_AXIS))
  with pytest.raises(ValueError, match="experts_per_cluster=6 must be divisible by the mesh's "
                                       "'expert' axis size 4"):
    foe.make_foe_block(small_foe(experts_per_cluster=6), mesh)
  with pytest.raises(ValueError, match="num_clusters=3 must be divisible"):
    foe.make_foe_block(small_foe(num_clusters=3, num_kv_heads=3, num_q_heads=3), mesh)
  with pytest.raises(ValueError, match="num_experts=12 must be divisible by the mesh size 8"):
    foe.make_moe_block(foe.MoEConfig(d_model=8, num_q_heads=2, num_kv_heads=1, head_dim=8,
                                     num_experts=12, top_k=2, d_ff=8), mesh)
  model_mesh = AbstractMesh((2, 4), ("data", "model"))
  with pytest.raises(ValueError, match=r"mesh has axes \('data', 'model'\), not \['cluster', "
                                       r"'expert'\]"):
    foe.make_foe_block(small_foe(), model_mesh)
  # The same mesh serves when its axes are named as (cluster, expert).
  foe.make_foe_block(small_foe(), model_mesh, axes=("data", "model"))
  with pytest.raises(ValueError, match="axes must be two distinct mesh axis names"):
    foe.make_foe_block(small_foe(), model_mesh, axes=("data", "data"))
  with pytest.raises(ValueError, match=r"mesh axes \['extra'\] are neither"):
    foe.make_moe_block(foe.MoEConfig(d_model=8, num_q_heads=2, num_kv_heads=1, head_dim=8,
                                     num_experts=8, top_k=2, d_ff=8),
                       AbstractMesh((2, 2, 2), ("data", "model", "extra")), axes=("data", "model"))


def test_reference_input_errors():
  cfg = small_foe()
  params = foe.init_foe_params(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match="num_clusters=2 streams"):
    foe.foe_block_reference(params, jnp.ones((3, 2, 4, cfg.d_model)), cfg)
  with pytest.raises(ValueError, match="token_groups=3"):
    foe.foe_block_reference(params, jnp.ones((2, 4, 4, cfg.d_model)), cfg, token_groups=3)
  with pytest.raises(ValueError, match="last dim d_model=32"):
    foe.foe_block_reference(params, jnp.ones((2, 4, 4, 16)), cfg)


def test_sharded_block_batch_error_on_one_device_mesh():
  cfg = small_foe(num_clusters=1, num_kv_heads=1, num_q_heads=2)
  mesh = foe.make_foe_mesh(1, 1)
  block = foe.make_foe_block(cfg, mesh)
  params = foe.init_foe_params(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match=r"residual must be \[num_clusters=1"):
    block(params, jnp.ones((2, 2, 4, cfg.d_model)))
  with pytest.raises(ValueError, match="with_cache=False"):
    block(params, jnp.ones((1, 2, 4, cfg.d_model)),
          kvjax.init_cache(2, 1, 8, cfg.head_dim, dtype=jnp.float32))
