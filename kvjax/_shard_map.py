"""One place for the `shard_map` import, whose home and keyword moved between jax versions.

jax >= 0.6 exposes `jax.shard_map(f, mesh=..., in_specs=..., out_specs=..., check_vma=...)`;
older releases have `jax.experimental.shard_map.shard_map(..., check_rep=...)`. `kvjax.foe`
and `kvjax.models.sharding` call `shard_map` from here with `check_vma`, and this module
translates.

`check_vma=True` (the default here) keeps jax's tracking of which values vary across mesh
axes. Besides catching wrong out_specs, it is what makes the transpose of `psum` on a
replicated input correct, so the gradients of the sharded blocks match their references.
"""

from __future__ import annotations

import inspect

import jax

if hasattr(jax, "shard_map"):
  _raw_shard_map = jax.shard_map
else:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map as _raw_shard_map

_PARAMS = inspect.signature(_raw_shard_map).parameters
if "check_vma" in _PARAMS:
  _CHECK_KEYWORD = "check_vma"
elif "check_rep" in _PARAMS:  # pragma: no cover - older jax
  _CHECK_KEYWORD = "check_rep"
else:  # pragma: no cover
  _CHECK_KEYWORD = None


def shard_map(f, *, mesh, in_specs, out_specs, check_vma: bool = True):
  """`shard_map` with one signature across jax versions.

  Args:
    f: the per-device function; it sees the local block of every input.
    mesh: a `jax.sharding.Mesh`.
    in_specs, out_specs: `PartitionSpec` pytrees matching the inputs and outputs.
    check_vma: keep jax's varying-manual-axes checks (named `check_rep` in older jax).
  """
  kwargs = dict(mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  if _CHECK_KEYWORD is not None:
    kwargs[_CHECK_KEYWORD] = check_vma
  return _raw_shard_map(f, **kwargs)
