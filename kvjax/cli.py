"""The `kvjax` command: `kvjax eval`, `kvjax bench`, `kvjax calibrate`, `kvjax passkey`, `kvjax serve`
(also `python -m kvjax ...`)."""

from __future__ import annotations

import argparse
import sys


def _eval(a):
  from kvjax import eval as ev
  specs = None
  if a.caches:
    specs = [ev.parse_spec(s) for s in a.caches]
  ev.run(a.model, text_file=a.text, contexts=a.contexts, specs=specs,
         incremental_steps=a.incremental_steps, incremental_windows=a.incremental_windows,
         calibration_windows=tuple(a.calibration_windows),
         chunk=a.chunk, out_dir=a.out, progress=not a.no_progress, plot=not a.no_plot,
         calibration=a.calibration, score_tokens=a.score_tokens)


def _calibrate(a):
  from kvjax import calibrate
  calibrate.run_from_args(a)


def _bench(a):
  from kvjax import bench
  bench.run(a.model, contexts=a.contexts, repeats=a.repeats, out_dir=a.out,
            caches=a.caches or None, calibration=a.calibration, dtype=a.dtype)


def _passkey(a):
  from kvjax import eval as ev, retrieval
  specs = [ev.parse_spec(s) for s in a.caches] if a.caches else None
  retrieval.run(a.model, lengths=a.lengths, depths=a.depths, specs=specs, out_dir=a.out,
                calibration=a.calibration)


def _serve(a):
  from kvjax import serve
  serve.run_from_args(a)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="kvjax", description="Rotated 4-bit KV caches in JAX.")
  sub = p.add_subparsers(dest="command", required=True)

  e = sub.add_parser("eval", help="int4/int8 caches vs the bf16 cache on a real model and text")
  e.add_argument("--model", default="gemma3-270m",
                 help="named offline checkpoint (gemma3-270m, qwen2.5-coder-0.5b), a Hugging Face "
                      "directory or a .gguf file (default: %(default)s)")
  e.add_argument("--text", default=None, help="evaluate on this UTF-8 text file instead of "
                 "Pride and Prejudice")
  e.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
  e.add_argument("--caches", nargs="+", default=None,
                 help="caches to compare (default: bf16 int4-naive int4-srft int4 K8V4); also "
                      "descriptions like K4V4-g64-srht or K4V4-g32-srft-cal, with an optional "
                      "'+k8@L1,L2,...' for 8-bit keys in those layers (e.g. int4+k8@1,2,4,10)")
  e.add_argument("--incremental-steps", type=int, default=64,
                 help="decode the last N positions of each window token by token, against "
                      "teacher forcing from the same prefilled cache (0: off)")
  e.add_argument("--incremental-windows", type=int, default=None,
                 help="windows per context for the incremental rows, run as one batch "
                      "(default: the scored windows)")
  e.add_argument("--score-tokens", type=int, default=2048,
                 help="tokens scored per context: ceil(N / context) disjoint windows of the "
                      "text, each opened with BOS (default: %(default)s)")
  e.add_argument("--calibration-windows", type=int, nargs="+", default=[1024, 1024, 4096],
                 help="window lengths (tokens of Emma, consecutive; one context band per "
                      "length) of the calibrations of every calibrated row (default: %(default)s)")
  e.add_argument("--chunk", type=int, default=512, help="prefill chunk length")
  e.add_argument("--out", default="results/eval")
  e.add_argument("--no-progress", action="store_true")
  e.add_argument("--no-plot", action="store_true")
  e.add_argument("--calibration", default=None, metavar="DIR",
                 help="the calibration artifact of the int4 row (`kvjax calibrate --out DIR`; "
                      "default: the model's own, computed on first use and kept in the user "
                      "cache); also '--caches int4:DIR' for extra rows")
  e.set_defaults(func=_eval)

  c = sub.add_parser("calibrate", help="calibrate a model's int4 cache and write the artifact "
                     "(closed form; --learned: + Optax R and λ), saved with Orbax")
  from kvjax.calibrate import add_arguments
  add_arguments(c)
  c.set_defaults(func=_calibrate)

  b = sub.add_parser("bench", help="whole-model decode time per token, int4 vs bf16 cache")
  b.add_argument("--model", default="gemma3-270m")
  b.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
  b.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                 help="the model's weights (default bfloat16, what a user runs)")
  b.add_argument("--caches", nargs="+", default=None)
  b.add_argument("--repeats", type=int, default=10)
  b.add_argument("--out", default="results/bench")
  b.add_argument("--calibration", default=None, metavar="DIR",
                 help="calibration artifact of the int4 cache (default: the model's own)")
  b.set_defaults(func=_bench)
  r = sub.add_parser("passkey", help="passkey retrieval: int4 answers vs the bf16 cache's")
  r.add_argument("--model", default="gemma3-270m")
  r.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
  r.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
  r.add_argument("--caches", nargs="+", default=None)
  r.add_argument("--out", default="results/passkey")
  r.add_argument("--calibration", default=None, metavar="DIR",
                 help="calibration artifact of the int4 cache (default: the model's own)")
  r.set_defaults(func=_passkey)
  s = sub.add_parser("serve", help="OpenAI-compatible HTTP server over the continuous-batching "
                     "engine (needs kvjax[serve])")
  from kvjax.serve import add_arguments as serve_arguments
  serve_arguments(s)
  s.set_defaults(func=_serve)
  return p


def _terminate(signum, frame):
  # SIGTERM ends the job the way Ctrl-C does, so writers clean up their temporary files.
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
  import signal
  args = build_parser().parse_args(argv)
  try:
    signal.signal(signal.SIGTERM, _terminate)
  except ValueError:  # not the main thread
    pass
  try:
    args.func(args)
  except KeyboardInterrupt:
    print(f"kvjax {args.command}: interrupted", file=sys.stderr)
    return 130
  except (ValueError, OSError, RuntimeError) as e:
    print(f"kvjax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
