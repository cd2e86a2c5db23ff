"""kvjax.corrections: corrections as values (registry, serialisation), and the claim that a new
correction is one module: a correction defined here, outside the library, runs through every
attention implementation and the fused kernel with no other change."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import corrections as kc
from kvjax.cache import with_config


def _rand(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _row_rel_err(a, ref):
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(a - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)


ALL = (kc.KeyOffset(), kc.RotaryKeyOffset(8), kc.KeyFeedback(), kc.ValueFeedback(), kc.KeySink(),
       kc.ValueSink(), kc.RecentValues(4))


def test_every_registered_kind_round_trips_through_json():
  assert [type(c) for c in ALL] == list(kc.REGISTRY.values())[:len(ALL)]
  cfg = kvjax.QuantConfig(key_bits=8, group_size=64, corrections=ALL[::-1])
  assert cfg.corrections == ALL                          # canonical (registry) order
  back = kvjax.QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
  assert back == cfg and hash(back) == hash(cfg)
  assert cfg.name == "K8V4-g64-srft+mean+rope8+fb+vfb+sink+vsink+vrec4"
  with pytest.raises(ValueError, match="unknown correction kind 'nope'"):
    kc.from_dict({"kind": "nope"})
  with pytest.raises(ValueError, match="unknown fields"):
    kc.from_dict({"kind": "recent_values", "window": 4, "extra": 1})
  with pytest.raises(ValueError, match="unknown QuantConfig fields"):
    kvjax.QuantConfig.from_dict({"key_sink": True})
  assert cfg.correction(kc.RecentValues) == kc.RecentValues(4)
  assert cfg.correction("key_sink") == kc.KeySink()
  assert kvjax.QuantConfig().correction(kc.KeySink) is None


def test_cache_arrays_follow_the_config():
  b, h, d = 2, 2, 64
  c = kvjax.init_cache(b, h, 32, d, quant=kvjax.QuantConfig(corrections=ALL),
                       params={"k_mean": _rand(0, d)})
  assert [sorted(a) for a in c.corrections] == [
      ["k_mean"], ["k_rope_channels", "k_rope_freq", "k_rope_mean"], ["k_feedback"],
      ["v_feedback"], ["k_sink"], ["v_sink"], ["v_recent"]]
  np.testing.assert_array_equal(np.asarray(c.array("k_mean"))[0], _rand(0, d))
  assert c.array("v_recent").shape == (b, h, 3, d)
  with pytest.raises(KeyError, match="k_nope"):
    c.array("k_nope")
  # Params: only those of the config's corrections, each shape checked.
  with pytest.raises(ValueError, match="k_sink is no correction's param"):
    kvjax.init_cache(b, h, 32, d, quant=kvjax.QuantConfig(corrections=ALL),
                     params={"k_sink": np.zeros(d)})
  with pytest.raises(ValueError, match="k_mean"):
    kvjax.init_cache(b, h, 32, d, quant=kvjax.QuantConfig(corrections=ALL),
                     params={"k_mean": np.zeros(d + 1)})
  with pytest.raises(ValueError, match="a dense cache has none"):
    kvjax.init_cache(b, h, 32, d, params={"k_mean": np.zeros(d)})
  # Another config of the same format: kept arrays stay, new corrections start at defaults.
  fewer = kvjax.QuantConfig(corrections=(kc.KeyOffset(), kc.ValueSink()))
  c2 = with_config(c, fewer)
  assert c2.config == fewer and len(c2.corrections) == 2
  np.testing.assert_array_equal(np.asarray(c2.array("k_mean")), np.asarray(c.array("k_mean")))
  with pytest.raises(ValueError, match="storage format"):
    with_config(c, kvjax.QuantConfig(key_bits=8))
  with pytest.raises(ValueError, match="k_feedback"):
    with_config(c, fewer, k_feedback=jnp.zeros((1, d, d)))


# --------------------------------------------------------------- a correction from outside


@dataclasses.dataclass(frozen=True)
class SinkBias(kc.Correction):
  """A per-head bias b_h on the logit of position 0 (a learned attention-sink bias): not
  expressible as a restored key, so the oracle applies it as a logit term too."""

  kind = "test_sink_bias"
  params = ("sink_bias",)
  restorable = False

  @property
  def label(self):
    return "+sinkbias"

  def param_shapes(self, head_dim):
    return {"sink_bias": ()}

  def default_params(self, head_dim):
    return {"sink_bias": np.zeros((1,), np.float32)}

  def logit_terms(self, r, arrays):
    b, h, t, rr, _ = r.qg.shape
    bias = jnp.broadcast_to(arrays["sink_bias"], (h,))[None, :, None, None, None]
    return jnp.where((r.kv_pos == 0)[:, None, None, None, :], bias, 0.0)

  def kernel_args(self, r, arrays, pending):
    b, h, rr, _ = r.qg.shape
    bias = jnp.broadcast_to(arrays["sink_bias"], (h,))[None, :, None]
    return {"sink_logit": r.scale * jnp.broadcast_to(bias, (b, h, rr)).reshape(b, h * rr)}


@pytest.fixture
def sink_bias():
  kc.register(SinkBias)
  try:
    yield SinkBias
  finally:
    del kc.REGISTRY[SinkBias.kind]


def test_a_new_correction_is_one_module(sink_bias):
  b, h, rep, d, n = 2, 2, 2, 64, 30
  bias = np.array([24.0, -16.0], np.float32)   # +3 and -2 in logits (times D ** -0.5)
  cfg = kvjax.QuantConfig(seed=3, corrections=(kc.KeySink(), sink_bias()))
  assert cfg.name.endswith("+sink+sinkbias")
  assert kvjax.QuantConfig.from_dict(cfg.to_dict()) == cfg
  k, v = jnp.asarray(_rand(1, b, n, h, d) + 0.5), jnp.asarray(_rand(2, b, n, h, d))
  q = jnp.asarray(2 * _rand(3, b, 1, h * rep, d))
  c = kvjax.append(kvjax.init_cache(b, h, 32, d, quant=cfg, params={"sink_bias": bias}), k, v,
                   num_tokens=jnp.array([n, 17]))
  # float64 oracle: dequantized, sink-restored keys; the bias on position 0's logit.
  from kvjax import attention
  kd, vd = attention._dequantized_kv(cfg, attention.quant_view(c), kvjax.positions(c))
  kd, vd, qf = (np.asarray(x, np.float64) for x in (kd, vd, q))
  expected = np.zeros((b, 1, h * rep, d))
  lengths = np.asarray(c.lengths)
  for bi in range(b):
    for head in range(h * rep):
      kv = head // rep
      logits = kd[bi, kv, :lengths[bi]] @ qf[bi, 0, head] / np.sqrt(d)
      logits[0] += bias[kv] / np.sqrt(d)        # unscaled term, times the logit scale
      p = np.exp(logits - logits.max())
      expected[bi, 0, head] = (p / p.sum()) @ vd[bi, kv, :lengths[bi]]
  for impl, bound in (("reference", 1e-5), ("xla", 1e-5), ("native", 1e-5), ("int8dot", 1e-3), ("dequant", 3e-2),
                      ("pallas", 1e-4)):
    assert _row_rel_err(kvjax.attend(q, c, impl=impl), expected).max() < bound, impl
  # Not vacuous: without the bias every row moves by more than the float32 paths' bounds, most
  # by more than the bf16 (dequant) one.
  plain = with_config(c, kvjax.QuantConfig(seed=3, corrections=(kc.KeySink(),)))
  moved = _row_rel_err(kvjax.attend(q, plain, impl="xla"), expected)
  assert moved.min() > 2e-3 and np.median(moved) > 1e-2, moved
  # Chunks through append_and_attend (prefill) and under jit.
  c0 = kvjax.init_cache(b, h, 32, d, quant=cfg, params={"sink_bias": bias})
  qs = jnp.asarray(2 * _rand(4, b, n, h * rep, d))
  ref, _ = kvjax.append_and_attend(c0, qs, k, v, impl="reference")
  out, _ = jax.jit(kvjax.append_and_attend, static_argnames="impl")(c0, qs, k, v, impl="xla")
  assert _row_rel_err(out, ref).max() < 1e-5
