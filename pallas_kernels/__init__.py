"""Pallas kernels of kvjax (imported as `kvjax.pallas_kernels`).

* `quantize_pack`: fused rotate + per-group scale + quantize + pack (the cache write).
* `decode_attention`: fused decode attention straight from 4/8-bit codes and
  scales, with split-K, GQA, ragged lengths, ring buffers and sliding windows.
  Dispatches to the Mosaic TPU kernel (`decode_attention_tpu`) or the Triton GPU
  kernel (`decode_attention_gpu`).
* `*_reference`: plain-jnp versions of both, the oracles of the tests.

On the CPU every kernel runs in the Pallas interpreter (`interpret=None` decides
that from `jax.default_backend()`).

Compile checks without accelerators (developer tools, extra packages in a separate
folder): `python -m kvjax.pallas_kernels.tpu_aot_check` (libtpu's Mosaic compiler,
v4/v5e/v5p/v6e topologies) and `python -m kvjax.pallas_kernels.gpu_triton_compile_check`
(Triton to sm_80/sm_90 cubin). Per-head rotations: `jax.vmap(quantize_pack)` over
heads is one kernel launch with an extra grid axis.
"""

from __future__ import annotations

from kvjax.pallas_kernels import tuning
from kvjax.pallas_kernels._compat import resolve_interpret
from kvjax.pallas_kernels.decode_attention_gpu import decode_attention_gpu
from kvjax.pallas_kernels.decode_attention_tpu import decode_attention_tpu
from kvjax.pallas_kernels.quantize_pack import quantize_pack, quantize_pack_reference
from kvjax.pallas_kernels.reference import decode_attention_reference


def decode_attention(q_rot, k_codes, k_scales, v_codes, v_scales, lengths, *, key_bits=4,
                     value_bits=4, group_size=32, ring=False, window=None, scale=None,
                     softcap=None, logit_offset=None, rope_coef=None, rope_freq=None,
                     sink_logit=None, sink_value=None, recent_values=None, backend=None,
                     interpret=None, block_s=None, num_splits=None, block_logsumexp=None,
                     page_table=None):
  """One decode step of attention over a quantized cache, in the rotated domain.

  Args:
    q_rot: [B, Hq, D] float32 queries already rotated and lambda-scaled by the
      caller (q~ = R_k (lam_k * q)).
    k_codes, v_codes: [B, H, S, D/2] uint8 split-halves nibbles (4-bit) or
      [B, H, S, D] int8 (8-bit), as in docs/cache_layout.md.
    k_scales, v_scales: [B, H, S, D // group_size] bfloat16 per-group scales.
    lengths: [B] int32 tokens written; the query is at absolute position L - 1.
    key_bits, value_bits, group_size: the cache's quantization (static).
    ring: the cache is a ring buffer of capacity S (sliding-window layer).
    window: None or the sliding window in tokens.
    scale: logit scale (default D ** -0.5); softcap: None or c for c * tanh(x / c).
    logit_offset: None or [B, Hq] float added to every logit of a query after the
      scale, before the soft-cap: pass scale * (q . k_mean) when keys are stored
      minus a per-channel mean and a soft-cap is used (softmax alone ignores it).
    rope_coef, rope_freq: None (default), or float [B, Hq, 2P] coefficients and
      [P] frequencies with P >= 1, always both: rotary logit offsets for keys
      stored minus c_t (`kvjax.rotary`). The logit of a slot at absolute position
      t gets, together with logit_offset (after the scale, before the soft-cap),
        sum_p rope_coef[b, hq, p] * cos(float32(t) * rope_freq[p])
            + rope_coef[b, hq, P + p] * sin(float32(t) * rope_freq[p]).
      rope_coef must already include the logit scale. t is the slot's position
      from the ring bookkeeping (the slot index for a non-ring cache); the trig
      terms are computed in the kernel per block of slots, nothing per slot is read.
    sink_logit: None or float [B, Hq], added (after the scale, before the soft-cap) to the
      logit of the key at absolute position 0 while it is visible: scale * q . e_0 for a
      cache that keeps its sink key's rounding error e_0 (`kvjax.corrections.KeySink`). Applied
      outside the kernel as one more split-K state (`_common.slot_split`).
    sink_value: None or float [B, H, D], added in the rotated value domain to the value at
      absolute position 0 while it is visible: R_v (e_0 / lam_v) for a cache that keeps its
      sink value's rounding error e_0 (`kvjax.corrections.ValueSink`); the same split-K state.
    recent_values: None or float [B, H, W, D]: row w is added in the rotated value domain to
      the value at position L - 1 - w (w = 0: the query's own token): R_v (e / lam_v) for the
      recent values' rounding errors e (`kvjax.corrections.RecentValues`); one more split-K state
      per row. At position 0 it adds to the sink value.
    backend: "tpu" (Mosaic), "gpu" (Triton) or None to follow
      `jax.default_backend()` (the TPU kernel when interpreting on the CPU).
    interpret: None (interpret on CPU only), a bool, or for the TPU kernel a
      `pltpu.InterpretParams` for TPU-semantics interpretation.
    block_s, num_splits: tuning overrides (defaults from `tuning`).
    page_table: None, or int32 [B, P] for a paged cache: k_codes ... v_scales are then a page
      pool [num_pages, H, page_size, ...] (`kvjax.paged`) and slot t of sequence b is in page
      page_table[b, t // page_size]. Both kernels read pages in place: the TPU kernel's index
      map reads the scalar-prefetched table (page_size a multiple of 32), the GPU kernel loads
      its sequence's table row and each page where it lies (page_size a power of two >= 16).
      Not with ring.
    block_logsumexp: None, or a block size n (dividing S and block_s): the kernel also returns,
      from the same pass, log sum exp(logit) per query head and block of n slots
      ([B, Hq, S // n], -inf for blocks with no visible slot): each block's share of the
      attention, for `kvjax.certified`. Not with the sink / recent-value corrections.

  Returns:
    [B, Hq, D] float32 output in the rotated value domain (the caller un-rotates
    once: out = lam_v * R_v^T o~). Rows that see no key (length 0) are zeros. With
    block_logsumexp, (that output, the block log-sum-exps).
  """
  backend = tuning.resolve_backend(backend)
  kernel = decode_attention_gpu if backend == "gpu" else decode_attention_tpu
  extra = {} if page_table is None else {"page_table": page_table}
  return kernel(q_rot, k_codes, k_scales, v_codes, v_scales, lengths, key_bits=key_bits,
                value_bits=value_bits, group_size=group_size, ring=ring, window=window,
                scale=scale, softcap=softcap, logit_offset=logit_offset, rope_coef=rope_coef,
                rope_freq=rope_freq, sink_logit=sink_logit, sink_value=sink_value,
                recent_values=recent_values, block_s=block_s, num_splits=num_splits,
                block_logsumexp=block_logsumexp, interpret=interpret, **extra)


__all__ = [
    "quantize_pack", "quantize_pack_reference", "decode_attention", "decode_attention_tpu",
    "decode_attention_gpu", "decode_attention_reference", "resolve_interpret", "tuning",
]
