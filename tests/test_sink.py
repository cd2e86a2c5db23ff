"""The exact sink key and value (kvjax.corrections.KeySink, ValueSink): position 0's key /
value read back exactly, on every path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import attention, cache as cache_lib
from kvjax import corrections as kc


def _rand(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _keys(seed, b, n, h, d):
  # An un-centred outlier at position 0 (as a BOS key is), then ordinary keys.
  k = _rand(seed, b, n, h, d) + 0.5
  k[:, 0] *= 6.0
  return jnp.asarray(k)


# Which of position 0's vectors the cache keeps exact.
SINKS = [(kc.KeySink(),), (kc.ValueSink(),), (kc.KeySink(), kc.ValueSink())]
SINK_IDS = ["key", "value", "both"]


def _row_rel_err(a, ref):
  a = np.asarray(a, np.float64)
  return np.linalg.norm(a - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)


@pytest.mark.parametrize("sink", SINKS, ids=SINK_IDS)
@pytest.mark.parametrize("ring", [False, True])
def test_sink_is_stored_exactly_and_only_it(ring, sink):
  b, h, d, n = 2, 2, 64, 12
  cfg = kvjax.QuantConfig(seed=1, corrections=sink)
  c = kvjax.init_cache(b, h, 64, d, quant=cfg, window=16 if ring else None)
  key_sink, value_sink = bool(cfg.correction(kc.KeySink)), bool(cfg.correction(kc.ValueSink))
  if key_sink:
    assert c.correction_arrays(kc.KeySink)["k_sink"].shape == (b, h, d)
  if value_sink:
    assert c.correction_arrays(kc.ValueSink)["v_sink"].shape == (b, h, d)
  k, v = _keys(0, b, n, h, d), _keys(1, b, n, h, d)
  c = kvjax.append(c, k, v, num_tokens=jnp.array([n, 5]))
  kv_hat = attention._dequantized_kv(c.config, attention.quant_view(c), cache_lib.positions(c))
  for x_hat, x, exact in zip(kv_hat, (k, v), (key_sink, value_sink)):
    err = np.abs(np.asarray(x_hat)[:, :, :n] - np.asarray(x).transpose(0, 2, 1, 3))  # [B,H,n,D]
    scale = np.abs(np.asarray(x)).max()
    # float32 round trip of one vector: ~1e-7 of its size. Every other vector keeps its 4-bit
    # error (~5% of the row's largest entry), so the check cannot pass by accident.
    if exact:
      assert err[:, :, 0].max() <= 1e-6 * scale
    else:
      assert err[:, :, 0].max() > 1e-3 * scale
    visible = 16 if ring else n   # slots of a 16-slot ring after 12 tokens: all still there
    assert err[0, :, 1:min(n, visible)].max(axis=-1).min() > 1e-3 * scale
  # Without key_sink the same position 0 has the ordinary 4-bit error.
  plain = kvjax.append(kvjax.init_cache(b, h, 64, d, quant=kvjax.QuantConfig(seed=1),
                                        window=16 if ring else None), k, v)
  k_plain, _ = attention._dequantized_kv(plain.config, attention.quant_view(plain),
                                         cache_lib.positions(plain))
  assert plain.corrections == ()
  assert np.abs(np.asarray(k_plain)[:, :, 0] - np.asarray(k)[:, 0]).max() > 1e-2 * scale


# (ring, tokens written): position 0 visible; a ring that wrapped (position 0 overwritten)
# and a window that no longer reaches it.
SINK_STATES = [(False, 40), (True, 12), (True, 40)]


@pytest.mark.parametrize("sink", SINKS[::2], ids=SINK_IDS[::2])  # value alone: kernel tests
@pytest.mark.parametrize("ring,n", SINK_STATES)
@pytest.mark.parametrize("impl,bound", [("xla", 1e-5), ("native", 1e-5), ("int8dot", 1e-3),
                                        ("pallas", 1e-4)])
def test_decode_paths_match_reference_with_sink(ring, n, impl, bound, sink):
  b, h, d, rep = 2, 2, 64, 4
  cfg = kvjax.QuantConfig(seed=2, corrections=sink)
  c = kvjax.init_cache(b, h, 64, d, quant=cfg, window=16 if ring else None)
  c = kvjax.append(c, _keys(3, b, n, h, d), _keys(4, b, n, h, d),
                   num_tokens=jnp.array([n, n - 3]))
  q = jnp.asarray(3 * _rand(5, b, 1, h * rep, d))
  for softcap in (None, 5.0):
    ref = np.asarray(attention.attend_reference(q, c, softcap=softcap), np.float64)
    out = kvjax.attend(q, c, impl=impl, softcap=softcap)
    # xla: the same float32 math in another order; int8dot: its two-level int8 rounding
    # (test_attention); pallas: the kernel's bf16-split products (test_pallas_decode_attention).
    assert _row_rel_err(out, ref).max() < bound


@pytest.mark.parametrize("sink", SINKS[::2], ids=SINK_IDS[::2])
@pytest.mark.parametrize("ring", [False, True])
def test_chunk_paths_match_reference_with_sink(ring, sink):
  b, h, d, rep, n = 2, 2, 64, 2, 24
  cfg = kvjax.QuantConfig(seed=3, corrections=sink)
  k, v = _keys(6, b, n, h, d), _keys(7, b, n, h, d)
  q = jnp.asarray(3 * _rand(8, b, n, h * rep, d))
  outs = {}
  for impl in ("reference", "xla", "dequant"):
    c = kvjax.init_cache(b, h, 64, d, quant=cfg, window=16 if ring else None)
    outs[impl], c = kvjax.append_and_attend(c, q, k, v, impl=impl)
  ref = np.asarray(outs["reference"], np.float64)
  assert _row_rel_err(outs["xla"], ref).max() < 1e-5
  # "dequant" rounds q~, codes and weights to bf16: bounded, as in test_attention, by twice
  # what a bf16 dense cache of the same keys and values loses against float32.
  dense = {}
  for dt in (jnp.float32, jnp.bfloat16):
    c = kvjax.init_cache(b, h, 64, d, dtype=dt, window=16 if ring else None)
    dense[dt], _ = kvjax.append_and_attend(c, q, k, v)
  bf16_err = _row_rel_err(dense[jnp.bfloat16], np.asarray(dense[jnp.float32], np.float64)).max()
  assert _row_rel_err(outs["dequant"], ref).max() < 2 * bf16_err


def test_sink_changes_attention_towards_the_exact_keys():
  """Against float attention over the original keys (values exact too), the sink cache's
  scores are closer than the plain cache's for every row that sees position 0."""
  b, h, d, n, rep = 2, 1, 64, 30, 4
  k, v = _keys(9, b, n, h, d), jnp.asarray(_rand(10, b, n, h, d))
  q = jnp.asarray(2 * _rand(11, b, 1, h * rep, d))
  dense = kvjax.append(kvjax.init_cache(b, h, 64, d, dtype=jnp.float32), k, v)
  exact = np.asarray(kvjax.attend(q, dense), np.float64)
  errs = {}
  for sink in (False, True):
    c = kvjax.init_cache(b, h, 64, d, quant=kvjax.QuantConfig(
        corrections=(kc.KeySink(),) if sink else (), value_bits=8, seed=4))
    c = kvjax.append(c, k, v)
    errs[sink] = _row_rel_err(kvjax.attend(q, c, impl="reference"), exact)
  assert errs[True].mean() < errs[False].mean()


