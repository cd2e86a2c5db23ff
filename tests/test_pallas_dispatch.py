"""kvjax.append / kvjax.attend with impl="pallas" (interpret mode on the CPU) against the XLA path."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import rotary
from kvjax import corrections as kc
from kvjax.cache import with_config


def _rand(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("kb,window,per_head", [(4, None, False), (8, 16, True)])
def test_pallas_append_and_decode_match_xla(kb, window, per_head):
  b, h, rep, d, n = 2, 2, 4, 64, 40
  lam = np.random.default_rng(0).uniform(0.5, 2.0, (h, d)).astype(np.float32) if per_head else None
  mean = np.random.default_rng(1).standard_normal((h, d)).astype(np.float32) if per_head else None
  cfg = kvjax.QuantConfig(key_bits=kb, group_size=32,
                          corrections=(kc.KeyOffset(),) if per_head else ())
  c = kvjax.init_cache(b, h, 64, d, quant=cfg, window=window, key_lambda=lam,
                       params={"k_mean": mean} if per_head else None)
  k, v = _rand(2, b, n, h, d), _rand(3, b, n, h, d)
  cx = kvjax.append(c, k, v, num_tokens=jnp.array([40, 17]), impl="xla")
  cp = kvjax.append(c, k, v, num_tokens=jnp.array([40, 17]), impl="pallas")
  # Same codes up to rare round-half ties from a different matmul order.
  kx = np.asarray(kvjax.quantizer.unpack_int4(cx.k_codes) if kb == 4 else cx.k_codes, np.int32)
  kp = np.asarray(kvjax.quantizer.unpack_int4(cp.k_codes) if kb == 4 else cp.k_codes, np.int32)
  assert np.abs(kx - kp).max() <= 1 and np.mean(kx != kp) < 1e-3
  q = _rand(4, b, 1, h * rep, d)
  ref = np.asarray(kvjax.attend(q, cx, impl="xla"), np.float64)
  out = np.asarray(kvjax.attend(q, cx, impl="pallas"), np.float64)
  err = np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
  assert err.max() < 1e-4


def test_pallas_decode_with_softcap_and_key_mean():
  b, h, rep, d = 1, 2, 2, 64
  mean = 3.0 * np.random.default_rng(5).standard_normal((h, d)).astype(np.float32)
  c = kvjax.init_cache(b, h, 32, d, quant=kvjax.QuantConfig(corrections=(kc.KeyOffset(),)),
                       params={"k_mean": mean})
  c = kvjax.append(c, _rand(6, b, 20, h, d) + mean, _rand(7, b, 20, h, d))
  q = 3 * _rand(8, b, 1, h * rep, d)
  ref = np.asarray(kvjax.attend(q, c, impl="xla", softcap=5.0), np.float64)
  out = np.asarray(kvjax.attend(q, c, impl="pallas", softcap=5.0), np.float64)
  assert (np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)).max() < 1e-4


@pytest.mark.parametrize("pairs,window,softcap", [(1, None, None), (8, 16, 5.0)])
def test_pallas_decode_with_rotary_key_offsets(pairs, window, softcap):
  # Keys with a rotating pre-RoPE mean in P channel pairs: the cache stores k - c_t and
  # the kernel adds q . c_t back per slot from the slot's position (ring slots included).
  b, h, rep, d, n = 2, 2, 2, 64, 40
  rng = np.random.default_rng(9)
  freq = rng.uniform(0.001, 1.0, (pairs,)).astype(np.float32)
  first = rng.choice(d // 2, pairs, replace=False)
  channels = np.stack([first, first + d // 2], axis=1).astype(np.int32)  # rotate-half pairs
  mean = (3.0 * rng.choice([-1.0, 1.0], (h, 2, pairs)) * rng.uniform(0.7, 1.3, (h, 2, pairs))
          ).astype(np.float32)
  cfg = kvjax.QuantConfig(corrections=(kc.RotaryKeyOffset(pairs),))
  c = kvjax.init_cache(b, h, 64, d, quant=cfg, window=window,
                       params={"k_rope_freq": freq, "k_rope_channels": channels,
                               "k_rope_mean": mean})
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  offset = rotary.key_offset(positions, jnp.asarray(freq), jnp.asarray(channels),
                                   jnp.asarray(mean), d)                 # [B, N, H, D]
  c = kvjax.append(c, _rand(10, b, n, h, d) + offset, _rand(11, b, n, h, d),
                   num_tokens=jnp.array([40, 23]))
  q = 2 * _rand(12, b, 1, h * rep, d)
  ref = np.asarray(kvjax.attend(q, c, impl="reference", softcap=softcap), np.float64)
  out = np.asarray(kvjax.attend(q, c, impl="pallas", softcap=softcap), np.float64)
  assert (np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)).max() < 1e-4
  # Not vacuous: the same codes read without the rotary term attend elsewhere.
  plain = with_config(c, cfg, k_rope_mean=jnp.zeros_like(c.array("k_rope_mean")))
  off = np.asarray(kvjax.attend(q, plain, impl="reference", softcap=softcap), np.float64)
  assert (np.linalg.norm(off - ref, axis=-1) / np.linalg.norm(ref, axis=-1)).max() > 1e-2


def test_pallas_write_with_feedback_and_rotary_offsets_matches_xla_write():
  # The whole cache write (offsets, rotation, feedback rounding, packing) through the fused
  # kernel against the XLA path: the same codes up to rounding-boundary flips.
  rng = np.random.default_rng(11)
  b, t, h, d, p = 2, 9, 2, 64, 3
  cfg = kvjax.QuantConfig(corrections=(kc.RotaryKeyOffset(p), kc.KeyFeedback(),
                                       kc.ValueFeedback()))
  freq = rng.uniform(0.01, 1.0, p).astype(np.float32)
  channels = np.stack([np.arange(p), np.arange(p) + d // 2], 1)
  mean = rng.standard_normal((h, 2, p)).astype(np.float32) * 3
  a = rng.standard_normal((h, d, d))
  hm = np.einsum("hij,hkj->hik", a, a) / d + 1e-2 * np.eye(d)
  u = np.linalg.cholesky(np.linalg.inv(hm)).transpose(0, 2, 1)
  fb = np.triu(u / np.diagonal(u, axis1=1, axis2=2)[..., None], 1).astype(np.float32)
  vfb = np.ascontiguousarray(fb[::-1])  # another matrix per head for the values
  cache = kvjax.init_cache(b, h, 16, d, quant=cfg,
                           params={"k_rope_freq": freq, "k_rope_channels": channels,
                                   "k_rope_mean": mean, "k_feedback": fb, "v_feedback": vfb})
  k = rng.standard_normal((b, t, h, d)).astype(np.float32)
  v = rng.standard_normal((b, t, h, d)).astype(np.float32)
  fused = kvjax.append(cache, k, v, impl="pallas")
  plain = kvjax.append(cache, k, v, impl="xla")
  lev = lambda c: np.asarray(kvjax.quantizer.unpack_int4(c), np.int32)
  for name in ("k_codes", "v_codes"):
    diff = np.abs(lev(getattr(fused, name)) - lev(getattr(plain, name)))
    assert diff.max() <= 2 * 2 and np.mean(diff > 0) < 2e-3, name
  # The value feedback acted: nearest rounding gives other value codes.
  without = dataclasses.replace(cfg, corrections=cfg.corrections[:2])
  nearest = kvjax.append(with_config(cache, without), k, v, impl="xla")
  assert np.mean(lev(nearest.v_codes) != lev(plain.v_codes)) > 0.05
