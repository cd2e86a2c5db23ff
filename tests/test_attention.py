import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax


def _np_attention(q, k, v, q_pos, kv_pos, *, window=None, softcap=None, scale=None):
  """float64 oracle. q [B,Tq,Hq,D]; k, v [B,N,H,D] (token-major); positions absolute."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, tq, hq, d = q.shape
  h = k.shape[2]
  r = hq // h
  scale = d ** -0.5 if scale is None else scale
  out = np.zeros_like(q)
  for bi in range(b):
    for t in range(tq):
      for j in range(hq):
        s = k[bi, :, j // r] @ q[bi, t, j] * scale
        if softcap is not None:
          s = softcap * np.tanh(s / softcap)
        kp = np.asarray(kv_pos[bi])
        ok = (kp >= 0) & (kp <= q_pos[bi][t])
        if window is not None:
          ok &= kp > q_pos[bi][t] - window
        if not ok.any():
          continue
        s = np.where(ok, s, -np.inf)
        p = np.exp(s - s.max())
        out[bi, t, j] = (p / p.sum()) @ v[bi, :, j // r]
  return out


def _row_rel_err(a, ref):
  a = np.asarray(a, np.float64)
  return np.linalg.norm(a - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)


def _rand(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("rep", [1, 4])
@pytest.mark.parametrize("tq", [1, 5])
def test_dense_cache_equals_plain_attention_ragged(rep, tq):
  b, h, d, n = 3, 2, 32, 20
  lens = np.array([20, 7, 12])
  k, v = _rand(0, b, n, h, d), _rand(1, b, n, h, d)
  c = kvjax.init_cache(b, h, 32, d, dtype=jnp.float32)
  c = kvjax.append(c, jnp.asarray(k), jnp.asarray(v), num_tokens=jnp.asarray(lens))
  q = _rand(2, b, tq, h * rep, d)
  out = kvjax.attend(jnp.asarray(q), c, softcap=30.0)
  q_pos = [list(range(l - tq, l)) for l in lens]
  kv_pos = [np.where(np.arange(n) < l, np.arange(n), -1) for l in lens]
  ref = _np_attention(q, k, v, q_pos, kv_pos, softcap=30.0)
  assert _row_rel_err(out, ref).max() < 1e-5


@pytest.mark.parametrize("kb,vb", [(4, 4), (8, 4), (8, 8)])
@pytest.mark.parametrize("g", [32, 64])
@pytest.mark.parametrize("tq", [1, 3, 17])  # 17 queries x 4 heads x G groups > D: chunk form
def test_quantized_domain_equals_dequantize_reference(kb, vb, g, tq):
  b, h, rep, d, n = 2, 2, 4, 128, 40
  cfg = kvjax.QuantConfig(key_bits=kb, value_bits=vb, group_size=g, rotation="srft", seed=7)
  c = kvjax.init_cache(b, h, 64, d, quant=cfg)
  c = kvjax.append(c, jnp.asarray(_rand(3, b, n, h, d)), jnp.asarray(_rand(4, b, n, h, d)),
                   num_tokens=jnp.array([40, 23]))
  q = jnp.asarray(_rand(5, b, tq, h * rep, d))
  fast = np.asarray(kvjax.attend(q, c, impl="xla"))
  ref = np.asarray(kvjax.attend(q, c, impl="reference"), np.float64)
  # Same math, different association order: float32 rounding only.
  assert _row_rel_err(fast, ref).max() < 1e-5


def _int4_vs_f64(k, v, q, rotation):
  b, n, h, d = k.shape
  c = kvjax.init_cache(b, h, n, d, quant=kvjax.QuantConfig(group_size=32, rotation=rotation))
  c = kvjax.append(c, jnp.asarray(k), jnp.asarray(v))
  out = kvjax.attend(jnp.asarray(q), c)
  pos = [list(range(n))] * b
  ref = _np_attention(q, k, v, [[n - 1]] * b, pos)
  return _row_rel_err(out, ref).max()


def test_int4_accuracy_gaussian_and_outliers():
  b, n, h, rep, d = 2, 256, 2, 4, 128
  q = _rand(10, b, 1, h * rep, d)
  k, v = _rand(11, b, n, h, d), _rand(12, b, n, h, d)
  for rot in ("none", "srht", "srft"):
    assert _int4_vs_f64(k, v, q, rot) < 0.2, rot
  # A few outlier channels (x10 scale, +8 offset) in K and V: 8 of 128, one
  # every 16 channels, so every quantization group of 32 holds two of them.
  ko, vo = k.copy(), v.copy()
  outliers = np.arange(0, d, 16)
  for x in (ko, vo):
    x[..., outliers] = x[..., outliers] * 10 + 8
  # Measured worst rows: none 0.372, SRHT 0.214, SRFT 0.140 (Gaussian: 0.187 / 0.171 / 0.154).
  none = _int4_vs_f64(ko, vo, q, "none")
  for rot in ("srht", "srft"):
    e = _int4_vs_f64(ko, vo, q, rot)
    assert e < 0.3, (rot, e)
    assert e <= 0.65 * none, (rot, e, none)


@pytest.mark.parametrize("quant", [None, kvjax.QuantConfig(group_size=32)])
def test_ring_buffer_equals_full_cache_with_window_mask(quant):
  b, h, rep, d, w = 2, 1, 2, 64, 8
  total = 30
  k, v = jnp.asarray(_rand(20, b, total, h, d)), jnp.asarray(_rand(21, b, total, h, d))
  q = jnp.asarray(_rand(22, b, total, h * rep, d))
  ring = kvjax.init_cache(b, h, 64, d, quant=quant, window=w, dtype=jnp.float32)
  full = kvjax.init_cache(b, h, 64, d, quant=quant, dtype=jnp.float32)
  assert ring.ring and not full.ring
  # A prefill chunk longer than the window, then decode steps, then a short chunk.
  steps = [(0, 13)] + [(t, t + 1) for t in range(13, 25)] + [(25, 30)]
  for lo, hi in steps:
    o_ring, ring = kvjax.append_and_attend(ring, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi])
    full = kvjax.append(full, k[:, lo:hi], v[:, lo:hi])
    o_full = kvjax.attend(q[:, lo:hi], full, window=w)
    np.testing.assert_allclose(np.asarray(o_ring), np.asarray(o_full), atol=2e-5, rtol=0)
  if quant is None:
    ref = _np_attention(np.asarray(q[:, 25:]), np.asarray(k), np.asarray(v),
                        [list(range(25, 30))] * b, [list(range(total))] * b, window=w)
    assert _row_rel_err(o_ring, ref).max() < 1e-5


@pytest.mark.parametrize("quant", [None, kvjax.QuantConfig()])
def test_ragged_batch_equals_sequences_one_by_one(quant):
  h, rep, d = 2, 2, 64
  lens = [17, 5, 11]
  k, v = _rand(30, 3, 17, h, d), _rand(31, 3, 17, h, d)
  knew, vnew = _rand(32, 3, 1, h, d), _rand(33, 3, 1, h, d)
  q = _rand(34, 3, 1, h * rep, d)
  c = kvjax.init_cache(3, h, 32, d, quant=quant, dtype=jnp.float32)
  c = kvjax.append(c, jnp.asarray(k), jnp.asarray(v), num_tokens=jnp.asarray(lens))
  out, _ = kvjax.append_and_attend(c, jnp.asarray(q), jnp.asarray(knew), jnp.asarray(vnew))
  for i, l in enumerate(lens):
    ci = kvjax.init_cache(1, h, 32, d, quant=quant, dtype=jnp.float32)
    ci = kvjax.append(ci, jnp.asarray(k[i:i + 1, :l]), jnp.asarray(v[i:i + 1, :l]))
    oi, _ = kvjax.append_and_attend(ci, jnp.asarray(q[i:i + 1]), jnp.asarray(knew[i:i + 1]),
                                    jnp.asarray(vnew[i:i + 1]))
    np.testing.assert_allclose(np.asarray(out[i]), np.asarray(oi[0]), atol=1e-5, rtol=0)


def test_empty_sequence_gives_zeros_not_nan():
  c = kvjax.init_cache(2, 1, 8, 64, quant=kvjax.QuantConfig())
  c = kvjax.append(c, jnp.ones((2, 3, 1, 64)), jnp.ones((2, 3, 1, 64)), num_tokens=jnp.array([3, 0]))
  out = kvjax.attend(jnp.ones((2, 1, 2, 64)), c, q_positions=jnp.array([[2], [0]]))
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)


def test_attend_under_jit_matches_eager():
  c = kvjax.init_cache(2, 2, 32, 64, quant=kvjax.QuantConfig(key_bits=8))
  c = kvjax.append(c, jnp.asarray(_rand(40, 2, 9, 2, 64)), jnp.asarray(_rand(41, 2, 9, 2, 64)))
  q = jnp.asarray(_rand(42, 2, 1, 4, 64))
  np.testing.assert_allclose(np.asarray(jax.jit(kvjax.attend)(q, c)), np.asarray(kvjax.attend(q, c)),
                             atol=1e-6)


def test_bad_inputs():
  c = kvjax.init_cache(2, 2, 8, 64)
  with pytest.raises(ValueError, match="multiple of the cache's kv_heads"):
    kvjax.attend(jnp.ones((2, 1, 3, 64)), c)
  with pytest.raises(ValueError, match="head_dim"):
    kvjax.attend(jnp.ones((2, 1, 4, 32)), c)
  with pytest.raises(ValueError, match=r"q must be \[batch, q_seq, q_heads, head_dim\]"):
    kvjax.attend(jnp.ones((2, 4, 64)), c)
  with pytest.raises(ValueError, match="impl"):
    kvjax.attend(jnp.ones((2, 1, 4, 64)), c, impl="cuda")
  ring = kvjax.init_cache(2, 2, 8, 64, window=4)
  with pytest.raises(ValueError, match="append_and_attend"):
    kvjax.attend(jnp.ones((2, 3, 4, 64)), ring)


@pytest.mark.parametrize("kb,vb,g,d,rep,tq", [(4, 4, 32, 128, 4, 1), (8, 4, 64, 64, 1, 1),
                                              (4, 8, 128, 256, 8, 1), (4, 4, 32, 64, 2, 3),
                                              (8, 8, 32, 256, 2, 1)])
def test_int8dot_fast_path_close_to_reference(kb, vb, g, d, rep, tq):
  """Two-level int8 query and weights: per-row error far below the int4 cache's own."""
  b, h, n = 2, 2, 300
  cfg = kvjax.QuantConfig(key_bits=kb, value_bits=vb, group_size=g, seed=3)
  c = kvjax.init_cache(b, h, 512, d, quant=cfg)
  c = kvjax.append(c, jnp.asarray(_rand(50, b, n, h, d)), jnp.asarray(_rand(51, b, n, h, d)),
                   num_tokens=jnp.array([300, 123]))
  q = jnp.asarray(4 * _rand(52, b, tq, h * rep, d))  # peaked attention, as in real models
  ref = np.asarray(kvjax.attend(q, c, impl="reference"), np.float64)
  fast = kvjax.attend(q, c, impl="int8dot")
  assert fast.shape == q.shape
  # Each two-level rounding leaves <= 1/(2 * 127 * 256) of a group's largest q~ entry or
  # weight; summed over a few hundred tokens that is ~1e-4 per row (measured 1.9-2.5e-4;
  # float32 vs float64 alone is ~1e-6). The int4 cache itself is ~15% from float here.
  assert _row_rel_err(fast, ref).max() < 1e-3


