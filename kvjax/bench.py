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

The model runs in bfloat16 weights by default (what a user runs; `dtype="float32"` as an
option). Each step is also set against this machine's roofline: the bytes a decode step must
read (every weight once, plus each layer's cache as sized to the context) over the read
bandwidth the benchmark measures itself (`kvjax.timing.read_bandwidth`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import resource

import jax
import jax.numpy as jnp

from kvjax import certified as certified_lib
from kvjax import timing
from kvjax.cache import DenseKVCache, QuantizedKVCache
from kvjax.eval import (cache_bytes, calibrations_for, check_out_dir, check_positive_ints,
                        parse_spec, save_plot, with_layers_for, write_results)
from kvjax.models.runner import Runner, prefill

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


DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def weight_bytes(model) -> int:
  """Bytes of every parameter (a tied embedding counted once): what one decode step reads."""
  from flax import nnx
  return int(sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def run(model_name: str = "gemma3-270m", *, contexts=(1024, 4096, 16384, 32768),
        repeats: int = 10, caches=None, out_dir: str = "results/bench",
        calibration: str | None = None, dtype: str = "bfloat16", log=print) -> dict:
  """Times one decode step per cache and context. The int4 cache is built from `calibration`
  (an artifact directory; default the model's own, "auto"), as users get it; other calibrated
  caches run in the config calibration gives them (their tensors' values do not change the
  work)."""
  from kvjax.models import load

  check_out_dir(out_dir)
  if dtype not in DTYPES:
    raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  contexts = check_positive_ints(list(contexts), "--contexts")
  check_positive_ints(repeats, "--repeats", minimum=4)  # quartiles of the pairs
  specs = [parse_spec(s) for s in (caches or ["bf16", "int4"])]
  if any(s.key8_auto for s in specs):
    raise ValueError("kvjax bench needs explicit layers for 8-bit keys (e.g. int4+k8@2,3,4,10); "
                     "'+k8@auto' layers are chosen by kvjax eval, which prints them")
  if specs[0].quant is not None:
    specs.insert(0, parse_spec("bf16"))
  if calibration is not None:
    specs = [dataclasses.replace(s, calibration=str(calibration)) if s.name == "int4" else s
             for s in specs]
  model, tokenizer = load(model_name, dtype=DTYPES[dtype])
  specs = [s.resolve_layers(model.config) for s in specs]
  model = with_layers_for(model, specs)
  cals = calibrations_for(model, [s for s in specs if s.calibration is not None],
                          tokenizer=tokenizer, log=log)
  runner = Runner(model)
  contexts = sorted(contexts)
  text_ids = None
  if any(s.certified is not None for s in specs):
    # A certified cache's ladder depends on what it holds: it is filled by prefilling real text
    # (Pride and Prejudice), not with random codes.
    from kvjax import corpus
    text_ids = tokenizer.encode(corpus.eval_text(), add_bos=model.config.add_bos)
    if len(text_ids) < max(contexts):
      raise ValueError(f"the text holds {len(text_ids)} tokens, fewer than the longest context")
  bw = timing.read_bandwidth()
  wbytes = weight_bytes(model)
  roofline_ms = lambda nbytes: 1e3 * (wbytes + nbytes) / bw["bytes_per_s"]
  log(f"{model_name}: decode step time per token ({dtype} weights, {wbytes / 2**20:.0f} MiB; "
      f"caches allocated for each context + {repeats + 2} tokens), backend "
      f"{jax.default_backend()}, {repeats} interleaved repeats; read bandwidth "
      f"{bw['bytes_per_s'] / 1e9:.1f} GB/s (sum over {bw['nbytes'] / 2**30:.1f} GiB)")
  rows = []
  token = jnp.asarray([[2]], jnp.int32)
  warmup = 2
  for ctx in contexts:
    # Each cache steps warmup + repeats times against the baseline (and the baseline as often
    # per variant): sized so that none overflows.
    max_len = ctx + (warmup + repeats) * max(1, len(specs) - 1) + 2
    state = {}
    for s in specs:
      if s.certified is not None:
        caches = model.init_cache(1, max_len, certified=s.certified)
        _, state[s.name] = prefill(runner, text_ids[:ctx], caches)
        continue
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

    def step(name):
      def go():
        logits, state[name] = runner(token, state[name])
        return logits
      return go

    base_name = specs[0].name
    nb_base = cache_bytes(model, specs[0], ctx, cals.get(base_name))
    for s in specs[1:]:
      before = (certified_lib.stats_summary(state[s.name]) if s.certified is not None else None)
      r = timing.pairwise(step(base_name), step(s.name), repeats=repeats, warmup=warmup)
      nb = cache_bytes(model, s, ctx, cals.get(s.name))  # sized to this context (rings: window)
      rows.append({"model": model_name, "context": ctx, "cache": s.name, "base": base_name,
                   "median_ms": r["variant_ms"], "iqr_ms": r["variant_iqr_ms"],
                   "base_ms": r["base_ms"], "base_iqr_ms": r["base_iqr_ms"],
                   "ratio_vs_bf16": r["ratio"], "ratio_iqr": r["ratio_iqr"], "cache_bytes": nb,
                   "base_bytes": nb_base, "compression_vs_bf16": nb_base / nb,
                   "roofline_ms": roofline_ms(nb), "base_roofline_ms": roofline_ms(nb_base),
                   "vs_roofline": r["variant_ms"] / roofline_ms(nb),
                   "base_vs_roofline": r["base_ms"] / roofline_ms(nb_base)})
      if before is not None:
        rows[-1]["certified"] = _ladder_during(before, certified_lib.stats_summary(state[s.name]),
                                               steps=warmup + repeats, config=s.certified,
                                               head_dim=model.config.head_dim)
        log(f"{ctx:>6} {s.name}: rows per rung while timed {rows[-1]['certified']['rows']}, "
            f"{rows[-1]['certified']['host_bytes_per_step'] / 2**10:.1f} KiB from the host per step")
      log(f"{ctx:>6} {s.name:<8} {r['variant_ms']:9.2f} ms/token against {base_name} "
          f"{r['base_ms']:9.2f}: ratio {r['ratio']:5.2f} (IQR {r['ratio_iqr'][0]:.2f}-"
          f"{r['ratio_iqr'][1]:.2f}); cache {nb / 2**20:8.2f} MiB ({nb_base / nb:.2f}x smaller); "
          f"roofline {roofline_ms(nb):.2f} / {roofline_ms(nb_base):.2f} ms -> "
          f"{rows[-1]['vs_roofline']:.2f}x / {rows[-1]['base_vs_roofline']:.2f}x of it")
    del state
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  doc = {"meta": {"model": model_name, "repeats": repeats, "warmup": warmup, "dtype": dtype,
                  "weight_bytes": wbytes, "read_bandwidth": bw,
                  "peak_process_bytes": peak, "machine": timing.machine(),
                  "method": "each cache against the bf16 one, interleaved pairs "
                            "(kvjax.timing.pairwise): median per-pair ratio and its IQR",
                  "note": "caches filled with random contents"},
         "rows": rows}
  out = pathlib.Path(out_dir)
  write_results(out / "bench.json", doc, log=log)
  save_plot(lambda: _plot(rows, out / "bench.png", model_name), log=log)
  log(f"peak process memory {peak / 2**30:.2f} GiB; wrote {out / 'bench.json'} and {out / 'bench.png'}")
  return doc


def _ladder_during(before: dict, after: dict, *, steps: int, config, head_dim: int) -> dict:
  """What a certified cache's ladder did over `steps` timed decode steps (`stats_summary` before
  and after): rows per rung, their shares, and host-to-device bytes per step (bfloat16 keys and
  values of each exact block moved)."""
  rows = {r: after["rows"][r] - before["rows"][r] for r in after["rows"]}
  total = max(1, sum(rows.values()))
  blocks = after["host_blocks"] - before["host_blocks"]
  return {"rows": rows, "share": {r: n / total for r, n in rows.items()},
          "host_bytes_per_step": blocks * config.block_size * head_dim * 2 * 2 / steps}


def _plot(rows, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name in dict.fromkeys(r["cache"] for r in rows):
    rs = [r for r in rows if r["cache"] == name]
    x = [r["context"] for r in rs]
    err = [[r["ratio_vs_bf16"] - r["ratio_iqr"][0] for r in rs],
           [r["ratio_iqr"][1] - r["ratio_vs_bf16"] for r in rs]]
    axes[0].errorbar(x, [r["ratio_vs_bf16"] for r in rs], yerr=err, marker="o", capsize=3,
                     label=name)
    axes[1].plot(x, [r["cache_bytes"] / 2**20 for r in rs], "o-", label=name)
  base = {r["context"]: r["base_bytes"] for r in rows}
  axes[1].plot(sorted(base), [base[c] / 2**20 for c in sorted(base)], "o-",
               label=rows[0]["base"] if rows else "bf16")
  axes[0].axhline(1.0, color="gray", lw=0.8)
  axes[0].set_ylabel("decode time per token / bf16 (median, IQR)")
  axes[1].set_ylabel("cache MiB")
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached tokens")
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
