"""Fused decode attention (TPU and GPU kernels, interpreted on the CPU) against the jnp
reference, and the reference against a float64 numpy dequantize-then-softmax oracle.

Every cache slot a query must not see (past the length, outside the window,
overwritten ring slots) gets NaN scales, so a kernel that reads, or fails to
mask, an invisible slot produces NaN. The Pallas interpreter starts outputs
and scratch as NaN too (see test_pallas_quantize_pack.test_interpreter_poisons_outputs).
Errors are measured per row (batch x query head) against that row's largest
visible dequantized value.

Cases with rope_pairs > 0 add rotary logit offsets (random coefficients and
frequencies); the oracle builds their per-slot logits from each slot's position
as docs/cache_layout.md defines it, independently of the kernels' bookkeeping.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.pallas_kernels import (_compat, decode_attention, decode_attention_gpu,
                                  decode_attention_reference, decode_attention_tpu)


@dataclasses.dataclass(frozen=True)
class Case:
  head_dim: int
  group_size: int
  n_rep: int
  key_bits: int
  value_bits: int
  capacity: int
  lengths: tuple
  ring: bool = False
  window: int | None = None
  softcap: float | None = None
  kv_heads: int = 2
  block_s: int = 32
  num_splits: int = 2
  rope_pairs: int = 0  # P > 0: random rotary logit offsets (rope_coef, rope_freq)
  sink: bool = False  # random sink_logit (added to the logit of position 0)
  sink_value: bool = False  # random sink_value (added to the value at position 0)
  recent: int = 0  # W > 0: random recent_values [B, H, W, D] (added at positions L - 1 - w)


CASES = [
    # lengths: empty, a non-multiple of the block, full; S=80 leaves a partial last block
    Case(64, 32, 4, 4, 4, 80, (0, 45, 80)),
    Case(128, 64, 8, 8, 4, 96, (0, 33, 70), window=20, softcap=30.0, kv_heads=1, num_splits=3),
    Case(256, 128, 1, 4, 4, 64, (0, 40, 150), ring=True),
    Case(128, 32, 1, 4, 8, 64, (5, 64, 201), ring=True, window=48, num_splits=1),
    # group_size == head_dim: one 4-bit group spans both nibble halves
    Case(128, 128, 4, 4, 4, 128, (1, 77, 128), kv_heads=1, num_splits=4),
    Case(64, 64, 8, 8, 8, 48, (0, 30, 100), ring=True, window=48, kv_heads=1),
]

# Rotary logit offsets: P = 1 and P = 8 (and P = 3, no power of two), GQA, ragged
# lengths with 0, ring buffers with windows at positions in the thousands (large angles).
ROPE_CASES = [
    Case(64, 32, 4, 4, 4, 80, (0, 45, 80), rope_pairs=1),
    Case(64, 32, 2, 4, 8, 64, (0, 40, 4001), ring=True, window=48, softcap=20.0, rope_pairs=8),
    Case(64, 64, 8, 4, 4, 96, (0, 33, 70), window=20, kv_heads=1, num_splits=3, rope_pairs=8),
    Case(128, 64, 3, 8, 4, 48, (7, 0, 1130), ring=True, window=40, kv_heads=1, num_splits=1,
         rope_pairs=3),
]

# Sink logits (a correction to position 0's logit): position 0 visible (lengths 1, 45, 80 of
# a linear cache; a ring that has not wrapped), hidden by a window (length 70, window 20) or
# overwritten in a ring (lengths 150, 201); with a soft-cap, rotary offsets, GQA, 8-bit keys.
SINK_CASES = [
    Case(64, 32, 4, 4, 4, 80, (1, 45, 80), sink=True),
    Case(128, 64, 8, 8, 4, 96, (0, 17, 70), window=20, softcap=30.0, kv_heads=1, num_splits=3,
         sink=True),
    Case(64, 32, 2, 4, 8, 64, (3, 40, 201), ring=True, window=48, softcap=20.0, rope_pairs=8,
         sink=True),
    Case(256, 128, 1, 4, 4, 64, (64, 2, 150), ring=True, sink=True),
    # Sink values (the value's rounding error at position 0), alone and with a sink logit.
    Case(64, 32, 4, 4, 4, 80, (1, 45, 80), sink_value=True),
    Case(64, 32, 2, 4, 8, 64, (3, 40, 201), ring=True, window=48, softcap=20.0, rope_pairs=8,
         sink=True, sink_value=True),
    # Recent values (positions L - 1 - w): linear and ring caches (a wrapped ring puts them
    # mid-buffer), lengths shorter than W (position 0 among them: added with the sink value),
    # 8-bit values, rotary offsets and a soft-cap (their weights need both), empty rows.
    Case(64, 32, 4, 4, 4, 80, (1, 45, 80), recent=1),
    Case(64, 32, 4, 4, 4, 80, (1, 3, 0), recent=4, sink_value=True, sink=True),
    Case(64, 32, 2, 4, 8, 64, (3, 40, 201), ring=True, window=48, softcap=20.0, rope_pairs=8,
         recent=4),
    Case(128, 64, 8, 8, 4, 96, (0, 17, 70), window=20, softcap=30.0, kv_heads=1, num_splits=3,
         recent=2),
]


def _case_id(c):
  mode = "ring" if c.ring else "linear"
  rope = f"-rope{c.rope_pairs}" if c.rope_pairs else ""
  sink = (("-sink" if c.sink else "") + ("-vsink" if c.sink_value else "")
          + (f"-vrec{c.recent}" if c.recent else ""))
  return (f"D{c.head_dim}-g{c.group_size}-rep{c.n_rep}-K{c.key_bits}V{c.value_bits}-{mode}"
          f"-w{c.window}-cap{c.softcap}{rope}{sink}")


def _unpack(codes, bits):
  if bits == 8:
    return codes.astype(np.int64)
  b = codes.view(np.int8).astype(np.int64)
  return 2 * np.concatenate([(b << 60) >> 60, b >> 4], axis=-1) + 1  # nibble c: level 2c + 1


def _positions(case, s):
  """[B, S] absolute position of every slot (docs/cache_layout.md), independent of the kernels."""
  out = np.zeros((len(case.lengths), s), np.int64)
  for bi, length in enumerate(case.lengths):
    for slot in range(s):
      if case.ring:
        out[bi, slot] = length - 1 - ((length - 1 - slot) % s)  # Python % is a floor modulo
      else:
        out[bi, slot] = slot
  return out


def _visible(case, s):
  """[B, S] bool from the definition in docs/cache_layout.md (independent of the kernels)."""
  out = np.zeros((len(case.lengths), s), bool)
  positions = _positions(case, s)
  for bi, length in enumerate(case.lengths):
    for slot in range(s):
      position = positions[bi, slot]
      ok = 0 <= position <= length - 1
      if case.window is not None:
        ok &= position > length - 1 - case.window
      out[bi, slot] = ok
  return out


def _make_inputs(case, seed):
  rng = np.random.default_rng(seed)
  b, h, s, d = len(case.lengths), case.kv_heads, case.capacity, case.head_dim
  g = d // case.group_size

  def codes(bits):
    if bits == 4:
      return rng.integers(0, 256, size=(b, h, s, d // 2), dtype=np.uint8)
    return rng.integers(-127, 128, size=(b, h, s, d), dtype=np.int8)

  def scales(bits):
    # Dequantized magnitudes of order 1 for both widths.
    top = 0.3 if bits == 4 else 0.3 * 7 / 127
    return rng.uniform(0.1 * top, top, size=(b, h, s, g)).astype(jnp.bfloat16)

  inputs = dict(q_rot=(rng.normal(size=(b, h * case.n_rep, d)) * 3).astype(np.float32),
                k_codes=codes(case.key_bits), k_scales=scales(case.key_bits),
                v_codes=codes(case.value_bits), v_scales=scales(case.value_bits),
                lengths=np.asarray(case.lengths, np.int32))
  hidden = ~_visible(case, s)
  for name in ("k_scales", "v_scales"):
    poisoned = np.asarray(inputs[name], np.float32)
    poisoned[np.broadcast_to(hidden[:, None, :, None], poisoned.shape)] = np.nan
    inputs[name] = poisoned.astype(jnp.bfloat16)
  if case.rope_pairs:
    # Drawn after everything else: the cases without rotary offsets keep their inputs.
    # Coefficients of order 1 (already scaled, like scale * q . m), so the rotary term
    # is as large as the key logits; frequencies of RoPE's range, (0.001, 1).
    p = case.rope_pairs
    inputs["rope_coef"] = (rng.normal(size=(b, h * case.n_rep, 2 * p)) * 1.5).astype(np.float32)
    inputs["rope_freq"] = rng.uniform(0.001, 1.0, size=(p,)).astype(np.float32)
    if case.softcap is not None:
      # With a soft-cap, both offsets must enter before it (checked by the oracle).
      inputs["logit_offset"] = rng.normal(size=(b, h * case.n_rep)).astype(np.float32)
  if case.sink:
    # Of the order of the logits, both signs (a sink key's error can raise or lower it).
    inputs["sink_logit"] = (rng.normal(size=(b, h * case.n_rep)) * 3).astype(np.float32)
  if case.sink_value:
    # Of the order of a 4-bit value's rounding error relative to the values (order 1).
    inputs["sink_value"] = (rng.normal(size=(b, h, d)) * 0.3).astype(np.float32)
  if case.recent:
    inputs["recent_values"] = (rng.normal(size=(b, h, case.recent, d)) * 0.3).astype(np.float32)
  return inputs


def _without_rope(inputs):
  return {k: v for k, v in inputs.items() if k not in ("rope_coef", "rope_freq")}


def _without_sink(inputs):
  return {k: v for k, v in inputs.items() if k not in ("sink_logit", "sink_value", "recent_values")}


def _static(case):
  return dict(key_bits=case.key_bits, value_bits=case.value_bits, group_size=case.group_size,
              ring=case.ring, window=case.window, softcap=case.softcap)


def _oracle(case, inputs, logit_offset=None, lse_block=None):
  """float64 numpy: dequantize everything, mask, softmax, weighted sum.

  Rotary logit offsets (inputs rope_coef, rope_freq), built slot by slot: the angle
  float32(t) * w in float32 (the kernels' and the models' product), then cos and sin of
  that angle in float64. A logit_offset in `inputs` is used unless one is passed; a
  sink_logit is added to the slot holding position 0. With lse_block, also returns the log-sum-exp
  of the logits per block of lse_block slots ([B, Hq, S // lse_block], -inf where none is visible).
  """
  b, hq, d = inputs["q_rot"].shape
  h, s, g = case.kv_heads, case.capacity, case.group_size

  def dequant(codes, scales, bits):
    c = _unpack(codes, bits).astype(np.float64)
    return c * np.repeat(np.asarray(scales, np.float64), g, axis=-1)

  keys = dequant(inputs["k_codes"], inputs["k_scales"], case.key_bits)
  values = dequant(inputs["v_codes"], inputs["v_scales"], case.value_bits)
  visible = _visible(case, s)
  positions = _positions(case, s)
  if "sink_value" in inputs:
    at0 = (positions == 0) & visible                                   # [B, S]
    values = values + np.where(at0[:, None, :, None],
                               np.asarray(inputs["sink_value"], np.float64)[:, :, None, :], 0.0)
  if "recent_values" in inputs:
    rec = np.asarray(inputs["recent_values"], np.float64)
    for w in range(rec.shape[2]):
      at = (positions == np.asarray(case.lengths)[:, None] - 1 - w) & visible  # [B, S]
      values = values + np.where(at[:, None, :, None], rec[:, :, w, None, :], 0.0)
  if logit_offset is None:
    logit_offset = inputs.get("logit_offset")
  coef, freq = inputs.get("rope_coef"), inputs.get("rope_freq")
  out = np.zeros((b, hq, d))
  vmax = np.zeros((b, hq))
  lse = np.full((b, hq, s // (lse_block or 1)), -np.inf)
  for bi in range(b):
    idx = np.flatnonzero(visible[bi])
    for head in range(hq):
      kv = head // case.n_rep
      if idx.size == 0:
        continue
      logits = keys[bi, kv, idx] @ inputs["q_rot"][bi, head].astype(np.float64) / np.sqrt(d)
      if logit_offset is not None:
        logits = logits + float(logit_offset[bi, head])
      if coef is not None:
        p = freq.shape[0]
        for slot_index, slot in enumerate(idx):
          angle = (np.float32(positions[bi, slot]) * freq).astype(np.float64)  # [P]
          logits[slot_index] += (coef[bi, head, :p].astype(np.float64) @ np.cos(angle) +
                                 coef[bi, head, p:].astype(np.float64) @ np.sin(angle))
      if "sink_logit" in inputs:
        logits = logits + np.where(positions[bi, idx] == 0,
                                   float(inputs["sink_logit"][bi, head]), 0.0)
      if case.softcap is not None:
        logits = case.softcap * np.tanh(logits / case.softcap)
      p = np.exp(logits - logits.max())
      out[bi, head] = (p / p.sum()) @ values[bi, kv, idx]
      vmax[bi, head] = np.abs(values[bi, kv, idx]).max()
      if lse_block:
        weights = np.zeros(s)
        weights[idx] = p
        with np.errstate(divide="ignore"):
          lse[bi, head] = np.log(weights.reshape(-1, lse_block).sum(-1)) + logits.max()
  return (out, vmax) if lse_block is None else (out, vmax, lse)


def _assert_rows_close(out, expected, vmax, rel_tol, lengths_visible):
  out = np.asarray(out, np.float64)
  assert out.shape == expected.shape
  assert not np.isnan(out).any(), "NaN leaked from an invisible slot or an unwritten buffer"
  row_err = np.abs(out - expected).max(axis=-1)  # [B, Hq]
  empty = ~lengths_visible
  assert np.all(out[empty] == 0.0), "rows that see no key must be exactly zero"
  bound = rel_tol * np.maximum(vmax, 1e-30)
  worst = (row_err / np.where(vmax > 0, vmax, 1.0))[~empty].max(initial=0.0)
  assert np.all(row_err[~empty] <= bound[~empty]), f"worst row error {worst:.3g} x max|v|"
  # Visible with `pytest -s`: the measured error, not just the bound it passed.
  print(f"[worst row error {worst:.2e} x max|v|, bound {rel_tol:.0e}]", end=" ")
  return worst


def _rows_with_keys(case, hq):
  any_visible = _visible(case, case.capacity).any(axis=1)
  return np.repeat(any_visible[:, None], hq, axis=1)


@pytest.mark.parametrize("case", CASES + ROPE_CASES + SINK_CASES, ids=_case_id)
def test_reference_matches_float64_oracle(case):
  inputs = _make_inputs(case, seed=zlib.crc32(_case_id(case).encode()))
  expected, vmax = _oracle(case, inputs)
  out = decode_attention_reference(**inputs, **_static(case))
  # float32 dequantization and accumulation over <= 128 slots: ~1e-6 of max|v|. The
  # rotary angle is the same float32 number on both sides (even at positions ~4000);
  # only float32 cos/sin round (~2^-24), times 2P <= 16 coefficients of order 1:
  # logit errors ~1e-6, so the same bound holds.
  _assert_rows_close(out, expected, vmax, 1e-5, _rows_with_keys(case, expected.shape[1]))
  if case.rope_pairs:
    # The rotary term is not a no-op: leaving it out changes the output by far more.
    without, _ = _oracle(case, _without_rope(inputs))
    assert np.abs(without - expected).max() > 1e-2
  if case.sink or case.sink_value or case.recent:
    # The sink logit / value moves only rows that see position 0 (not all of them noticeably: a
    # row whose only key is position 0, or where it has a tiny weight), the last value every
    # row with a key; some by far more than the bound.
    without, _ = _oracle(case, _without_sink(inputs))
    sees = (_visible(case, case.capacity) & (_positions(case, case.capacity) == 0)).any(1)
    if case.recent:
      sees = np.asarray(case.lengths) > 0
    change = np.abs(without - expected).max(axis=-1)   # [B, Hq]
    assert np.all(change[~sees] == 0.0), change
    assert change.max() > 1e-2, change


# Both kernels multiply codes (exact in bf16) by a float32 operand split into two
# bf16 parts (relative error 2^-17 per product): logit errors ~1e-5 for |logit|
# ~ 10, hence output errors of a few 1e-6 of max|v| (measured); bounded at 1e-4.
KERNELS = [("tpu", decode_attention_tpu, 1e-4), ("gpu", decode_attention_gpu, 1e-4)]


@pytest.mark.parametrize("target,kernel,rel_tol", KERNELS, ids=[k[0] for k in KERNELS])
@pytest.mark.parametrize("case", CASES + ROPE_CASES + SINK_CASES, ids=_case_id)
def test_kernel_matches_reference(case, target, kernel, rel_tol):
  # Sink cases: the kernels score position 0 as usual and a split-K state added outside
  # them moves its weight to the corrected logit (recomputed in float32; the kernel's own
  # ~1e-5 logit error on that slot stays in the difference), within the same bound.
  # Rotary cases: the kernels form the same float32 angles as the reference and add
  # 2P float32 products (HIGHEST-precision [R, P] x [P, block_s] matmuls on TPU, FMAs
  # on GPU): logit errors ~1e-6, below the 1e-5 of the scores, so the bound stays
  # (measured: up to 1.1e-5 of max|v| with rotary offsets, 9e-6 without).
  inputs = _make_inputs(case, seed=7 + case.head_dim + case.capacity)
  reference = np.asarray(decode_attention_reference(**inputs, **_static(case)), np.float64)
  _, vmax = _oracle(case, inputs)
  out = kernel(**inputs, **_static(case), block_s=case.block_s, num_splits=case.num_splits,
               interpret=True)
  assert out.dtype == jnp.float32
  _assert_rows_close(out, reference, vmax, rel_tol, _rows_with_keys(case, reference.shape[1]))


@pytest.mark.parametrize("case", [CASES[0], CASES[3], ROPE_CASES[1]], ids=_case_id)
def test_tpu_kernel_tpu_semantics_interpreter(case):
  params = _compat.tpu_interpret_params()
  if params is None:
    pytest.skip("this jax has no pltpu.InterpretParams")
  inputs = _make_inputs(case, seed=99)
  reference = np.asarray(decode_attention_reference(**inputs, **_static(case)), np.float64)
  _, vmax = _oracle(case, inputs)
  out = decode_attention_tpu(**inputs, **_static(case), block_s=case.block_s,
                             num_splits=case.num_splits, interpret=params)
  _assert_rows_close(out, reference, vmax, 1e-4, _rows_with_keys(case, reference.shape[1]))


def test_dispatch_with_default_tuning():
  # backend=None on the CPU picks the TPU kernel; block sizes come from the tuning table.
  case = Case(128, 32, 4, 4, 4, 160, (0, 97, 160), kv_heads=2)
  inputs = _make_inputs(case, seed=5)
  reference = np.asarray(decode_attention_reference(**inputs, **_static(case)), np.float64)
  _, vmax = _oracle(case, inputs)
  for backend in (None, "gpu"):
    out = decode_attention(**inputs, **_static(case), backend=backend)
    _assert_rows_close(out, reference, vmax, 1e-4, _rows_with_keys(case, reference.shape[1]))


def test_logit_offset_enters_before_softcap():
  # Keys stored minus a per-channel mean need the per-query constant back only
  # when a soft-cap follows; without one the softmax must ignore it.
  case = Case(128, 32, 4, 4, 4, 64, (0, 50, 64), softcap=2.0, kv_heads=1)
  inputs = _make_inputs(case, seed=21)
  offset = (np.random.default_rng(22).normal(size=(3, 4)) * 3).astype(np.float32)
  expected, vmax = _oracle(case, inputs, logit_offset=offset)
  rows = _rows_with_keys(case, 4)
  _assert_rows_close(decode_attention_reference(**inputs, **_static(case), logit_offset=offset),
                     expected, vmax, 1e-5, rows)
  without, _ = _oracle(case, inputs)
  assert np.abs(expected - without).max() > 1e-2  # the offset matters under a soft-cap
  for kernel in (decode_attention_tpu, decode_attention_gpu):
    out = kernel(**inputs, **_static(case), logit_offset=offset, block_s=32, interpret=True)
    _assert_rows_close(out, expected, vmax, 1e-4, rows)
  uncapped = dataclasses.replace(case, softcap=None)
  plain, vmax = _oracle(uncapped, inputs)
  out = decode_attention_tpu(**inputs, **_static(uncapped), logit_offset=offset, block_s=32,
                             interpret=True)
  _assert_rows_close(out, plain, vmax, 1e-4, rows)


def test_explicit_scale_matches_reference():
  case = Case(64, 32, 2, 4, 4, 64, (64, 20, 3), kv_heads=1)
  inputs = _make_inputs(case, seed=3)
  ref = np.asarray(decode_attention_reference(**inputs, **_static(case), scale=0.05))
  default = np.asarray(decode_attention_reference(**inputs, **_static(case)))
  assert np.abs(ref - default).max() > 1e-3  # the scale really changes the result
  _, vmax = _oracle(case, inputs)
  for kernel in (decode_attention_tpu, decode_attention_gpu):
    out = kernel(**inputs, **_static(case), scale=0.05, block_s=32, interpret=True)
    _assert_rows_close(out, ref.astype(np.float64), vmax, 1e-4,
                       _rows_with_keys(case, ref.shape[1]))


@pytest.mark.parametrize("change,error,match", [
    (dict(q_rot=np.ones((3, 4, 64, 1), np.float32)), ValueError, "q_rot must be"),
    (dict(k_codes=np.ones((3, 2, 64, 64), np.uint8)), ValueError, "k_codes must be"),
    (dict(k_codes=np.ones((3, 2, 64, 32), np.int8)), TypeError, "k_codes must be uint8"),
    (dict(v_scales=np.ones((3, 2, 64, 3), np.float32)), ValueError, "v_scales must be"),
    (dict(lengths=np.ones((2,), np.int32)), ValueError, "lengths must be"),
    (dict(q_rot=np.ones((3, 3, 64), np.float32)), ValueError, "multiple of KV heads"),
    (dict(window=0), ValueError, "window must be"),
    (dict(logit_offset=np.ones((3, 2), np.float32)), ValueError, "logit_offset must be"),
    (dict(rope_coef=np.ones((3, 4, 2), np.float32)), ValueError, "rope_freq is None"),
    (dict(rope_freq=np.ones((1,), np.float32)), ValueError, "rope_coef is None"),
    (dict(rope_coef=np.ones((3, 4, 4), np.float32), rope_freq=np.ones((1,), np.float32)),
     ValueError, r"rope_coef must be a float \[B, Hq, 2P\] = \(3, 4, 2\)"),
    (dict(rope_coef=np.ones((3, 4, 2), np.int32), rope_freq=np.ones((1,), np.float32)),
     ValueError, "rope_coef must be a float"),
    (dict(rope_coef=np.ones((3, 4, 0), np.float32), rope_freq=np.ones((0,), np.float32)),
     ValueError, r"rope_freq must be a float \[P\] array with P >= 1"),
    (dict(rope_coef=np.ones((3, 4, 2), np.float32), rope_freq=np.ones((1, 1), np.float32)),
     ValueError, "rope_freq must be"),
])
def test_bad_arguments_raise(change, error, match):
  args = dict(q_rot=np.ones((3, 4, 64), np.float32),
              k_codes=np.ones((3, 2, 64, 32), np.uint8), k_scales=np.ones((3, 2, 64, 2)),
              v_codes=np.ones((3, 2, 64, 32), np.uint8), v_scales=np.ones((3, 2, 64, 2)),
              lengths=np.ones((3,), np.int32), window=None)
  args.update(change)
  for kernel in (decode_attention_tpu, decode_attention_gpu):
    with pytest.raises(error, match=match):
      kernel(**args, key_bits=4, value_bits=4, group_size=32, interpret=True)
  with pytest.raises(error, match=match):
    decode_attention_reference(**args, key_bits=4, value_bits=4, group_size=32)


# Linear and ring caches, windows, a soft-cap, 8-bit keys, rotary offsets, GQA up to 8.
LSE_CASES = [c for c in CASES[:4] + ROPE_CASES[1:3] if c.capacity % 16 == 0]


@pytest.mark.parametrize("target,kernel", [("reference", decode_attention_reference),
                                           ("tpu", decode_attention_tpu),
                                           ("gpu", decode_attention_gpu)])
@pytest.mark.parametrize("case", LSE_CASES, ids=_case_id)
def test_block_logsumexp_in_the_same_pass(case, target, kernel):
  """Per block of 16 slots, log sum exp(logit) over its visible slots (what a certificate of the
  step needs, kvjax.certified), from the kernels' own pass, against the float64 oracle; the
  attention output is unchanged by asking for it."""
  inputs = _make_inputs(case, seed=11 + case.capacity)
  expected, vmax, lse_expected = _oracle(case, inputs, lse_block=16)
  tuning = {} if target == "reference" else dict(block_s=case.block_s,
                                                num_splits=case.num_splits, interpret=True)
  out, lse = kernel(**inputs, **_static(case), block_logsumexp=16, **tuning)
  plain = kernel(**inputs, **_static(case), **tuning)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
  lse = np.asarray(lse, np.float64)
  assert lse.shape == lse_expected.shape
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_expected))
  finite = np.isfinite(lse_expected)
  # Logit errors: float32 (reference) or 2^-17 per product (kernels), ~1e-5 at |logit| ~ 10.
  err = np.abs(np.where(finite, lse, 0.0) - np.where(finite, lse_expected, 0.0))
  assert err.max() <= 1e-4 * (1 + np.abs(np.where(finite, lse_expected, 0.0)).max())
  # Not vacuous: the blocks' masses differ, and with the softmax's total they give the
  # oracle's attention output (each block's mass times its own weighted mean would; here the
  # total: the masses of a row sum to one).
  rows = finite.any(-1)
  top = np.where(rows, np.max(np.where(finite, lse, -1e300), -1), 0.0)[..., None]
  mass = np.where(finite, np.exp(np.where(finite, lse, 0.0) - top), 0.0)
  total = mass.sum(-1)
  np.testing.assert_allclose((mass.sum(-1) / np.where(rows, total, 1.0))[rows], 1.0)
  assert np.ptp(lse[finite]) > 0.1


def test_block_logsumexp_refuses_slot_corrections_and_bad_blocks():
  case = SINK_CASES[0]
  inputs = _make_inputs(case, seed=1)
  with pytest.raises(ValueError, match="sink_logit"):
    decode_attention_reference(**inputs, **_static(case), block_logsumexp=16)
  case = CASES[0]
  inputs = _make_inputs(case, seed=1)
  with pytest.raises(ValueError, match="block_logsumexp"):
    decode_attention_tpu(**inputs, **_static(case), block_logsumexp=24, interpret=True)


# Paged caches (kvjax.paged): the same sequences stored as pages of 32 slots in a shuffled
# pool, every unused page and every invisible slot NaN-poisoned. Both kernels read pages in
# place through the table (scalar-prefetched on TPU, a table row per program on GPU) and must
# give the contiguous reference's output within the kernels' bound, corrections included.
PAGED_CASES = [
    Case(64, 32, 4, 4, 4, 96, (1, 45, 96), sink=True, sink_value=True, recent=2, rope_pairs=2),
    Case(128, 64, 8, 8, 4, 96, (0, 33, 70), window=20, softcap=30.0, kv_heads=1, num_splits=2),
]


def _to_pages(inputs, page_size, seed):
  """(pool arrays [N, H, page, ...], page_table [B, P]) holding inputs' caches."""
  rng = np.random.default_rng(seed)
  b, h, s = inputs["k_codes"].shape[:3]
  p = s // page_size
  num_pages = b * p + 3                                   # spare pages stay poisoned
  table = rng.permutation(num_pages)[:b * p].reshape(b, p).astype(np.int32)
  pool = {}
  for name in ("k_codes", "k_scales", "v_codes", "v_scales"):
    a = np.asarray(inputs[name])
    fill = np.nan if "scales" in name else 0
    out = np.full((num_pages, h, page_size) + a.shape[3:], fill, a.dtype)
    for bi in range(b):
      for j in range(p):
        out[table[bi, j]] = a[bi, :, j * page_size:(j + 1) * page_size]
    pool[name] = out
  return pool, table


@pytest.mark.parametrize("target,kernel,rel_tol", KERNELS, ids=[k[0] for k in KERNELS])
@pytest.mark.parametrize("case", PAGED_CASES, ids=_case_id)
def test_paged_kernel_matches_contiguous_reference(case, target, kernel, rel_tol):
  inputs = _make_inputs(case, seed=11 + case.head_dim)
  reference = np.asarray(decode_attention_reference(**inputs, **_static(case)), np.float64)
  _, vmax = _oracle(case, inputs)
  pool, table = _to_pages(inputs, 32, seed=case.capacity)
  paged_inputs = dict(inputs, **pool)
  out = decode_attention(**paged_inputs, **_static(case), page_table=table, backend=target,
                         num_splits=case.num_splits, interpret=True)
  _assert_rows_close(out, reference, vmax, rel_tol, _rows_with_keys(case, reference.shape[1]))


def test_paged_kernel_refuses_bad_pages():
  case = PAGED_CASES[0]
  inputs = _make_inputs(case, seed=1)
  pool, table = _to_pages(inputs, 32, seed=0)
  with pytest.raises(ValueError, match="page_table"):
    decode_attention_tpu(**dict(inputs, **pool), **_static(case), page_table=table[0],
                         interpret=True)
  pool16, table16 = _to_pages(inputs, 16, seed=0)
  with pytest.raises(ValueError, match="multiple of 32"):
    decode_attention_tpu(**dict(inputs, **pool16), **_static(case), page_table=table16,
                         interpret=True)
  pool8, table8 = _to_pages(inputs, 8, seed=0)
  with pytest.raises(ValueError, match="page_size must be a power of two >= 16"):
    decode_attention_gpu(**dict(inputs, **pool8), **_static(case), page_table=table8,
                         interpret=True)
  with pytest.raises(ValueError, match="ring"):
    decode_attention_tpu(**dict(inputs, **pool), **dict(_static(case), ring=True),
                         page_table=table, interpret=True)
