"""Collectives of a compiled XLA program, read from its HLO text.

`collectives(hlo_text)` finds every all-to-all, all-reduce, all-gather, reduce-scatter and
collective-permute instruction (synchronous, or the `-start` half of an async pair), with
its replica groups and the bytes of its result per device. Nothing here trusts what the
Python code meant to emit: the numbers come from the compiled module.

Device ids in replica groups are logical ids, i.e. positions in the program's device
assignment; for a `jit` over a mesh that is the mesh's row-major (flattened) device order,
so on a `(cluster, expert)` mesh id i sits in cluster i // expert_axis_size.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

COLLECTIVE_KINDS = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter",
                    "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}

# "%name = <shape> <op>(" where op is a collective or its async start.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<op>all-to-all|all-reduce|all-gather|reduce-scatter|collective-permute)"
    r"(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of a compiled module.

  Attributes:
    kind: one of COLLECTIVE_KINDS.
    name: the HLO instruction name.
    shapes: result arrays as (dtype, dims) pairs (several when the op is a tuple, as XLA
      makes of a tiled all-to-all or of combined all-reduces).
    bytes_per_device: bytes of the result on each participating device.
    groups: tuple of device-id tuples; for collective-permute, the (source, target) pairs.
    is_async: True for a `-start` instruction.
  """

  kind: str
  name: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]
  bytes_per_device: float
  groups: tuple[tuple[int, ...], ...]
  is_async: bool = False

  @property
  def group_size(self) -> int:
    return max((len(g) for g in self.groups), default=0)

  def spans(self, owner_of_device) -> bool:
    """True if some group holds devices with different `owner_of_device(id)` values."""
    return any(len({owner_of_device(d) for d in g}) > 1 for g in self.groups)


def _shape_arrays(shape_text: str):
  arrays = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype not in _DTYPE_BYTES:
      continue
    arrays.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return tuple(arrays)


def _array_bytes(arrays) -> float:
  return float(sum(_DTYPE_BYTES[dt] * int(np.prod(dims, dtype=np.int64)) for dt, dims in arrays))


def _parse_brace_groups(text: str) -> tuple[tuple[int, ...], ...]:
  groups = (tuple(int(x) for x in grp.split(",") if x.strip())
            for grp in re.findall(r"\{([0-9,\s]*)\}", text))
  return tuple(g for g in groups if g)


def _parse_iota_groups(match) -> tuple[tuple[int, ...], ...]:
  # [G,S]<=[d0,d1,...]T(p0,p1,...): iota over prod(d), reshaped to d, transposed by p,
  # reshaped to G groups of S ids.
  out_dims = [int(x) for x in match.group(1).split(",")]
  src_dims = [int(x) for x in match.group(2).split(",")]
  ids = np.arange(int(np.prod(src_dims))).reshape(src_dims)
  if match.group(3):
    ids = ids.transpose([int(x) for x in match.group(3).split(",")])
  ids = ids.reshape(out_dims[0], -1) if len(out_dims) >= 2 else ids.reshape(1, -1)
  return tuple(tuple(int(x) for x in row) for row in ids)


_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[(?P<axes>[^\]]*)\]"
    r"(?:,\s*device_ids=\(\[(?P<dims>[0-9,]+)\](?:T\((?P<perm>[0-9,]+)\))?\))?"
    r"\s*\{(?P<over>[^}]*)\}")


def _parse_mesh_groups(match) -> tuple[tuple[int, ...], ...]:
  # mesh['a'=4,'b'=2][, device_ids=([d0,d1]T(p))] {'a'}: the devices, laid out on a mesh of
  # those axis sizes (row-major over the iota, or over iota(d) transposed by p), grouped along
  # the named axes (the others fixed).
  axes = [(name, int(size)) for name, size in re.findall(r"'([^']+)'=(\d+)", match.group("axes"))]
  sizes = [n for _, n in axes]
  if match.group("dims"):
    ids = np.arange(int(np.prod(sizes))).reshape([int(x) for x in match.group("dims").split(",")])
    if match.group("perm"):
      ids = ids.transpose([int(x) for x in match.group("perm").split(",")])
  else:
    ids = np.arange(int(np.prod(sizes)))
  ids = ids.reshape(sizes)
  over = set(re.findall(r"'([^']+)'", match.group("over")))
  grouped = [i for i, (name, _) in enumerate(axes) if name in over]
  fixed = [i for i in range(len(axes)) if i not in grouped]
  ids = ids.transpose(fixed + grouped).reshape(-1, int(np.prod([sizes[i] for i in grouped])))
  return tuple(tuple(int(x) for x in row) for row in ids)


