"""`python -m kvjax.foe report --out DIR`: collectives of both blocks from compiled HLO, the
latency model at larger scales, and measured step times on simulated CPU devices.

Files written to DIR:
  foe.hlo.txt, baseline.hlo.txt       compiled HLO of the prefill block on the 2x4 mesh
  foe.decode.hlo.txt, baseline.decode.hlo.txt   the int4-cache decode step, same mesh
  collectives.md / collectives.json   every collective with replica groups and bytes
  latency.md / latency.json / latency.png   alpha-beta model at larger scales
  cpu_step_times.md                   wall-clock of the blocks on 8 simulated CPU devices
  report.md                           all of the above tables in one file
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

# Configurations of the report (small enough to compile and run on a CPU in seconds).
MESH_SHAPE = (2, 4)
SMALL = dict(d_model=256, num_q_heads=8, num_kv_heads=2, head_dim=32, num_clusters=2,
             experts_per_cluster=8, top_k=2, d_ff=256, capacity_factor=1.25)
SMALL_PREFILL = dict(batch=8, seq=64)
SMALL_DECODE = dict(batch=8, seq=1, max_len=128)

# An illustrative large layer: 8 KV heads -> 8 clusters of 8 experts, top-1 per cluster; the
# baseline has the same 64 experts with a global top-8. Chosen to match the single-node case
# the paper describes (one cluster per GPU on an 8-GPU node); not the paper's exact model.
LARGE = dict(d_model=4096, num_q_heads=32, num_kv_heads=8, head_dim=128, num_clusters=8,
             experts_per_cluster=8, top_k=1, d_ff=2048, capacity_factor=1.25)
LARGE_PHASES = {"prefill": dict(batch=64, seq=2048), "decode": dict(batch=256, seq=1)}
# (label, devices, nodes): FoE mesh is (8 clusters, devices / 8); cluster-major device order
# puts devices / 8 consecutive devices, i.e. whole clusters, on each 8-GPU node.
SCALES = (("1 node x 8 GPUs", 8), ("4 nodes x 8 GPUs", 32), ("8 nodes x 8 GPUs", 64))


def _abstract(tree, mesh, specs):
  import jax
  from jax.sharding import NamedSharding
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                        sharding=NamedSharding(mesh, s)),
                      tree, specs)


def compile_blocks(num_devices: int, num_clusters: int, cfg_kwargs: dict, batch: int, seq: int,
                   *, dtype_name: str = "float32", cache: str | None = None,
                   max_len: int | None = None, with_aux: bool = False,
                   stage: str = "compiled") -> dict[str, str]:
  """Compiles the FoE and baseline blocks (abstract inputs: nothing is allocated).

  Args:
    cache: None (whole-sequence attention), "dense" or "int4" (a kvjax cache of `max_len`).
    stage: "compiled" for the optimized module, "lowered" for the HLO handed to XLA. The
      CPU compiler widens bf16 collectives to f32, so bf16 byte counts meant for GPUs are
      read from the lowered module.

  Returns:
    {"foe": hlo_text, "baseline": hlo_text}.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import kvjax
  from kvjax import cache as cache_lib
  from kvjax.foe import blocks
  from kvjax.foe.config import FoEConfig
  from kvjax.foe.mesh import CLUSTER_AXIS, EXPERT_AXIS, make_foe_mesh

  dtype = jnp.dtype(dtype_name)
  mesh = make_foe_mesh(num_devices, num_clusters)
  cfg = FoEConfig(**cfg_kwargs)
  base_cfg = cfg.matched_baseline()
  foe_params = jax.eval_shape(lambda: blocks.init_foe_params(jax.random.key(0), cfg, dtype))
  base_params = jax.eval_shape(lambda: blocks.init_moe_params(jax.random.key(0), base_cfg,
                                                              dtype))
  residual = jax.ShapeDtypeStruct((cfg.num_clusters, batch, seq, cfg.d_model), dtype)
  x = jax.ShapeDtypeStruct((batch, seq, cfg.d_model), dtype)
  caches = {"foe": None, "baseline": None}
  if cache is not None:
    quant = kvjax.QuantConfig() if cache == "int4" else None
    for name, heads in (("foe", cfg.num_kv_heads), ("baseline", base_cfg.num_kv_heads)):
      caches[name] = jax.eval_shape(lambda h=heads: kvjax.init_cache(
          batch, h, max_len, cfg.head_dim, quant=quant, dtype=dtype))
  token_axes = (CLUSTER_AXIS, EXPERT_AXIS)
  foe_block = blocks.make_foe_block(cfg, mesh, with_cache=cache is not None, with_aux=with_aux)
  base_block = blocks.make_moe_block(base_cfg, mesh, with_cache=cache is not None,
                                     with_aux=with_aux)
  foe_args = (_abstract(foe_params, mesh, blocks.foe_param_specs()),
              _abstract(residual, mesh, P(CLUSTER_AXIS, EXPERT_AXIS)),
              None if caches["foe"] is None else _abstract(
                  caches["foe"], mesh,
                  cache_lib.partition_specs(caches["foe"], EXPERT_AXIS, CLUSTER_AXIS)))
  base_args = (_abstract(base_params, mesh, blocks.moe_param_specs()),
               _abstract(x, mesh, P(token_axes)),
               None if caches["baseline"] is None else _abstract(
                   caches["baseline"], mesh,
                   cache_lib.partition_specs(caches["baseline"], token_axes, None)))
  lowered = {"foe": foe_block.lower(*foe_args), "baseline": base_block.lower(*base_args)}
  if stage == "lowered":
    return {name: low.as_text(dialect="hlo") for name, low in lowered.items()}
  if stage != "compiled":
    raise ValueError(f"stage must be 'compiled' or 'lowered', got {stage!r}")
  return {name: low.compile().as_text() for name, low in lowered.items()}


