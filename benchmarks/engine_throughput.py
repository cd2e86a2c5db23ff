"""Serving on the CPU: the engine with the calibrated int4 cache against the bf16 cache.

    python benchmarks/engine_throughput.py [--model gemma3-270m] [--requests 32]
        [--context 2048] [--repeats 12] [--budget-mib N] [--out docs/results/engine_throughput]

Two engines over the same model (one with the model's calibrated int4 cache, "auto" artifact;
one with the dense bfloat16 cache) each take `--requests` requests whose prompts are
`--context` tokens of the evaluation book (different offsets), prefilled through the engine's
chunked prefill (timed once each). Then decode steps of the full batch (every request running)
are timed pairwise, bf16 and int4 alternating (kvjax.timing.pairwise): tokens/s of each and
their ratio, median and interquartile range.

Capacity at a fixed memory budget (default: what the bf16 pool for these requests takes): the
bytes of one page of every layer in each format, measured on the engines' own pools, and so
the largest number of `--context` + decoded-token sequences each format holds. This is the
point of int4 in serving: more sequences per byte.

On the CPU each layer's attention gathers the batch's pages into a contiguous view first
(kvjax.paged's reference path); the fused paged kernels are the accelerator path. Writes
JSON, a Markdown table and a plot.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp

import kvjax
from kvjax import corpus
from kvjax.models.engine import Engine, init_pools
from kvjax.timing import machine, pairwise


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--requests", type=int, default=32)
  p.add_argument("--context", type=int, default=2048)
  p.add_argument("--repeats", type=int, default=12)
  p.add_argument("--page-size", type=int, default=32)
  p.add_argument("--prefill-chunk", type=int, default=512)
  p.add_argument("--budget-mib", type=float, default=None)
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  for name in ("requests", "context", "page_size", "prefill_chunk"):
    if getattr(a, name) < 1:
      raise SystemExit(f"--{name.replace('_', '-')} must be positive")
  if a.repeats < 4:
    raise SystemExit("--repeats must be >= 4")
  out = pathlib.Path(a.out or f"docs/results/engine_throughput_{a.model}")

  model, tok = kvjax.models.load(a.model, calibration="auto")
  ids = tok.encode(corpus.eval_text())
  stride = max(1, (len(ids) - a.context) // a.requests)
  prompts = [ids[i * stride:i * stride + a.context] for i in range(a.requests)]
  steps = 2 + 2 * a.repeats + 2
  seq = a.context + steps
  pages_per_seq = -(-seq // a.page_size)
  num_pages = a.requests * pages_per_seq
  kw = dict(num_pages=num_pages, page_size=a.page_size, max_slots=a.requests,
            max_seq_len=pages_per_seq * a.page_size, prefill_chunk=a.prefill_chunk,
            eos_token_ids=())
  engines = {"bf16": Engine(model, calibration=False, cache_dtype=jnp.bfloat16, **kw),
             "int4": Engine(model, **kw)}
  result = dict(machine=machine(), model=a.model, requests=a.requests, context=a.context,
                page_size=a.page_size, weights=str(model.dtype), formats={})
  for name, e in engines.items():
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
      rid = e.add_request(prompt, max_new_tokens=steps)
    e._admit()
    while any(r is not None and r.state == "prefill" for r in e.slots):
      req = min((r for r in e.slots if r is not None and r.state == "prefill"),
                key=lambda r: r.admitted)
      tok_ = e.prefill(req.id)
      if tok_ is not None:
        e.insert(req.id, tok_)
      print(f"\r{name}: prefilled {sum(r.state == 'decode' for r in e.slots if r)}/"
            f"{a.requests}", end="", flush=True)
    prefill_s = time.perf_counter() - t0
    print(f"\r{name}: prefill of {a.requests} x {a.context} tokens {prefill_s:.1f} s "
          "(compilation included)")
    page_bytes = sum(a.nbytes for part in e.pools.values() for pool in part
                     for a in pool.pages.values())
    # Slot state: per sequence (lengths, corrections' state) and fixed (rotations, λ, params).
    slots = [sum(a.nbytes for part in init_pools(model, 1, a.page_size, n, **e._pool_args)
                 .values() for pool in part for a in jax.tree.leaves(pool.slots))
             for n in (1, 2)]
    per_slot = slots[1] - slots[0]
    result["formats"][name] = dict(prefill_s=prefill_s, cache_bytes=e.cache_bytes(),
                                   bytes_per_page=page_bytes // num_pages,
                                   bytes_per_slot=per_slot, fixed_bytes=slots[0] - per_slot)

  timing = pairwise(lambda: engines["bf16"].generate(), lambda: engines["int4"].generate(),
                    repeats=a.repeats)
  result["decode"] = timing
  for name, ms in (("bf16", timing["base_ms"]), ("int4", timing["variant_ms"])):
    result["formats"][name]["decode_step_ms"] = ms
    result["formats"][name]["tokens_per_s"] = a.requests / (ms / 1e3)

  budget = (a.budget_mib * 2**20 if a.budget_mib
            else result["formats"]["bf16"]["cache_bytes"])
  for name, f in result["formats"].items():
    per_seq = f["bytes_per_page"] * pages_per_seq + f["bytes_per_slot"]
    f["sequences_in_budget"] = int(max(0, budget - f["fixed_bytes"]) // per_seq)
  result["budget_bytes"] = budget

  rows = ["| cache | bytes/page (all layers) | decode step (ms, median [IQR]) | tokens/s | "
          f"sequences of {seq} tokens in {budget / 2**20:.0f} MiB |", "|---|---|---|---|---|"]
  for name, iqr in (("bf16", timing["base_iqr_ms"]), ("int4", timing["variant_iqr_ms"])):
    f = result["formats"][name]
    rows.append(f"| {name} | {f['bytes_per_page']:,} | {f['decode_step_ms']:.0f} "
                f"[{iqr[0]:.0f}, {iqr[1]:.0f}] | {f['tokens_per_s']:.1f} | "
                f"{f['sequences_in_budget']} |")
  rows.append(f"\nint4 / bf16 decode step: {timing['ratio']:.2f} "
              f"[{timing['ratio_iqr'][0]:.2f}, {timing['ratio_iqr'][1]:.2f}] "
              f"({a.repeats} pairs); {a.requests} requests x {a.context} tokens, {a.model}, "
              f"{result['weights']} weights; CPU {result['machine']['cpu']}, "
              f"flags {[k for k, v in result['machine']['flags'].items() if v]}")
  table = "\n".join(rows)
  print(table)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(result, indent=1))
  out.with_suffix(".md").write_text(table + "\n")
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    names = list(result["formats"])
    ax[0].bar(names, [result["formats"][n]["tokens_per_s"] for n in names])
    ax[0].set_title(f"decode tokens/s ({a.requests} x {a.context})")
    ax[1].bar(names, [result["formats"][n]["sequences_in_budget"] for n in names])
    ax[1].set_title(f"sequences in {budget / 2**20:.0f} MiB")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
  except Exception as err:  # the table and JSON are the result; the plot is a convenience
    print(f"plot skipped: {err}")


if __name__ == "__main__":
  main()