@pytest.mark.parametrize("kb,vb,g,d,rep", [(4, 4, 32, 128, 4), (8, 4, 64, 64, 1), (4, 8, 128, 256, 2)])
def test_dequant_chunk_path_close_to_reference_and_the_cpu_default_for_chunks(kb, vb, g, d, rep):
  """Chunks on the CPU: bf16 rotated-domain dequantization, per-row error of bf16 size."""
  b, h, n, tq = 2, 2, 300, 5
  cfg = kvjax.QuantConfig(key_bits=kb, value_bits=vb, group_size=g, seed=4)
  k, v = jnp.asarray(_rand(80, b, n, h, d)), jnp.asarray(_rand(81, b, n, h, d))
  lengths = jnp.array([300, 123])
  c = kvjax.append(kvjax.init_cache(b, h, 512, d, quant=cfg), k, v, num_tokens=lengths)
  q = jnp.asarray(4 * _rand(82, b, tq, h * rep, d))
  ref = np.asarray(kvjax.attend(q, c, impl="reference"), np.float64)
  out = kvjax.attend(q, c, impl="dequant")
  # q~, the dequantized codes and the weights are each rounded to bf16 (2^-9 relative), as
  # in a bf16 dense cache: through these peaked softmax rows that is 1-2.5% per row, and the
  # bf16 dense cache of the same K/V is that far from float32 too (measured 1.4-2.2%). Bound:
  # twice the bf16 cache's own worst row (the int4 cache itself is ~15% from float).
  dense = {dt: kvjax.append(kvjax.init_cache(b, h, 512, d, dtype=dt), k, v, num_tokens=lengths)
           for dt in (jnp.float32, jnp.bfloat16)}
  bf16_err = _row_rel_err(kvjax.attend(q, dense[jnp.bfloat16]),
                          np.asarray(kvjax.attend(q, dense[jnp.float32]), np.float64)).max()
  assert _row_rel_err(out, ref).max() < 2 * bf16_err
  np.testing.assert_array_equal(np.asarray(kvjax.attend(q, c)), np.asarray(out))  # CPU auto
  assert np.abs(np.asarray(out) - np.asarray(kvjax.attend(q, c, impl="xla"))).max() > 0


