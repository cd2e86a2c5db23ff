"""Whole-model prefill time on the CPU: bf16 cache vs int4 cache (CPU chunk path vs exact path).

    python benchmarks/prefill_cpu.py [--model gemma3-270m] [--tokens 4096] [--chunk 512]
                                     [--repeats 2] [--out results/prefill_cpu]

A prompt of random token ids is fed through the model in fixed-size chunks into an
empty cache of each kind: the bf16 dense cache; the default int4 cache, whose
chunks run `impl="dequant"` on the CPU; and the same int4 cache forced to the exact
float32 "xla" path. Runs are interleaved; the best of `repeats` is reported with
its ratio to bf16, printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import eval as ev
from kvjax.models.runner import Runner
from kvjax.models import load


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--chunk", type=int, default=512)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default="results/prefill_cpu")
  a = p.parse_args(argv)
  model, _ = load(a.model)
  runners = {"auto": Runner(model), "xla": Runner(model, attention_impl="xla")}
  ids = np.random.default_rng(0).integers(3, model.config.vocab_size, a.tokens).tolist()
  # name -> (runner, cache factory)
  kinds = {
      "bf16": ("auto", lambda: model.init_cache(1, a.tokens, dtype=jnp.bfloat16)),
      "int4 (CPU chunk path: dequant)": ("auto", lambda: model.init_cache(
          1, a.tokens, quant=kvjax.QuantConfig())),
      "int4 (exact xla path)": ("xla", lambda: model.init_cache(
          1, a.tokens, quant=kvjax.QuantConfig())),
  }
  for name, (impl, make) in kinds.items():  # compile every chunk shape once
    ev.prefill(runners[impl], ids[:a.chunk], make(), chunk=a.chunk)
  times = {name: [] for name in kinds}
  for r in range(a.repeats):
    for name, (impl, make) in kinds.items():
      caches = jax.block_until_ready(make())
      t0 = time.perf_counter()
      logits, caches = ev.prefill(runners[impl], ids, caches, chunk=a.chunk)
      jax.block_until_ready(logits)
      times[name].append(time.perf_counter() - t0)
      print(f"repeat {r + 1}/{a.repeats} {name}: {times[name][-1]:.2f} s", flush=True)
  base = min(times["bf16"])
  rows = [{"model": a.model, "tokens": a.tokens, "chunk": a.chunk, "cache": name,
           "best_s": min(t), "ratio_vs_bf16": min(t) / base} for name, t in times.items()]
  for r in rows:
    print(f"{r['cache']:<32} {r['best_s']:7.2f} s  ratio {r['ratio_vs_bf16']:5.2f}")
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "prefill_cpu.json").write_text(json.dumps(rows, indent=2))
  print(f"saved {out / 'prefill_cpu.json'}")


if __name__ == "__main__":
  main()
