"""Runs tiny models sharded over 8 CPU devices and reports what tests/test_sharding.py checks.

    python tests/sharding_worker.py single OUT.json     # one process, 8 devices
    python -m kvjax.distributed --processes 2 --local-devices 4 -- \
        tests/sharding_worker.py multi OUT.json          # two processes x 4 devices

A separate process because XLA fixes the CPU device count when the backend starts. The worker
measures; the test holds the bounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

if sys.argv[1] == "single":
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from kvjax import distributed  # noqa: E402

process_id, num_processes = distributed.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from kvjax.cache import QuantizedKVCache  # noqa: E402
from kvjax.models import ModelConfig, model_class, calibrated, sharding  # noqa: E402
from kvjax.models.generate import generate_tokens  # noqa: E402

STEPS = 16
MESHES = ((1, 8), (2, 4), (4, 2))


def configs():
  """Three head layouts: 8 KV heads (split), 1 KV head (repeated, then replicated attention at
  model axis 8), 14 query heads over 2 KV heads (split at 2, replicated attention at 4 and 8)."""
  llama = dataclasses.replace(ModelConfig.llama_tiny(), num_heads=8, num_kv_heads=8)
  gemma = dataclasses.replace(ModelConfig.gemma3_tiny(), num_kv_heads=1)
  qwen = dataclasses.replace(ModelConfig.qwen2_tiny(), num_heads=14, num_kv_heads=2, head_dim=32)
  return {"llama-8kv": llama, "gemma-1kv": gemma, "qwen-14q2kv": qwen}


def build(cfg, seed=0):
  model = model_class(cfg)(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(1)
  ids = rng.integers(3, cfg.vocab_size, 400)
  if cfg.add_bos:
    ids[0] = cfg.bos_token_id
  cal = calibrated.calibrate(model, ids.tolist(), window_lengths=(64, 64), chunk=32,
                             progress=False)
  prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 37, 11, 60)]
  return model, cal, prompts


def per_token_bytes(caches) -> tuple[int, int]:
  """(busiest device, all devices together) bytes of the arrays that grow with the tokens:
  K/V or their codes and scales (the per-layer basis tensors are a fixed cost)."""
  busiest, total = {}, 0
  for cache in jax.tree.leaves(caches, is_leaf=lambda c: hasattr(c, "lengths")):
    names = ("k_codes", "k_scales", "v_codes", "v_scales") if isinstance(cache, QuantizedKVCache) \
        else ("k", "v")
    for n in names:
      a = getattr(cache, n)
      total += a.nbytes
      for s in a.addressable_shards:
        busiest[s.device] = busiest.get(s.device, 0) + s.data.nbytes
  return max(busiest.values()), total


def single(out, only=None):
  result = {"devices": jax.device_count(), "models": {}}
  for name, cfg in configs().items():
    if only is not None and name != only:
      continue
    model, cal, prompts = build(cfg)
    runs = {}
    for cache, kw in (("bf16", dict(cache_dtype=jnp.bfloat16, calibration=False)),
                      ("int4", dict(calibration=cal))):
      init = dict(dtype=jnp.bfloat16) if cache == "bf16" else dict(calibration=cal)
      ref = generate_tokens(model, prompts, max_new_tokens=STEPS, **kw)
      _, unsharded_total = per_token_bytes(model.init_cache(4, 256, **init))
      # The dense cache on the 2x4 mesh only (its specs are the codes' without the basis; every
      # mesh is covered with real checkpoints by benchmarks/sharded_generate.py): CI time.
      for d, t in MESHES if cache == "int4" else ((2, 4),):
        sm = sharding.shard(model, jax.make_mesh((d, t), ("data", "model")))
        got = generate_tokens(sm, prompts, max_new_tokens=STEPS, **kw)
        caches = sm.init_cache(4, 256, **init)
        busiest, _ = per_token_bytes(caches)
        # The int4 step's collectives (the bf16 step's are the same ops without codes to keep).
        ops = sharding.decode_step_collectives(sm, caches) if cache == "int4" else []
        runs[f"{cache} {d}x{t}"] = dict(
            equal=got == ref, tokens=got, attention=sm.layout.attention, kv_repeat=sm.layout.kv_repeat,
            per_token_bytes_busiest=busiest, per_token_bytes_unsharded=unsharded_total,
            collectives=[dict(kind=o.kind, shapes=[[s, list(x)] for s, x in o.shapes],
                              groups=[list(g) for g in o.groups]) for o in ops])
    result["models"][name] = dict(num_layers=cfg.num_layers, layer_types=len(set(cfg.layer_pattern)),
                                  runs=runs)
  with open(out, "w") as f:
    json.dump(result, f)


def multi(out):
  """Tiny Llama on mesh 2x4: data over the processes, model within each."""
  cfg = configs()["llama-8kv"]
  model, cal, prompts = build(cfg)
  sm = sharding.shard(model, jax.make_mesh((2, 4), ("data", "model")))
  caches = {"bf16": dict(cache_dtype=jnp.bfloat16, calibration=False),
            "int4": dict(calibration=cal)}
  result = {"processes": num_processes, "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
            "tokens": {c: generate_tokens(sm, prompts, max_new_tokens=STEPS, **kw)
                       for c, kw in caches.items()}}
  if process_id == 0:
    with open(out, "w") as f:
      json.dump(result, f)


if __name__ == "__main__":
  mode, path = sys.argv[1], sys.argv[2]
  if mode == "single":
    single(path, sys.argv[3] if len(sys.argv) > 3 else None)
  elif mode == "multi":
    multi(path)
  else:
    raise SystemExit(f"unknown mode {mode!r}: single or multi")
