"""Exact recent values (kvjax.corrections.RecentValues(W)): each new token's query reads the values
of the W most recent tokens (its own included) exact, on every path; chunks, token-by-token
decode and the kernels agree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import attention, cache as cache_lib, smoothing
from kvjax import corrections as kc


def _window(cfg):
  r = cfg.correction(kc.RecentValues)
  return 0 if r is None else r.window


def _without_recent(cfg):
  return dataclasses.replace(cfg, corrections=tuple(
      c for c in cfg.corrections if not isinstance(c, kc.RecentValues)))


def _recent(w, **kw):
  return kvjax.QuantConfig(corrections=(kc.RecentValues(w),) if w else (), **kw)


def _rand(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _row_rel_err(a, ref):
  a = np.asarray(a, np.float64)
  return np.linalg.norm(a - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)


def _oracle(cfg, q, k, v, q_positions, *, window, softcap, d, h):
  """float64 numpy: every query attends to the stored (dequantized) keys and values of
  positions <= its own inside the window, with the values of the W most recent
  positions (its own included) replaced by the exact ones."""
  lin = kvjax.append(kvjax.init_cache(k.shape[0], h, 64, d, quant=cfg), k, v)
  kd, vd = attention._dequantized_kv(lin.config, attention.quant_view(lin),
                                     cache_lib.positions(lin))
  kd, vd = np.asarray(kd, np.float64), np.asarray(vd, np.float64)              # [B, H, N, D]
  q, v = np.asarray(q, np.float64), np.asarray(v, np.float64)
  b, t, hq, _ = q.shape
  rep = hq // h
  out = np.zeros(q.shape)
  for bi in range(b):
    for ti, pos in enumerate(q_positions):
      lo = 0 if window is None else max(0, pos - window + 1)
      for head in range(hq):
        kv = head // rep
        logits = kd[bi, kv, lo:pos + 1] @ q[bi, ti, head] / np.sqrt(d)
        if softcap is not None:
          logits = softcap * np.tanh(logits / softcap)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        vals = vd[bi, kv, lo:pos + 1].copy()
        for w in range(min(_window(cfg), pos + 1 - lo)):
          vals[-1 - w] = v[bi, pos - w, kv]  # the recent values, exact
        out[bi, ti, head] = p @ vals
  return out


CONFIGS = [dict(corrections=(kc.RecentValues(1),)),
           dict(corrections=(kc.RecentValues(4), kc.ValueSink(), kc.KeySink())),
           dict(corrections=(kc.RecentValues(3),), key_bits=8, value_bits=8)]
CONFIG_IDS = ["own", "recent4-with-sink", "recent3-K8V8"]


@pytest.mark.parametrize("extra", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("ring", [False, True])
def test_chunk_paths_read_the_own_value_exact(ring, extra):
  b, h, d, rep, n, window = 2, 2, 64, 2, 24, 16
  cfg = kvjax.QuantConfig(seed=3, **extra)
  k = jnp.asarray(_rand(1, b, n, h, d) + 0.5)
  v = jnp.asarray(_rand(2, b, n, h, d))
  q = jnp.asarray(3 * _rand(3, b, n, h * rep, d))
  w = window if ring else None
  for softcap in ((5.0,) if ring else (None,)):  # the soft-cap on one of the two layouts
    expected = _oracle(cfg, q, k, v, range(n), window=w, softcap=softcap, d=d, h=h)
    plain = _oracle(_without_recent(cfg), q, k, v, range(n), window=w,
                    softcap=softcap, d=d, h=h)
    outs = {}
    for impl in ("reference", "xla", "native", "int8dot", "dequant"):
      c = kvjax.init_cache(b, h, 64, d, quant=cfg, window=w)
      outs[impl], _ = kvjax.append_and_attend(c, q, k, v, impl=impl, softcap=softcap)
    # reference / xla: the same float32 math (xla in another order); int8dot: two-level int8
    # rounding of queries and weights (test_attention).
    assert _row_rel_err(outs["reference"], expected).max() < 1e-5
    assert _row_rel_err(outs["xla"], expected).max() < 1e-5
    assert _row_rel_err(outs["native"], expected).max() < 1e-5
    assert _row_rel_err(outs["int8dot"], expected).max() < 1e-3
    # "dequant" rounds q~, codes and weights to bf16 (test_sink's bound: twice what a bf16
    # dense cache loses against float32, measured here on the same inputs).
    dense = {}
    for dt in (jnp.float32, jnp.bfloat16):
      dc = kvjax.init_cache(b, h, 64, d, dtype=dt, window=w)
      dense[dt], _ = kvjax.append_and_attend(dc, q, k, v, softcap=softcap)
    bf16_err = _row_rel_err(dense[jnp.bfloat16], np.asarray(dense[jnp.float32], np.float64))
    assert _row_rel_err(outs["dequant"], expected).max() < 2 * bf16_err.max()
    # The correction is not a no-op: without it most rows move by far more than the float32
    # bounds (by p_t times the value error: rows that give their own slot little weight
    # move little; 8-bit values have 16x smaller errors).
    moved = _row_rel_err(plain, expected)
    big = 1e-2 if cfg.value_bits == 4 else 1e-3
    assert moved.max() > big and np.median(moved) > big / 20, (moved.max(), np.median(moved))


@pytest.mark.parametrize("extra", CONFIGS[:2], ids=CONFIG_IDS[:2])
@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("impl,bound", [("reference", 1e-5), ("xla", 1e-5), ("native", 1e-5),
                                        ("int8dot", 1e-3),
                                        ("pallas", 1e-4)])
def test_decode_steps_read_the_own_value_exact(ring, extra, impl, bound):
  """Token 0 from an empty cache (position 0: the sink slot too), a chunk, then decode steps
  (a 16-slot ring wraps); each decode step's output against the oracle."""
  b, h, d, rep, n, window = 2, 2, 64, 2, 22, 16
  cfg = kvjax.QuantConfig(seed=4, **extra)
  k = jnp.asarray(_rand(4, b, n, h, d) + 0.5)
  v = jnp.asarray(_rand(5, b, n, h, d))
  q = jnp.asarray(3 * _rand(6, b, n, h * rep, d))
  w = window if ring else None
  expected = _oracle(cfg, q, k, v, range(n), window=w, softcap=None, d=d, h=h)
  c = kvjax.init_cache(b, h, 64, d, quant=cfg, window=w)
  step = jax.jit(kvjax.append_and_attend, static_argnames="impl")
  steps = [(0, 1), (1, 18)] + [(t, t + 1) for t in range(18, n)]
  for lo, hi in steps:
    out, c = step(c, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], impl=impl if hi - lo == 1 else "xla")
    assert _row_rel_err(out, expected[:, lo:hi]).max() < bound, (lo, hi)


