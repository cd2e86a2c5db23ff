"""Every kernel lowers for real TPUs (Mosaic) and NVIDIA GPUs (Triton) without the hardware.

`jax.export` runs the Pallas -> Mosaic / Pallas -> Triton lowering on the CPU and
yields the StableHLO module a TPU or GPU runtime would compile. What this
proves: the kernels trace, their block specs and grids are accepted, and every
operation inside has a Mosaic / Triton lowering rule. What it cannot prove:
Mosaic's own layout passes and Triton's PTX compilation run only on the device.

Triton custom calls are not covered by export's compatibility guarantee, so that
check is disabled explicitly for the GPU exports.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from kvjax.pallas_kernels import decode_attention, quantize_pack

TRITON_TARGET = "__gpu$xla.gpu.triton"
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": TRITON_TARGET}
BACKEND = {"tpu": "tpu", "cuda": "gpu"}


def _export(fn, args, platform):
  # The CPU decode path's kernel (kvjax.native) is a custom call of this project, too.
  disabled = [jax.export.DisabledSafetyCheck.custom_call(t)
              for t in (TRITON_TARGET, "kvjax_quant_attention")]
  exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=disabled)(*args)
  return exported.mlir_module()


def _custom_call_targets(module_text):
  return re.findall(r'stablehlo\.custom_call @([\w$.]+)|call_target_name = "([^"]+)"',
                    module_text)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("bits,d,group_size", [(4, 128, 32), (4, 64, 64), (8, 256, 128)])
@pytest.mark.parametrize("feedback", [False, True], ids=["nearest", "feedback"])
def test_quantize_pack_lowers(platform, bits, d, group_size, feedback):
  fn = functools.partial(quantize_pack, bits=bits, group_size=group_size,
                         backend=BACKEND[platform], interpret=False)
  args = (jax.ShapeDtypeStruct((96, d), jnp.bfloat16), jax.ShapeDtypeStruct((d, d), jnp.float32),
          jax.ShapeDtypeStruct((d,), jnp.float32))
  if feedback:  # error-feedback rounding: an extra [D, D] float32 matrix
    args += (jax.ShapeDtypeStruct((d, d), jnp.float32),)
    plain = fn
    fn = lambda x, rotation, lam, f: plain(x, rotation, lam, feedback=f)
  text = _export(fn, args, platform)
  assert CUSTOM_CALL[platform] in text
  name = f"quantize_pack_int{bits}_g{group_size}"
  assert (name + "_feedback" in text) == feedback and name in text
  code_shape = f"96x{d // 2}xui8" if bits == 4 else f"96x{d}xi8"
  assert code_shape in text  # codes come out of the kernel already packed


DECODE_CASES = [
    # (B, H, n_rep, S, D, g, key_bits, value_bits, ring, window, softcap)
    (2, 2, 4, 1024, 128, 32, 4, 4, False, None, None),
    (2, 1, 8, 512, 256, 128, 8, 4, True, 128, 50.0),
    (1, 2, 1, 1000, 64, 64, 4, 8, False, 100, None),
]


def _decode_args(case):
  """Shapes of decode_attention's positional arguments for a DECODE_CASES entry."""
  b, h, n_rep, s, d, g, key_bits, value_bits, *_ = case

  def code_struct(bits):
    return (jax.ShapeDtypeStruct((b, h, s, d // 2), jnp.uint8) if bits == 4
            else jax.ShapeDtypeStruct((b, h, s, d), jnp.int8))

  scales = jax.ShapeDtypeStruct((b, h, s, d // g), jnp.bfloat16)
  return (jax.ShapeDtypeStruct((b, h * n_rep, d), jnp.float32), code_struct(key_bits), scales,
          code_struct(value_bits), scales, jax.ShapeDtypeStruct((b,), jnp.int32))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"D{c[4]}-g{c[5]}-K{c[6]}V{c[7]}")
@pytest.mark.parametrize("rope_pairs", [0, 1, 8], ids=lambda p: f"rope{p}")
def test_decode_attention_lowers(platform, case, rope_pairs):
  b, h, n_rep, s, d, g, key_bits, value_bits, ring, window, softcap = case
  args = _decode_args(case)
  fn = functools.partial(decode_attention, key_bits=key_bits, value_bits=value_bits,
                         group_size=g, ring=ring, window=window, softcap=softcap,
                         backend=BACKEND[platform], interpret=False)
  if rope_pairs:
    # Rotary logit offsets: [B, Hq, 2P] coefficients and [P] frequencies.
    args += (jax.ShapeDtypeStruct((b, h * n_rep, 2 * rope_pairs), jnp.float32),
             jax.ShapeDtypeStruct((rope_pairs,), jnp.float32))
    plain = fn
    fn = lambda *a: plain(*a[:6], rope_coef=a[6], rope_freq=a[7])
  text = _export(fn, args, platform)
  assert CUSTOM_CALL[platform] in text
  assert f"decode_attention_k{key_bits}v{value_bits}_g{g}" in text
  # The fused kernel never materializes dequantized K/V: no [B, H, S, D] float
  # tensor exists anywhere in the lowered program.
  for dtype in ("f32", "bf16", "f16"):
    assert f"{b}x{h}x{s}x{d}x{dtype}" not in text
  # Nor per-slot rotary terms: cos/sin are computed inside the kernel, per block.
  for width in {rope_pairs, 2 * rope_pairs} - {0}:
    for shape in (f"{b}x{s}x{width}", f"{s}x{width}", f"{b}x{h}x{n_rep}x{s}",
                  f"{b}x{h * n_rep}x{s}"):
      assert f"tensor<{shape}xf32>" not in text
  # Exactly one kernel launch; everything else (query layout, split combine) is plain HLO.
  targets = [t for pair in _custom_call_targets(text) for t in pair if t]
  assert targets == [CUSTOM_CALL[platform]], targets


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", DECODE_CASES[:2], ids=lambda c: f"D{c[4]}-g{c[5]}-K{c[6]}V{c[7]}")
def test_decode_attention_with_block_logsumexp_lowers(platform, case):
  # The per-block log-sum-exps a certificate needs (kvjax.certified) come out of the same
  # kernel launch: one custom call, and no [.., S] per-slot logits outside it.
  b, h, n_rep, s, d, g, key_bits, value_bits, ring, window, softcap = case
  args = _decode_args(case)
  fn = functools.partial(decode_attention, key_bits=key_bits, value_bits=value_bits,
                         group_size=g, ring=ring, window=window, softcap=softcap,
                         backend=BACKEND[platform], interpret=False, block_logsumexp=16)
  text = _export(fn, args, platform)
  targets = [t for pair in _custom_call_targets(text) for t in pair if t]
  assert targets == [CUSTOM_CALL[platform]], targets
  assert f"tensor<{b}x{h * n_rep}x{s // 16}xf32>" in text
  for shape in (f"{b}x{h}x{n_rep}x{s}", f"{b}x{h * n_rep}x{s}"):
    assert f"tensor<{shape}xf32>" not in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_decode_attention_with_logit_offset_lowers(platform):
  b, h, n_rep, s, d, g = 2, 2, 4, 256, 128, 32
  codes = jax.ShapeDtypeStruct((b, h, s, d // 2), jnp.uint8)
  scales = jax.ShapeDtypeStruct((b, h, s, d // g), jnp.bfloat16)
  args = (jax.ShapeDtypeStruct((b, h * n_rep, d), jnp.float32), codes, scales, codes, scales,
          jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, h * n_rep), jnp.float32))

  def fn(q, kc, ks, vc, vs, lengths, offset):
    return decode_attention(q, kc, ks, vc, vs, lengths, softcap=30.0, logit_offset=offset,
                            backend=BACKEND[platform], interpret=False)

  text = _export(fn, args, platform)
  assert CUSTOM_CALL[platform] in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_decode_attention_with_sink_logit_lowers(platform):
  # The sink corrections (logit and value) and the query's own value correction are split-K
  # states built outside the kernel from one slot each: still one kernel launch, and no
  # dequantized [B, H, S, D] K/V anywhere.
  b, h, n_rep, s, d, g = 2, 2, 4, 256, 128, 32
  codes = jax.ShapeDtypeStruct((b, h, s, d // 2), jnp.uint8)
  scales = jax.ShapeDtypeStruct((b, h, s, d // g), jnp.bfloat16)
  hq = jax.ShapeDtypeStruct((b, h * n_rep), jnp.float32)
  hd = jax.ShapeDtypeStruct((b, h, d), jnp.float32)
  args = (jax.ShapeDtypeStruct((b, h * n_rep, d), jnp.float32), codes, scales, codes, scales,
          jax.ShapeDtypeStruct((b,), jnp.int32), hq, hq, hd,
          jax.ShapeDtypeStruct((b, h, 4, d), jnp.float32))

  def fn(q, kc, ks, vc, vs, lengths, offset, sink, sink_value, recent_values):
    return decode_attention(q, kc, ks, vc, vs, lengths, softcap=30.0, logit_offset=offset,
                            sink_logit=sink, sink_value=sink_value, recent_values=recent_values,
                            ring=True, window=128, backend=BACKEND[platform], interpret=False)

  text = _export(fn, args, platform)
  targets = [t for pair in _custom_call_targets(text) for t in pair if t]
  assert targets == [CUSTOM_CALL[platform]], targets
  for dtype in ("f32", "bf16", "f16"):
    assert f"{b}x{h}x{s}x{d}x{dtype}" not in text


# A whole decode step through the library with the default implementation ("auto"), exported from
# this CPU host: the implementation is chosen for the platform the step is lowered for.

def _decode_step_exported(platform):
  import numpy as np
  import kvjax
  from kvjax import corrections as kc
  b, h, rep, s, d = 2, 2, 4, 256, 128
  cfg = kvjax.QuantConfig(corrections=(kc.KeyOffset(), kc.RotaryKeyOffset(4), kc.KeyFeedback(),
                                       kc.KeySink(), kc.ValueSink(), kc.RecentValues(4)))
  cache = kvjax.init_cache(b, h, s, d, quant=cfg)
  cache = kvjax.append(cache, jnp.ones((b, 10, h, d)), jnp.ones((b, 10, h, d)), impl="xla")
  q = jax.ShapeDtypeStruct((b, 1, h * rep, d), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, 1, h, d), jnp.float32)
  step = lambda cache, q, k, v: kvjax.append_and_attend(cache, q, k, v)
  return _export(step, (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), cache),
                        q, kv, kv), platform), np


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_a_default_decode_step_exported_for_an_accelerator_holds_the_kernels(platform):
  text, _ = _decode_step_exported(platform)
  targets = [t for pair in _custom_call_targets(text) for t in pair if t]
  # The fused write (keys and values) and the fused decode attention; no interpret-mode loop.
  assert targets.count(CUSTOM_CALL[platform]) == 3, targets
  assert "decode_attention_k4v4_g32" in text and "quantize_pack_int4_g32" in text


def test_a_default_decode_step_exported_for_the_cpu_holds_no_pallas_kernel():
  text, _ = _decode_step_exported("cpu")
  assert not [t for pair in _custom_call_targets(text) for t in pair if t in CUSTOM_CALL.values()]
  assert "decode_attention" not in text and "quantize_pack" not in text
  from kvjax import native
  # The CPU's own decode path: the C++ kernel where it could be built, else XLA ops only.
  assert (native.TARGET in text) == native.available()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_paged_decode_attention_lowers_without_gathering(platform):
  # Over a page pool the kernels read pages through the table (scalar-prefetched on TPU, a
  # table row per program on GPU): one kernel launch, and no contiguous [B, H, P * page, ...]
  # copy of the sequences' codes.
  b, h, n_rep, d, g, pages, page, width = 3, 2, 4, 128, 32, 40, 32, 8
  codes = jax.ShapeDtypeStruct((pages, h, page, d // 2), jnp.uint8)
  scales = jax.ShapeDtypeStruct((pages, h, page, d // g), jnp.bfloat16)
  args = (jax.ShapeDtypeStruct((b, h * n_rep, d), jnp.float32), codes, scales, codes, scales,
          jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, width), jnp.int32))
  fn = lambda q, kc, ks, vc, vs, lengths, table: decode_attention(
      q, kc, ks, vc, vs, lengths, group_size=g, window=100, page_table=table,
      backend=BACKEND[platform], interpret=False)
  text = _export(fn, args, platform)
  targets = [t for pair in _custom_call_targets(text) for t in pair if t]
  assert targets == [CUSTOM_CALL[platform]], targets
  assert "paged_decode_attention_k4v4_g32" in text
  assert f"{b}x{h}x{width * page}x{d // 2}xui8" not in text
  assert f"{b}x{width}x{h}x{page}x{d // 2}xui8" not in text
