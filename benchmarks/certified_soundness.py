"""Soundness of the certified-attention bound, per family: actual error against float64 exact
attention, row by row, never above the certificate.

    python benchmarks/certified_soundness.py [--rows 100000] [--contexts 512 8192]
        [--out results/certified_soundness]

For each family (`kvjax.certified.soundness.FAMILIES`) and context, `--rows` rows (one query
token of one query head) run through rung 0 of certified attention (tolerance off, so every
row keeps its compressed-tier certificate: the hardest case for the bound) and are compared
with exact attention in float64. Prints and saves a table: rows, violations (must be 0), the
worst actual/bound ratio, the median bound/actual (how loose the bound is) and the median
relative bound.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from kvjax import certified
from kvjax.certified import soundness
from kvjax.timing import machine


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=100_000)
  p.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
  p.add_argument("--families", nargs="+", default=list(soundness.FAMILIES),
                 choices=soundness.FAMILIES)
  p.add_argument("--out", default="results/certified_soundness")
  a = p.parse_args(argv)
  if a.rows < 1 or any(c < 16 for c in a.contexts):
    p.error("--rows must be >= 1 and every context >= 16")
  loose = certified.CertifiedConfig(tol=1e9, atol=1e30)
  rows = []
  for n in a.contexts:
    for name in a.families:
      t0 = time.time()

      def progress(i, total, dt, name=name, n=n):
        print(f"\r  {name} @ {n}: {i}/{total} calls, {dt:.0f} s", end="", file=sys.stderr)

      err, cert = soundness.check_rows(name, loose, length=n, rows=a.rows, progress=progress)
      print(file=sys.stderr)
      bound = cert.bound.astype(np.float64)
      row = {"family": name, "context": n, "rows": int(err.size),
             "violations": int(np.sum(err > bound)),
             "worst_actual_over_bound": float(np.max(err / bound)),
             "median_bound_over_actual": float(np.median(bound / np.maximum(err, 1e-30))),
             "median_relative_bound": float(np.median(bound / cert.out_norm)),
             "median_relative_error": float(np.median(err / cert.out_norm)),
             "seconds": round(time.time() - t0, 1)}
      rows.append(row)
      print(f"{name:>10} {n:>6} rows {row['rows']:>7} violations {row['violations']} "
            f"worst err/bound {row['worst_actual_over_bound']:.3g} "
            f"median bound/err {row['median_bound_over_actual']:.3g} "
            f"median rel bound {row['median_relative_bound']:.3g} "
            f"median rel err {row['median_relative_error']:.3g}", flush=True)
  out = pathlib.Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  doc = {"machine": machine(), "rows": rows}
  (out / "certified_soundness.json").write_text(json.dumps(doc, indent=2))
  print(f"wrote {out / 'certified_soundness.json'}")
  if any(r["violations"] for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  main()
