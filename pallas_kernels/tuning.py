"""Default block sizes of the Pallas kernels, keyed by (target, head_dim).

UNTUNED ON HARDWARE: these values were chosen from the tiling rules of each
target (TPU: (8, 128) f32 / (32, 128) int8 tiles, score rows along 128 lanes;
GPU/Triton: power-of-two tiles, >= 16 per matmul dimension) and from a
VMEM / shared-memory budget, not from timing runs; the kernels were developed
on machines without a TPU or GPU. Re-tune with a sweep on the target chip and
replace the table entries; callers can always pass block sizes explicitly.
"""

from __future__ import annotations

import jax

# (target, head_dim) -> rows of cached tokens per grid step of decode attention.
# TPU: a [block_s, D/2] uint8 code block plus [block_s, G] bf16 scales per K and V,
# double-buffered, stays far below the 16-32 MiB of VMEM; 512 tokens per step keeps
# the per-step overhead (~0.35 us) small against the DMA time.
# GPU: one loop iteration of a Triton program loads [block_s, g] code tiles;
# 64-128 rows keep registers per thread moderate with 4 warps.
DECODE_BLOCK_S = {
    ("tpu", 64): 512,
    ("tpu", 128): 512,
    ("tpu", 256): 256,
    ("gpu", 64): 128,
    ("gpu", 128): 64,
    ("gpu", 256): 64,
}

# Programs (grid points) the split-K heuristic aims for: a v5e TensorCore runs
# grid points one after another (megacore chips split "parallel" axes over 2
# cores), an H100 has 132 SMs that want a few programs each.
TARGET_PARALLEL_PROGRAMS = {"tpu": 2, "gpu": 264}

# (target, head_dim) -> rows per grid step of the write kernel.
QUANTIZE_PACK_BLOCK_N = {
    ("tpu", 64): 512,
    ("tpu", 128): 256,
    ("tpu", 256): 128,
    ("gpu", 64): 64,
    ("gpu", 128): 32,
    ("gpu", 256): 32,
}

TARGETS = ("tpu", "gpu")


def resolve_backend(backend: str | None) -> str:
  """Kernel family for `backend` ("tpu" | "gpu" | None = from the default device).

  On the CPU (tests, interpret mode) None picks "tpu", whose kernels the generic
  interpreter runs as well as the GPU ones.
  """
  if backend is None:
    platform = jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else "tpu"
  if backend not in TARGETS:
    raise ValueError(f"backend must be one of {TARGETS} or None, got {backend!r}")
  return backend


def _nearest_head_dim(table, target, head_dim):
  dims = sorted(d for t, d in table if t == target)
  larger = [d for d in dims if d >= head_dim]
  return larger[0] if larger else dims[-1]


def decode_block_s(target: str, head_dim: int) -> int:
  """Default cached tokens per block for decode attention."""
  return DECODE_BLOCK_S[(target, _nearest_head_dim(DECODE_BLOCK_S, target, head_dim))]


def quantize_pack_block_n(target: str, head_dim: int) -> int:
  """Default rows per grid step of `quantize_pack`."""
  return QUANTIZE_PACK_BLOCK_N[(target, _nearest_head_dim(QUANTIZE_PACK_BLOCK_N, target,
                                                          head_dim))]


# Fewest cache slots worth a split of their own: every split writes and the
# combine step reads back an [n_rep, D] float32 partial, which must stay small
# next to the codes the split reads (512 int4 slots of D=128 are ~37 KB per K/V).
MIN_SLOTS_PER_SPLIT = {"tpu": 1024, "gpu": 512}


def default_num_splits(target: str, batch: int, kv_heads: int, num_blocks: int,
                       block_s: int) -> int:
  """Split-K factor: enough (batch, head, split) programs to fill the chip.

  At most one split per MIN_SLOTS_PER_SPLIT slots of capacity and never more
  splits than blocks, so every split has work when the cache is full.
  """
  wanted = -(-TARGET_PARALLEL_PROGRAMS[target] // max(batch * kv_heads, 1))
  by_work = max(1, num_blocks * block_s // MIN_SLOTS_PER_SPLIT[target])
  return max(1, min(wanted, by_work, num_blocks))