def test_attend_over_the_cache_alone_reads_the_stored_value():
  # kvjax.attend has no new value in hand: it reads what the cache stores.
  b, h, d, n = 1, 2, 64, 10
  on = _recent(3, seed=5)
  k, v = jnp.asarray(_rand(7, b, n, h, d)), jnp.asarray(_rand(8, b, n, h, d))
  q = jnp.asarray(_rand(9, b, 1, h, d))
  c_on = kvjax.append(kvjax.init_cache(b, h, 32, d, quant=on), k, v)
  c_off = kvjax.append(kvjax.init_cache(b, h, 32, d, quant=_without_recent(on)), k, v)
  np.testing.assert_array_equal(np.asarray(kvjax.attend(q, c_on, impl="xla")),
                                np.asarray(kvjax.attend(q, c_off, impl="xla")))
  # ... while append_and_attend of the same last token does read it exact.
  c0 = kvjax.append(kvjax.init_cache(b, h, 32, d, quant=on), k[:, :-1], v[:, :-1])
  out, _ = kvjax.append_and_attend(c0, q, k[:, -1:], v[:, -1:], impl="xla")
  assert np.abs(np.asarray(out) - np.asarray(kvjax.attend(q, c_on, impl="xla"))).max() > 1e-4


def test_own_value_moves_outputs_towards_the_exact_values():
  """Queries that look mostly at their own key (8-bit keys, 4-bit values): against float
  attention over the original keys and values, every row is closer with the own value exact."""
  b, h, d, n, rep = 2, 1, 64, 20, 4
  k, v = jnp.asarray(_rand(10, b, n, h, d)), jnp.asarray(_rand(11, b, n, h, d))
  q = jnp.asarray(np.repeat(np.asarray(k), rep, axis=2) * 0.6 + 0.3 * _rand(12, b, n, h * rep, d))
  dense = kvjax.init_cache(b, h, 64, d, dtype=jnp.float32)
  exact, _ = kvjax.append_and_attend(dense, q, k, v)
  exact = np.asarray(exact, np.float64)
  errs = {}
  for on in (False, True):
    c = kvjax.init_cache(b, h, 64, d, quant=_recent(int(on), key_bits=8, seed=6))
    out, _ = kvjax.append_and_attend(c, q, k, v, impl="xla")
    errs[on] = _row_rel_err(out, exact)
  assert np.all(errs[True] < errs[False])
  assert errs[True].mean() < 0.5 * errs[False].mean()


