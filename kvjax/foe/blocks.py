"""The Federation-of-Experts block and the standard-MoE baseline: `shard_map` versions over a
`(cluster, expert)` mesh and single-device references of the same math.

FoE block (C clusters; cluster c owns KV head c, its query heads, its residual stream r_c,
its router and its experts):

    a_c  = Attn_c(RMSNorm_c(r_c))                 # cluster c's heads only
    h    = mean_c (r_c + a_c)                     # the one cross-cluster sync: a sum
    r_c' = h + MoE_c(RMSNorm'_c(h))               # top-k among cluster c's experts

Inputs and outputs are the stacked residual streams [C, B, T, D]; a model starts with
r_c = embedding for every c and reads out mean_c r_c. Sharded, device (c, e) holds
cluster c's attention weights, batch shard e, and experts block e of cluster c: the
all-to-alls run over the `expert` axis only, and the only collective over the `cluster`
axis is the all-reduce of the residual (plus scalar loss averages).

Baseline block (one pool of E experts, global top-k):

    x' = x + Attn(RMSNorm(x));   y = x' + MoE(RMSNorm'(x'))

Sharded with data-parallel attention (batch split over all devices, attention weights
replicated) and expert parallelism over both mesh axes: its all-to-alls span the mesh.

Routing and capacity follow `kvjax.foe.routing`; a dispatch group is one device's tokens,
so the references take `token_groups` (= the number of batch shards) to reproduce the
capacity limit exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kvjax import cache as cache_lib
from kvjax.foe import routing as routing_lib
from kvjax._shard_map import shard_map
from kvjax.foe.attention import (apply_rope, cache_positions, cached_attention,
                                 causal_attention, rms_norm)
from kvjax.foe.config import FoEConfig, MoEConfig, expert_capacity
from kvjax.foe.mesh import CLUSTER_AXIS, EXPERT_AXIS

Params = dict[str, jax.Array]


# ----------------------------------------------------------------------------- parameters

@functools.partial(jax.jit, static_argnums=(1, 2))
def init_foe_params(key: jax.Array, cfg: FoEConfig, dtype=jnp.float32) -> Params:
  """Random FoE block parameters; every array has the cluster axis first.

  Shapes (C clusters, R = q heads per KV head, hd = head_dim, Ec = experts per cluster):
    attn_norm, moe_norm [C, D]; wq [C, D, R, hd]; wk, wv [C, D, hd]; wo [C, R, hd, D];
    router [C, D, Ec]; w_gate, w_up [C, Ec, D, F]; w_down [C, Ec, F, D].
  """
  c, d, r, hd = cfg.num_clusters, cfg.d_model, cfg.q_per_kv, cfg.head_dim
  ec, f = cfg.experts_per_cluster, cfg.d_ff
  keys = jax.random.split(key, 10)

  def normal(k, shape, fan_in):
    return (jax.random.normal(k, shape, jnp.float32) / jnp.sqrt(fan_in)).astype(dtype)

  return {
      "attn_norm": (1.0 + 0.1 * jax.random.normal(keys[0], (c, d))).astype(dtype),
      "wq": normal(keys[1], (c, d, r, hd), d),
      "wk": normal(keys[2], (c, d, hd), d),
      "wv": normal(keys[3], (c, d, hd), d),
      "wo": normal(keys[4], (c, r, hd, d), r * hd * c),
      "moe_norm": (1.0 + 0.1 * jax.random.normal(keys[5], (c, d))).astype(dtype),
      "router": normal(keys[6], (c, d, ec), d),
      "w_gate": normal(keys[7], (c, ec, d, f), d),
      "w_up": normal(keys[8], (c, ec, d, f), d),
      "w_down": normal(keys[9], (c, ec, f, d), f * c * cfg.top_k),
  }


@functools.partial(jax.jit, static_argnums=(1, 2))
def init_moe_params(key: jax.Array, cfg: MoEConfig, dtype=jnp.float32) -> Params:
  """Random baseline block parameters.

  Shapes (H KV heads): attn_norm, moe_norm [D]; wq [D, H, R, hd]; wk, wv [D, H, hd];
  wo [H, R, hd, D]; router [D, E]; w_gate, w_up [E, D, F]; w_down [E, F, D].
  """
  h, d, r, hd = cfg.num_kv_heads, cfg.d_model, cfg.q_per_kv, cfg.head_dim
  e, f = cfg.num_experts, cfg.d_ff
  keys = jax.random.split(key, 10)

  def normal(k, shape, fan_in):
    return (jax.random.normal(k, shape, jnp.float32) / jnp.sqrt(fan_in)).astype(dtype)

  return {
      "attn_norm": (1.0 + 0.1 * jax.random.normal(keys[0], (d,))).astype(dtype),
      "wq": normal(keys[1], (d, h, r, hd), d),
      "wk": normal(keys[2], (d, h, hd), d),
      "wv": normal(keys[3], (d, h, hd), d),
      "wo": normal(keys[4], (h, r, hd, d), h * r * hd),
      "moe_norm": (1.0 + 0.1 * jax.random.normal(keys[5], (d,))).astype(dtype),
      "router": normal(keys[6], (d, e), d),
      "w_gate": normal(keys[7], (e, d, f), d),
      "w_up": normal(keys[8], (e, d, f), d),
      "w_down": normal(keys[9], (e, f, d), f * cfg.top_k),
  }


AXES = (CLUSTER_AXIS, EXPERT_AXIS)


def foe_param_specs(axes: tuple[str, str] = AXES) -> dict[str, P]:
  """PartitionSpecs of FoE parameters: clusters over axes[0], experts over axes[1]."""
  cluster, expert = axes
  specs = {name: P(cluster) for name in
           ("attn_norm", "wq", "wk", "wv", "wo", "moe_norm", "router")}
  specs.update({name: P(cluster, expert) for name in ("w_gate", "w_up", "w_down")})
  return specs


def moe_param_specs(axes: tuple[str, str] = AXES) -> dict[str, P]:
  """PartitionSpecs of baseline parameters: experts over both axes, the rest replicated."""
  specs = {name: P() for name in
           ("attn_norm", "wq", "wk", "wv", "wo", "moe_norm", "router")}
  specs.update({name: P(tuple(axes)) for name in ("w_gate", "w_up", "w_down")})
  return specs


# ------------------------------------------------------------------------------ the math

def _foe_attention(params: Params, residual: jax.Array, cfg: FoEConfig, cache, impl="auto"):
  """Attention of the clusters in `params`; residual [c, B, T, D] -> ([c, B, T, D], cache)."""
  clusters, batch, seq, _ = residual.shape
  normed = rms_norm(residual, params["attn_norm"][:, None, None, :], cfg.norm_eps)
  q = jnp.einsum("cbtd,cdrh->btcrh", normed, params["wq"])
  q = q.reshape(batch, seq, clusters * cfg.q_per_kv, cfg.head_dim)
  k = jnp.einsum("cbtd,cdh->btch", normed, params["wk"])
  v = jnp.einsum("cbtd,cdh->btch", normed, params["wv"])
  positions = cache_positions(cache, batch, seq)
  q = apply_rope(q, positions, cfg.rope_theta)
  k = apply_rope(k, positions, cfg.rope_theta)
  if cache is None:
    out = causal_attention(q, k, v)
  else:
    out, cache = cached_attention(cache, q, k, v, impl=impl)
  out = out.reshape(batch, seq, clusters, cfg.q_per_kv, cfg.head_dim)
  return jnp.einsum("btcrh,crhd->cbtd", out, params["wo"]), cache


def _baseline_attention(params: Params, x: jax.Array, cfg: MoEConfig, cache, impl="auto"):
  """Attention with all heads; x [B, T, D] -> ([B, T, D], cache)."""
  batch, seq, _ = x.shape
  normed = rms_norm(x, params["attn_norm"], cfg.norm_eps)
  q = jnp.einsum("btd,dhrk->bthrk", normed, params["wq"])
  q = q.reshape(batch, seq, cfg.num_q_heads, cfg.head_dim)
  k = jnp.einsum("btd,dhk->bthk", normed, params["wk"])
  v = jnp.einsum("btd,dhk->bthk", normed, params["wv"])
  positions = cache_positions(cache, batch, seq)
  q = apply_rope(q, positions, cfg.rope_theta)
  k = apply_rope(k, positions, cfg.rope_theta)
  if cache is None:
    out = causal_attention(q, k, v)
  else:
    out, cache = cached_attention(cache, q, k, v, impl=impl)
  out = out.reshape(batch, seq, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)
  return jnp.einsum("bthrk,hrkd->btd", out, params["wo"]), cache


def _stack_stats(stats: list[routing_lib.RouterStats]) -> routing_lib.RouterStats:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *stats)


def _aux_dict(stats: routing_lib.RouterStats) -> dict[str, jax.Array]:
  balance, z = routing_lib.router_losses(stats)
  return {"load_balancing_loss": balance, "z_loss": z,
          "dropped_fraction": jnp.mean(stats.dropped_fraction)}


def _check_groups(batch: int, token_groups: int) -> None:
  if not isinstance(token_groups, int) or token_groups < 1 or batch % token_groups:
    raise ValueError(f"token_groups={token_groups!r} must be a positive int dividing the "
                     f"batch size {batch}")


def _check_residual(name: str, x: jax.Array, ndim: int, d_model: int) -> None:
  if x.ndim != ndim or x.shape[-1] != d_model:
    raise ValueError(f"{name} must have {ndim} dims with last dim d_model={d_model}, got "
                     f"shape {x.shape}")


def foe_block_reference(params: Params, residual: jax.Array, cfg: FoEConfig, *, cache=None,
                        token_groups: int = 1, attention_impl: str = "auto") -> tuple[jax.Array, Any, dict[str, jax.Array]]:
  """Single-device FoE block.

  Args:
    params: from `init_foe_params`.
    residual: [C, B, T, D] per-cluster residual streams.
    cfg: the block configuration.
    cache: None (whole sequences, causal) or a kvjax cache with C KV heads and batch B.
    token_groups: dispatch groups (consecutive batch slices) for the capacity limit;
      the sharded block on a mesh with `expert` size n matches token_groups = n.
    attention_impl: the cache attention's implementation (`kvjax.attend`'s impl).

  Returns:
    (new residual [C, B, T, D], new cache or None, aux dict with scalar
    `load_balancing_loss`, `z_loss`, `dropped_fraction`).
  """
  _check_residual("residual", residual, 4, cfg.d_model)
  if residual.shape[0] != cfg.num_clusters:
    raise ValueError(f"residual must have num_clusters={cfg.num_clusters} streams on axis 0, "
                     f"got shape {residual.shape}")
  clusters, batch, seq, width = residual.shape
  _check_groups(batch, token_groups)
  attn, cache = _foe_attention(params, residual, cfg, cache, attention_impl)
  synced = jnp.mean(residual + attn, axis=0)  # [B, T, D]
  tokens_per_group = batch // token_groups * seq
  capacity = expert_capacity(tokens_per_group, cfg.top_k, cfg.experts_per_cluster,
                             cfg.capacity_factor)
  groups = synced.reshape(token_groups, tokens_per_group, width)
  outputs, stats = [], []
  for c in range(clusters):
    normed = rms_norm(groups, params["moe_norm"][c], cfg.norm_eps)
    per_group = [routing_lib.moe_layer(normed[g], params["router"][c], params["w_gate"][c],
                                       params["w_up"][c], params["w_down"][c],
                                       top_k=cfg.top_k, capacity=capacity)
                 for g in range(token_groups)]
    outputs.append(jnp.stack([o for o, _ in per_group]).reshape(batch, seq, width))
    stats.append(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0),
                              *[s for _, s in per_group]))
  new_residual = synced[None] + jnp.stack(outputs)
  return new_residual, cache, _aux_dict(_stack_stats(stats))


def moe_block_reference(params: Params, x: jax.Array, cfg: MoEConfig, *, cache=None,
                        token_groups: int = 1, attention_impl: str = "auto") -> tuple[jax.Array, Any, dict[str, jax.Array]]:
  """Single-device baseline block.

  Args:
    params: from `init_moe_params`.
    x: [B, T, D] residual stream.
    cache: None or a kvjax cache with all KV heads and batch B.
    token_groups: dispatch groups; the sharded baseline on an n-device mesh matches n.

  Returns:
    (new residual [B, T, D], new cache or None, aux dict as in `foe_block_reference`).
  """
  _check_residual("x", x, 3, cfg.d_model)
  batch, seq, width = x.shape
  _check_groups(batch, token_groups)
  attn, cache = _baseline_attention(params, x, cfg, cache, attention_impl)
  hidden = x + attn
  tokens_per_group = batch // token_groups * seq
  capacity = expert_capacity(tokens_per_group, cfg.top_k, cfg.num_experts,
                             cfg.capacity_factor)
  normed = rms_norm(hidden, params["moe_norm"], cfg.norm_eps).reshape(
      token_groups, tokens_per_group, width)
  per_group = [routing_lib.moe_layer(normed[g], params["router"], params["w_gate"],
                                     params["w_up"], params["w_down"], top_k=cfg.top_k,
                                     capacity=capacity) for g in range(token_groups)]
  moe_out = jnp.stack([o for o, _ in per_group]).reshape(batch, seq, width)
  stats = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0), *[s for _, s in per_group])
  return hidden + moe_out, cache, _aux_dict(stats)


# ------------------------------------------------------------------------ sharded blocks

def _check_mesh(mesh: Mesh, axes) -> tuple[int, int]:
  """(cluster axis size, expert axis size); the mesh must have both axes and no other axis of
  size > 1 (a model's (data, model) mesh serves with axes=("data", "model"))."""
  if (not isinstance(axes, (tuple, list)) or len(axes) != 2 or axes[0] == axes[1]
      or not all(isinstance(a, str) for a in axes)):
    raise ValueError(f"axes must be two distinct mesh axis names (cluster, expert), got {axes!r}")
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh has axes {mesh.axis_names}, not {missing} (axes={tuple(axes)!r}; "
                     "see kvjax.foe.make_foe_mesh)")
  others = [a for a in mesh.axis_names if a not in axes and mesh.shape[a] > 1]
  if others:
    raise ValueError(f"mesh axes {others} are neither of axes={tuple(axes)!r}")
  return mesh.shape[axes[0]], mesh.shape[axes[1]]


def make_foe_block(cfg: FoEConfig, mesh: Mesh, *, with_cache: bool = False,
                   with_aux: bool = True, attention_impl: str = "auto",
                   axes: tuple[str, str] = AXES):
  """Builds the jitted `shard_map` FoE block for `mesh`.

  Returns `block(params, residual, cache=None) -> (residual', cache', aux)` with shapes as
  in `foe_block_reference`. With `with_aux=False` (inference) aux is {} and the router
  statistics are not averaged across devices, so the block's only collectives are the
  expert all-to-alls and the residual all-reduce. Place inputs first with `shard_foe_inputs` (shard_map checks the
  inputs' shardings): residual [C, B, T, D] is split as P(cluster, expert) (clusters x
  batch shards).

  axes: the mesh axes that play (cluster, expert): ("cluster", "expert") on a
  `make_foe_mesh` mesh, ("data", "model") inside a sharded model's mesh (clusters along the data
  axis, experts along the model axis).

  Raises:
    ValueError: if the mesh's cluster axis does not divide num_clusters or its expert axis
      does not divide experts_per_cluster.
  """
  mesh_clusters, mesh_experts = _check_mesh(mesh, axes)
  cluster_axis, expert_axis = axes
  if cfg.num_clusters % mesh_clusters:
    raise ValueError(f"FoEConfig.num_clusters={cfg.num_clusters} must be divisible by the "
                     f"mesh's {cluster_axis!r} axis size {mesh_clusters}")
  if cfg.experts_per_cluster % mesh_experts:
    raise ValueError(f"FoEConfig.experts_per_cluster={cfg.experts_per_cluster} must be "
                     f"divisible by the mesh's {expert_axis!r} axis size {mesh_experts}")
  param_specs = foe_param_specs(axes)
  residual_spec = P(cluster_axis, expert_axis)

  def local_block(params, residual, cache):
    local_clusters, local_batch, seq, width = residual.shape
    attn, cache = _foe_attention(params, residual, cfg, cache, attention_impl)
    # The cross-cluster sync: one all-reduce of the residual over the cluster axis.
    synced = jax.lax.psum(jnp.sum(residual + attn, axis=0), cluster_axis) / cfg.num_clusters
    tokens = local_batch * seq
    capacity = expert_capacity(tokens, cfg.top_k, cfg.experts_per_cluster,
                               cfg.capacity_factor)
    flat = synced.reshape(tokens, width)
    outputs, stats = [], []
    for c in range(local_clusters):
      normed = rms_norm(flat, params["moe_norm"][c], cfg.norm_eps)
      out, st = routing_lib.moe_layer(normed, params["router"][c], params["w_gate"][c],
                                      params["w_up"][c], params["w_down"][c],
                                      top_k=cfg.top_k, capacity=capacity,
                                      expert_axis=expert_axis)
      outputs.append(out.reshape(local_batch, seq, width))
      stats.append(st)
    aux = {}
    if with_aux:
      # Means of the statistics over all token groups first, then the losses (a mean of
      # per-group products would not be the batch's load-balancing loss).
      stats = [jax.tree.map(lambda s: jax.lax.pmean(s, expert_axis), st) for st in stats]
      aux = jax.tree.map(lambda s: jax.lax.pmean(s, cluster_axis),
                         _aux_dict(_stack_stats(stats)))
    return synced[None] + jnp.stack(outputs), cache, aux

  def block(params, residual, cache=None):
    if residual.ndim != 4 or residual.shape[0] != cfg.num_clusters:
      raise ValueError(f"residual must be [num_clusters={cfg.num_clusters}, B, T, D], got "
                       f"shape {residual.shape}")
    if residual.shape[1] % mesh_experts:
      raise ValueError(f"batch size {residual.shape[1]} must be divisible by the mesh's "
                       f"{expert_axis!r} axis size {mesh_experts}")
    if (cache is not None) != with_cache:
      raise ValueError(f"this block was built with with_cache={with_cache}; pass "
                       f"{'a cache' if with_cache else 'cache=None'}")
    cache_specs = None if cache is None else cache_lib.partition_specs(cache, expert_axis,
                                                                       cluster_axis)
    fn = shard_map(local_block, mesh=mesh,
                   in_specs=(param_specs, residual_spec, cache_specs),
                   out_specs=(residual_spec, cache_specs, P()))
    return fn(params, residual, cache)

  return jax.jit(block)


def make_moe_block(cfg: MoEConfig, mesh: Mesh, *, with_cache: bool = False,
                   with_aux: bool = True, attention_impl: str = "auto",
                   axes: tuple[str, str] = AXES):
  """Builds the jitted `shard_map` baseline block for `mesh`.

  Returns `block(params, x, cache=None) -> (x', cache', aux)`; x [B, T, D] is split over
  the batch on both mesh axes, experts over both axes (global expert parallelism).
  `with_aux` and `axes` as in `make_foe_block`.

  Raises:
    ValueError: if the device count does not divide num_experts.
  """
  mesh_clusters, mesh_experts = _check_mesh(mesh, axes)
  num_devices = mesh_clusters * mesh_experts
  if cfg.num_experts % num_devices:
    raise ValueError(f"MoEConfig.num_experts={cfg.num_experts} must be divisible by the "
                     f"mesh size {num_devices} (experts are split over both mesh axes)")
  token_axes = tuple(axes)
  param_specs = moe_param_specs(axes)
  x_spec = P(token_axes)

  def local_block(params, x, cache):
    local_batch, seq, width = x.shape
    attn, cache = _baseline_attention(params, x, cfg, cache, attention_impl)
    hidden = x + attn
    tokens = local_batch * seq
    capacity = expert_capacity(tokens, cfg.top_k, cfg.num_experts, cfg.capacity_factor)
    normed = rms_norm(hidden, params["moe_norm"], cfg.norm_eps).reshape(tokens, width)
    out, stats = routing_lib.moe_layer(normed, params["router"], params["w_gate"],
                                       params["w_up"], params["w_down"], top_k=cfg.top_k,
                                       capacity=capacity, expert_axis=token_axes)
    aux = {}
    if with_aux:
      aux = _aux_dict(jax.tree.map(lambda s: jax.lax.pmean(s, token_axes), stats))
    return hidden + out.reshape(local_batch, seq, width), cache, aux

  def block(params, x, cache=None):
    if x.ndim != 3 or x.shape[0] % num_devices:
      raise ValueError(f"x must be [B, T, D] with B divisible by the mesh size {num_devices}, "
                       f"got shape {x.shape}")
    if (cache is not None) != with_cache:
      raise ValueError(f"this block was built with with_cache={with_cache}; pass "
                       f"{'a cache' if with_cache else 'cache=None'}")
    cache_specs = None if cache is None else cache_lib.partition_specs(cache, token_axes, None)
    fn = shard_map(local_block, mesh=mesh, in_specs=(param_specs, x_spec, cache_specs),
                   out_specs=(x_spec, cache_specs, P()))
    return fn(params, x, cache)

  return jax.jit(block)


def place(tree, mesh: Mesh, specs):
  """`jax.device_put` of a pytree with matching PartitionSpecs (None specs pass through)."""
  if tree is None:
    return None
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def shard_foe_inputs(mesh: Mesh, params: Params, residual: jax.Array, cache=None, *,
                     axes: tuple[str, str] = AXES):
  """Places FoE parameters, residual and optional cache on `mesh` as `make_foe_block` expects."""
  cluster, expert = axes
  return (place(params, mesh, foe_param_specs(axes)),
          place(residual, mesh, P(cluster, expert)),
          None if cache is None else
          place(cache, mesh, cache_lib.partition_specs(cache, expert, cluster)))


def shard_moe_inputs(mesh: Mesh, params: Params, x: jax.Array, cache=None, *,
                     axes: tuple[str, str] = AXES):
  """Places baseline parameters, input and optional cache on `mesh`."""
  token_axes = tuple(axes)
  return (place(params, mesh, moe_param_specs(axes)), place(x, mesh, P(token_axes)),
          None if cache is None else
          place(cache, mesh, cache_lib.partition_specs(cache, token_axes, None)))
