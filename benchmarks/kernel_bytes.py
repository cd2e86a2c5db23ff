"""HBM bytes per decode step and layer: fused int4 / K8V4 kernels vs a bf16 dense kernel.

Counts come from the kernels themselves, not from a formula of the format:

* TPU (Mosaic) kernel: the `pallas_call` is intercepted, and every BlockSpec's
  real index map is evaluated (vectorized) at every grid point with the real
  scalar-prefetched slot ranges. Pallas' pipeline copies a block from HBM only
  when its block index differs from the previous grid point's, which is exactly
  what is counted; outputs likewise.
* GPU (Triton) kernel: the grid blocks are whole-sequence pointers and loads
  happen inside the kernel loop, so the count replays that loop: for every
  (batch, head, split) program, the blocks [first, end) its loop visits, each
  loading the code segments and scale columns the kernel loads, plus its query
  tile and its partial outputs.
* Both add the jnp step after the kernel: the split-K combine (read the
  partials, write the output). The queries need no step before: the kernels
  read the caller's q~ buffer through a free reshape and apply the logit scale
  themselves.
* bf16 dense baseline: the same flash-decoding blocking over bf16 K and V
  [block_s, D] blocks (the kernel one would write for a bf16 cache), same q,
  partials and combine traffic.

Roofline time = bytes / HBM bandwidth (TPU v5e 819 GB/s, H100 SXM 3.35 TB/s):
a lower bound that ignores launch latency, which dominates at short contexts.

Measured CPU ratio: the same layer shapes and contexts, one decode step on this
machine's CPU (`kvjax.attend`, the default CPU path for the quantized formats:
the C++ kernel of kvjax.native where it builds; the bf16 dense cache as the baseline), timed interleaved in one process
by benchmarks/decode_attention_cpu.py's `run`; median time / bf16 median time.

Usage: python benchmarks/kernel_bytes.py [--out results/kernel_bytes] [--no-cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kvjax.pallas_kernels import _common, decode_attention_gpu, decode_attention_tpu, tuning

BANDWIDTH = {"tpu_v5e": 819e9, "h100": 3.35e12}
CONTEXTS = (1024, 4096, 16384, 65536)


@dataclasses.dataclass(frozen=True)
class LayerShape:
  name: str
  q_heads: int
  kv_heads: int
  head_dim: int


SHAPES = (
    LayerShape("gemma3-1b-like", q_heads=4, kv_heads=1, head_dim=256),
    LayerShape("llama-8b-like", q_heads=32, kv_heads=8, head_dim=128),
)


@dataclasses.dataclass(frozen=True)
class Format:
  name: str
  key_bits: int | None  # None: bf16 dense
  value_bits: int | None
  group_size: int | None


FORMATS = (
    Format("bf16", None, None, None),
    Format("int4-g32", 4, 4, 32),
    Format("int4-g64", 4, 4, 64),
    Format("int4-g128", 4, 4, 128),
    Format("K8V4-g32", 8, 4, 32),
)


def _block_bytes(spec, dtype):
  shape = [1 if dim is None else dim for dim in spec.block_shape]
  return math.prod(shape) * jnp.dtype(dtype).itemsize


def _capture_pallas_call(fn, *args, **kwargs):
  """Runs a kernel wrapper with pallas_call replaced by a recorder; returns what it saw."""
  seen = {}

  def recording_pallas_call(kernel, **call_kwargs):
    def call(*call_args):
      seen.update(call_kwargs, kernel=kernel, args=call_args)
      outs = call_kwargs["out_shape"]
      return [jnp.zeros(o.shape, o.dtype) for o in outs]
    return call

  with mock.patch.object(pl, "pallas_call", recording_pallas_call):
    fn(*args, **kwargs)
  return seen


def _pipeline_copies(grid, index_map, prefetch):
  """Number of HBM copies of one operand: grid points whose block index changed."""
  points = np.indices(grid).reshape(len(grid), -1)  # row-major, last axis fastest
  mapped = jax.vmap(lambda *ids: jnp.stack(
      [jnp.asarray(i) for i in index_map(*ids, *prefetch)]))(*[jnp.asarray(p) for p in points])
  mapped = np.asarray(mapped)
  changed = np.ones(mapped.shape[0], bool)
  changed[1:] = np.any(mapped[1:] != mapped[:-1], axis=1)
  return int(changed.sum())


def _combine_bytes(batch, q_heads, head_dim, partial_shapes):
  """The split-K combine reads every partial and writes the [B, Hq, D] float32 output."""
  partial_bytes = sum(math.prod(s) * 4 for s in partial_shapes)
  return partial_bytes + batch * q_heads * head_dim * 4


def _cache_inputs(batch, kv_heads, context, head_dim, fmt):
  def codes(bits):
    width = head_dim // 2 if bits == 4 else head_dim
    return jnp.zeros((batch, kv_heads, context, width), jnp.uint8 if bits == 4 else jnp.int8)
  scales = jnp.zeros((batch, kv_heads, context, head_dim // fmt.group_size), jnp.bfloat16)
  return codes(fmt.key_bits), scales, codes(fmt.value_bits), scales


def tpu_quantized_bytes(shape, fmt, context, batch=1):
  """Bytes of one decode step through the Mosaic kernel, by category."""
  q = jnp.zeros((batch, shape.q_heads, shape.head_dim), jnp.float32)
  k_codes, k_scales, v_codes, v_scales = _cache_inputs(batch, shape.kv_heads, context,
                                                       shape.head_dim, fmt)
  lengths = jnp.full((batch,), context, jnp.int32)
  seen = _capture_pallas_call(decode_attention_tpu, q, k_codes, k_scales, v_codes, v_scales,
                              lengths, key_bits=fmt.key_bits, value_bits=fmt.value_bits,
                              group_size=fmt.group_size, interpret=True)
  grid_spec = seen["grid_spec"]
  num_prefetch = grid_spec.num_scalar_prefetch
  prefetch = seen["args"][:num_prefetch]
  operands = seen["args"][num_prefetch:]
  grid = grid_spec.grid
  by_category = {"codes": 0, "scales": 0, "q": 0, "constants": 0, "partials_out": 0}
  num_constants = len(operands) - 4 - (2 if fmt.key_bits == 4 else 1)
  for i, (spec, operand) in enumerate(zip(grid_spec.in_specs, operands)):
    nbytes = _pipeline_copies(grid, spec.index_map, prefetch) * _block_bytes(spec, operand.dtype)
    if i < num_constants:
      by_category["constants"] += nbytes
    elif i < len(operands) - 4:
      by_category["q"] += nbytes
    elif operand.dtype in (jnp.uint8, jnp.int8):
      by_category["codes"] += nbytes
    else:
      by_category["scales"] += nbytes
  for spec, out in zip(grid_spec.out_specs, seen["out_shape"]):
    by_category["partials_out"] += (_pipeline_copies(grid, spec.index_map, prefetch) *
                                    _block_bytes(spec, out.dtype))
  by_category["combine"] = _combine_bytes(batch, shape.q_heads, shape.head_dim,
                                         [o.shape for o in seen["out_shape"]])
  return by_category


def gpu_quantized_bytes(shape, fmt, context, batch=1):
  """Bytes of one decode step through the Triton kernel, replaying its loop bounds."""
  q = jnp.zeros((batch, shape.q_heads, shape.head_dim), jnp.float32)
  k_codes, k_scales, v_codes, v_scales = _cache_inputs(batch, shape.kv_heads, context,
                                                       shape.head_dim, fmt)
  lengths = jnp.full((batch,), context, jnp.int32)
  seen = _capture_pallas_call(decode_attention_gpu, q, k_codes, k_scales, v_codes, v_scales,
                              lengths, key_bits=fmt.key_bits, value_bits=fmt.value_bits,
                              group_size=fmt.group_size, interpret=True)
  kernel = seen["kernel"]
  assert isinstance(kernel, functools.partial)
  params = kernel.keywords
  block_s, split_slots = params["block_s"], params["split_slots"]
  b, h, num_splits = seen["grid"]
  q_arr, kc, ks, vc, vs, lengths_arr, lo, hi, _, _ = seen["args"]
  n_rep = q_arr.shape[2]
  # Each byte tile is loaded once per block; each scale column once per block.
  code_bytes_per_slot = (sum(w for _, w, _ in params["key_tiles"]) * kc.dtype.itemsize +
                         sum(w for _, w, _ in params["value_tiles"]) * vc.dtype.itemsize)
  key_groups = {grp for _, _, nib in params["key_tiles"] for _, grp, _ in nib}
  value_groups = {grp for _, _, nib in params["value_tiles"] for _, grp, _ in nib}
  scale_bytes_per_slot = len(key_groups) * ks.dtype.itemsize + len(value_groups) * vs.dtype.itemsize
  blocks = 0
  lo, hi = np.asarray(lo), np.asarray(hi)
  for bi in range(b):
    for split in range(num_splits):
      slot_lo = max(int(lo[bi]), split * split_slots)
      slot_hi = min(int(hi[bi]), (split + 1) * split_slots)
      if slot_hi > slot_lo:
        blocks += -(-slot_hi // block_s) - slot_lo // block_s
  blocks *= h
  programs = b * h * num_splits
  by_category = {
      "codes": blocks * block_s * code_bytes_per_slot,
      "scales": blocks * block_s * scale_bytes_per_slot,
      "q": programs * n_rep * shape.head_dim * 4,
      "constants": 0,
      "partials_out": programs * n_rep * (shape.head_dim + 2) * 4,
  }
  by_category["combine"] = _combine_bytes(batch, shape.q_heads, shape.head_dim,
                                         [o.shape for o in seen["out_shape"]])
  return by_category


def dense_bf16_bytes(shape, context, target, batch=1):
  """A bf16 flash-decoding kernel with the same blocking (block_s, splits) as ours."""
  d, h, n_rep = shape.head_dim, shape.kv_heads, shape.q_heads // shape.kv_heads
  block_s = tuning.decode_block_s(target, d)
  num_blocks = -(-context // block_s)
  num_splits = tuning.default_num_splits(target, batch, h, num_blocks, block_s)
  programs = batch * h * num_splits
  partial_shapes = [(batch, h, num_splits, n_rep, d), (batch, h, num_splits, n_rep),
                    (batch, h, num_splits, n_rep)]
  return {
      "codes": batch * h * num_blocks * block_s * d * 2 * 2,  # K and V, bf16
      "scales": 0,
      "q": programs * n_rep * d * 4,
      "constants": 0,
      "partials_out": programs * n_rep * (d + 2) * 4,
      "combine": _combine_bytes(batch, shape.q_heads, d, partial_shapes),
  }


def measure():
  rows = []
  for shape in SHAPES:
    for context in CONTEXTS:
      for fmt in FORMATS:
        row = {"shape": dataclasses.asdict(shape), "context": context, "format": fmt.name}
        for target, bandwidth_key in (("tpu", "tpu_v5e"), ("gpu", "h100")):
          if fmt.key_bits is None:
            parts = dense_bf16_bytes(shape, context, target)
          elif target == "tpu":
            parts = tpu_quantized_bytes(shape, fmt, context)
          else:
            parts = gpu_quantized_bytes(shape, fmt, context)
          total = sum(parts.values())
          row[target] = {"bytes": total, "by_category": parts,
                         "roofline_us": total / BANDWIDTH[bandwidth_key] * 1e6}
        rows.append(row)
  for row in rows:  # ratio against the bf16 row of the same shape and context
    dense = next(r for r in rows if r["shape"] == row["shape"] and r["context"] == row["context"]
                 and r["format"] == "bf16")
    for target in ("tpu", "gpu"):
      row[target]["ratio_vs_bf16"] = row[target]["bytes"] / dense[target]["bytes"]
  return rows


def add_cpu_ratios(rows, *, batch, repeats):
  """Adds row["cpu"] = {"median_ms", "ratio_vs_bf16"} measured on this machine's CPU."""
  import kvjax
  from decode_attention_cpu import run
  for shape in SHAPES:
    impls = {f.name: (kvjax.QuantConfig(key_bits=f.key_bits, value_bits=f.value_bits,
                                        group_size=f.group_size), "auto")
             for f in FORMATS if f.key_bits is not None}
    for context in CONTEXTS:
      print(f"CPU timing {shape.name} at {context} tokens ...", flush=True)
      measured = run([context], batch=batch, kv_heads=shape.kv_heads,
                     rep=shape.q_heads // shape.kv_heads, head_dim=shape.head_dim,
                     repeats=repeats, impls=impls)
      for m in measured:
        row = next(r for r in rows if r["shape"]["name"] == shape.name
                   and r["context"] == context and r["format"] == m["cache"])
        row["cpu"] = {"batch": batch, "median_ms": m["median_ms"],
                      "ratio_vs_bf16": m["ratio_vs_bf16"]}


