"""CPU decode-attention time, int4 cache vs bf16 dense cache, as ratios in one process.

    python benchmarks/decode_attention_cpu.py [--contexts 1024 4096 16384] [--out results/attention_cpu]

For each context length: one decode step (one query token per sequence) over a
full cache, jitted (bf16: native bf16 products with float32 accumulation; int4:
the default CPU path "int8dot", and the float32 "xla" path for reference), timed interleaved (bf16, int4, bf16, int4, ...) so both see
the same machine state; medians and the int4/bf16 ratio are printed and saved
as JSON. Absolute times depend on the machine; the ratio is the result.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

import kvjax


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
    caches = {"bf16": _filled_cache(batch, kv_heads, n, head_dim, None, key)}
    fns = {"bf16": jax.jit(lambda q, c: kvjax.attend(q, c))}
    for name, (cfg, impl) in impls.items():
      caches[name] = _filled_cache(batch, kv_heads, n, head_dim, cfg, key)
      fns[name] = jax.jit(lambda q, c, impl=impl: kvjax.attend(q, c, impl=impl))
    for name, c in caches.items():
      fns[name](q, c).block_until_ready()  # compile
    times = {name: [] for name in caches}
    for _ in range(repeats):
      for name, c in caches.items():
        t0 = time.perf_counter()
        fns[name](q, c).block_until_ready()
        times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["bf16"])
    for name in caches:
      med = statistics.median(times[name])
      row = {"context": n, "cache": name, "median_ms": 1e3 * med, "ratio_vs_bf16": med / base,
             "cache_bytes": kvjax.nbytes(caches[name])}
      rows.append(row)
      print(f"{n:>7} {name:>14} {1e3 * med:10.2f} ms  ratio {med / base:5.2f}  "
            f"bytes {row['cache_bytes'] / 2**20:8.1f} MiB", flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=4)
  p.add_argument("--rep", type=int, default=4, help="query heads per KV head")
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--out", default="results/attention_cpu")
  a = p.parse_args(argv)
  # name -> (cache config, attend impl). "auto" on the CPU is the int8-dot fast path.
  impls = {"int4-g32": (kvjax.QuantConfig(group_size=32), "auto"),
           "int4-g128": (kvjax.QuantConfig(group_size=128), "auto"),
           "K8V4-g32": (kvjax.QuantConfig(key_bits=8, group_size=32), "auto"),
           "int4-g32-xla": (kvjax.QuantConfig(group_size=32), "xla")}
  print(f"backend={jax.default_backend()} B={a.batch} kv_heads={a.kv_heads} rep={a.rep} "
        f"head_dim={a.head_dim}")
  rows = run(a.contexts, batch=a.batch, kv_heads=a.kv_heads, rep=a.rep, head_dim=a.head_dim,
             repeats=a.repeats, impls=impls)
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "decode_attention_cpu.json").write_text(json.dumps(rows, indent=2))
  print(f"saved {out / 'decode_attention_cpu.json'}")


if __name__ == "__main__":
  main()
