"""Which calibration windows serve which context? One set of closed-form parameters per choice of
windows, each evaluated at 1K and 4K (Gemma-3-270M by default, hook mode, default recipe).

    python benchmarks/calibration_windows.py --out results/calibration_windows

Choices: the two 1,024-token windows alone, the 4,096-token window alone, all three with their
statistics summed, and all three with the 4K window weighted 1/2 (windows as
`kvjax.models.calibrated.DEFAULT_WINDOWS`: consecutive, BOS-opened, from the start of Emma).
Prints the table and writes <out>/calibration_windows_<model>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import numpy as np

from kvjax import corpus
from kvjax import eval as ev
from kvjax.cache import _STATS_FIELDS
from kvjax.models import Runner, calibrated, load


def _combine(trees, weights):
  """Weighted sum of statistics trees of the same model (any window lengths)."""
  out = {}
  for part in ("groups", "tail"):
    runs = []
    for r, c in enumerate(trees[0][part]):
      fields = {f: sum(w * getattr(t[part][r], f) for t, w in zip(trees, weights))
                for f in _STATS_FIELDS if f != "rope_freq"}
      runs.append(dataclasses.replace(c, **fields))
    out[part] = tuple(runs)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--windows-1k", type=int, default=4, help="scored 1K windows")
  p.add_argument("--windows-4k", type=int, default=1, help="scored 4K windows")
  p.add_argument("--out", default="results/calibration_windows")
  a = p.parse_args(argv)
  t0 = time.time()
  model, tok = load(a.model)
  cfg = model.config
  runner = Runner(model)
  cal_ids = tok.encode(corpus.calibration_text(), add_bos=cfg.add_bos)
  ids = tok.encode(corpus.eval_text(), add_bos=cfg.add_bos)
  wins = calibrated.calibration_windows(cal_ids, calibrated.DEFAULT_WINDOWS, bos=cfg.add_bos)
  per = [calibrated.collect_window_stats(model, [w], runner=runner, progress=False)[len(w)]
         for w in wins]
  sets = {"2 x 1K windows": _combine(per[:2], [1, 1]), "1 x 4K window": per[2],
          "all three, summed": _combine(per, [1, 1, 1]),
          "all three, 4K window weighted 1/2": _combine(per, [1, 1, 0.5])}
  print(f"[{time.time() - t0:.0f}s] statistics done", flush=True)
  cals = {k: calibrated.from_stats(model, v) for k, v in sets.items()}
  specs = [ev.CacheSpec("bf16", None)] + [
      ev.CacheSpec(k, ev.SPEC_CHOICES["int4"].quant, calibrate=True) for k in cals]
  rows = []
  for c, n in ((1024, a.windows_1k), (4096, a.windows_4k)):
    scored = ev.windows(ids, c, n, bos=cfg.add_bos)
    res = ev._pool_windows([ev.evaluate_window(runner, w, specs, max_len=c, calibrations=cals,
                                               progress=False) for w in scored])
    base = float(np.mean(res["bf16"]["hook"][0]))
    for s in specs[1:]:
      nll, kl, _ = res[s.name]["hook"]
      rows.append({"context": c, "fitted on": s.name, "windows": len(scored),
                   "tokens_scored": int(nll.size),
                   "delta_ppl_pct": 100 * float(np.expm1(np.mean(nll) - base)),
                   "kl_mean": float(np.mean(kl))})
      r = rows[-1]
      print(f"{c:>5} {s.name:<36} {r['delta_ppl_pct']:+6.2f}% KL {r['kl_mean']:.4f} "
            f"({r['tokens_scored']} tokens) [{time.time() - t0:.0f}s]", flush=True)
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"calibration_windows_{a.model}.json"
  path.write_text(json.dumps({"meta": {"model": a.model, "seconds": round(time.time() - t0, 1),
                                       "windows": list(calibrated.DEFAULT_WINDOWS)},
                              "rows": rows}, indent=2))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
