"""`kvjax bench`: whole-model decode time per token against cached context, int4 vs bf16.

For each context length both caches are allocated for that many tokens (plus
the timed steps) and filled with random contents (decode cost does not depend on
the values, and a real 8K-token prefill per cache would dominate the run): the
attention of a decode step reads every slot of a global layer's cache, so a
cache allocated far beyond its contents would time the allocation, not the
context. Then one-token decode steps
run interleaved (bf16, int4, bf16, ...) in one process. Medians, the int4/bf16
ratio, cache bytes and the process's peak memory are printed and saved as JSON
and a PNG plot. Times are this machine's; the ratio is the result. A calibrated
format ("int4", "K8V4") is timed in the config calibration gives it (rotary key
offsets read, both feedback roundings and the sink key written every step).
"""

from __future__ import annotations

import dataclasses
import pathlib
import resource
import statistics
import time

import jax
import jax.numpy as jnp

from kvjax.cache import DenseKVCache, QuantizedKVCache
from kvjax.eval import (cache_bytes, calibrations_for, check_out_dir, check_positive_ints,
                        parse_spec, save_plot, with_layers_for, write_results)
from kvjax.models.runner import Runner

_IS_CACHE = lambda x: isinstance(x, (DenseKVCache, QuantizedKVCache))


def fill_caches(caches, length: int, key):
  """Caches whose every sequence holds `length` random tokens (codes, scales and K/V random)."""
  leaves, treedef = jax.tree_util.tree_flatten(caches, is_leaf=_IS_CACHE)
  out = []
  for i, c in enumerate(leaves):
    k = jax.random.fold_in(key, i)
    upd = {}
    for f in dataclasses.fields(c):
      if f.name in ("k", "v"):
        x = getattr(c, f.name)
        upd[f.name] = jax.random.normal(jax.random.fold_in(k, hash(f.name) % 997), x.shape).astype(x.dtype)
      elif f.name in ("k_codes", "v_codes"):
        x = getattr(c, f.name)
        upd[f.name] = jax.random.randint(jax.random.fold_in(k, hash(f.name) % 997), x.shape, 0,
                                         255 if x.dtype == jnp.uint8 else 127).astype(x.dtype)
      elif f.name in ("k_scales", "v_scales"):
        x = getattr(c, f.name)
        upd[f.name] = jax.random.uniform(jax.random.fold_in(k, 7), x.shape, minval=0.01,
                                         maxval=0.1).astype(x.dtype)
    upd["lengths"] = jnp.full_like(c.lengths, length)
    out.append(dataclasses.replace(c, **upd))
  return jax.tree_util.tree_unflatten(treedef, out)


def run(model_name: str = "gemma3-270m", *, contexts=(256, 1024, 4096, 8192), repeats: int = 10,
        caches=None, out_dir: str = "results/bench", calibration: str | None = None,
        log=print) -> dict:
  """Times one decode step per cache and context. The int4 cache is built from `calibration`
  (an artifact directory; default the model's own, "auto"), as users get it; other calibrated
  caches run in the config calibration gives them (their tensors' values do not change the
  work)."""
  from kvjax.models import load

  check_out_dir(out_dir)
  contexts = check_positive_ints(list(contexts), "--contexts")
  check_positive_ints(repeats, "--repeats")
  specs = [parse_spec(s) for s in (caches or ["bf16", "int4"])]
  if any(s.key8_auto for s in specs):
    raise ValueError("kvjax bench needs explicit layers for 8-bit keys (e.g. int4+k8@2,3,4,10); "
                     "'+k8@auto' layers are chosen by kvjax eval, which prints them")
  if specs[0].quant is not None:
    specs.insert(0, parse_spec("bf16"))
  if calibration is not None:
    specs = [dataclasses.replace(s, calibration=str(calibration)) if s.name == "int4" else s
             for s in specs]
  model, tokenizer = load(model_name)
  specs = [s.resolve_layers(model.config) for s in specs]
  model = with_layers_for(model, specs)
  cals = calibrations_for(model, [s for s in specs if s.calibration is not None],
                          tokenizer=tokenizer, log=log)
  runner = Runner(model)
  contexts = sorted(contexts)
  log(f"{model_name}: decode step time per token (caches allocated for each context + "
      f"{repeats + 2} tokens), backend {jax.default_backend()}, {repeats} interleaved repeats")
  rows = []
  token = jnp.asarray([[2]], jnp.int32)
  for ctx in contexts:
    max_len = ctx + repeats + 2
    state = {}
    for s in specs:
      if s.quant is None:
        base = model.init_cache(1, max_len, dtype=jnp.bfloat16)
      elif s.name in cals:
        base = model.init_cache(1, max_len, calibration=cals[s.name])
      else:
        # A calibrated format is timed in the config calibration gives it; its parameters'
        # values do not change the work.
        quant, layer_quant = s.formats(model.config.head_dim)
        base = model.init_cache(1, max_len, quant=quant, layer_quant=layer_quant)
      state[s.name] = fill_caches(base, ctx, jax.random.key(ctx))
      _, state[s.name] = runner(token, state[s.name])  # compile + warm up
      jax.block_until_ready(state[s.name])
    times = {s.name: [] for s in specs}
    for _ in range(repeats):
      for s in specs:
        t0 = time.perf_counter()
        logits, state[s.name] = runner(token, state[s.name])
        logits.block_until_ready()
        times[s.name].append(time.perf_counter() - t0)
    base_t = statistics.median(times[specs[0].name])
    for s in specs:
      med = statistics.median(times[s.name])
      nb = cache_bytes(model, s, ctx, cals.get(s.name))  # sized to this context (rings: window)
      row = {"model": model_name, "context": ctx, "cache": s.name, "median_ms": 1e3 * med,
             "ratio_vs_bf16": med / base_t, "cache_bytes": nb,
             "compression_vs_bf16": None}
      rows.append(row)
    bf = next(r for r in rows if r["context"] == ctx and r["cache"] == specs[0].name)
    for r in rows:
      if r["context"] == ctx:
        r["compression_vs_bf16"] = bf["cache_bytes"] / r["cache_bytes"]
        log(f"{ctx:>6} {r['cache']:<8} {r['median_ms']:9.2f} ms/token  ratio "
            f"{r['ratio_vs_bf16']:5.2f}  cache {r['cache_bytes'] / 2**20:8.2f} MiB "
            f"({r['compression_vs_bf16']:.2f}x smaller)")
    del state
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  doc = {"meta": {"model": model_name, "repeats": repeats, "max_len": "context + repeats + 2",
                  "peak_process_bytes": peak, "backend": jax.default_backend(),
                  "note": "caches filled with random contents; medians of interleaved runs"},
         "rows": rows}
  out = pathlib.Path(out_dir)
  write_results(out / "bench.json", doc, log=log)
  save_plot(lambda: _plot(rows, out / "bench.png", model_name), log=log)
  log(f"peak process memory {peak / 2**30:.2f} GiB; wrote {out / 'bench.json'} and {out / 'bench.png'}")
  return doc


def _plot(rows, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name in dict.fromkeys(r["cache"] for r in rows):
    rs = [r for r in rows if r["cache"] == name]
    axes[0].plot([r["context"] for r in rs], [r["median_ms"] for r in rs], "o-", label=name)
    axes[1].plot([r["context"] for r in rs], [r["cache_bytes"] / 2**20 for r in rs], "o-", label=name)
  axes[0].set_ylabel("decode ms / token (CPU)")
  axes[1].set_ylabel("cache MiB")
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached tokens")
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
