"""What tensor parallelism costs a decode step, and what the int4 cache saves, on 8 and 64 GPUs.

    python benchmarks/sharding_cost.py [--context 32768] [--batch 32] [--out docs/results/sharding_cost]

Per generated token (one decode step of the whole batch), for a mesh data x model:
  * communication: the all-reduces one step holds (read from the compiled HLO of the sharded
    models, tests/test_sharding.py): one for the vocabulary-parallel embedding, then per layer one
    after the MLP and, when heads are split, one after attention, each of the hidden state
    [batch / data, E] in bfloat16 over the model axis; timed with the alpha-beta model of
    `kvjax.foe.latency` (ring all-reduce; NVLink 900 GB/s and 2 us inside a node of 8 GPUs,
    50 GB/s and 8 us between nodes). The argmax all-gathers ([batch, model] scalars) are left out.
  * memory: bytes each device reads per step, its weights (bfloat16) plus its share of the cache
    at `--context` tokens (bf16 K/V: 4 D bytes per token and KV head; int4 g32 with bfloat16
    scales: 1.125 D; sliding-window layers hold their window), and the HBM roofline time at 3.35 TB/s (H100 SXM).
These are model predictions from the layouts, not measurements (no GPU here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from kvjax.foe.latency import LinkModel, group_time
from kvjax.models import ModelConfig

HBM = 3.35e12


def llama3_8b_shape() -> ModelConfig:
  """Llama-3-8B's sizes (32 layers, 32 query / 8 KV heads, d=128): the size that outgrows one
  accelerator's memory at long context, for the cost table only (no checkpoint is loaded)."""
  return dataclasses.replace(ModelConfig.llama_tiny(), vocab_size=128256, hidden_size=4096,
                             intermediate_size=14336, num_layers=32, num_heads=32,
                             num_kv_heads=8, head_dim=128, layer_types=("global",) * 32)


def layer_params(cfg: ModelConfig) -> int:
  e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  attn = e * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  return cfg.num_layers * (attn + 3 * e * f)


def step(cfg: ModelConfig, data: int, model: int, batch: int, context: int,
         link: LinkModel) -> dict:
  from kvjax.models.sharding import HEADS
  hq, h = cfg.num_heads, cfg.num_kv_heads
  heads_split = model > 1 and hq % model == 0 and (h % model == 0 or model % h == 0)
  repeat = max(1, model // h) if heads_split else 1
  kv_local = h * repeat // model if heads_split else h
  rows = batch // data
  group = list(range(model))  # model axis last: consecutive device ids
  reduces = 1 + cfg.num_layers * (2 if heads_split else 1)
  reduce_bytes = rows * cfg.hidden_size * 2
  comm = reduces * group_time("all-reduce", group, reduce_bytes, link)
  weights = 2 * (layer_params(cfg) / model + cfg.vocab_size * cfg.hidden_size / model
                 * (1 if cfg.tie_word_embeddings else 2))
  if not heads_split:  # attention weights replicated over the model axis
    e, d = cfg.hidden_size, cfg.head_dim
    attn = cfg.num_layers * e * d * (2 * hq + 2 * h)
    weights += 2 * attn * (1 - 1 / model)
  per_token = {"bf16": 4 * cfg.head_dim, "int4": 1.125 * cfg.head_dim}
  out = dict(mesh=f"{data}x{model}",
             attention="-" if model == 1 else HEADS if heads_split else "replicated",
             kv_repeat=repeat, all_reduces=reduces, all_reduce_bytes=reduce_bytes,
             comm_us=comm * 1e6, weights_gb=weights / 1e9)
  from kvjax.models.config import LOCAL
  tokens = sum(min(context, cfg.sliding_window) if t == LOCAL and cfg.sliding_window else context
               for t in cfg.layer_types)  # ring buffers hold a window
  for name, b in per_token.items():
    cache = rows * kv_local * tokens * b
    out[f"{name}_cache_gb"] = cache / 1e9
    out[f"{name}_hbm_us"] = (weights + cache) / HBM * 1e6
  out["int4_over_bf16"] = (out["int4_hbm_us"] + comm * 1e6) / (out["bf16_hbm_us"] + comm * 1e6)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--context", type=int, default=32768)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--out", default="docs/results/sharding_cost")
  a = p.parse_args(argv)
  if a.context < 1 or a.batch < 8 or a.batch % 8:
    p.error("--context must be positive and --batch a positive multiple of 8")
  link = LinkModel()
  models = {"gemma3-270m": ModelConfig.preset("gemma3-270m"),
            "qwen2.5-0.5b": ModelConfig.preset("qwen2.5-0.5b"),
            "llama3-8b (shape)": llama3_8b_shape()}
  meshes = [(8, 1), (1, 8), (2, 4), (8, 8), (1, 64)]
  rows = []
  for name, cfg in models.items():
    for d, t in meshes:
      if a.batch % d:
        continue
      rows.append(dict(model=name, **step(cfg, d, t, a.batch, a.context, link)))
  head = ("| model | mesh | attention | all-reduces / step | comm (us) | weights / device (GB) "
          "| cache / device bf16 → int4 (GB) | HBM roofline bf16 → int4 (us) | int4 / bf16 step |")
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    lines.append(f"| {r['model']} | {r['mesh']} | {r['attention']} | {r['all_reduces']} | "
                 f"{r['comm_us']:.0f} | {r['weights_gb']:.2f} | {r['bf16_cache_gb']:.2f} → "
                 f"{r['int4_cache_gb']:.2f} | {r['bf16_hbm_us']:.0f} → {r['int4_hbm_us']:.0f} | "
                 f"{r['int4_over_bf16']:.2f} |")
  table = "\n".join(lines)
  print(f"batch {a.batch}, context {a.context}\n{table}")
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  (out.parent / (out.name + ".json")).write_text(json.dumps(dict(batch=a.batch, context=a.context,
                                                      link=dataclasses.asdict(link), hbm=HBM,
                                                      rows=rows), indent=1))
  (out.parent / (out.name + ".md")).write_text(f"batch {a.batch}, context {a.context}\n\n{table}\n")


if __name__ == "__main__":
  main()