def collective_records(hlo_text: str, num_devices: int) -> list[dict]:
  from kvjax.foe import hlo
  return [{"kind": op.kind, "name": op.name, "bytes_per_device": op.bytes_per_device,
           "groups": [list(g) for g in op.groups],
           "shapes": [[dt, list(dims)] for dt, dims in op.shapes]}
          for op in hlo.collectives(hlo_text, num_devices)]


def records_to_ops(records: list[dict]):
  from kvjax.foe.hlo import Collective
  return [Collective(kind=r["kind"], name=r["name"],
                     shapes=tuple((dt, tuple(d)) for dt, d in r["shapes"]),
                     bytes_per_device=r["bytes_per_device"],
                     groups=tuple(tuple(g) for g in r["groups"])) for r in records]


def scale_collectives(num_devices: int) -> dict:
  """Collectives of the LARGE layer on `num_devices` (run in a process with that many).

  Bytes come from the lowered (pre-optimization) module in bf16, because the CPU compiler
  widens bf16 collectives to f32; the compiled module's collectives are checked to have the
  same kinds and replica groups, and are kept under "compiled" for reference.
  """
  result = {}
  for phase, shape in LARGE_PHASES.items():
    args = (num_devices, LARGE["num_clusters"], LARGE, shape["batch"], shape["seq"])
    lowered = compile_blocks(*args, dtype_name="bfloat16", stage="lowered")
    compiled = compile_blocks(*args, dtype_name="bfloat16", stage="compiled")
    result[phase] = {}
    for name in lowered:
      low = collective_records(lowered[name], num_devices)
      comp = collective_records(compiled[name], num_devices)
      signature = lambda recs: sorted((r["kind"], str(r["groups"])) for r in recs)
      if signature(low) != signature(comp):
        raise RuntimeError(f"{name} {phase}: collectives of the lowered and compiled modules "
                           f"differ: {signature(low)} vs {signature(comp)}")
      result[phase][name] = low
      result[phase][name + "_compiled"] = comp
  return result


def _subprocess_env(num_devices: int) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run_scale_subprocess(num_devices: int, out_json: str) -> dict:
  subprocess.run([sys.executable, "-m", "kvjax.foe", "scale-hlo", "--devices",
                  str(num_devices), "--out", out_json], check=True,
                 env=_subprocess_env(num_devices))
  with open(out_json) as f:
    return json.load(f)


def measure_step_times(repeats: int = 30) -> dict[str, float]:
  """Median wall-clock seconds of the prefill block on the 2x4 simulated-CPU mesh."""
  import jax
  import jax.numpy as jnp
  from kvjax.foe import blocks
  from kvjax.foe.config import FoEConfig
  from kvjax.foe.mesh import make_foe_mesh

  mesh = make_foe_mesh(MESH_SHAPE[0] * MESH_SHAPE[1], MESH_SHAPE[0])
  cfg = FoEConfig(**SMALL)
  base_cfg = cfg.matched_baseline()
  b, t = SMALL_PREFILL["batch"], SMALL_PREFILL["seq"]
  keys = jax.random.split(jax.random.key(0), 4)
  residual = jax.random.normal(keys[0], (cfg.num_clusters, b, t, cfg.d_model))
  x = jax.random.normal(keys[1], (b, t, cfg.d_model))
  foe_in = blocks.shard_foe_inputs(mesh, blocks.init_foe_params(keys[2], cfg), residual)[:2]
  base_in = blocks.shard_moe_inputs(mesh, blocks.init_moe_params(keys[3], base_cfg), x)[:2]
  runs = (("foe", blocks.make_foe_block(cfg, mesh, with_aux=False), foe_in),
          ("baseline", blocks.make_moe_block(base_cfg, mesh, with_aux=False), base_in))
  for _, fn, args in runs:
    jax.block_until_ready(fn(*args))
  # Interleaved, so a change in the machine's load hits both blocks alike.
  samples = {name: [] for name, _, _ in runs}
  for _ in range(repeats):
    for name, fn, args in runs:
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      samples[name].append(time.perf_counter() - start)
  times = {}
  for name, values in samples.items():
    times[name] = float(np.median(values))
    times[name + "_p25"], times[name + "_p75"] = (float(v) for v in np.percentile(values, [25, 75]))
  return times