def test_int8dot_blocks_and_segments_do_not_change_the_result(monkeypatch):
  """The lax.map over (batch, head) blocks and the segmented int32 value sums are exact."""
  b, h, n, d = 3, 2, 200, 64
  cfg = kvjax.QuantConfig(group_size=32, seed=1)
  c = kvjax.append(kvjax.init_cache(b, h, 256, d, quant=cfg), jnp.asarray(_rand(70, b, n, h, d)),
                   jnp.asarray(_rand(71, b, n, h, d)), num_tokens=jnp.array([200, 77, 0]))
  q = jnp.asarray(3 * _rand(72, b, 1, h * 4, d))
  whole = np.asarray(kvjax.attend(q, c, impl="int8dot"))
  from kvjax import attention
  monkeypatch.setattr(attention, "_INT8DOT_BLOCK_BYTES", 1)   # one (batch, head) pair per step
  monkeypatch.setattr(attention, "_INT8DOT_SEGMENT", 48)      # 256 slots in 6 segments
  split = np.asarray(kvjax.attend(q, c, impl="int8dot"))
  np.testing.assert_allclose(split, whole, rtol=0, atol=1e-6 * np.abs(whole).max())
  assert np.all(split[2] == 0)  # an empty sequence attends to nothing: zeros, not NaN
  ref = np.asarray(kvjax.attend(q, c, impl="reference"), np.float64)
  assert _row_rel_err(split[:2], ref[:2]).max() < 1e-3


