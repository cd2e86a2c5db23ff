import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import quantizer
from kvjax import corrections as kc


def _kv(key, b, t, h, d, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(key))
  return jax.random.normal(k1, (b, t, h, d), dtype), jax.random.normal(k2, (b, t, h, d), dtype)


def test_dense_append_writes_exactly_and_ragged():
  c = kvjax.init_cache(2, 3, 16, 8, dtype=jnp.float32)
  k, v = _kv(0, 2, 5, 3, 8)
  c = kvjax.append(c, k, v, num_tokens=jnp.array([5, 2]))
  np.testing.assert_array_equal(np.asarray(c.lengths), [5, 2])
  np.testing.assert_array_equal(np.asarray(c.k[0, :, :5]), np.asarray(k[0]).transpose(1, 0, 2))
  np.testing.assert_array_equal(np.asarray(c.k[1, :, :2]), np.asarray(k[1, :2]).transpose(1, 0, 2))
  assert np.all(np.asarray(c.k[1, :, 2:]) == 0)  # tokens past num_tokens were not written
  k2, v2 = _kv(1, 2, 1, 3, 8)
  c = kvjax.append(c, k2, v2)
  np.testing.assert_array_equal(np.asarray(c.v[1, :, 2]), np.asarray(v2[1, 0]))
  np.testing.assert_array_equal(np.asarray(kvjax.positions(c)[1, :4]), [0, 1, 2, -1])


def test_quantized_append_stores_quantizer_output():
  cfg = kvjax.QuantConfig(key_bits=8, value_bits=4, group_size=32, rotation="srht")
  c = kvjax.init_cache(1, 2, 8, 64, quant=cfg)
  assert c.k_codes.dtype == jnp.int8 and c.k_codes.shape == (1, 2, 8, 64)
  assert c.v_codes.dtype == jnp.uint8 and c.v_codes.shape == (1, 2, 8, 32)
  k, v = _kv(2, 1, 3, 2, 64)
  c = kvjax.append(c, k, v)
  kc, ks = quantizer.quantize(k, c.k_rotation, c.k_lambda, bits=8, group_size=32)
  np.testing.assert_array_equal(np.asarray(c.k_codes[0, :, :3]), np.asarray(kc[0]).transpose(1, 0, 2))
  np.testing.assert_array_equal(np.asarray(c.k_scales[0, :, :3]), np.asarray(ks[0]).transpose(1, 0, 2))


def test_ring_buffer_keeps_the_last_window_positions():
  c = kvjax.init_cache(1, 1, 100, 4, window=4, dtype=jnp.float32)
  assert c.ring and c.capacity == 4 and c.k.shape[2] == 4
  k, v = _kv(3, 1, 6, 1, 4)
  c = kvjax.append(c, k, v)  # a chunk longer than the ring: only the last 4 survive
  pos = np.asarray(kvjax.positions(c))[0]
  for s in range(4):
    np.testing.assert_array_equal(np.asarray(c.k[0, 0, s]), np.asarray(k[0, pos[s], 0]))
  assert sorted(pos.tolist()) == [2, 3, 4, 5]
  k2, v2 = _kv(4, 1, 1, 1, 4)
  c = kvjax.append(c, k2, v2)
  assert sorted(np.asarray(kvjax.positions(c))[0].tolist()) == [3, 4, 5, 6]
  assert int(c.lengths[0]) == 7


def test_window_not_smaller_than_max_len_is_a_plain_cache():
  c = kvjax.init_cache(1, 1, 8, 4, window=8)
  assert not c.ring and c.window == 8 and c.capacity == 8