def _groups(line: str, kind: str, num_devices: int | None):
  if kind == "collective-permute":
    m = re.search(r"source_target_pairs=(\{(?:\{[0-9,\s]*\},?)*\})", line)
    return _parse_brace_groups(m.group(1)) if m else ()
  m = _MESH_GROUPS.search(line)
  if m:
    return _parse_mesh_groups(m)
  m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
  if m:
    return _parse_iota_groups(m)
  m = re.search(r"replica_groups=(\{(?:\{[0-9,\s]*\},?)*\})", line)
  groups = _parse_brace_groups(m.group(1)) if m else ()
  if not groups and num_devices:
    groups = (tuple(range(num_devices)),)  # empty replica_groups: every device
  return groups


def collectives(hlo_text: str, num_devices: int | None = None) -> list[Collective]:
  """Every collective instruction in `hlo_text` (the `-done` halves are skipped).

  Args:
    hlo_text: `jax.jit(f).lower(...).compile().as_text()`.
    num_devices: devices of the program, used when an op has empty replica groups.
  """
  found = []
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    kind = m.group("op")
    arrays = _shape_arrays(m.group("shape"))
    if m.group("start") and kind in ("all-gather", "collective-permute") and len(arrays) >= 2:
      # Async start returns (operand(s), result(s), [context]); keep the result half.
      arrays = arrays[len(arrays) // 2:] if kind == "all-gather" else arrays[1:2]
    found.append(Collective(kind=kind, name=m.group("name"), shapes=arrays,
                            bytes_per_device=_array_bytes(arrays),
                            groups=_groups(line, kind, num_devices),
                            is_async=bool(m.group("start"))))
  return found


def mesh_cluster_of(expert_axis_size: int):
  """Owner function for `Collective.spans`: logical device id -> cluster index."""
  return lambda device_id: device_id // expert_axis_size


def table_rows(ops: list[Collective], expert_axis_size: int) -> list[dict]:
  """Rows for a report: one per collective, with whether its groups cross clusters."""
  cluster_of = mesh_cluster_of(expert_axis_size)
  rows = []
  for op in ops:
    rows.append({
        "kind": op.kind, "name": op.name,
        "shape": " + ".join(f"{dt}[{','.join(map(str, dims))}]" for dt, dims in op.shapes),
        "bytes_per_device": op.bytes_per_device, "group_size": op.group_size,
        "num_groups": len(op.groups),
        "groups": " ".join("{" + ",".join(map(str, g)) + "}" for g in op.groups),
        "crosses_clusters": op.spans(cluster_of),
    })
  return rows


def markdown_table(rows: list[dict]) -> str:
  head = ("| collective | instruction | result per device | bytes/device | group size | groups "
          "| crosses clusters |\n|---|---|---|---:|---:|---|---|\n")
  body = "".join(
      f"| {r['kind']} | {r['name']} | {r['shape']} | {r['bytes_per_device']:.0f} | "
      f"{r['group_size']} | {r['groups']} | {'yes' if r['crosses_clusters'] else 'no'} |\n"
      for r in rows)
  return head + body


def bytes_by_kind(rows: list[dict]) -> dict[tuple[str, bool], float]:
  """Total bytes per device by (kind, crosses_clusters)."""
  totals: dict[tuple[str, bool], float] = {}
  for r in rows:
    key = (r["kind"], r["crosses_clusters"])
    totals[key] = totals.get(key, 0.0) + r["bytes_per_device"]
  return totals
