"""A model and its caches on a device mesh: tensor parallel over heads, data parallel over batch.

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    model = kvjax.models.shard(model, mesh)           # or load(name, mesh=mesh)
    caches = model.init_cache(batch, max_len, calibration=model.calibration)
    kvjax.generate(model, tokenizer, prompts, ...)    # unchanged

Layout (docs/sharding.md has the collectives and their cost):
  * parameters, Megatron style: the q/k/v projections and the MLP's gate/up are split by
    output columns over the model axis, the attention output and MLP down projections by input
    rows, so each layer needs one all-reduce after attention and one after the MLP. The
    embedding (and an untied LM head) is split over the vocabulary. Norms are replicated.
  * attention runs under `shard_map`, each device calling the same `kvjax.append_and_attend`
    (hence the same kernels) on its own query heads and the KV heads they read. The caches are
    split over KV heads with them: codes, scales, per-sequence correction state, and the
    per-head rotations, λ and calibration tensors. When the model has fewer KV heads than the
    model axis, each KV head is stored once per device that reads it (`kv_repeat`), as serving
    stacks do; a cache is never gathered.
  * when the query heads do not split evenly over the model axis (or the KV heads neither
    split nor tile it), attention is replicated over the model axis: every device of a data
    shard computes every head (same numbers, no communication), and only the MLP and the
    vocabulary are split. `Layout.attention` says which.
  * the batch (and each cache's batch axis) is split over the data axis.

The same code runs on one process or on several under `jax.distributed` (`kvjax.distributed`):
parameters and caches are placed with `make_array_from_callback` when the mesh spans
processes, and every process passes the same host values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import kvjax
from kvjax._shard_map import shard_map
from kvjax.cache import DenseKVCache, QuantizedKVCache, partition_specs
from kvjax.models.config import ModelConfig

HEADS = "heads"           # Layout.attention: query heads (and KV heads) split over the model axis
REPLICATED = "replicated"  # every device of a data shard computes every head


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a model's parameters, activations and caches live on `mesh` (static, hashable).

  Attributes:
    mesh: the device mesh.
    data_axis: mesh axis splitting the batch, or None.
    model_axis: mesh axis splitting heads and MLP columns, or None.
    attention: HEADS or REPLICATED (see the module docstring).
    kv_repeat: copies of each KV head in the caches (> 1 when there are fewer KV heads than
      model-axis devices and attention is split; 1 otherwise).
  """

  mesh: Mesh
  data_axis: str | None
  model_axis: str | None
  attention: str
  kv_repeat: int

  @property
  def model_size(self) -> int:
    return self.mesh.shape[self.model_axis] if self.model_axis else 1

  @property
  def data_size(self) -> int:
    return self.mesh.shape[self.data_axis] if self.data_axis else 1

  @property
  def head_axis(self) -> str | None:
    """The mesh axis the cache's KV-head axis is split over (None: replicated)."""
    return self.model_axis if self.attention == HEADS else None

  def sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)

  # -- attention ---------------------------------------------------------------------------------

  def append_and_attend(self, cache, q, k, v, *, scale, softcap, num_tokens, impl):
    """`kvjax.append_and_attend` with every device on its own heads and batch rows.

    q [B, T, Hq, D], k, v [B, T, H, D] as the layer computed them (H: the model's KV heads);
    cache: this layer's cache from `model.init_cache` (H * kv_repeat KV heads).
    Returns (out [B, T, Hq, D], new cache), laid out like the inputs.
    """
    h = k.shape[2]
    if cache.num_kv_heads != h * self.kv_repeat:
      raise ValueError(f"the cache holds {cache.num_kv_heads} KV heads where this layout "
                       f"stores {h * self.kv_repeat} ({h} x kv_repeat {self.kv_repeat}): make the "
                       "caches of a sharded model with its model.init_cache(...)")
    if self.kv_repeat > 1:
      # Device i's query heads all read original KV head i // kv_repeat (module docstring).
      k, v = jnp.repeat(k, self.kv_repeat, axis=2), jnp.repeat(v, self.kv_repeat, axis=2)
    act = P(self.data_axis, None, self.head_axis, None)
    cache_spec = cache_specs(cache, self.data_axis, self.head_axis)

    def local(cache, q, k, v, n):
      return kvjax.append_and_attend(cache, q, k, v, scale=scale, softcap=softcap,
                                     num_tokens=n, impl=impl)

    n = jnp.full((q.shape[0],), q.shape[1], jnp.int32) if num_tokens is None else num_tokens
    # check_vma off: the per-device body may run Pallas kernels, which carry no
    # varying-axes annotations; the specs above say exactly what varies.
    run = shard_map(local, mesh=self.mesh,
                    in_specs=(cache_spec, act, act, act, P(self.data_axis)),
                    out_specs=(act, cache_spec), check_vma=False)
    return run(cache, q, k, v, n.astype(jnp.int32))

  def replicate(self, x: jax.Array) -> jax.Array:
    """x (inside jit) replicated on every device, so that every process can read it."""
    return jax.lax.with_sharding_constraint(x, self.sharding(P()))