def test_overflow_raises_eagerly_and_flags_under_jit():
  c = kvjax.init_cache(2, 1, 4, 8, dtype=jnp.float32)
  k, v = _kv(5, 2, 3, 1, 8)
  c = kvjax.append(c, k, v)
  with pytest.raises(ValueError, match="overflows the cache"):
    kvjax.append(c, k, v)
  before = np.asarray(c.k)
  c2 = jax.jit(kvjax.append)(c, k, v)
  np.testing.assert_array_equal(np.asarray(c2.overflow), [True, True])
  np.testing.assert_array_equal(np.asarray(c2.lengths), [4, 4])
  # Nothing already stored was overwritten; only the one free slot was filled.
  np.testing.assert_array_equal(np.asarray(c2.k)[:, :, :3], before[:, :, :3])
  np.testing.assert_array_equal(np.asarray(c2.k)[:, :, 3], np.asarray(k)[:, 0])
  with pytest.raises(OverflowError, match="overflowed"):
    kvjax.check_overflow([c2])
  kvjax.check_overflow([c])  # no overflow: no error


@pytest.mark.parametrize("g,factor", [(32, 3.5), (64, 3.7), (128, 3.8)])
def test_nbytes_compression(g, factor):
  dense = kvjax.init_cache(4, 4, 4096, 128)
  quant = kvjax.init_cache(4, 4, 4096, 128, quant=kvjax.QuantConfig(group_size=g))
  assert kvjax.nbytes(dense) / kvjax.nbytes(quant) >= factor
  # Bytes are what is stored: packed codes at half a byte, bf16 scales.
  per_token = 2 * (128 // 2 + 2 * (128 // g))
  assert kvjax.nbytes(quant) == 4 * 4 * 4096 * per_token + 4 * 4 + 4
  assert kvjax.nbytes(quant, include_params=True) > kvjax.nbytes(quant)


def test_under_jit_with_donation_scan_and_vmap():
  cfg = kvjax.QuantConfig()
  c = kvjax.init_cache(2, 2, 16, 64, quant=cfg)
  k, v = _kv(6, 2, 8, 2, 64)
  eager = c
  for t in range(8):
    eager = kvjax.append(eager, k[:, t:t + 1], v[:, t:t + 1])

  step = jax.jit(lambda c, kk, vv: kvjax.append(c, kk, vv), donate_argnums=0)
  jitted = jax.tree_util.tree_map(jnp.copy, c)  # donation consumes the buffers
  for t in range(8):
    jitted = step(jitted, k[:, t:t + 1], v[:, t:t + 1])

  def body(c, kv):
    return kvjax.append(c, kv[0][:, None], kv[1][:, None]), None
  scanned, _ = jax.lax.scan(body, c, (k.swapaxes(0, 1), v.swapaxes(0, 1)))
  for other in (jitted, scanned):
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(other)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # vmap over a stacked layer axis: two layers' caches appended at once.
  stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), c)
  ks = jnp.stack([k, 2 * k])
  out = jax.vmap(kvjax.append)(stacked, ks, jnp.stack([v, v]))
  layer1 = kvjax.append(c, 2 * k, v)
  np.testing.assert_array_equal(np.asarray(out.k_codes[1]), np.asarray(layer1.k_codes))


def test_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="even"):
    kvjax.init_cache(1, 1, 8, 63, quant=kvjax.QuantConfig())
  with pytest.raises(ValueError, match="not divisible by QuantConfig.group_size"):
    kvjax.init_cache(1, 1, 8, 80, quant=kvjax.QuantConfig(group_size=64))
  with pytest.raises(ValueError, match="power-of-two"):
    kvjax.init_cache(1, 1, 8, 96, quant=kvjax.QuantConfig(rotation="srht"))
  with pytest.raises(ValueError, match="max_len"):
    kvjax.init_cache(1, 1, 0, 64)
  with pytest.raises(ValueError, match="group_size"):
    kvjax.QuantConfig(group_size=16)
  with pytest.raises(ValueError, match="key_bits"):
    kvjax.QuantConfig(key_bits=2)
  with pytest.raises(TypeError, match="QuantConfig"):
    kvjax.init_cache(1, 1, 8, 64, quant={"bits": 4})
  c = kvjax.init_cache(2, 2, 8, 64)
  with pytest.raises(ValueError, match=r"k must be \[batch, seq, kv_heads, head_dim\]"):
    kvjax.append(c, jnp.ones((2, 2, 64)), jnp.ones((2, 2, 64)))
  with pytest.raises(ValueError, match="kv_heads"):
    kvjax.append(c, jnp.ones((2, 1, 3, 64)), jnp.ones((2, 1, 3, 64)))
  with pytest.raises(TypeError, match="floating"):
    kvjax.append(c, jnp.ones((2, 1, 2, 64), jnp.int32), jnp.ones((2, 1, 2, 64), jnp.int32))
  # A learned rotation is a value (matrices), not a name the config could generate.
  with pytest.raises(ValueError, match="learned rotation is a value"):
    kvjax.QuantConfig(rotation="learned")


