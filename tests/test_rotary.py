"""Rotary key offsets (kvjax.rotary): the math against brute force, and caches that use them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import rotary, smoothing
from kvjax import corrections as kc


def _rope_params(freq, channels, mean):
  return {"k_rope_freq": freq, "k_rope_channels": channels, "k_rope_mean": mean}


def _rope_pairs(rng, d, p):
  freq = rng.uniform(0.002, 1.0, p).astype(np.float32)
  first = rng.choice(d // 2, p, replace=False)
  channels = np.stack([first, first + d // 2], 1).astype(np.int32)
  return freq, channels


def _brute_offset(positions, freq, channels, mean, d):
  """c_t built pair by pair with explicit 2 x 2 rotations, float64. -> [B, T, Hr, D]."""
  b, t = positions.shape
  hr = mean.shape[0]
  out = np.zeros((b, t, hr, d))
  for p, (i, j) in enumerate(channels):
    a = np.float32(positions).astype(np.float32) * np.float32(freq[p])
    for h in range(hr):
      m = np.array([mean[h, 0, p], mean[h, 1, p]], np.float64)
      rot = np.stack([np.stack([np.cos(a), -np.sin(a)], -1), np.stack([np.sin(a), np.cos(a)], -1)], -2)
      c = rot @ m                                               # [B, T, 2]
      out[:, :, h, i] += c[..., 0]
      out[:, :, h, j] += c[..., 1]
  return out


def test_key_offset_and_logit_offsets_match_brute_force():
  rng = np.random.default_rng(0)
  d, p, hr = 64, 5, 2
  freq, channels = _rope_pairs(rng, d, p)
  mean = rng.standard_normal((hr, 2, p)).astype(np.float32) * 3
  positions = rng.integers(0, 5000, (2, 7)).astype(np.int32)
  got = np.asarray(rotary.key_offset(jnp.asarray(positions), freq, channels, mean, d))
  want = _brute_offset(positions, freq, channels, mean, d)
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
  # q . c_t for every (query, slot): the coefficient form equals the dot with the explicit c_t.
  q = rng.standard_normal((2, hr, 3, 4, d)).astype(np.float32)       # [B, H, T, R, D]
  kv_pos = rng.integers(0, 5000, (2, 11)).astype(np.int32)
  c = _brute_offset(kv_pos, freq, channels, mean, d)                   # [B, N, H, D]
  want = np.einsum("bhtrd,bnhd->bhtrn", q, c)
  got = np.asarray(rotary.logit_offsets(jnp.asarray(q), jnp.asarray(kv_pos), freq, channels,
                                        mean))
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def _rotating_keys(rng, b, n, h, d, freq, channels, mean, start=0):
  pos = start + np.arange(n)[None, :].repeat(b, 0)
  k = rng.standard_normal((b, n, h, d)).astype(np.float32)
  return k + _brute_offset(pos, freq, channels, mean, d).astype(np.float32)


@pytest.mark.parametrize("window", [None, 24])
def test_cache_with_rotary_offsets_paths_agree_and_beat_no_offset(window):
  rng = np.random.default_rng(1 if window is None else 2)
  b, h, d, p, n = 2, 2, 64, 4, 40
  freq, channels = _rope_pairs(rng, d, p)
  mean = rng.standard_normal((h, 2, p)).astype(np.float32) * 25   # offset >> the noise
  k = _rotating_keys(rng, b, n, h, d, freq, channels, mean)
  v = rng.standard_normal((b, n, h, d)).astype(np.float32)
  q = rng.standard_normal((b, 1, 2 * h, d)).astype(np.float32)
  dense = kvjax.append(kvjax.init_cache(b, h, 64, d, dtype=jnp.float32, window=window), k, v)
  exact = np.asarray(kvjax.attend(q, dense))
  # 8-bit values, so that the outputs' error is the keys'.
  cfg = kvjax.QuantConfig(value_bits=8, corrections=(kc.RotaryKeyOffset(p),))
  rot = kvjax.append(kvjax.init_cache(b, h, 64, d, quant=cfg, window=window,
                                      params=_rope_params(freq, channels, mean)), k, v)
  plain = kvjax.append(kvjax.init_cache(b, h, 64, d, quant=kvjax.QuantConfig(value_bits=8),
                                        window=window), k, v)
  ref = np.asarray(kvjax.attend(q, rot, impl="reference"))
  for impl, tol in (("xla", 1e-5), ("native", 1e-5), ("int8dot", 2e-3), ("dequant", 3e-2)):
    out = np.asarray(kvjax.attend(q, rot, impl=impl))
    row = np.abs(out - ref).max(-1) / np.abs(ref).max(-1)          # per (batch, query head)
    assert row.max() < tol, (impl, row.max())
  err_rot = np.abs(ref - exact).max(-1)
  err_plain = np.abs(np.asarray(kvjax.attend(q, plain, impl="reference")) - exact).max(-1)
  assert err_rot.mean() < 0.5 * err_plain.mean()


def test_chunked_and_token_by_token_writes_store_the_same_codes():
  # Positions come from the cache lengths: writing in pieces must subtract the same c_t.
  rng = np.random.default_rng(3)
  b, h, d, p, n = 1, 1, 64, 3, 20
  freq, channels = _rope_pairs(rng, d, p)
  mean = rng.standard_normal((h, 2, p)).astype(np.float32) * 5
  k = _rotating_keys(rng, b, n, h, d, freq, channels, mean)
  v = rng.standard_normal((b, n, h, d)).astype(np.float32)
  cfg = kvjax.QuantConfig(corrections=(kc.RotaryKeyOffset(p),))
  make = lambda: kvjax.init_cache(b, h, 32, d, quant=cfg,
                                  params=_rope_params(freq, channels, mean))
  whole = kvjax.append(make(), k, v)
  parts = make()
  for lo in (0, 7, 8, 15):
    hi = {0: 7, 7: 8, 8: 15, 15: 20}[lo]
    parts = kvjax.append(parts, k[:, lo:hi], v[:, lo:hi])
  np.testing.assert_array_equal(np.asarray(whole.k_codes), np.asarray(parts.k_codes))
  np.testing.assert_array_equal(np.asarray(whole.k_scales), np.asarray(parts.k_scales))


def test_bad_rotary_parameters_are_rejected():
  cfg = kvjax.QuantConfig(corrections=(kc.RotaryKeyOffset(2),))
  with pytest.raises(ValueError, match="k_rope_freq"):
    kvjax.init_cache(1, 1, 8, 64, quant=cfg,
                     params=_rope_params(np.zeros(3), np.zeros((3, 2)), np.zeros((2, 3))))
  with pytest.raises(ValueError, match="k_rope_channels"):
    kvjax.init_cache(1, 1, 8, 64, quant=cfg, params=_rope_params(
        np.zeros(2), np.array([[0, 32], [1, 64]]), np.zeros((2, 2))))
  with pytest.raises(ValueError, match="RotaryKeyOffset.pairs"):
    kc.RotaryKeyOffset(-1)
  with pytest.raises(ValueError, match="RotaryKeyOffset.pairs=33"):
    kvjax.init_cache(1, 1, 8, 64, quant=kvjax.QuantConfig(corrections=(kc.RotaryKeyOffset(33),)))
  # A param of a correction the config does not have is refused, naming its owner.
  with pytest.raises(ValueError, match="k_mean belongs to 'key_offset'"):
    kvjax.init_cache(1, 1, 8, 64, quant=cfg, params={"k_mean": np.zeros(64)})


def _stats_of(k, q, freq_full, chunks):
  b, n, h, d = k.shape
  base = kvjax.init_cache(b, h, n, d, dtype=jnp.float32)
  st = kvjax.with_stats({"c": base}, rope_freq={"c": jnp.asarray(freq_full)})["c"]
  lo = 0
  for hi in chunks:
    st = st.accumulate(jnp.asarray(q[:, lo:hi]), jnp.asarray(k[:, lo:hi]), jnp.asarray(k[:, lo:hi]))
    st = kvjax.append(st, jnp.asarray(k[:, lo:hi]), jnp.asarray(k[:, lo:hi]))
    lo = hi
  return st


def test_calibration_recovers_a_planted_rotary_mean():
  rng = np.random.default_rng(4)
  b, n, h, d = 1, 600, 2, 64
  freq_full = (1.0 / 10000.0 ** (np.arange(0, d, 2) / d)).astype(np.float32)
  planted = np.array([3, 9])                                  # fast pairs: w T >> 2.8
  mean = np.zeros((h, 2, 2), np.float32)
  mean[:, :, :] = rng.standard_normal((h, 2, 2)) * 4
  channels = np.stack([planted, planted + d // 2], 1)
  const = rng.standard_normal((h, d)).astype(np.float32)
  k = _rotating_keys(rng, b, n, h, d, freq_full[planted], channels, mean) + const
  q = rng.standard_normal((b, n, 2 * h, d)).astype(np.float32)
  st = _stats_of(k, q, freq_full, (250, 600))
  got = smoothing.key_params(st, smoothing.KeyCalibration(rope_pairs=2, feedback=False))
  assert sorted(got["k_rope_channels"][:, 0].tolist()) == planted.tolist()
  order = np.argsort(got["k_rope_channels"][:, 0])
  np.testing.assert_allclose(got["k_rope_freq"][order], freq_full[planted])
  # Least squares over 600 noisy tokens (unit noise): about 1/sqrt(300) per coordinate.
  np.testing.assert_allclose(got["k_rope_mean"][:, :, order], mean, atol=0.25)
  np.testing.assert_allclose(got["k_mean"], const, atol=0.25)
  # The residual second moment per channel, from the sums, equals that of the residual keys.
  pos = np.arange(n)[None]
  c_t = _brute_offset(pos, got["k_rope_freq"], got["k_rope_channels"], got["k_rope_mean"], d)
  resid = k - c_t - got["k_mean"]
  lam_want = smoothing.balance_lambda(np.sqrt((resid ** 2).mean((0, 1))),
                                      np.sqrt((q.reshape(b, n, h, 2, d) ** 2).sum(3).mean((0, 1))),
                                      smoothing.KeyCalibration())
  np.testing.assert_allclose(got["k_lambda"], lam_want, rtol=1e-3)


def test_feedback_matrix_is_the_ldl_feedback_of_the_rotated_query_moment():
  rng = np.random.default_rng(5)
  b, n, h, d = 1, 80, 1, 32
  k = rng.standard_normal((b, n, h, d)).astype(np.float32)
  q = rng.standard_normal((b, n, 2, d)).astype(np.float32) * rng.uniform(0.1, 3, d)
  st = _stats_of(k, q, np.zeros(d // 2, np.float32), (80,))
  lam = rng.uniform(0.5, 2, (h, d))
  rot = np.linalg.qr(rng.standard_normal((d, d)))[0][None]
  f = smoothing.feedback_matrix(st, lam, rot, damping=0.01)[0]
  assert np.all(np.tril(f) == 0)
  qr = np.einsum("btrd,ed->btre", q * lam[0], rot[0]).reshape(-1, d)
  hm = qr.T @ qr
  hm += 0.01 * np.mean(np.diag(hm)) * np.eye(d)
  u = np.linalg.cholesky(np.linalg.inv(hm)).T
  np.testing.assert_allclose(f, np.triu(u / np.diag(u)[:, None], 1), rtol=1e-3, atol=1e-5)


def test_cos_sin_is_within_its_stated_error():
  """`rotary.cos_sin` against float64 at the angles decode steps evaluate (float32 position times
  frequency), positions -1 .. 131,071, frequencies over Gemma's and Llama's ranges."""
  pos = np.concatenate([np.arange(-1, 4096), np.random.default_rng(0).integers(0, 1 << 17, 20000)])
  freq = np.concatenate([1e4 ** (-np.arange(64) / 64), 1e6 ** (-np.arange(64) / 64), [1.0, 3.1]])
  a = jnp.asarray(pos, jnp.float32)[:, None] * jnp.asarray(freq, jnp.float32)
  cos, sin = jax.jit(rotary.cos_sin)(a)
  ad = np.asarray(a, np.float64)
  assert np.abs(np.asarray(cos, np.float64) - np.cos(ad)).max() < 1.2e-7
  assert np.abs(np.asarray(sin, np.float64) - np.sin(ad)).max() < 1.2e-7