def test_dispatch_table_chooses_the_path():
  from kvjax import attention as attn
  c = kvjax.init_cache(1, 2, 64, 64, quant=kvjax.QuantConfig())
  dense = kvjax.init_cache(1, 2, 64, 64)
  assert attn.choose_impl("auto", c, 1, "cpu") in ("native", "int8dot")  # tests/test_native.py
  assert attn.choose_impl("auto", c, 8, "cpu") == "dequant"
  assert attn.choose_impl("auto", c, 1, "tpu") == "pallas"
  assert attn.choose_impl("auto", c, 8, "gpu") == "xla"
  assert attn.choose_impl("pallas", c, 8) == "xla"  # the fused kernel is decode-only
  assert attn.choose_impl("auto", dense, 1, "tpu") == "xla"
  # The format carries no implementation: the call chooses, and "auto" on the CPU is the C++
  # kernel where it could be built, int8dot otherwise.
  q = jnp.asarray(4 * _rand(60, 1, 1, 4, 64))
  k, v = jnp.asarray(_rand(61, 1, 50, 2, 64)), jnp.asarray(_rand(62, 1, 50, 2, 64))
  c = kvjax.append(c, k, v)
  outs = {impl: np.asarray(kvjax.attend(q, c, impl=impl)) for impl in ("xla", "int8dot")}
  if jax.default_backend() == "cpu":
    auto = attn.choose_impl("auto", c, 1)
    np.testing.assert_array_equal(np.asarray(kvjax.attend(q, c)),
                                  np.asarray(kvjax.attend(q, c, impl=auto)))
  assert np.abs(outs["xla"] - outs["int8dot"]).max() > 0  # really two different paths
  with pytest.raises(ValueError, match="impl"):
    kvjax.attend(q, c, impl="cuda")
