"""The fused write kernel against its jnp reference, and the reference against a float64 oracle.

Kernels run in the Pallas interpreter on the CPU. The interpreter starts every
float output and scratch buffer as NaN (jax's `uninitialized_value`), so a scale
the kernel forgot to write shows up as NaN; `test_interpreter_poisons_outputs`
checks that assumption instead of trusting it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from kvjax.pallas_kernels import _compat, quantize_pack, quantize_pack_reference
from kvjax.pallas_kernels.quantize_pack import round_half_even

QMAX = {4: 15, 8: 127}
STEP = {4: 2.0, 8: 1.0}  # distance between adjacent levels, in units of the scale
BF16_EPS = 2.0 ** -8  # bfloat16 has an 8-bit significand: relative rounding error <= 2^-9


def _orthogonal(rng, d):
  q, r = np.linalg.qr(rng.normal(size=(d, d)))
  return (q * np.sign(np.diag(r))).astype(np.float32)


def _inputs(seed, n, d):
  rng = np.random.default_rng(seed)
  # Heavy-ish tails and a per-channel spread, like post-RoPE keys.
  x = (rng.standard_t(df=5, size=(n, d)) * rng.uniform(0.2, 4.0, size=d)).astype(np.float32)
  rotation = _orthogonal(rng, d)
  lam = rng.uniform(0.5, 2.0, size=d).astype(np.float32)
  return x, rotation, lam


def _unpack(codes, bits):
  c = np.asarray(codes)
  if bits == 8:
    return c.astype(np.int32)
  b = c.view(np.int8).astype(np.int32)
  low = ((b << 28) >> 28)
  high = b >> 4
  return 2 * np.concatenate([low, high], axis=-1) + 1  # nibble c holds the odd level 2c + 1


def _rotated64(x, rotation, lam):
  return (x.astype(np.float64) / lam.astype(np.float64)) @ rotation.astype(np.float64).T


def _check_half_step(codes, scales, y64, bits, group_size):
  """Per row: every dequantized channel is within half a quantization step of y (float64).

  A step is 2 scales for the odd 4-bit levels, 1 scale for 8-bit. Rounding to the
  nearest level costs at most half a step; the clip at most qmax * 2^-9 scales
  (the bf16 scale may be rounded down), < 0.25 step; 1e-3 of a step covers the
  float32 matmul of the kernel and reference.
  """
  n, d = y64.shape
  c = _unpack(codes, bits).astype(np.float64)
  s = np.repeat(np.asarray(scales, np.float64), group_size, axis=1)
  assert np.all(np.abs(c) <= QMAX[bits])
  steps = np.abs(c * s - y64) / (STEP[bits] * np.where(s > 0, s, 1.0))
  worst_per_row = steps.max(axis=1)
  assert worst_per_row.max() <= 0.5 + 1e-3, f"worst row error {worst_per_row.max():.4f} steps"
  # Visible with `pytest -s`: the measured error, not just the bound it passed.
  print(f"[worst row error {worst_per_row.max():.4f} quantization steps, bound 0.501]", end=" ")
  return worst_per_row


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("d,group_size", [(64, 32), (128, 64), (256, 128), (128, 128)])
def test_reference_matches_float64_oracle(bits, d, group_size):
  x, rotation, lam = _inputs(1000 + d + group_size + bits, 37, d)
  codes, scales = quantize_pack_reference(x, rotation, lam, bits=bits, group_size=group_size)
  y64 = _rotated64(x, rotation, lam)
  groups = y64.reshape(37, d // group_size, group_size)
  scale64 = np.abs(groups).max(axis=-1) / QMAX[bits]
  # Stored scales are the bf16 rounding of the exact abs-max scale.
  np.testing.assert_allclose(np.asarray(scales, np.float64), scale64, rtol=BF16_EPS)
  assert codes.dtype == (jnp.uint8 if bits == 4 else jnp.int8)
  assert codes.shape == (37, d // 2 if bits == 4 else d)
  _check_half_step(codes, scales, y64, bits, group_size)


def test_reference_nibble_layout_is_split_halves():
  # Channel j in the low nibble of byte j, channel j + D/2 in the high nibble.
  d = 64
  y = np.zeros((1, d), np.float32)
  y[0, 3] = 15.0  # group 0 max -> scale 1, level 15 = nibble 7 at channel 3
  y[0, 3 + d // 2] = -15.0  # level -15 = nibble -8 (0x8) at channel 35, high nibble of byte 3
  # Every other channel is 0 -> level +1 = nibble 0.
  codes, scales = quantize_pack_reference(y, np.eye(d, dtype=np.float32), np.ones(d, np.float32),
                                          bits=4, group_size=32)
  assert np.asarray(scales, np.float32).tolist() == [[1.0, 1.0]]
  assert int(codes[0, 3]) == 0x87
  assert int(np.asarray(codes).astype(np.int64).sum()) == 0x87


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("d,group_size", [(64, 32), (128, 64), (256, 128), (128, 128), (256, 32)])
def test_kernel_matches_reference(bits, d, group_size):
  n = 45  # not a multiple of the 32-row block: exercises the padded tail
  x, rotation, lam = _inputs(d * 7 + group_size + bits, n, d)
  x[5] = 0.0  # an all-zero row: scale 0, codes 0, no 0/0
  codes, scales = quantize_pack(x, rotation, lam, bits=bits, group_size=group_size, block_n=32,
                                interpret=True)
  ref_codes, ref_scales = quantize_pack_reference(x, rotation, lam, bits=bits,
                                                  group_size=group_size)
  assert codes.shape == ref_codes.shape and codes.dtype == ref_codes.dtype
  assert scales.shape == ref_scales.shape and scales.dtype == ref_scales.dtype
  s, rs = np.asarray(scales, np.float32), np.asarray(ref_scales, np.float32)
  assert not np.isnan(s).any()
  # Both compute the rotation in float32; a different summation order can move
  # an abs-max by an ulp, which changes the bf16 scale only at a rounding tie.
  np.testing.assert_allclose(s, rs, rtol=BF16_EPS, atol=0)
  assert np.mean(s == rs) >= 0.99
  c, rc = _unpack(codes, bits), _unpack(ref_codes, bits)
  assert np.abs(c - rc).max() <= STEP[bits]  # one level apart at most
  assert np.mean(c != rc) <= 1e-3
  # An all-zero row: scale 0, every level the smallest one (+1 for 4-bit, 0 for 8-bit).
  assert np.all(c[5] == (1 if bits == 4 else 0)) and np.all(s[5] == 0)
  _check_half_step(codes, scales, _rotated64(x, rotation, lam), bits, group_size)


@pytest.mark.parametrize("bits,d,group_size", [(4, 256, 32), (8, 256, 128), (4, 128, 128)])
def test_gpu_variant_matches_reference(bits, d, group_size):
  # The GPU variant cuts the rotation into 64-column chunks and stores codes per chunk.
  x, rotation, lam = _inputs(d + bits + group_size, 40, d)
  codes, scales = quantize_pack(x, rotation, lam, bits=bits, group_size=group_size,
                                backend="gpu", block_n=32, interpret=True)
  ref_codes, ref_scales = quantize_pack_reference(x, rotation, lam, bits=bits,
                                                  group_size=group_size)
  c, rc = _unpack(codes, bits), _unpack(ref_codes, bits)
  assert np.abs(c - rc).max() <= STEP[bits] and np.mean(c != rc) <= 1e-3
  np.testing.assert_allclose(np.asarray(scales, np.float32), np.asarray(ref_scales, np.float32),
                             rtol=BF16_EPS)
  _check_half_step(codes, scales, _rotated64(x, rotation, lam), bits, group_size)


def test_kernel_matches_core_quantizer_layout():
  # The write kernel must produce exactly what kvjax.quantizer stores (the cache contract).
  from kvjax import quantizer
  d, g = 128, 32
  x, rotation, lam = _inputs(7, 40, d)
  for bits in (4, 8):
    codes, scales = quantize_pack(x, rotation, lam, bits=bits, group_size=g, interpret=True)
    core_codes, core_scales = quantizer.quantize(x[:, None], rotation[None], lam[None],
                                                 bits=bits, group_size=g)
    c, cc = _unpack(codes, bits), _unpack(np.asarray(core_codes)[:, 0], bits)
    assert np.abs(c - cc).max() <= 1 and np.mean(c != cc) <= 1e-3
    np.testing.assert_allclose(np.asarray(scales, np.float32),
                               np.asarray(core_scales, np.float32)[:, 0], rtol=BF16_EPS)


def test_kernel_tpu_semantics_interpreter():
  params = _compat.tpu_interpret_params()
  if params is None:
    pytest.skip("this jax has no pltpu.InterpretParams")
  d, g = 128, 64
  x, rotation, lam = _inputs(11, 40, d)
  codes, scales = quantize_pack(x, rotation, lam, bits=4, group_size=g, block_n=32,
                                interpret=params)
  ref_codes, ref_scales = quantize_pack_reference(x, rotation, lam, bits=4, group_size=g)
  assert np.mean(_unpack(codes, 4) != _unpack(ref_codes, 4)) <= 1e-3
  np.testing.assert_allclose(np.asarray(scales, np.float32), np.asarray(ref_scales, np.float32),
                             rtol=BF16_EPS)


@pytest.mark.parametrize("bits", [4, 8])
def test_ties_are_broken_the_same_way_everywhere(bits):
  # Exact ties only happen for special inputs; random data would not catch a different rule.
  # 4-bit levels are odd, so ties sit on even integers and go up (2 floor(u / 2) + 1);
  # 8-bit ties sit on half-integers and go to even.
  d = 64
  x = np.zeros((32, d), np.float32)
  x[:, 0] = QMAX[bits]  # group 0 scale: exactly 1.0
  x[:, 32] = -QMAX[bits]  # group 1 scale: exactly 1.0
  if bits == 4:
    ties = np.array([0.0, 2.0, 4.0, -2.0, -4.0, 14.0, -14.0, 1.0, -1.0, 0.99], np.float32)
    expected = [1, 3, 5, -1, -3, 15, -13, 1, -1, 1]
  else:
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 6.5, -6.5], np.float32)
    expected = [0, 2, 2, 0, -2, -2, 4, -4, 6, -6]
    assert np.round(ties).astype(np.int32).tolist() == expected  # numpy: half to even
  x[:, 1:11] = ties
  x[:, 40:50] = ties
  eye, ones = np.eye(d, dtype=np.float32), np.ones(d, np.float32)
  for fn in (quantize_pack_reference,
             lambda *a, **k: quantize_pack(*a, interpret=True, **k)):
    codes, scales = fn(x, eye, ones, bits=bits, group_size=32)
    c = _unpack(codes, bits)
    assert np.all(np.asarray(scales, np.float32) == 1.0)
    assert np.all(c[:, 1:11] == expected) and np.all(c[:, 40:50] == expected)


def test_round_half_even_helper_matches_jnp_round():
  values = np.concatenate([np.arange(-200, 200) * 0.25,
                           np.random.default_rng(0).normal(scale=50, size=2000)])
  values = values.astype(np.float32)
  np.testing.assert_array_equal(np.asarray(round_half_even(jnp.asarray(values))),
                                np.round(values))


def test_kernel_accepts_bf16_input_and_float32_scales():
  d, g = 64, 32
  x, rotation, lam = _inputs(3, 20, d)
  xb = jnp.asarray(x, jnp.bfloat16)
  codes, scales = quantize_pack(xb, rotation, lam, bits=4, group_size=g,
                                scale_dtype=jnp.float32, interpret=True)
  ref_codes, ref_scales = quantize_pack_reference(xb, rotation, lam, bits=4, group_size=g,
                                                  scale_dtype=jnp.float32)
  assert scales.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(scales), np.asarray(ref_scales), rtol=1e-6)
  assert np.mean(_unpack(codes, 4) != _unpack(ref_codes, 4)) <= 1e-3


def test_interpreter_poisons_outputs():
  # The poisoning the kernel tests rely on: unwritten float outputs read back as NaN.
  def writes_nothing(x_ref, o_ref):
    del x_ref, o_ref

  out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                       interpret=True)(jnp.ones((8, 128), jnp.float32))
  assert np.isnan(np.asarray(out)).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=np.ones((4, 64, 1), np.float32)), "x must be"),
    (dict(rotation=np.eye(32, dtype=np.float32)), "rotation must be"),
    (dict(lam=np.ones(32, np.float32)), "lam must be"),
    (dict(bits=3), "bits must be"),
    (dict(group_size=48), "group_size must be"),
    (dict(feedback=np.zeros((32, 32), np.float32)), "feedback must be"),
    (dict(x=np.ones((4, 96), np.float32), rotation=np.eye(96, dtype=np.float32),
          lam=np.ones(96, np.float32), group_size=64), "multiple of group_size"),
])
def test_bad_arguments_raise(kwargs, match):
  args = dict(x=np.ones((4, 64), np.float32), rotation=np.eye(64, dtype=np.float32),
              lam=np.ones(64, np.float32), bits=4, group_size=32)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    quantize_pack(args.pop("x"), args.pop("rotation"), args.pop("lam"), interpret=True, **args)
  with pytest.raises(TypeError, match="floating"):
    quantize_pack(np.ones((4, 64), np.int32), np.eye(64), np.ones(64), interpret=True)


# Error-feedback rounding (kvjax.quantizer.feedback_levels) in the write kernel.

def _feedback_from_hessian(seed, d):
  """A random PD H [D, D] with a spread spectrum (like E[q~ q~^T]) and its LDLQ feedback.

  F = U / diag(U)[:, None] with the diagonal zeroed, U the upper Cholesky factor of H^-1:
  the feedback that minimizes e^T H e greedily, channel by channel.
  """
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(d, d)) * rng.uniform(0.1, 3.0, size=d)
  h = a @ a.T / d + 1e-3 * np.eye(d)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  f = u / np.diag(u)[:, None]
  np.fill_diagonal(f, 0.0)
  return h, f.astype(np.float32)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("d,group_size", [(64, 32), (128, 64), (128, 32)])
def test_feedback_kernel_matches_reference(backend, bits, d, group_size):
  n = 45  # not a multiple of the 32-row block
  x, rotation, lam = _inputs(d * 3 + group_size + bits, n, d)
  x[5] = 0.0  # an all-zero row: scale 0, u = 0 everywhere, no 0/0
  _, f = _feedback_from_hessian(d + group_size, d)
  codes, scales = quantize_pack(x, rotation, lam, bits=bits, group_size=group_size, feedback=f,
                                backend=backend, block_n=32, interpret=True)
  ref_codes, ref_scales = quantize_pack_reference(x, rotation, lam, bits=bits,
                                                  group_size=group_size, feedback=f)
  assert codes.shape == ref_codes.shape and codes.dtype == ref_codes.dtype
  assert scales.shape == ref_scales.shape and scales.dtype == ref_scales.dtype
  s, rs = np.asarray(scales, np.float32), np.asarray(ref_scales, np.float32)
  assert not np.isnan(s).any()
  # Scales are the abs-max ones of y, feedback or not.
  np.testing.assert_allclose(s, rs, rtol=BF16_EPS, atol=0)
  assert np.mean(s == rs) >= 0.99
  c, rc = _unpack(codes, bits), _unpack(ref_codes, bits)
  # The kernels sum the propagated errors in another order than the XLA loop: only codes at
  # a rounding boundary may move, by one level, and an early move would spread to its group.
  assert np.abs(c - rc).max() <= STEP[bits]
  assert np.mean(c != rc) <= 2e-3
  assert np.all(c[5] == (1 if bits == 4 else 0)) and np.all(s[5] == 0)
  # The feedback really acted: most rows differ from nearest rounding.
  nearest, _ = quantize_pack_reference(x, rotation, lam, bits=bits, group_size=group_size)
  assert np.mean(np.any(_unpack(nearest, bits) != c, axis=1)) > 0.5


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("bits", [4, 8])
def test_zero_feedback_gives_nearest_codes(backend, bits):
  d, g = 128, 32
  x, rotation, lam = _inputs(21 + bits, 40, d)
  kwargs = dict(bits=bits, group_size=g, backend=backend, block_n=32, interpret=True)
  codes, scales = quantize_pack(x, rotation, lam, feedback=np.zeros((d, d), np.float32), **kwargs)
  near_codes, near_scales = quantize_pack(x, rotation, lam, **kwargs)
  # u = y * (1 / s) with feedback, y / s without: they may differ in the last ulp, so
  # codes are compared with the reference's tolerance, scales exactly.
  np.testing.assert_array_equal(np.asarray(scales), np.asarray(near_scales))
  c, nc = _unpack(codes, bits), _unpack(near_codes, bits)
  assert np.abs(c - nc).max() <= STEP[bits] and np.mean(c != nc) <= 1e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("d,group_size", [(64, 32), (128, 64)])
def test_feedback_lowers_hessian_weighted_error(bits, d, group_size):
  h, f = _feedback_from_hessian(7 * d + bits, d)
  x, rotation, lam = _inputs(5 * d + group_size + bits, 45, d)
  y64 = _rotated64(x, rotation, lam)

  def weighted_error(feedback):
    codes, scales = quantize_pack(x, rotation, lam, bits=bits, group_size=group_size,
                                  feedback=feedback, block_n=32, interpret=True)
    s = np.repeat(np.asarray(scales, np.float64), group_size, axis=1)
    e = _unpack(codes, bits) * s - y64
    return np.einsum("ni,ij,nj->n", e, h, e)  # per row

  fb, nearest = weighted_error(f), weighted_error(None)
  ratio = fb.mean() / nearest.mean()
  print(f"[e^T H e: feedback / nearest = {ratio:.3f}, rows better {np.mean(fb < nearest):.2f}]",
        end=" ")
  # Measured about 0.4; nearest rounding minimizes the plain squared error, not this one.
  assert ratio < 0.7
  assert np.mean(fb < nearest) >= 0.9


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_feedback_reads_only_the_strict_upper_triangle(backend):
  d, g = 64, 32
  x, rotation, lam = _inputs(31, 40, d)
  _, f = _feedback_from_hessian(32, d)
  noise = np.tril(np.random.default_rng(33).normal(size=(d, d))).astype(np.float32)
  kwargs = dict(bits=4, group_size=g, backend=backend, block_n=32, interpret=True)
  codes, _ = quantize_pack(x, rotation, lam, feedback=f, **kwargs)
  noisy, _ = quantize_pack(x, rotation, lam, feedback=f + noise, **kwargs)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(noisy))


def test_feedback_kernel_tpu_semantics_interpreter():
  params = _compat.tpu_interpret_params()
  if params is None:
    pytest.skip("this jax has no pltpu.InterpretParams")
  d, g = 128, 64
  x, rotation, lam = _inputs(41, 40, d)
  _, f = _feedback_from_hessian(42, d)
  codes, scales = quantize_pack(x, rotation, lam, bits=4, group_size=g, feedback=f, block_n=32,
                                interpret=params)
  ref_codes, ref_scales = quantize_pack_reference(x, rotation, lam, bits=4, group_size=g,
                                                  feedback=f)
  c, rc = _unpack(codes, 4), _unpack(ref_codes, 4)
  assert np.abs(c - rc).max() <= STEP[4] and np.mean(c != rc) <= 2e-3
  np.testing.assert_allclose(np.asarray(scales, np.float32), np.asarray(ref_scales, np.float32),
                             rtol=BF16_EPS)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("per_head", [False, True])
def test_quantize_heads_with_feedback_matches_core_quantizer(bits, per_head):
  # The cache's Pallas write path against its XLA path (kvjax.quantizer.quantize).
  from kvjax import _pallas_dispatch, quantizer
  b, t, h, d, g = 2, 11, 2, 64, 32
  hr = h if per_head else 1
  rng = np.random.default_rng(50 + bits + hr)
  x = (rng.standard_t(df=5, size=(b, t, h, d)) * rng.uniform(0.2, 4.0, size=d)).astype(np.float32)
  rotation = np.stack([_orthogonal(rng, d) for _ in range(hr)])
  lam = rng.uniform(0.5, 2.0, size=(hr, d)).astype(np.float32)
  feedback = np.stack([_feedback_from_hessian(60 + i, d)[1] for i in range(hr)])
  codes, scales = _pallas_dispatch.quantize_heads(x, rotation, lam, bits=bits, group_size=g,
                                                  scale_dtype=jnp.bfloat16, feedback=feedback)
  core_codes, core_scales = quantizer.quantize(x, rotation, lam, bits=bits, group_size=g,
                                               feedback=feedback)
  assert codes.shape == core_codes.shape and scales.shape == core_scales.shape
  c, cc = _unpack(codes, bits), _unpack(core_codes, bits)
  assert np.abs(c - cc).max() <= STEP[bits] and np.mean(c != cc) <= 2e-3
  np.testing.assert_allclose(np.asarray(scales, np.float32), np.asarray(core_scales, np.float32),
                             rtol=BF16_EPS)
  if per_head:  # each head used its own feedback: head 1's F on head 0 gives other codes
    swapped, _ = quantizer.quantize(x, rotation, lam, bits=bits, group_size=g,
                                    feedback=feedback[::-1])
    assert np.mean(_unpack(swapped, bits) != c) > 0.05