def _latency_rows(scale_data: dict, link) -> list[dict]:
  from kvjax.foe import latency
  rows = []
  for label, devices in SCALES:
    for phase in LARGE_PHASES:
      row = {"scale": label, "devices": devices, "phase": phase}
      for name in ("foe", "baseline"):
        ops = records_to_ops(scale_data[devices][phase][name])
        t = latency.layer_time(ops, link)
        row[name] = t
        row[f"{name}_cross_node_bytes"] = latency.cross_node_bytes(ops, link.gpus_per_node)
      row["speedup"] = (row["baseline"]["total"] / row["foe"]["total"]
                        if row["foe"]["total"] > 0 else float("inf"))
      rows.append(row)
  return rows


def _latency_markdown(rows, link) -> str:
  lines = [
      f"Alpha-beta model (kvjax.foe.latency): {link.gpus_per_node} GPUs/node, intra-node "
      f"{link.intra_bandwidth / 1e9:.0f} GB/s, inter-node {link.inter_bandwidth / 1e9:.0f} GB/s "
      f"per GPU, alpha {link.intra_latency * 1e6:.0f} us / {link.inter_latency * 1e6:.0f} us. "
      "Collectives and bytes come from the HLO of each block at that device count, in bf16 "
      "(read from the module handed to XLA, whose collectives and replica groups are checked "
      "to equal the compiled module's; the CPU compiler widens them to f32). Layer: d_model 4096, 32 q heads, 8 KV heads, 64 experts of d_ff 2048; FoE 8 "
      "clusters x 8 experts top-1 each, baseline global top-8; capacity factor 1.25. "
      f"Global batch: prefill {LARGE_PHASES['prefill']['batch']} sequences x "
      f"{LARGE_PHASES['prefill']['seq']} tokens, decode {LARGE_PHASES['decode']['batch']} "
      "sequences x 1 token. FoE mesh: 8 clusters x (GPUs / 8), cluster-major; baseline: all "
      "GPUs in one expert-parallel group with data-parallel attention. Communication only, "
      "no overlap with compute, no load imbalance (capacity-padded buffers are what moves).",
      "",
      "| scale | phase | FoE all-to-all (us) | FoE all-reduce (us) | FoE total (us) | "
      "baseline all-to-all (us) | baseline all-reduce (us) | baseline total (us) | "
      "baseline / FoE | FoE cross-node MB/GPU | baseline cross-node MB/GPU |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    f, b = r["foe"], r["baseline"]
    lines.append(
        f"| {r['scale']} | {r['phase']} | {f.get('all-to-all', 0) * 1e6:.1f} | "
        f"{f.get('all-reduce', 0) * 1e6:.1f} | {f['total'] * 1e6:.1f} | "
        f"{b.get('all-to-all', 0) * 1e6:.1f} | {b.get('all-reduce', 0) * 1e6:.1f} | "
        f"{b['total'] * 1e6:.1f} | {r['speedup']:.2f}x | "
        f"{r['foe_cross_node_bytes'] / 1e6:.2f} | {r['baseline_cross_node_bytes'] / 1e6:.2f} |")
  return "\n".join(lines) + "\n"


def _plot_latency(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(LARGE_PHASES), figsize=(11, 4))
  for ax, phase in zip(np.atleast_1d(axes), LARGE_PHASES):
    sub = [r for r in rows if r["phase"] == phase]
    pos = np.arange(len(sub))
    ax.bar(pos - 0.2, [r["foe"]["total"] * 1e6 for r in sub], 0.4, label="FoE")
    ax.bar(pos + 0.2, [r["baseline"]["total"] * 1e6 for r in sub], 0.4, label="baseline MoE")
    ax.set_xticks(pos, [r["scale"] for r in sub], fontsize=8)
    ax.set_ylabel("predicted communication per layer (us)")
    ax.set_yscale("log")
    ax.set_title(f"{phase} (alpha-beta model)")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_report(out_dir: str) -> str:
  """Writes every report file to `out_dir`; needs 8 devices in this process."""
  import jax
  from kvjax.foe import hlo
  from kvjax.foe.latency import LinkModel

  os.makedirs(out_dir, exist_ok=True)
  num_devices = MESH_SHAPE[0] * MESH_SHAPE[1]
  if jax.device_count() < num_devices:
    raise RuntimeError(f"the report needs {num_devices} devices, found {jax.device_count()}; "
                       "run it as `python -m kvjax.foe report`, which sets XLA_FLAGS")
  sections = []
  collectives_json = {}
  variants = (
      ("prefill, dense kvjax cache", "", dict(cache="dense", max_len=SMALL_PREFILL["seq"],
                                              **SMALL_PREFILL)),
      ("decode, int4 kvjax cache", ".decode", dict(cache="int4", **SMALL_DECODE)),
      ("training forward with aux losses, no cache", ".train",
       dict(with_aux=True, **SMALL_PREFILL)),
  )
  for title, suffix, kwargs in variants:
    texts = compile_blocks(num_devices, MESH_SHAPE[0], SMALL, **kwargs)
    for name, text in texts.items():
      if suffix != ".train":
        with open(os.path.join(out_dir, f"{name}{suffix}.hlo.txt"), "w") as f:
          f.write(text)
      rows = hlo.table_rows(hlo.collectives(text, num_devices), MESH_SHAPE[1])
      collectives_json[f"{name}{suffix or '.prefill'}"] = rows
      totals = hlo.bytes_by_kind(rows)
      summary = ", ".join(f"{kind} {'cross' if cross else 'intra'}-cluster {b:.0f} B"
                          for (kind, cross), b in sorted(totals.items()))
      sections.append(f"### {'FoE' if name == 'foe' else 'Baseline MoE'} block, {title}, "
                      f"mesh {MESH_SHAPE[0]}x{MESH_SHAPE[1]} (cluster x expert)\n\n"
                      + hlo.markdown_table(rows) + f"\nBytes per device by kind: {summary}\n")
  cfg_line = (f"Block: {SMALL}; prefill batch {SMALL_PREFILL['batch']} x "
              f"{SMALL_PREFILL['seq']} tokens, decode batch {SMALL_DECODE['batch']}, float32. "
              "Device ids are positions in the mesh (cluster-major): id // "
              f"{MESH_SHAPE[1]} is the cluster.\n\n")
  collectives_md = "## Collectives in the compiled HLO\n\n" + cfg_line + "\n".join(sections)
  with open(os.path.join(out_dir, "collectives.md"), "w") as f:
    f.write(collectives_md)
  with open(os.path.join(out_dir, "collectives.json"), "w") as f:
    json.dump(collectives_json, f, indent=1)

  scale_data = {}
  for _, devices in SCALES:
    scale_data[devices] = run_scale_subprocess(devices,
                                               os.path.join(out_dir, f"scale{devices}.json"))
  link = LinkModel()
  rows = _latency_rows(scale_data, link)
  latency_md = "## Latency model\n\n" + _latency_markdown(rows, link)
  with open(os.path.join(out_dir, "latency.md"), "w") as f:
    f.write(latency_md)
  with open(os.path.join(out_dir, "latency.json"), "w") as f:
    json.dump(rows, f, indent=1)
  _plot_latency(rows, os.path.join(out_dir, "latency.png"))

  times = measure_step_times()
  step_md = (
      "## Measured step times (simulation on CPU, not a claim about GPUs)\n\n"
      f"8 host-platform CPU devices simulated on this machine's cores, mesh "
      f"{MESH_SHAPE[0]}x{MESH_SHAPE[1]}, prefill block of {SMALL_PREFILL['batch']} x "
      f"{SMALL_PREFILL['seq']} tokens, float32, 30 interleaved runs after warm-up. The "
      "collectives here are memory copies between threads, so these numbers say nothing "
      "about interconnects.\n\n| block | median step (ms) | 25th-75th percentile (ms) |\n"
      "|---|---:|---:|\n" + "".join(
          f"| {label} | {times[k] * 1e3:.2f} | {times[k + '_p25'] * 1e3:.2f}-"
          f"{times[k + '_p75'] * 1e3:.2f} |\n"
          for label, k in (("FoE", "foe"), ("baseline MoE", "baseline"))))
  with open(os.path.join(out_dir, "cpu_step_times.md"), "w") as f:
    f.write(step_md)
  report = "\n".join(["# Federation of Experts: communication report\n", collectives_md,
                      latency_md, step_md])
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(report)
  return report