def test_calibrated_parameters_are_used():
  d = 64
  rot = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))[0].astype(np.float32)
  lam = np.random.default_rng(1).uniform(0.5, 2, d).astype(np.float32)
  c = kvjax.init_cache(1, 2, 4, d, quant=kvjax.QuantConfig(),
                       key_rotation=rot, value_rotation=rot, key_lambda=lam, value_lambda=lam)
  np.testing.assert_array_equal(np.asarray(c.k_rotation[0]), rot)
  np.testing.assert_array_equal(np.asarray(c.v_lambda[0]), lam)
  with pytest.raises(ValueError, match="key_rotation"):
    kvjax.init_cache(1, 2, 4, d, quant=kvjax.QuantConfig(), key_rotation=np.eye(32))


@pytest.mark.parametrize("cfg", [
    kvjax.QuantConfig(rotation="none"),
    kvjax.QuantConfig(),
    kvjax.QuantConfig(key_bits=8, group_size=64, scale_dtype="float16"),
    kvjax.QuantConfig(corrections=(kc.KeyFeedback(), kc.ValueFeedback(), kc.RotaryKeyOffset(2))),
], ids=["none", "srft", "k8-g64-f16", "feedback-rotary"])
def test_chunk_and_token_writes_under_jit_store_identical_codes(cfg):
  # Decode writes one token per step, prefill a chunk; both are separately compiled programs.
  # The codes must come from exactly the stored (rounded) scale in both, or a 4-bit cache is
  # path-dependent: before round_to_dtype, ~0.5% of codes differed between the two.
  # (Shapes as in Gemma-3: one KV head of 256 channels, a 512-token chunk.)
  rng = np.random.default_rng(11)
  b, h, d, n, m = 1, 1, 256, 512, 32
  k = (rng.standard_normal((b, n, h, d)) * rng.uniform(0.1, 20, d)).astype(np.float32)
  v = rng.standard_normal((b, n, h, d)).astype(np.float32)
  # A feedback matrix as calibration makes it (U / diag U, (H + δ)^-1 = UᵀU) for queries that
  # look along 16 main directions.
  a = rng.standard_normal((d, 16))
  hm = a @ a.T + 0.01 * np.trace(a @ a.T) / d * np.eye(d)
  u = np.linalg.cholesky(np.linalg.inv(hm)).T
  feedback = np.broadcast_to(np.triu(u / np.diag(u)[:, None], 1), (h, d, d)).astype(np.float32)
  params = {"k_feedback": feedback, "v_feedback": feedback[:, ::-1, ::-1].transpose(0, 2, 1),
            "k_rope_freq": np.array([0.3, 0.01], np.float32),
            "k_rope_channels": np.array([[0, 128], [1, 129]]),
            "k_rope_mean": rng.standard_normal((h, 2, 2)).astype(np.float32)}
  if not cfg.corrections:
    params = {}
  make = lambda: kvjax.init_cache(b, h, n, d, quant=cfg, params=params)
  append = jax.jit(kvjax.append)
  whole = append(make(), k, v)
  steps = make()
  for t in range(m):  # the first m tokens one at a time
    steps = append(steps, k[:, t:t + 1], v[:, t:t + 1])
  for name in ("k_codes", "k_scales", "v_codes", "v_scales"):
    np.testing.assert_array_equal(np.asarray(getattr(whole, name))[:, :, :m],
                                  np.asarray(getattr(steps, name))[:, :, :m], err_msg=name)
