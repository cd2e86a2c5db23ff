"""Compiles the GPU kernels' Triton IR to PTX and cubin with Triton itself, without a GPU.

`jax.export` (tests/test_pallas_lowering.py) proves the kernels lower to Triton
IR; XLA compiles that IR only on a machine with a GPU. This developer check
captures the Triton IR that Pallas emits for each configuration and runs
Triton's own compiler on it (TTIR -> TTGIR -> LLVM -> PTX -> cubin via the
ptxas that ships in the `triton` wheel) for a chosen compute capability, and
reports the shared memory each kernel needs.

Caveats: it hooks a private jax function to get the IR text
(`jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module`), and the
`triton` wheel must understand the IR jax's bundled Triton dialect prints (checked:
jax 0.10.2 with triton 3.6.0). `triton` is not a dependency of kvjax; install
it in a separate folder for this run only:

    pip install --no-deps --target /tmp/triton 'triton==3.6.0'
    PYTHONPATH=/tmp/triton python -m kvjax.pallas_kernels.gpu_triton_compile_check --cc 90 --cc 80

Exit status 1 if any configuration fails to compile.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

from kvjax.pallas_kernels import decode_attention, quantize_pack
from kvjax.pallas_kernels.tpu_aot_check import QUANTIZE_PACK_CONFIGS, decode_jobs

_TRITON_TARGET = "__gpu$xla.gpu.triton"


def _capture_triton_ir(fn, args):
  """Triton IR text of the (single) Pallas kernel in `fn`, as lowered for CUDA."""
  from jax._src.pallas.triton import lowering as triton_lowering
  captured = []
  original = triton_lowering.lower_jaxpr_to_triton_module

  def recording(*a, **k):
    result = original(*a, **k)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  triton_lowering.lower_jaxpr_to_triton_module = recording
  try:
    jax.export.export(jax.jit(fn), platforms=["cuda"],
                      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
                          _TRITON_TARGET)])(*args)
  finally:
    triton_lowering.lower_jaxpr_to_triton_module = original
  if len(captured) != 1:
    raise RuntimeError(f"expected one Triton kernel, captured {len(captured)}")
  return captured[0]


def _jobs():
  for bits, d, g in QUANTIZE_PACK_CONFIGS:
    fn = functools.partial(quantize_pack, bits=bits, group_size=g, backend="gpu",
                           interpret=False)
    args = (jax.ShapeDtypeStruct((512, d), jnp.bfloat16), jax.ShapeDtypeStruct((d, d), jnp.float32),
            jax.ShapeDtypeStruct((d,), jnp.float32))
    yield f"quantize_pack int{bits} D={d} g={g}", fn, args, 4, 1
  for config, pairs, args, wrap in decode_jobs(jax.ShapeDtypeStruct):
    _, _, n_rep, _, d, g, kb, vb, ring, window, softcap = config
    fn = functools.partial(decode_attention, key_bits=kb, value_bits=vb, group_size=g, ring=ring,
                           window=window, softcap=softcap, backend="gpu", interpret=False)
    yield (f"decode_attention K{kb}V{vb} n_rep={n_rep} D={d} g={g} ring={ring} "
           f"window={window} softcap={softcap} rope_pairs={pairs}", wrap(fn), args, 4, 2)


def run(compute_capabilities, out=sys.stdout):
  """Compiles every configuration for each compute capability; returns the failure count."""
  import triton
  from triton.backends.compiler import GPUTarget
  failures = 0
  with tempfile.TemporaryDirectory() as tmp:
    for i, (label, fn, args, num_warps, num_stages) in enumerate(_jobs()):
      path = os.path.join(tmp, f"kernel{i}.ttir")
      with open(path, "w") as f:
        f.write(_capture_triton_ir(fn, args))
      for cc in compute_capabilities:
        try:
          kernel = triton.compile(path, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
          print(f"OK    sm_{cc} smem={kernel.metadata.shared:>7} B  {label}", file=out,
                flush=True)
        except Exception as e:  # report every configuration, then fail at the end
          failures += 1
          print(f"FAIL  sm_{cc} {label}\n      {str(e)[:2000]}", file=out, flush=True)
  return failures


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cc", type=int, action="append",
                      help="CUDA compute capability, e.g. 90 (H100), 80 (A100); repeatable")
  args = parser.parse_args(argv)
  failures = run(args.cc or [90])
  print(f"{failures} configuration(s) failed")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
