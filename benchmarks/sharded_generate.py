"""Greedy tokens of a real model sharded over 8 CPU devices against the same model on one.

    python benchmarks/sharded_generate.py --model gemma3-270m [--steps 32] [--prompt-tokens 256]
        [--batch 4] [--meshes 1x8 2x4 4x2] [--out docs/results/sharded_gemma3-270m]

For each cache (the dense bfloat16 cache and the model's calibrated int4 cache, "auto"
artifact) the unsharded model generates `--steps` tokens after `--batch` prompts of real text
(different offsets into the evaluation book); then the model sharded over each mesh (data x
model) does the same, and the tokens are compared, as are the logits of the first 64 prompt
positions (top-1 agreement, median and max |difference|).

Sharding changes the order of floating-point sums (partial products summed across devices, other
per-device batch sizes), and a quantized cache turns such ulp-level differences into different
codes, which later layers amplify. So beside the meshes the script measures the noise floor: the
unsharded model with its MLP weights multiplied by (1 + 1e-7 * N(0, 1)) (a perturbation of the
size of float32 reassociation), compared the same way. A correct sharded model sits at or below
that floor; a wrong layout (a head reading another head's keys, a missing all-reduce) moves
logits by O(1) at every position and far below the floor's agreement. Also recorded per mesh: the attention
layout (heads split or replicated, KV-head copies), the collectives of one compiled decode
step (kind, bytes per device, group size), cache bytes on the busiest device against the
unsharded cache (batch 4, 512 slots), and wall time per generated token (a CPU simulation of 8 devices on this machine's
cores: a smoke figure, not a speed claim). Writes JSON and prints a table.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kvjax  # noqa: E402
from kvjax import corpus  # noqa: E402
from kvjax.models import sharding  # noqa: E402
from kvjax.models.generate import generate_tokens  # noqa: E402
from kvjax.timing import machine  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--steps", type=int, default=32)
  p.add_argument("--prompt-tokens", type=int, default=256)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--meshes", nargs="+", default=["1x8", "2x4", "4x2"])
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  meshes = []
  for m in a.meshes:
    try:
      d, t = (int(x) for x in m.split("x"))
    except ValueError:
      p.error(f"--meshes: {m!r} is not DATAxMODEL (e.g. 2x4)")
    if d * t != 8 or a.batch % d:
      p.error(f"--meshes: {m} must use 8 devices and split --batch {a.batch}")
    meshes.append((d, t))
  if a.steps < 1 or a.prompt_tokens < 1:
    p.error("--steps and --prompt-tokens must be positive")
  out = pathlib.Path(a.out or f"docs/results/sharded_{a.model}")

  model, tok = kvjax.models.load(a.model, calibration="auto")
  ids = tok.encode(corpus.eval_text())
  prompts = [ids[i * 1000:i * 1000 + a.prompt_tokens] for i in range(a.batch)]
  caches = {"bf16": dict(cache_dtype=jnp.bfloat16, calibration=False),
            "int4": dict(calibration=model.calibration)}
  perturbed = _perturbed(model)
  head = jnp.asarray([p_[:64] for p_ in prompts], jnp.int32)
  rows = []
  for name, kw in caches.items():
    init = dict(dtype=kw["cache_dtype"]) if name == "bf16" else dict(
        calibration=model.calibration)

    def logits(m):
      out, _ = m(head, m.init_cache(a.batch, 512, **init))
      return np.asarray(out)

    t0 = time.perf_counter()
    ref = generate_tokens(model, prompts, max_new_tokens=a.steps, **kw)
    ref_s = time.perf_counter() - t0
    ref_logits = logits(model)
    unsharded_bytes = int(sum(x.nbytes for x in jax.tree.leaves(model.init_cache(a.batch, 512,
                                                                                  **init))))
    print(f"{name} unsharded: {ref_s:.1f} s", flush=True)
    floor = dict(cache=name, mesh="unsharded, weights x (1 + 1e-7 N)",
                 **_compare(generate_tokens(perturbed, prompts, max_new_tokens=a.steps, **kw),
                            ref, logits(perturbed), ref_logits))
    rows.append(floor)
    print(f"{name} noise floor: equal={floor['equal']} top-1 {floor['top1_agreement']:.4f} "
          f"median |dlogit| {floor['median_abs_logit_diff']:.2e}", flush=True)
    for d, t in meshes:
      mesh = jax.make_mesh((d, t), ("data", "model"))
      sm = sharding.shard(model, mesh)
      t0 = time.perf_counter()
      got = generate_tokens(sm, prompts, max_new_tokens=a.steps, **kw)
      wall = time.perf_counter() - t0
      c = sm.init_cache(a.batch, 512, **init)
      ops = sharding.decode_step_collectives(sm, c)
      row = dict(cache=name, mesh=f"{d}x{t}", attention=sm.layout.attention,
                 kv_repeat=sm.layout.kv_repeat,
                 **_compare(got, ref, logits(sm), ref_logits),
                 collectives=[dict(kind=o.kind, shapes=[[s, list(dims)] for s, dims in o.shapes],
                                   bytes_per_device=o.bytes_per_device, group_size=o.group_size)
                              for o in ops],
                 cache_bytes_unsharded=unsharded_bytes,
                 cache_bytes_placed=int(sum(x.nbytes for x in jax.tree.leaves(c))),
                 cache_bytes_per_device=sharding.cache_nbytes_per_device(c),
                 wall_s=round(wall, 2), unsharded_wall_s=round(ref_s, 2))
      rows.append(row)
      print(f"{name} {d}x{t} {row['attention']:10s} kv x{row['kv_repeat']} equal={row['equal']} "
            f"top-1 {row['top1_agreement']:.4f} median |dlogit| "
            f"{row['median_abs_logit_diff']:.2e} "
            f"collectives={[(o['kind'], o['group_size']) for o in row['collectives']]} "
            f"cache/device {row['cache_bytes_per_device']}/{row['cache_bytes_unsharded']} "
            f"{wall:.1f} s", flush=True)
      del sm, c
  result = dict(model=a.model, steps=a.steps, prompt_tokens=a.prompt_tokens, batch=a.batch,
                machine=machine(), rows=rows,
                command="python benchmarks/sharded_generate.py " + " ".join(argv or []))
  out.parent.mkdir(parents=True, exist_ok=True)
  path = out.parent / (out.name + ".json")  # not with_suffix: "qwen2.5-..." has a dot
  tmp = out.parent / (out.name + ".json.tmp")
  tmp.write_text(json.dumps(result, indent=1))
  tmp.replace(path)
  print(f"wrote {path}")


def _perturbed(model):
  """The model with every MLP weight multiplied by (1 + 1e-7 N(0, 1)) (fixed seed)."""
  from flax import nnx
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pure = nnx.to_pure_dict(params)
  key = iter(jax.random.split(jax.random.key(7), 1000))

  def jitter(path, x):
    if "mlp" not in jax.tree_util.keystr(path):
      return x
    noise = jax.random.normal(next(key), x.shape, jnp.float32)
    return (x.astype(jnp.float32) * (1 + 1e-7 * noise)).astype(x.dtype)

  nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(jitter, pure))
  out = nnx.merge(graphdef, params, rest)
  out.checkpoint_name, out.calibration = model.checkpoint_name, model.calibration
  return out


def _compare(got, ref, got_logits, ref_logits) -> dict:
  diff = np.abs(got_logits - ref_logits).max(axis=-1)   # [B, T]: worst over the vocabulary
  return dict(equal=got == ref,
              first_difference=[next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), None)
                                for g, r in zip(got, ref)],
              top1_agreement=float((got_logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
              median_abs_logit_diff=float(np.median(diff)), max_abs_logit_diff=float(diff.max()))


if __name__ == "__main__":
  main()