def plan(cfg: ModelConfig, mesh: Mesh, *, data_axis: str | None = "data",
         model_axis: str | None = "model") -> Layout:
  """The layout of a model with config `cfg` on `mesh` (see the module docstring)."""
  check_mesh(mesh, data_axis=data_axis, model_axis=model_axis)
  mesh = _auto_axes(mesh)
  tp = mesh.shape[model_axis] if model_axis else 1
  hq, h = cfg.num_heads, cfg.num_kv_heads
  if tp > 1 and hq % tp == 0 and (h % tp == 0 or tp % h == 0):
    return Layout(mesh, data_axis, model_axis, HEADS, max(1, tp // h))
  return Layout(mesh, data_axis, model_axis, REPLICATED if tp > 1 else HEADS, 1)


def check_mesh(mesh, *, data_axis, model_axis) -> None:
  """ValueError/TypeError naming the argument unless `mesh` has the two (distinct) axes."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  for name, axis in (("data_axis", data_axis), ("model_axis", model_axis)):
    if axis is not None and axis not in mesh.axis_names:
      raise ValueError(f"{name}={axis!r} is not an axis of the mesh {mesh.axis_names}; pass "
                       f"{name}=None to leave it out")
  if data_axis is not None and data_axis == model_axis:
    raise ValueError(f"data_axis and model_axis must differ, both are {data_axis!r}")
  others = set(mesh.axis_names) - {data_axis, model_axis}
  if any(mesh.shape[a] > 1 for a in others):
    raise ValueError(f"mesh axes {sorted(others)} are neither data_axis nor model_axis; name "
                     "them, or give the mesh only those two")


def _auto_axes(mesh: Mesh) -> Mesh:
  """The mesh with every axis of type Auto (`jax.make_mesh` may default to Explicit): XLA
  places what the layout does not pin (activations between the pinned projections)."""
  auto = getattr(jax.sharding, "AxisType", None)
  types = getattr(mesh, "axis_types", None)
  if auto is None or types is None or all(t == auto.Auto for t in types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(auto.Auto,) * len(mesh.axis_names))


# -- parameters ------------------------------------------------------------------------------------

def _param_spec(path: tuple[str, ...], shape: tuple[int, ...], layout: Layout) -> P:
  """The PartitionSpec of one parameter (path: its names from the model root)."""
  m, tp = layout.model_axis, layout.model_size
  lead = (None,) * (len(shape) - (2 if path[-1] == "kernel" else 1))

  def cols(width):  # [in, out] split by output columns (bias [out] alike)
    if tp == 1 or width % tp:
      return P()
    return P(*lead, None, m) if path[-1] == "kernel" else P(*lead, m)

  def rows(height):  # [in, out] split by input rows (bias replicated)
    if tp == 1 or height % tp or path[-1] != "kernel":
      return P()
    return P(*lead, m, None)

  split_heads = layout.attention == HEADS and tp > 1
  if path == ("embedding",):
    return P(m, None) if tp > 1 and shape[0] % tp == 0 else P()
  if path[:1] == ("lm_head",):
    return cols(shape[-1])
  if "attention" in path:
    proj = path[-2]
    if proj == "q_proj":
      return cols(shape[-1]) if split_heads else P()
    if proj in ("k_proj", "v_proj"):
      return cols(shape[-1]) if split_heads and layout.kv_repeat == 1 else P()
    if proj == "o_proj":
      return rows(shape[-2]) if split_heads else P()
    return P()  # q/k norms
  if "mlp" in path:
    proj = path[-2]
    if proj in ("gate_proj", "up_proj"):
      return cols(shape[-1])
    if proj == "down_proj":
      return rows(shape[-2])
  return P()  # norms


def param_specs(model, layout: Layout) -> dict:
  """PartitionSpecs for `nnx.to_pure_dict(nnx.state(model, nnx.Param))`, same structure."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def spec(path, leaf):
    names = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return _param_spec(names, leaf.shape, layout)

  return jax.tree_util.tree_map_with_path(spec, pure)


def put(x, sharding: NamedSharding) -> jax.Array:
  """x placed with `sharding`, also when the mesh spans processes (every process must pass the
  same value)."""
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard(model, mesh: Mesh, *, data_axis: str | None = "data",
          model_axis: str | None = "model"):
  """The model with its parameters placed on `mesh` and its attention run per device.

  Returns a new model (the argument is left as it is) whose `layout` is this mesh's `Layout`;
  its `init_cache` makes caches placed to match, and `kvjax.generate` runs on it unchanged.
  """
  from kvjax.models.decoder import CausalLM
  if not isinstance(model, CausalLM):
    raise TypeError(f"model must be a kvjax.models.CausalLM, got {type(model).__name__}")
  layout = plan(model.config, mesh, data_axis=data_axis, model_axis=model_axis)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pure = nnx.to_pure_dict(params)
  specs = param_specs(model, layout)
  placed = jax.tree.map(lambda a, s: put(a, layout.sharding(s)), pure, specs,
                        is_leaf=lambda x: isinstance(x, P))
  nnx.replace_by_pure_dict(params, placed)
  new = nnx.merge(graphdef, params, rest)
  new.checkpoint_name, new.calibration = model.checkpoint_name, model.calibration
  new.layout = layout
  return new


# -- caches -----------------------------------------------------------------------------------------

def cache_specs(cache, data_axis: str | None, head_axis: str | None):
  """`kvjax.cache.partition_specs` for a model's caches; certified and statistics caches are
  refused with the reason."""
  if not isinstance(cache, (DenseKVCache, QuantizedKVCache)):
    raise ValueError(f"a sharded model runs on dense and quantized caches, got "
                     f"{type(cache).__name__} (certified caches keep host-memory tiers that "
                     "are not sharded yet)")
  try:
    return partition_specs(cache, data_axis, head_axis)
  except TypeError as e:
    raise ValueError(str(e)) from None


def _repeat_heads(cache, r: int):
  """The cache with each KV head stored r times in a row (head i -> i*r .. i*r + r-1)."""
  if r == 1:
    return cache
  specs = cache_specs(cache, "batch", "heads")  # marks which axis of each array is the heads'

  def rep(a, spec):
    if "heads" not in tuple(spec):
      return a
    return jnp.repeat(a, r, axis=tuple(spec).index("heads"))

  return jax.tree.map(rep, cache, specs, is_leaf=lambda x: isinstance(x, P))


def place_caches(caches, layout: Layout):
  """Fresh caches from an unsharded `init_cache`, laid out for `layout` (KV heads repeated
  `kv_repeat` times, then placed)."""
  def one(cache):
    cache = _repeat_heads(cache, layout.kv_repeat)
    specs = cache_specs(cache, layout.data_axis, layout.head_axis)
    return jax.tree.map(lambda a, s: put(a, layout.sharding(s)), cache, specs)

  return {part: tuple(one(c) for c in caches[part]) for part in ("groups", "tail")}


def check_batch(layout: Layout, batch: int) -> None:
  if batch % layout.data_size:
    raise ValueError(f"batch {batch} does not split over the mesh's data axis "
                     f"{layout.data_axis!r} of size {layout.data_size}; use a multiple of "
                     f"{layout.data_size}")


def replicated(layout: Layout, x) -> jax.Array:
  return put(x, layout.sharding(P()))


def cache_nbytes_per_device(caches) -> int:
  """Bytes of cache arrays held by the busiest device (addressable shards only)."""
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(caches):
    for s in leaf.addressable_shards:
      per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
  return max(per_device.values(), default=0)


def decode_step_collectives(model, caches) -> list:
  """The collectives (`kvjax.foe.hlo.Collective`) of one compiled greedy decode step of the
  sharded `model` over `caches` (read from the compiled HLO, not from what the code meant)."""
  from kvjax.foe.hlo import collectives
  from kvjax.models.decoder import cache_lengths
  from kvjax.models.generate import _decode_step
  if model.layout is None:
    raise ValueError("decode_step_collectives needs a sharded model (kvjax.models.shard)")
  graphdef, state = nnx.split(model)
  batch = cache_lengths(caches).shape[0]
  tokens = replicated(model.layout, np.zeros(batch, np.int32))
  key = replicated(model.layout, jax.random.key(0))
  greedy = (("temperature", 0.0), ("top_k", None), ("top_p", None))
  compiled = _decode_step.lower(graphdef, state, caches, tokens, key, greedy, "auto").compile()
  return collectives(compiled.as_text(), model.layout.mesh.size)
