"""Compiles the TPU kernels with the real Mosaic compiler, without a TPU.

`jax.export` (tests/test_pallas_lowering.py) stops at the Mosaic MLIR that jax
emits; Mosaic's own layout and legalization passes run inside libtpu when XLA
compiles the `tpu_custom_call`. libtpu can compile for a *described* TPU
topology on a CPU-only machine (deviceless ahead-of-time compilation), which
runs those passes for real. This script does that for every kernel
configuration in the matrix below and reports each one.

libtpu is not a dependency of kvjax (installing it into the environment makes
jax probe for TPUs at start-up); put the version matching jax (0.0.42.* for jax
0.10.2) in a separate folder and point PYTHONPATH at it for this run only:

    pip install --no-deps --target /tmp/libtpu 'libtpu==0.0.42.*'
    TPU_ACCELERATOR_TYPE=v5litepod-4 TPU_WORKER_HOSTNAMES=localhost TPU_SKIP_MDS_QUERY=1 \\
      PYTHONPATH=/tmp/libtpu python -m kvjax.pallas_kernels.tpu_aot_check --topology v5e:2x2

Exit status 1 if any configuration fails to compile.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp

from kvjax.pallas_kernels import decode_attention, quantize_pack

# (bits, head_dim, group_size) of the write kernel.
QUANTIZE_PACK_CONFIGS = [(bits, d, g) for bits in (4, 8)
                         for d, g in ((64, 32), (128, 32), (128, 128), (256, 64), (256, 128))]

# (B, H, n_rep, S, D, g, key_bits, value_bits, ring, window, softcap) of decode attention.
DECODE_CONFIGS = [
    (2, 2, 4, 1024, 128, 32, 4, 4, False, None, None),
    (1, 8, 4, 4096, 128, 64, 4, 4, False, None, None),
    (2, 1, 4, 2048, 256, 32, 4, 4, False, None, None),
    (2, 1, 8, 512, 256, 128, 8, 4, True, 128, 50.0),
    (1, 2, 1, 1000, 64, 64, 4, 8, False, 100, None),
    (2, 8, 4, 4096, 128, 64, 8, 8, False, None, None),
    (1, 2, 7, 768, 64, 32, 4, 4, True, None, None),
]

# (index into DECODE_CONFIGS, P): decode attention with rotary logit offsets of P pairs
# (P = 1: degenerate [n_rep, 1] x [1, block_s] matmuls; P = 3 with n_rep = 7: nothing a
# power of two).
DECODE_ROPE_CONFIGS = [(0, 1), (0, 8), (3, 16), (4, 8), (6, 3)]


def decode_jobs(struct):
  """Every decode configuration (plain, then with rotary offsets) with abstract arguments.

  `struct(shape, dtype)` builds the arguments. Yields (config, P, args, wrap): P = 0
  means no rotary offsets, and wrap(decode_fn) is the function of args to compile.
  """
  for config, pairs in ([(c, 0) for c in DECODE_CONFIGS] +
                        [(DECODE_CONFIGS[i], p) for i, p in DECODE_ROPE_CONFIGS]):
    b, h, n_rep, s, d, g, kb, vb, ring, window, softcap = config

    def codes(bits):
      return struct((b, h, s, d // 2), jnp.uint8) if bits == 4 else struct((b, h, s, d), jnp.int8)

    scales = struct((b, h, s, d // g), jnp.bfloat16)
    args = (struct((b, h * n_rep, d), jnp.float32), codes(kb), scales, codes(vb), scales,
            struct((b,), jnp.int32))
    if pairs:
      args += (struct((b, h * n_rep, 2 * pairs), jnp.float32), struct((pairs,), jnp.float32))
      wrap = lambda fn: (lambda *a: fn(*a[:6], rope_coef=a[6], rope_freq=a[7]))
    else:
      wrap = lambda fn: fn
    yield config, pairs, args, wrap


def _topology_device(topology, chips_per_host_bounds):
  from jax.experimental import topologies
  desc = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                      chip_config_name="default",
                                      chips_per_host_bounds=chips_per_host_bounds, num_slices=1)
  return desc.devices[0]


def _compile(fn, args):
  jax.jit(fn).lower(*args).compile()


def run(topology, chips_per_host_bounds=(2, 2, 1), out=sys.stdout):
  """Compiles every configuration for `topology`; returns the number of failures."""
  device = _topology_device(topology, chips_per_host_bounds)
  sharding = jax.sharding.SingleDeviceSharding(device)
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  jobs = []
  for bits, d, g in QUANTIZE_PACK_CONFIGS:
    fn = functools.partial(quantize_pack, bits=bits, group_size=g, backend="tpu",
                           interpret=False)
    args = (sds((512, d), jnp.bfloat16), sds((d, d), jnp.float32), sds((d,), jnp.float32))
    jobs.append((f"quantize_pack int{bits} D={d} g={g}", fn, args))
  for config, pairs, args, wrap in decode_jobs(sds):
    b, h, n_rep, s, d, g, kb, vb, ring, window, softcap = config
    fn = functools.partial(decode_attention, key_bits=kb, value_bits=vb, group_size=g, ring=ring,
                           window=window, softcap=softcap, backend="tpu", interpret=False)
    jobs.append((f"decode_attention K{kb}V{vb} B={b} H={h} n_rep={n_rep} S={s} D={d} g={g} "
                 f"ring={ring} window={window} softcap={softcap} rope_pairs={pairs}", wrap(fn),
                 args))
  failures = 0
  print(f"# {topology} ({device.device_kind})", file=out, flush=True)
  for label, fn, args in jobs:
    try:
      _compile(fn, args)
      print(f"OK    {label}", file=out, flush=True)
    except Exception as e:  # report every configuration, then fail at the end
      failures += 1
      print(f"FAIL  {label}\n      {str(e)[:2000]}", file=out, flush=True)
  return failures


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", action="append",
                      help="TPU topology name, e.g. v5e:2x2, v6e:2x2, v4:2x2x1, v5p:2x2x1 "
                           "(repeatable; default v5e:2x2)")
  args = parser.parse_args(argv)
  failures = sum(run(t) for t in (args.topology or ["v5e:2x2"]))
  print(f"{failures} configuration(s) failed")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