def test_value_recent_config_and_bytes():
  for bad in (True, -1, 0, 2.0, 65):
    with pytest.raises(ValueError, match="RecentValues.window must be an int"):
      kc.RecentValues(bad)
  assert _recent(4).name.endswith("+vrec4")
  # The own value costs nothing; W - 1 float32 error vectors per sequence and head are counted.
  off = kvjax.init_cache(3, 2, 100, 64, quant=kvjax.QuantConfig())
  own = kvjax.init_cache(3, 2, 100, 64, quant=_recent(1))
  four = kvjax.init_cache(3, 2, 100, 64, quant=_recent(4))
  assert kvjax.nbytes(own) == kvjax.nbytes(off)
  assert four.array("v_recent").shape == (3, 2, 3, 64)
  assert kvjax.nbytes(four) - kvjax.nbytes(off) == 3 * 2 * 3 * 64 * 4
  # The default calibration recipe turns it on; the recipe can turn it off.
  q = kvjax.QuantConfig()
  assert _window(smoothing.calibrated_config(q, head_dim=64)) == 4
  off_recipe = dataclasses.replace(smoothing.KeyCalibration(), value_recent=0)
  assert _window(smoothing.calibrated_config(q, off_recipe, head_dim=64)) == 0


def test_ring_holds_the_last_errors_for_any_chunking():
  """Writing in one chunk, token by token, or in ragged chunks leaves the same v_recent, and
  its rows are the value errors of the last W - 1 positions (row p mod (W - 1))."""
  b, h, d, n, w = 2, 2, 64, 11, 4
  cfg = _recent(w, seed=7)
  k, v = jnp.asarray(_rand(20, b, n, h, d)), jnp.asarray(_rand(21, b, n, h, d))
  step = jax.jit(kvjax.append)
  whole = step(kvjax.init_cache(b, h, 32, d, quant=cfg), k, v)
  one = kvjax.init_cache(b, h, 32, d, quant=cfg)
  for t in range(n):
    one = step(one, k[:, t:t + 1], v[:, t:t + 1])
  np.testing.assert_array_equal(np.asarray(whole.array("v_recent")),
                                np.asarray(one.array("v_recent")))
  _, vd = attention._dequantized_kv(whole.config, attention.quant_view(whole),
                                    cache_lib.positions(whole))
  err = np.asarray(v).transpose(0, 2, 1, 3) - np.asarray(vd)[:, :, :n]          # [B, H, n, D]
  for p in range(n - (w - 1), n):
    np.testing.assert_allclose(np.asarray(whole.array("v_recent"))[:, :, p % (w - 1)], err[:, :, p],
                               atol=1e-6)
  # Ragged: sequence 1 writes fewer tokens; its rows hold its own last positions.
  rag = step(kvjax.init_cache(b, h, 32, d, quant=cfg), k, v, num_tokens=jnp.array([n, 6]))
  for p in range(6 - (w - 1), 6):
    np.testing.assert_allclose(np.asarray(rag.array("v_recent"))[1, :, p % (w - 1)], err[1, :, p],
                               atol=1e-6)
