"""Rotation ablation for the 4-bit KV cache (K4V4, g=32) on a real model and held-out text, every
calibrated row made through the calibration artifact (`kvjax.calibrate.calibrate`, saved with
`kvjax.calibration.save`, evaluated as `int4:DIR`, exactly as `kvjax eval` reads it).

Rows: no rotation / SRHT / SRFT / Householder (k = d/2) (uncalibrated) / the closed-form recipe
(the default artifact) / that recipe with learned R + λ on the SRFT base / learned R + λ from the
identity (no SRFT) / learned λ only (R = SRFT) from the closed-form λ.
For each learned row: the calibration-set reconstruction MSE of K and V through its R, λ and
mean (relative, mean over layers), and for every row, on disjoint windows of Pride and Prejudice
(teacher-forced through the cache, kvjax.eval.evaluate_window), ΔPPL and mean KL against the
bf16 cache. Calibration uses the artifact's windows of Emma, disjoint from the evaluation text.

    python benchmarks/ablation.py --model gemma3-270m --contexts 1024 --score-tokens 4096

Writes results/ablation/<model>.json (and the artifacts under results/ablation/) and prints the
table.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import time

import jax
import numpy as np

from kvjax import calibrate as cal
from kvjax import calibration as artifact
from kvjax import corpus
from kvjax import eval as ev
from kvjax.config import QuantConfig
from kvjax.models import Runner, calibrated


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--contexts", type=int, nargs="+", default=[1024])
  p.add_argument("--score-tokens", type=int, default=4096)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--batch-tokens", type=int, default=512)
  p.add_argument("--learning-rate", type=float, default=2e-3)
  p.add_argument("--objective", choices=cal.OBJECTIVES, default="mse")
  p.add_argument("--chunk", type=int, default=512)
  p.add_argument("--out", default="results/ablation")
  p.add_argument("--no-progress", action="store_true")
  a = p.parse_args(argv)
  progress = not a.no_progress
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  from kvjax.models import load
  model, tok = load(a.model)
  cfg = model.config
  runner = Runner(model)
  cal_ids = tok.encode(corpus.calibration_text(), add_bos=cfg.add_bos)
  eval_ids = tok.encode(corpus.eval_text(), add_bos=cfg.add_bos)
  wins = calibrated.calibration_windows(cal_ids, calibrated.DEFAULT_WINDOWS, bos=cfg.add_bos)
  print(f"[{time.time() - t0:.0f}s] statistics over windows of {[len(w) for w in wins]} tokens "
        "of Emma", flush=True)
  stats = calibrated.collect_window_stats(model, wins, chunk=a.chunk, progress=progress,
                                          runner=runner)
  variants = {
      "closed form (default artifact)": None,
      "learned R+λ, SRFT base": dict(base="srft"),
      "learned R+λ, no SRFT": dict(base="none"),
      "learned λ only from the closed form": dict(base="srft", learn_rotation=False)}
  paths, info = {}, {}
  for name, extra in variants.items():
    learned = None if extra is None else cal.CalibrationConfig(
        objective=a.objective, steps=a.steps, batch_tokens=a.batch_tokens,
        learning_rate=a.learning_rate, checkpoint_every=0, init="closed-form", **extra)
    t1 = time.time()
    print(f"[{t1 - t0:.0f}s] calibrating {name!r}", flush=True)
    result = cal.calibrate(model, cal_ids, learned=learned, stats=stats, chunk=a.chunk,
                           text_name=f"austen:{corpus.CALIBRATION_BOOK}", progress=progress)
    slug = name.split(" (")[0].replace(" ", "-").replace("+", "").replace("λ", "lambda")
    paths[name] = out / f"{a.model}-{slug}"
    shutil.rmtree(paths[name], ignore_errors=True)
    artifact.save(result, paths[name])
    lm = result.manifest.get("learned", {})
    info[name] = {"seconds": round(time.time() - t1, 1), "artifact": str(paths[name]),
                  "first_loss": (lm.get("losses") or [None])[0],
                  "last_loss": (lm.get("losses") or [None])[-1],
                  "key_mse": float(np.mean(lm["key_mse_per_layer"])) if lm else None,
                  "value_mse": float(np.mean(lm["value_mse_per_layer"])) if lm else None}

  specs = [ev.CacheSpec("bf16", None)] + [
      ev.CacheSpec(kind, QuantConfig(rotation=kind)) for kind in ("none", "srht", "srft",
                                                                  "householder")] + [
      ev.CacheSpec(name, QuantConfig(), calibrate=True, calibration=str(paths[name]))
      for name in variants]
  calibrations = ev.calibrations_for(model, specs)
  rows = []
  for c in a.contexts:
    windows = ev.windows(eval_ids, c, -(-a.score_tokens // c), bos=cfg.add_bos)
    print(f"[{time.time() - t0:.0f}s] evaluating {len(specs)} caches on {len(windows)} "
          f"window(s) of {c} tokens", flush=True)
    res = ev._pool_windows([ev.evaluate_window(runner, w, specs, max_len=c, chunk=a.chunk,
                                               calibrations=calibrations, progress=progress)
                            for w in windows])
    ref_ppl = math.exp(float(np.mean(res["bf16"]["hook"][0])))
    for s in specs[1:]:
      nll, kl, agree = res[s.name]["hook"]
      ppl = math.exp(float(np.mean(nll)))
      rows.append({"model": a.model, "context": c, "cache": s.name, "ppl": ppl,
                   "bf16_ppl": ref_ppl, "delta_ppl_pct": 100 * (ppl / ref_ppl - 1),
                   "kl_mean": float(np.mean(kl)), "top1_agree": float(np.mean(agree)),
                   "tokens_scored": int(nll.size), "windows": len(windows),
                   "key_mse": info.get(s.name, {}).get("key_mse"),
                   "value_mse": info.get(s.name, {}).get("value_mse")})
  doc = {"meta": {"model": a.model, "quant": "K4V4 g32", "eval_corpus": "austen:Pride & Prejudice",
                  "calibration_corpus": "austen:Emma",
                  "calibration_windows": list(calibrated.DEFAULT_WINDOWS),
                  "objective": a.objective, "steps": a.steps, "batch_tokens": a.batch_tokens,
                  "learning_rate": a.learning_rate, "variants": info,
                  "seconds": round(time.time() - t0, 1), "jax": jax.__version__,
                  "mse_definition": "learned rows: sum ||x - x_hat||^2 / sum ||x||^2 over the "
                                    "longest calibration window, mean over layers, x_hat through "
                                    "the learned R, λ and the plain key mean"},
         "rows": rows}
  path = out / f"{a.model}.json"
  path.write_text(json.dumps(doc, indent=2))
  print(format_table(rows))
  print(f"wrote {path} in {time.time() - t0:.0f} s")


def format_table(rows) -> str:
  w = max(len(r["cache"]) for r in rows)
  head = (f"{'ctx':>5} {'cache':<{w}} {'K MSE':>8} {'V MSE':>8} {'PPL':>8} {'dPPL%':>7} "
          f"{'KL':>7} {'tokens':>6}")
  lines = [head, "-" * len(head)]
  mse = lambda v: f"{v:8.5f}" if v is not None else f"{'-':>8}"
  for r in rows:
    lines.append(f"{r['context']:>5} {r['cache']:<{w}} {mse(r['key_mse'])} {mse(r['value_mse'])} "
                 f"{r['ppl']:8.3f} {r['delta_ppl_pct']:+6.2f}% {r['kl_mean']:7.4f} "
                 f"{r['tokens_scored']:>6}")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
