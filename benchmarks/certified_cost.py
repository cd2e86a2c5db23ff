"""CPU cost of certified attention for one layer's decode step, against the plain int4 cache
and the bf16 cache, pairwise (`kvjax.timing`).

    python benchmarks/certified_cost.py [--contexts 1024 4096 8192] [--repeats 30]
        [--out results/certified_cost]

Qwen2.5-0.5B's attention shape (2 KV heads x 7 query heads, d=64), batch 1, random keys and
values. Variants, each timed against bf16 (A B A B ...): the plain int4 cache (default CPU
decode path), the certified cache's first rung alone (tolerance off: the cost when the ladder
stays on rung 0, the compressed tier read and the certificate computed) and the certified cache
with tol=0.01 (random values are the worst case: rows climb the ladder). Also prints device
bytes read per step (the compressed tier and its metadata) against bf16.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp

import kvjax
from kvjax import certified
from kvjax.timing import machine, pairwise

H, R, D = 2, 7, 64


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
  p.add_argument("--repeats", type=int, default=30)
  p.add_argument("--out", default="results/certified_cost")
  a = p.parse_args(argv)
  if a.repeats < 4 or any(c < 16 for c in a.contexts):
    p.error("--repeats must be >= 4 and every context >= 16")
  rows = []
  for n in a.contexts:
    key = jax.random.key(n)
    k = jax.random.normal(jax.random.fold_in(key, 1), (1, n, H, D))
    v = jax.random.normal(jax.random.fold_in(key, 2), (1, n, H, D))
    q = jax.random.normal(jax.random.fold_in(key, 3), (1, 1, H * R, D))
    k1, v1 = k[:, :1], v[:, :1]
    bf16 = kvjax.append(kvjax.init_cache(1, H, n + 1, D, dtype=jnp.bfloat16), k, v)
    int4 = kvjax.append(kvjax.init_cache(1, H, n + 1, D, quant=kvjax.QuantConfig()), k, v)
    plain = jax.jit(lambda c, q, k, v: kvjax.append_and_attend(c, q, k, v)[0])
    variants = {"int4 (plain)": (plain, int4)}
    for label, cfg in (("certified rung 0", certified.CertifiedConfig(tol=1e9, atol=1e30)),
                       ("certified tol=0.01", certified.CertifiedConfig(tol=0.01))):
      c = certified.write(certified.init_cache(1, H, n + 1, D, config=cfg), k, v)
      variants[label] = (jax.jit(lambda c, q, k, v: certified.append_and_attend(c, q, k, v)[0]), c)
    base = lambda: plain(bf16, q, k1, v1)
    dense_bytes = 2 * n * H * D * 2
    for label, (fn, cache) in variants.items():
      r = pairwise(base, lambda fn=fn, cache=cache: fn(cache, q, k1, v1), repeats=a.repeats,
                   warmup=2)
      tier = cache.tier if isinstance(cache, certified.CertifiedKVCache) else cache
      nbytes = kvjax.cache.nbytes(tier)
      if isinstance(cache, certified.CertifiedKVCache):
        nbytes += sum(getattr(cache, f).nbytes for f in certified.cache.META_FIELDS)
      row = {"context": n, "variant": label, "ratio_vs_bf16": r["ratio"],
             "ratio_iqr": r["ratio_iqr"], "variant_ms": r["variant_ms"], "bf16_ms": r["base_ms"],
             "device_bytes": int(nbytes), "bf16_bytes": dense_bytes}
      rows.append(row)
      print(f"{n:>6} {label:<20} {r['variant_ms']:8.2f} ms vs bf16 {r['base_ms']:7.2f} ms: "
            f"ratio {r['ratio']:.2f} (IQR {r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f}); "
            f"device bytes {nbytes / dense_bytes:.2f}x bf16", flush=True)
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "certified_cost.json").write_text(json.dumps({"machine": machine(), "rows": rows},
                                                      indent=2))
  print(f"wrote {out / 'certified_cost.json'}")


if __name__ == "__main__":
  main()
