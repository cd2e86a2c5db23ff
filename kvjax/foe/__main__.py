"""Command line: `python -m kvjax.foe report --out DIR` and `python -m kvjax.foe train --out DIR`.

The report needs 8 devices; on the CPU this entry point sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported (unless a device
count is already forced).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _force_host_devices(count: int) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m kvjax.foe")
  sub = parser.add_subparsers(dest="command", required=True)
  rep = sub.add_parser("report", help="HLO collectives, latency model, CPU step times")
  rep.add_argument("--out", required=True, help="output directory")
  scale = sub.add_parser("scale-hlo", help="(internal) collectives of the large layer")
  scale.add_argument("--devices", type=int, required=True)
  scale.add_argument("--out", required=True, help="output JSON file")
  train = sub.add_parser("train", help="train tiny FoE and baseline LMs on the Austen corpus")
  train.add_argument("--out", required=True, help="output directory")
  train.add_argument("--steps", type=int, default=None, help="optimizer steps per model")
  train.add_argument("--seconds", type=float, default=None,
                     help="wall-clock budget per model (the step count is fixed by the first)")
  train.add_argument("--preset", default="default", help="model size preset: default or test")
  train.add_argument("--seed", type=int, default=None, help="initialization and data seed")
  args = parser.parse_args(argv)

  if args.command == "report":
    _force_host_devices(8)
    from kvjax.foe.report import run_report
    print(run_report(args.out))
  elif args.command == "scale-hlo":
    _force_host_devices(args.devices)
    from kvjax.foe.report import scale_collectives
    with open(args.out, "w") as f:
      json.dump(scale_collectives(args.devices), f)
  elif args.command == "train":
    from kvjax.foe.train import run_training
    result = run_training(args.out, steps=args.steps, seconds=args.seconds, preset=args.preset,
                          seed=args.seed)
    print(json.dumps(result["summary"], indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
