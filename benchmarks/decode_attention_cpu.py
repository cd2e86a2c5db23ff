"""CPU decode-attention time, each quantized cache against the bf16 dense cache, pairwise.

    python benchmarks/decode_attention_cpu.py [--contexts 1024 4096 16384] [--repeats 30]
        [--out results/attention_cpu]
    taskset -c 0 python benchmarks/decode_attention_cpu.py ...      # one core

For each context length: one decode step (one query token per sequence) over a full cache,
jitted (bf16: native bf16 products with float32 accumulation; int4 / K8V4: the default CPU
path, the C++ kernel of kvjax.native, and the XLA "int8dot" path it replaced). Each variant is
timed against bf16 alone, interleaved A B A B (`kvjax.timing`): the median per-pair ratio with its interquartile
range, each side's median and IQR, and the machine (CPU flags, cores) are printed and saved as
JSON and a plot. Absolute times depend on the machine; the ratio is the result.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp

import kvjax
from kvjax.timing import machine, pairwise


def _filled_cache(b, h, n, d, quant, key):
  c = kvjax.init_cache(b, h, n, d, quant=quant, dtype=jnp.bfloat16)
  k1, k2 = jax.random.split(key)
  k = jax.random.normal(k1, (b, n, h, d), jnp.float32)
  v = jax.random.normal(k2, (b, n, h, d), jnp.float32)
  return jax.jit(kvjax.append)(c, k, v)


def run(contexts, *, batch, kv_heads, rep, head_dim, repeats, impls):
  rows = []
  for n in contexts:
    key = jax.random.key(n)
    q = jax.random.normal(key, (batch, 1, kv_heads * rep, head_dim), jnp.bfloat16)
    base_cache = _filled_cache(batch, kv_heads, n, head_dim, None, key)
    base_fn = jax.jit(lambda q, c: kvjax.attend(q, c))
    for name, (cfg, impl) in impls.items():
      cache = _filled_cache(batch, kv_heads, n, head_dim, cfg, key)
      fn = jax.jit(lambda q, c, impl=impl: kvjax.attend(q, c, impl=impl))
      r = pairwise(lambda: base_fn(q, base_cache), lambda: fn(q, cache), repeats=repeats)
      row = {"context": n, "cache": name, "impl": impl, **r,
             "cache_bytes": kvjax.nbytes(cache), "bf16_bytes": kvjax.nbytes(base_cache)}
      rows.append(row)
      print(f"{n:>7} {name:>14}  bf16 {r['base_ms']:8.2f} ms  {name} {r['variant_ms']:8.2f} ms  "
            f"ratio {r['ratio']:5.2f} (IQR {r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f})  "
            f"bytes {row['cache_bytes'] / row['bf16_bytes']:.3f} of bf16", flush=True)
      del cache
  return rows


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name in dict.fromkeys(r["cache"] for r in rows):
    mine = [r for r in rows if r["cache"] == name]
    x = [r["context"] for r in mine]
    y = [r["ratio"] for r in mine]
    err = [[r["ratio"] - r["ratio_iqr"][0] for r in mine], [r["ratio_iqr"][1] - r["ratio"] for r in mine]]
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context (tokens)")
  ax.set_ylabel("decode attention time / bf16 (median, IQR)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=4)
  p.add_argument("--rep", type=int, default=4, help="query heads per KV head")
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--repeats", type=int, default=30, help="pairs per variant (>= 4)")
  p.add_argument("--out", default="results/attention_cpu")
  a = p.parse_args(argv)
  # name -> (cache config, attend impl). "auto" on the CPU is the C++ kernel (kvjax.native)
  # where it builds; "int8dot" is the XLA path it replaced (and the fallback).
  impls = {"int4-g32": (kvjax.QuantConfig(group_size=32), "auto"),
           "int4-g128": (kvjax.QuantConfig(group_size=128), "auto"),
           "K8V4-g32": (kvjax.QuantConfig(key_bits=8, group_size=32), "auto"),
           "int4-g32-int8dot": (kvjax.QuantConfig(group_size=32), "int8dot")}
  from kvjax import native
  print(f"kvjax.native available: {native.available()} {native.unavailable_reason() or ''}")
  print(f"backend={jax.default_backend()} B={a.batch} kv_heads={a.kv_heads} rep={a.rep} "
        f"head_dim={a.head_dim}; {machine()}")
  rows = run(a.contexts, batch=a.batch, kv_heads=a.kv_heads, rep=a.rep, head_dim=a.head_dim,
             repeats=a.repeats, impls=impls)
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  doc = {"machine": machine(), "shape": {"batch": a.batch, "kv_heads": a.kv_heads, "rep": a.rep,
                                         "head_dim": a.head_dim},
         "method": "pairwise against bf16, interleaved (kvjax.timing.pairwise)", "rows": rows}
  (out / "decode_attention_cpu.json").write_text(json.dumps(doc, indent=2))
  plot(rows, out / "decode_attention_cpu.png")
  print(f"saved {out / 'decode_attention_cpu.json'} and .png")


if __name__ == "__main__":
  main()