def test_value_sink_moves_outputs_towards_the_exact_values():
  """Queries that put most of their weight on position 0 (a sink-like key) with 8-bit keys:
  keeping the sink value exact removes most of the output error (the rest is the other
  values' error times their small weights)."""
  b, h, d, n, rep = 2, 1, 64, 30, 4
  k, v = _keys(14, b, n, h, d), _keys(15, b, n, h, d)
  q = jnp.asarray(np.broadcast_to(np.asarray(k)[:, :1, :, None], (b, 1, h, rep, d))
                  .reshape(b, 1, h * rep, d) * 0.3 + 0.3 * _rand(16, b, 1, h * rep, d))
  dense = kvjax.append(kvjax.init_cache(b, h, 64, d, dtype=jnp.float32), k, v)
  exact = np.asarray(kvjax.attend(q, dense), np.float64)
  errs = {}
  for sink in (False, True):
    c = kvjax.init_cache(b, h, 64, d, quant=kvjax.QuantConfig(
        corrections=(kc.ValueSink(),) if sink else (), key_bits=8, seed=4))
    errs[sink] = _row_rel_err(kvjax.attend(q, kvjax.append(c, k, v), impl="xla"), exact)
  assert errs[True].max() < 0.5 * errs[False].min()


def test_chunk_and_token_writes_store_the_same_sink_error():
  b, h, d, n = 2, 2, 128, 20
  cfg = kvjax.QuantConfig(corrections=(kc.KeySink(), kc.ValueSink()), seed=5)
  k, v = _keys(12, b, n, h, d), jnp.asarray(_rand(13, b, n, h, d))
  step = jax.jit(kvjax.append)
  whole = step(kvjax.init_cache(b, h, 64, d, quant=cfg), k, v)
  one = kvjax.init_cache(b, h, 64, d, quant=cfg)
  for t in range(n):
    one = step(one, k[:, t:t + 1], v[:, t:t + 1])
  for name in ("k_sink", "v_sink"):
    np.testing.assert_array_equal(np.asarray(whole.array(name)), np.asarray(one.array(name)))
    assert np.abs(np.asarray(whole.array(name))).max() > 0
  # Later chunks never touch them.
  again = step(whole, k[:, :3], v[:, :3])
  for name in ("k_sink", "v_sink"):
    np.testing.assert_array_equal(np.asarray(again.array(name)), np.asarray(whole.array(name)))


def test_sink_config_errors_and_bytes():
  with pytest.raises(TypeError, match="corrections"):
    kvjax.QuantConfig(corrections=(kc.KeySink,))          # the class, not a value
  with pytest.raises(ValueError, match="more than once"):
    kvjax.QuantConfig(corrections=(kc.KeySink(), kc.KeySink()))
  on = kvjax.init_cache(3, 2, 100, 64, quant=kvjax.QuantConfig(corrections=(kc.KeySink(),)))
  off = kvjax.init_cache(3, 2, 100, 64, quant=kvjax.QuantConfig())
  # One float32 vector per sequence and head is per-sequence storage: counted.
  assert kvjax.nbytes(on) - kvjax.nbytes(off) == 3 * 2 * 64 * 4
  assert kvjax.QuantConfig(corrections=(kc.KeySink(),)).name.endswith("+sink")
  both = kvjax.init_cache(3, 2, 100, 64, quant=kvjax.QuantConfig(
      corrections=(kc.ValueSink(), kc.KeySink())))
  assert kvjax.nbytes(both) - kvjax.nbytes(on) == 3 * 2 * 64 * 4
  # Canonical order whatever the order given: one name, one config.
  assert both.config.name.endswith("+sink+vsink")
  assert both.config == kvjax.QuantConfig(corrections=(kc.KeySink(), kc.ValueSink()))
