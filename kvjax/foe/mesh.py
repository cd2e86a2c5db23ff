"""The 2-D device mesh of the FoE layer: a cluster axis times an expert axis."""

from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh

CLUSTER_AXIS = "cluster"
EXPERT_AXIS = "expert"


def make_foe_mesh(num_devices: int, num_clusters: int, *, devices=None) -> Mesh:
  """Builds a `(cluster, expert)` mesh of shape `[num_clusters, num_devices // num_clusters]`.

  Devices are laid out cluster-major: the devices of one cluster are consecutive in
  `jax.devices()` order, which on a real machine keeps a cluster inside one node.

  Args:
    num_devices: devices to use (the first `num_devices` of `devices`).
    num_clusters: size of the cluster axis; must divide `num_devices`.
    devices: device list; `jax.devices()` when None.

  Raises:
    ValueError: if a count is not positive, `num_clusters` does not divide `num_devices`,
      or fewer than `num_devices` devices exist.
  """
  for name, value in (("num_devices", num_devices), ("num_clusters", num_clusters)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if num_devices % num_clusters:
    raise ValueError(f"num_clusters={num_clusters} must divide num_devices={num_devices} "
                     "to form a (cluster, expert) mesh")
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < num_devices:
    raise ValueError(
        f"num_devices={num_devices} but only {len(devices)} devices are available; on the "
        "CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax")
  grid = np.array(devices[:num_devices], dtype=object).reshape(
      num_clusters, num_devices // num_clusters)
  return Mesh(grid, (CLUSTER_AXIS, EXPERT_AXIS))
