"""Pairwise timing on the CPU: each variant against the baseline, interleaved, with its spread.

Timing five programs round-robin slows some of them (caches and memory bandwidth are shared,
the baseline's median moved 12 -> 22 ms between runs of the old five-way loop). Here every
variant is timed against the baseline alone, A B A B ..., for `repeats` pairs; the ratio of a
pair is taken per pair (so slow drifts of the machine cancel), and what is reported is the
median ratio with its interquartile range, next to each side's median and IQR in ms, the
thread count and the CPU's flags (amx, avx512_bf16, avx512_vnni), so every figure says what it
was measured on.

    from kvjax.timing import pairwise, machine
    row = pairwise(lambda: base(q, c0), lambda: variant(q, c1), repeats=30)

Used by `kvjax bench` and benchmarks/decode_attention_cpu.py.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def _cpuinfo() -> tuple[set, str]:
  """(the first CPU's flags, its model name) from /proc/cpuinfo; empty where there is none."""
  flags, model = set(), platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
        elif line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  return flags, model


def cpu_flags() -> set:
  """Every flag of the CPU (`/proc/cpuinfo`); empty where the system does not say."""
  return _cpuinfo()[0]


def machine() -> dict:
  """What a CPU timing depends on: model name, cores, thread settings, the flags above."""
  flags, model = _cpuinfo()
  import jax
  return {"cpu": model, "cores": os.cpu_count(),
          "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
          "flags": {f: f in flags for f in FLAGS},
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
          "backend": jax.default_backend()}


def _quartiles(xs):
  q = statistics.quantiles(xs, n=4, method="inclusive")
  return q[0], statistics.median(xs), q[2]


def time_once(fn: Callable) -> float:
  """Seconds of one call, waiting for the result (`fn` returns a jax value or a pytree)."""
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def pairwise(base: Callable, variant: Callable, *, repeats: int = 30, warmup: int = 2) -> dict:
  """Times `base` and `variant` alternately `repeats` times each (after `warmup` calls of each,
  compilation included); returns medians and IQRs in ms and the per-pair ratio's median and
  IQR."""
  if repeats < 4:
    raise ValueError(f"repeats must be >= 4 for quartiles, got {repeats}")
  for _ in range(warmup):
    time_once(base)
    time_once(variant)
  a, b = [], []
  for i in range(repeats):
    # Alternate which side goes first, so neither always follows the other.
    if i % 2:
      b.append(time_once(variant))
      a.append(time_once(base))
    else:
      a.append(time_once(base))
      b.append(time_once(variant))
  ratios = [y / x for x, y in zip(a, b)]
  qa, qb, qr = _quartiles(a), _quartiles(b), _quartiles(ratios)
  return {"repeats": repeats,
          "base_ms": 1e3 * qa[1], "base_iqr_ms": [1e3 * qa[0], 1e3 * qa[2]],
          "variant_ms": 1e3 * qb[1], "variant_iqr_ms": [1e3 * qb[0], 1e3 * qb[2]],
          "ratio": qr[1], "ratio_iqr": [qr[0], qr[2]]}


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 9) -> dict:
  """This machine's memory read bandwidth as XLA sees it: a jitted float32 sum over `nbytes`
  (default 1 GiB, far beyond any cache), the median of `repeats` timed calls after one warm-up.
  Returns {"bytes_per_s", "nbytes", "median_ms", "iqr_ms"} (the roofline's denominator)."""
  if repeats < 4:
    raise ValueError(f"repeats must be >= 4 for quartiles, got {repeats}")
  import jax
  import jax.numpy as jnp
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  time_once(lambda: f(x))
  ts = [time_once(lambda: f(x)) for _ in range(repeats)]
  lo, med, hi = _quartiles(ts)
  del x
  return {"bytes_per_s": (nbytes // 4 * 4) / med, "nbytes": nbytes // 4 * 4,
          "median_ms": 1e3 * med, "iqr_ms": [1e3 * lo, 1e3 * hi]}

