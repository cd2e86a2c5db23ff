"""Sweep the closed-form key calibration (kvjax.smoothing.KeyCalibration) through `kvjax eval`.

    python benchmarks/calibration_sweep.py --contexts 1024 4096 \
        --recipe rope_pairs=0,feedback=False --recipe rope_pairs=32

Each --recipe is comma-separated KeyCalibration fields; every recipe becomes one K4V4 g32 SRFT
cache evaluated beside the bf16 cache (hook mode), and the usual table and JSON are written.
"""

from __future__ import annotations

import argparse
import dataclasses

from kvjax import eval as ev
from kvjax.config import QuantConfig
from kvjax.smoothing import KeyCalibration


def parse_recipe(text: str) -> tuple[str, KeyCalibration]:
  fields = {f.name: f.type for f in dataclasses.fields(KeyCalibration)}
  kwargs = {}
  for item in filter(None, text.split(",")):
    key, _, value = item.partition("=")
    if key not in fields:
      raise SystemExit(f"unknown KeyCalibration field {key!r}; known: {sorted(fields)}")
    default = getattr(KeyCalibration(), key)
    if isinstance(default, bool):
      if value not in ("True", "False"):
        raise SystemExit(f"{key} must be True or False, got {value!r}")
      kwargs[key] = value == "True"
    else:
      kwargs[key] = type(default)(value)
  name = "int4" + "".join(f"-{k}{v}" for k, v in kwargs.items())
  return name, dataclasses.replace(KeyCalibration(), **kwargs)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--contexts", type=int, nargs="+", default=[1024])
  p.add_argument("--recipe", action="append", default=[],
                 help="KeyCalibration fields, e.g. rope_pairs=16,feedback=False (repeatable)")
  p.add_argument("--calibration-windows", type=int, nargs="+", default=[1024, 1024, 4096])
  p.add_argument("--out", default="results/calibration_sweep")
  a = p.parse_args(argv)
  q = QuantConfig(rotation="srft")
  specs = [ev.CacheSpec("bf16", None)]
  for text in a.recipe or [""]:
    name, recipe = parse_recipe(text)
    specs.append(ev.CacheSpec(name, q, calibrate=True, recipe=recipe, description=str(recipe)))
  ev.run(a.model, contexts=a.contexts, specs=specs, incremental_steps=0,
         calibration_windows=tuple(a.calibration_windows), out_dir=a.out)


if __name__ == "__main__":
  main()
