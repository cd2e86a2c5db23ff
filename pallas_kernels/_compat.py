"""Pallas API names that moved between jax 0.10 and 0.12, resolved in one place.

jax renamed the backend compiler-parameter classes (`TPUCompilerParams` ->
`pltpu.CompilerParams`, `TritonCompilerParams` -> `pallas.triton.CompilerParams`);
the kernels import the classes from here so that only this file knows both names.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

try:  # jax >= 0.6: backend modules own their CompilerParams.
  TPUCompilerParams = pltpu.CompilerParams
except AttributeError:  # pragma: no cover - older jax
  TPUCompilerParams = pltpu.TPUCompilerParams

try:
  from jax.experimental.pallas import triton as pltriton
  TritonCompilerParams = pltriton.CompilerParams
except (ImportError, AttributeError):  # pragma: no cover - older jax
  pltriton = None
  TritonCompilerParams = pl.TritonCompilerParams

PrefetchScalarGridSpec = pltpu.PrefetchScalarGridSpec
VMEM = pltpu.VMEM if hasattr(pltpu, "VMEM") else pltpu.TPUMemorySpace.VMEM


def tpu_interpret_params():
  """TPU-semantics interpreter settings (simulated VMEM/DMA on the CPU), or None.

  Returns None on jax versions without `pltpu.InterpretParams`; callers then
  fall back to the generic interpreter (`interpret=True`).
  """
  params_cls = getattr(pltpu, "InterpretParams", None)
  return None if params_cls is None else params_cls()


def resolve_interpret(interpret):
  """`interpret=None` means: interpret exactly when running on the CPU."""
  if interpret is None:
    return jax.default_backend() == "cpu"
  return interpret
