"""Rotation ablation for the 4-bit KV cache (K4V4, g=32) on a real model and held-out text.

Rows: no rotation / SRHT / SRFT / Householder (k = d/2) / SRFT + closed-form key offset and λ
(kvjax.smoothing) / learned R + λ on the SRFT base / learned R + λ from the identity (no SRFT) /
learned λ only (R = SRFT) starting from the closed form.
For each: calibration-set reconstruction MSE of K and V (relative, mean over layers) and its
reduction against no rotation, and on the first C tokens of Pride and Prejudice (teacher-forced
through the cache, kvjax.eval.evaluate_window) perplexity, ΔPPL and mean KL against the bf16
cache. Calibration uses the first tokens of Emma, disjoint from the evaluation text.

    python benchmarks/ablation.py --model gemma3-270m --contexts 1024

Writes results/ablation/<model>.json and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shutil
import time

import jax
import numpy as np

from kvjax import calibrate as cal
from kvjax import corpus
from kvjax import eval as ev
from kvjax.models.runner import Runner
from kvjax import smoothing
from kvjax.config import QuantConfig
from kvjax.rotations import rotation_matrix_np


def _fixed_arrays(kind, d, quant, stats_params=None):
  """Rotation/λ/μ arrays (broadcast over layers and heads) of a non-learned cache."""
  arrays = {"k_rotation": rotation_matrix_np(kind, d, quant.seed),
            "v_rotation": rotation_matrix_np(kind, d, quant.seed + 1),
            "k_lambda": np.ones(d, np.float32), "v_lambda": np.ones(d, np.float32),
            "k_mean": np.zeros(d, np.float32)}
  if stats_params is not None:
    arrays["k_mean"], arrays["k_lambda"] = stats_params
  return arrays


def _stats_params(cfg, stats):
  """Closed-form constant key offset and λ per layer [L, H, D] from StatsKVCaches (kvjax.smoothing)."""
  mean = np.zeros((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim), np.float32)
  lam = np.ones_like(mean)
  for part, run, index, layer in cal._layer_slots(cfg):
    p = smoothing.key_params(stats[part][run], smoothing.OFFSET_AND_LAMBDA)
    mean[layer], lam[layer] = p["k_mean"][index], p["k_lambda"][index]
  return mean, lam


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--contexts", type=int, nargs="+", default=[1024])
  p.add_argument("--calibration-tokens", type=int, default=2048)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--batch-tokens", type=int, default=512)
  p.add_argument("--learning-rate", type=float, default=2e-3)
  p.add_argument("--objective", choices=cal.OBJECTIVES, default="mse")
  p.add_argument("--chunk", type=int, default=512)
  p.add_argument("--out", default="results/ablation")
  p.add_argument("--no-progress", action="store_true")
  a = p.parse_args(argv)
  progress = not a.no_progress
  t0 = time.time()
  from kvjax.models import load
  model, tok = load(a.model)
  cfg = model.config
  d = cfg.head_dim
  quant = QuantConfig(key_bits=4, value_bits=4, group_size=32, rotation="srft")
  runner = Runner(model)
  cal_ids = tok.encode(corpus.calibration_text(), add_bos=cfg.add_bos)[:a.calibration_tokens]
  eval_ids = tok.encode(corpus.eval_text(), add_bos=cfg.add_bos)
  print(f"[{time.time() - t0:.0f}s] collecting calibration data on {len(cal_ids)} tokens of Emma",
        flush=True)
  # One prefill gives both the vectors to train on and the statistics of the closed form.
  data, stats = cal.collect(runner, cal_ids, chunk=a.chunk, progress=progress,
                            return_caches=True)
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)

  learned = {}
  train_info = {}
  variants = {"srft": dict(base="srft"), "none": dict(base="none"),
              # λ only, R fixed to the SRFT base, starting from the closed-form λ and offset.
              "lambda": dict(base="srft", learn_rotation=False, init="closed-form")}
  for base, extra in variants.items():
    cc = cal.CalibrationConfig(objective=a.objective, steps=a.steps,
                               batch_tokens=a.batch_tokens, learning_rate=a.learning_rate,
                               checkpoint_every=0, **extra)
    t1 = time.time()
    print(f"[{t1 - t0:.0f}s] training learned variant {base!r}: {extra}", flush=True)
    lq = dataclasses.replace(quant, rotation="learned")
    params, fixed, losses = cal.train(data, lq, cc, attn_scale=cfg.query_scale,
                                      progress=progress)
    arrays = cal.finalize(params, fixed)
    directory = out / f"{a.model}-learned-{base}"
    shutil.rmtree(directory, ignore_errors=True)
    meta = {"model": a.model, "architecture": cal.architecture(cfg),
            "corpus": {"corpus": "austen:Emma", "first_token": 0, "num_tokens": len(cal_ids)},
            "config": dataclasses.asdict(cc), "steps": cc.steps, "losses": losses,
            "head_dim": d, "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads}
    cal.save_calibration(directory, cal.Calibration(quant=lq, metadata=meta, **arrays))
    learned[base] = (arrays, directory)
    train_info[base] = {"seconds": round(time.time() - t1, 1), "first_loss": losses[0],
                        "last_loss": losses[-1]}

  closed = _stats_params(cfg, stats)
  rows_spec = [
      ("none", QuantConfig(rotation="none"), False, None, _fixed_arrays("none", d, quant)),
      ("srht", QuantConfig(rotation="srht"), False, None, _fixed_arrays("srht", d, quant)),
      ("srft", QuantConfig(rotation="srft"), False, None, _fixed_arrays("srft", d, quant)),
      ("householder", QuantConfig(rotation="householder"), False, None,
       _fixed_arrays("householder", d, quant)),
      ("srft+offset+λ (closed form)", QuantConfig(rotation="srft"), True, None,
       _fixed_arrays("srft", d, quant, closed)),
      ("learned R+λ, SRFT base", dataclasses.replace(quant, rotation="learned"), False,
       str(learned["srft"][1]), learned["srft"][0]),
      ("learned R+λ, no SRFT", dataclasses.replace(quant, rotation="learned"), False,
       str(learned["none"][1]), learned["none"][0]),
      ("learned λ from closed form", dataclasses.replace(quant, rotation="learned"), False,
       str(learned["lambda"][1]), learned["lambda"][0]),
  ]
  mse = {}
  for name, q, _, _, arrays in rows_spec:
    m = cal.reconstruction_mse(data, arrays, q)
    mse[name] = {"key": float(m["key"].mean()), "value": float(m["value"].mean())}
  base_mse = mse["none"]

  specs = [ev.CacheSpec("bf16", None)] + [
      ev.CacheSpec(name, q, calibrate=closed_form, calibration=cdir)
      for name, q, closed_form, cdir, _ in rows_spec]
  rows = []
  for c in a.contexts:
    print(f"[{time.time() - t0:.0f}s] evaluating {len(specs)} caches at {c} tokens", flush=True)
    window = np.asarray(eval_ids[:c], np.int32)
    res = ev.evaluate_window(runner, window, specs, max_len=c, stats=stats, chunk=a.chunk,
                             progress=progress)
    ref_ppl = math.exp(float(np.mean(res["bf16"]["hook"][0])))
    for s in specs[1:]:
      nll, kl, agree = res[s.name]["hook"]
      ppl = math.exp(float(np.mean(nll)))
      m = mse[s.name]
      rows.append({
          "model": a.model, "context": c, "cache": s.name, "ppl": ppl, "bf16_ppl": ref_ppl,
          "delta_ppl": ppl - ref_ppl, "delta_ppl_pct": 100 * (ppl / ref_ppl - 1),
          "kl_mean": float(np.mean(kl)), "top1_agree": float(np.mean(agree)),
          "key_mse": m["key"], "value_mse": m["value"],
          "key_mse_reduction_pct": 100 * (1 - m["key"] / base_mse["key"]),
          "value_mse_reduction_pct": 100 * (1 - m["value"] / base_mse["value"]),
          "kv_mse_reduction_pct": 100 * (1 - (m["key"] + m["value"])
                                         / (base_mse["key"] + base_mse["value"]))})
  doc = {"meta": {"model": a.model, "quant": "K4V4 g32", "eval_corpus": "austen:Pride & Prejudice",
                  "calibration_corpus": "austen:Emma", "calibration_tokens": len(cal_ids),
                  "objective": a.objective, "steps": a.steps, "batch_tokens": a.batch_tokens,
                  "learning_rate": a.learning_rate, "training": train_info,
                  "seconds": round(time.time() - t0, 1), "jax": jax.__version__,
                  "mse_definition": "sum ||x - x_hat||^2 / sum ||x||^2 over calibration tokens, "
                                    "mean over layers (x_hat through the cache's quantizer)"},
         "rows": rows}
  path = out / f"{a.model}.json"
  path.write_text(json.dumps(doc, indent=2))
  print(format_table(rows))
  print(f"wrote {path} in {time.time() - t0:.0f} s")


def format_table(rows) -> str:
  head = (f"{'ctx':>5} {'cache':<30} {'K MSE red.':>10} {'V MSE red.':>10} {'KV red.':>8} "
          f"{'PPL':>8} {'dPPL':>8} {'dPPL%':>7} {'KL':>7}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['context']:>5} {r['cache']:<30} {r['key_mse_reduction_pct']:9.1f}% "
                 f"{r['value_mse_reduction_pct']:9.1f}% {r['kv_mse_reduction_pct']:7.1f}% "
                 f"{r['ppl']:8.3f} {r['delta_ppl']:+8.3f} {r['delta_ppl_pct']:+6.2f}% "
                 f"{r['kl_mean']:7.4f}")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
