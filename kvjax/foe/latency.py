"""An alpha-beta model of per-layer communication time, fed by collectives read from HLO.

Each collective group of p devices spanning k nodes (m = p / k devices per node) costs:

* all-to-all: (p - 1) * alpha + max(intra_bytes / B_intra, inter_bytes / B_inter), where a
  device sends n (m - 1) / p bytes to peers on its node and n (p - m) / p off the node
  (n = bytes per device); alpha is the inter-node latency when k > 1.
* all-reduce: ring, 2 (p - 1) alpha + 2 (p - 1) / p * n / B, on one fabric when k == 1 or
  m == 1; otherwise hierarchical: intra-node reduce-scatter, inter-node all-reduce of n / m
  bytes, intra-node all-gather.
* all-gather (n = gathered bytes) / reduce-scatter (n = result bytes, input p n):
  ring, (p - 1) alpha + (p - 1) / p * input / B on the slowest fabric used.
* collective-permute: alpha + n / B.

Groups of one collective run concurrently (disjoint devices, one NIC per GPU), so an op
costs its slowest group; ops of a layer run one after another with no overlap with compute.
These are the model's assumptions, not measurements.
"""

from __future__ import annotations

import dataclasses

from kvjax.foe.hlo import Collective


@dataclasses.dataclass(frozen=True)
class LinkModel:
  """Link figures of a GPU cluster.

  Attributes:
    gpus_per_node: devices sharing the intra-node fabric.
    intra_bandwidth: bytes/s per GPU inside a node (NVLink 4: 900e9).
    inter_bandwidth: bytes/s per GPU between nodes (one 400 Gb/s InfiniBand NIC: 50e9).
    intra_latency, inter_latency: seconds per message step (alpha).
  """

  gpus_per_node: int = 8
  intra_bandwidth: float = 900e9
  inter_bandwidth: float = 50e9
  intra_latency: float = 2e-6
  inter_latency: float = 8e-6

  def __post_init__(self):
    if self.gpus_per_node < 1:
      raise ValueError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")
    for name in ("intra_bandwidth", "inter_bandwidth"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive bytes/s, got {getattr(self, name)}")
    for name in ("intra_latency", "inter_latency"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")


def _group_layout(group, gpus_per_node):
  nodes: dict[int, int] = {}
  for device in group:
    nodes[device // gpus_per_node] = nodes.get(device // gpus_per_node, 0) + 1
  return len(group), len(nodes), max(nodes.values())


def _ring(p, alpha, volume, bandwidth):
  return (p - 1) * alpha + (p - 1) / p * volume / bandwidth


def group_time(kind: str, group, bytes_per_device: float, link: LinkModel) -> float:
  """Seconds for one group of one collective."""
  p, k, m = _group_layout(group, link.gpus_per_node)
  n = bytes_per_device
  if p <= 1:
    return 0.0
  cross = k > 1
  alpha = link.inter_latency if cross else link.intra_latency
  slow_bw = link.inter_bandwidth if cross else link.intra_bandwidth
  if kind == "all-to-all":
    intra = n * (m - 1) / p
    inter = n * (p - m) / p
    return (p - 1) * alpha + max(intra / link.intra_bandwidth, inter / link.inter_bandwidth)
  if kind == "all-reduce":
    if not cross or m == 1:
      return 2 * _ring(p, alpha, n, slow_bw)
    intra_phase = _ring(m, link.intra_latency, n, link.intra_bandwidth)
    inter_phase = 2 * _ring(k, link.inter_latency, n / m, link.inter_bandwidth)
    return 2 * intra_phase + inter_phase
  if kind == "all-gather":
    return _ring(p, alpha, n, slow_bw)
  if kind == "reduce-scatter":
    return _ring(p, alpha, n * p, slow_bw)
  if kind == "collective-permute":
    return alpha + n / slow_bw
  raise ValueError(f"unknown collective kind {kind!r}")


def collective_time(op: Collective, link: LinkModel) -> float:
  """Seconds for one collective: its slowest group (groups run concurrently)."""
  if op.kind == "collective-permute":
    return max((group_time(op.kind, pair, op.bytes_per_device, link) for pair in op.groups),
               default=0.0)
  return max((group_time(op.kind, g, op.bytes_per_device, link) for g in op.groups),
             default=0.0)


def layer_time(ops: list[Collective], link: LinkModel) -> dict[str, float]:
  """Seconds per layer by collective kind, plus 'total' (serial, no overlap)."""
  out: dict[str, float] = {}
  for op in ops:
    out[op.kind] = out.get(op.kind, 0.0) + collective_time(op, link)
  out["total"] = sum(v for k, v in out.items())
  return out


def cross_node_bytes(ops: list[Collective], gpus_per_node: int) -> float:
  """Bytes per device moved by collectives whose groups span more than one node."""
  total = 0.0
  for op in ops:
    if any(_group_layout(g, gpus_per_node)[1] > 1 for g in op.groups):
      total += op.bytes_per_device
  return total