def print_table(rows):
  header = (f"{'layer':<16} {'context':>7} {'format':<10} {'TPU MB':>9} {'x bf16':>7} "
            f"{'v5e us':>8} {'GPU MB':>9} {'x bf16':>7} {'H100 us':>8} {'CPU x bf16':>10}")
  print(header)
  print("-" * len(header))
  for r in rows:
    t, g = r["tpu"], r["gpu"]
    print(f"{r['shape']['name']:<16} {r['context']:>7} {r['format']:<10} "
          f"{t['bytes'] / 1e6:>9.3f} {t['ratio_vs_bf16']:>7.3f} {t['roofline_us']:>8.2f} "
          f"{g['bytes'] / 1e6:>9.3f} {g['ratio_vs_bf16']:>7.3f} {g['roofline_us']:>8.2f} "
          f"{r['cpu']['ratio_vs_bf16'] if 'cpu' in r else float('nan'):>10.2f}")


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(SHAPES), figsize=(6 * len(SHAPES), 4.5), squeeze=False)
  for ax, shape in zip(axes[0], SHAPES):
    for fmt in FORMATS:
      sel = [r for r in rows if r["shape"]["name"] == shape.name and r["format"] == fmt.name]
      ax.plot([r["context"] for r in sel], [r["tpu"]["roofline_us"] for r in sel], marker="o",
              label=f"{fmt.name} v5e")
      ax.plot([r["context"] for r in sel], [r["gpu"]["roofline_us"] for r in sel], marker="x",
              linestyle="--", label=f"{fmt.name} H100")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("roofline time per layer per decode step (us)")
    ax.set_title(f"{shape.name}: {shape.q_heads} q / {shape.kv_heads} kv heads, "
                 f"D={shape.head_dim}")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/kernel_bytes", help="output directory")
  parser.add_argument("--no-cpu", action="store_true", help="skip the measured CPU ratio")
  parser.add_argument("--cpu-batch", type=int, default=4, help="sequences per CPU decode step")
  parser.add_argument("--cpu-repeats", type=int, default=9)
  args = parser.parse_args(argv)
  rows = measure()
  if not args.no_cpu:
    add_cpu_ratios(rows, batch=args.cpu_batch, repeats=args.cpu_repeats)
  print_table(rows)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "kernel_bytes.json"), "w") as f:
    json.dump({"bandwidth_bytes_per_s": BANDWIDTH, "batch": 1, "rows": rows}, f, indent=1)
  plot(rows, os.path.join(args.out, "kernel_bytes.png"))
  worst = max(r["tpu"]["ratio_vs_bf16"] for r in rows if r["format"].startswith("int4"))
  worst_gpu = max(r["gpu"]["ratio_vs_bf16"] for r in rows if r["format"].startswith("int4"))
  print(f"\nworst int4 / bf16 byte ratio: TPU kernel {worst:.3f}, GPU kernel {worst_gpu:.3f} "
        f"(target <= 0.3)")
  cpu = [r for r in rows if "cpu" in r and r["format"] == "int4-g32" and r["context"] == 4096]
  for r in cpu:
    print(f"CPU int4-g32 / bf16 time at 4K, {r['shape']['name']}: {r['cpu']['ratio_vs_bf16']:.2f} "
          f"(target <= 1.0)")
  print(f"saved {args.out}/kernel_bytes.json and kernel_bytes.png")


if __name__ == "__main__":
  main()
