"""kvjax.eval on a tiny random model: the machinery, not the real-model numbers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import corrections as kc
from kvjax import eval as ev
from kvjax.models.runner import Runner
from kvjax import smoothing
from kvjax.models import ModelConfig, model_class


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig.preset("gemma3-tiny")
  from flax import nnx
  model = model_class(cfg)(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3))
  return model, Runner(model, attention_impl="xla")


def test_hook_reference_is_exact(tiny):
  model, runner = tiny
  cfg = model.config
  tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, 70).astype(np.int32)
  specs = [ev.CacheSpec("f32", None), ev.CacheSpec("same", None),
           ev.CacheSpec("int4", kvjax.QuantConfig())]
  res = ev.evaluate_window(runner, tokens, specs, max_len=80, chunk=32, progress=False)
  nll, kl, agree = res["same"]["hook"]
  assert len(nll) == len(tokens) - 1
  np.testing.assert_allclose(kl, 0.0, atol=1e-6)
  assert agree.min() == 1.0
  # The int4 cache really quantizes (other NLLs), and its KL is finite. (This random model's
  # distributions are nearly one-hot: its true KL, ~1e-13, is below float32 resolution.)
  assert np.abs(res["int4"]["hook"][0] - res["f32"]["hook"][0]).max() > 1e-4
  assert np.all(np.isfinite(res["int4"]["hook"][1])) and res["int4"]["hook"][1].mean() < 10


@pytest.mark.parametrize("recipe", ["plain", "calibrated"])
def test_incremental_decode_matches_teacher_forcing_from_the_same_prefill(tiny, recipe):
  """Windows batched, prefilled once; the last m tokens one at a time vs in chunks. Both start
  from the same cache, so they differ only by float rounding: per token to 2e-3 relative
  (this random model's NLLs are ~50 nats; its int4 codes rarely sit on a rounding boundary), while the hook
  scores equal `evaluate_window`'s for those positions and the int4 cache differs from f32."""
  model, runner = tiny
  cfg = model.config
  wins = np.random.default_rng(1).integers(3, cfg.vocab_size, (3, 40)).astype(np.int32)
  wins[:, 0] = 2
  stats = (ev.collect_stats(runner, np.random.default_rng(2).integers(
      3, cfg.vocab_size, (2, 40)).astype(np.int32), chunk=16, progress=False)
           if recipe == "calibrated" else None)
  int4 = ev.CacheSpec("int4", kvjax.QuantConfig(), calibrate=recipe == "calibrated")
  if recipe == "calibrated":  # the default recipe: sink key and value, 4 recent values, ...
    assert ev.SPEC_CHOICES["int4"].recipe == int4.recipe and int4.recipe.value_recent == 4
  specs = [ev.CacheSpec("f32", None), int4]
  cals = ev.calibrations_for(model, specs, stats=stats) if recipe == "calibrated" else None
  if recipe == "calibrated":
    cfg0 = cals["int4"].configs[0]
    assert cfg0.correction(kc.RecentValues).window == 4 and cfg0.correction(kc.KeySink)
  stats = cals
  res = ev.evaluate_incremental(runner, wins, specs, steps=13, max_len=48, calibrations=stats,
                                chunk=16, progress=False)
  for name in ("f32", "int4"):
    for mode in ("hook", "incremental"):
      assert all(a.shape == (3, 12) for a in res[name][mode])
    np.testing.assert_allclose(res[name]["incremental"][0], res[name]["hook"][0], rtol=2e-3,
                               atol=2e-3)
  np.testing.assert_allclose(res["f32"]["hook"][1], 0.0, atol=1e-6)
  assert np.abs(res["int4"]["hook"][0] - res["f32"]["hook"][0]).max() > 1e-4
  # The teacher-forced suffix scores what the whole-window hook pass scores there.
  one = ev.evaluate_window(runner, wins[1], specs, max_len=48, calibrations=stats, chunk=16,
                           progress=False)
  np.testing.assert_allclose(res["int4"]["hook"][0][1], one["int4"]["hook"][0][27:], rtol=2e-3,
                             atol=2e-3)
  with pytest.raises(ValueError, match="steps"):
    ev.evaluate_incremental(runner, wins, specs, steps=1, max_len=48, progress=False)
  with pytest.raises(ValueError, match="windows"):
    ev.evaluate_incremental(runner, wins[0], specs, steps=4, max_len=48, progress=False)


def test_paired_ppl_ratio_and_its_interval():
  rng = np.random.default_rng(7)
  b = rng.uniform(1.0, 5.0, (6, 200))
  shift = 0.01
  a = b + shift + 0.05 * rng.standard_normal(b.shape)
  r = ev.paired_ppl_ratio(a, b)
  want = 100 * np.expm1(np.mean(a - b))
  assert r["pct"] == pytest.approx(want) and r["tokens"] == 1200
  lo, hi = r["ci95_pct"]
  assert lo < 100 * np.expm1(shift) < hi and lo < r["pct"] < hi
  # Token-level se of i.i.d. differences: 0.05 / sqrt(1200).
  assert r["se_nats"] == pytest.approx(0.05 / np.sqrt(1200), rel=0.15)
  # A bias shared by all tokens of a window (correlated errors) widens the interval.
  c = a + rng.standard_normal((6, 1)) * 0.05
  assert ev.paired_ppl_ratio(c, b)["se_nats"] > 3 * r["se_nats"]
  assert ev.paired_ppl_ratio(b, b)["pct"] == 0.0
  with pytest.raises(ValueError, match="nll_a and nll_b"):
    ev.paired_ppl_ratio(a[0], b[0])
  with pytest.raises(ValueError, match="nll_a and nll_b"):
    ev.paired_ppl_ratio(a, b[:, :5])


def test_calibration_statistics_of_windows_are_sums(tiny):
  model, runner = tiny
  wins = np.random.default_rng(2).integers(3, model.config.vocab_size, (2, 24)).astype(np.int32)
  both = ev.collect_stats(runner, wins, chunk=16, progress=False)
  each = [ev.collect_stats(runner, w, chunk=16, progress=False) for w in wins]
  is_stats = lambda x: isinstance(x, kvjax.StatsKVCache)
  leaves = lambda t: [c for c in jax.tree_util.tree_leaves(t, is_leaf=is_stats) if is_stats(c)]
  for b, e0, e1 in zip(leaves(both), leaves(each[0]), leaves(each[1])):
    assert np.all(np.asarray(b.count) == 48)
    for f in ("k_sum", "k_sq", "v_sq", "q_sq", "qq", "k_cos", "k_sin", "trig"):
      np.testing.assert_allclose(np.asarray(getattr(b, f)),
                                 np.asarray(getattr(e0, f)) + np.asarray(getattr(e1, f)),
                                 rtol=1e-4, atol=1e-4, err_msg=f)
  with pytest.raises(ValueError, match="calibration tokens"):
    ev.collect_stats(runner, np.zeros((2, 3, 4), np.int32), progress=False)


def test_token_stats_against_float64():
  rng = np.random.default_rng(5)
  t, v = 64, 3000
  ref = rng.standard_normal((t, v)) * rng.uniform(0.5, 8.0, (t, 1))  # flat to peaked rows
  logits = ref + rng.standard_normal((t, v)) * rng.uniform(1e-3, 0.5, (t, 1))
  targets = rng.integers(0, v, t)
  valid = np.arange(t) < t - 3
  nll, kl, agree = (np.asarray(x, np.float64) for x in ev._token_stats(
      ev._reference_stats(jnp.asarray(ref, jnp.float32)), jnp.asarray(logits, jnp.float32),
      jnp.asarray(targets, jnp.int32), jnp.asarray(valid)))
  r32, l32 = ref.astype(np.float32).astype(np.float64), logits.astype(np.float32).astype(np.float64)
  lse = lambda x: x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
  lp_ref, lp = r32 - lse(r32)[:, None], l32 - lse(l32)[:, None]
  want_kl = (np.exp(lp_ref) * (lp_ref - lp)).sum(-1)
  want_nll = -lp[np.arange(t), targets]
  assert want_kl[valid].min() > 0
  np.testing.assert_allclose(kl[valid], want_kl[valid], rtol=1e-3, atol=2e-6)
  np.testing.assert_allclose(nll[valid], want_nll[valid], rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(agree[valid], (r32.argmax(-1) == l32.argmax(-1))[valid])
  assert not np.any(nll[~valid]) and not np.any(kl[~valid]) and not np.any(agree[~valid])


def test_calibration_statistics_and_params(tiny):
  model, runner = tiny
  cfg = model.config
  tokens = np.random.default_rng(1).integers(3, cfg.vocab_size, 40).astype(np.int32)
  stats = ev.collect_stats(runner, list(tokens), chunk=16, progress=False)
  leaves = [c for c in jax.tree_util.tree_leaves(
      stats, is_leaf=lambda x: isinstance(x, kvjax.StatsKVCache)) if isinstance(c, kvjax.StatsKVCache)]
  assert leaves and all(float(np.min(c.count)) == 40 for c in leaves)
  # Statistics equal those of the keys the dense cache stored (global layers keep all 40).
  for c in leaves:
    if not c.ring:
      k = np.asarray(c.k, np.float64)[..., :40, :]      # [..., B, H, 40, D]
      np.testing.assert_allclose(np.asarray(c.k_sum), k.sum(axis=(-4, -2)), rtol=1e-4, atol=1e-4)
  q = model.init_cache(1, 64, quant=kvjax.QuantConfig())
  cal = smoothing.calibrate_caches(q, stats, value_metric=model.value_output_metric())
  for c in jax.tree_util.tree_leaves(cal, is_leaf=lambda x: isinstance(x, kvjax.QuantizedKVCache)):
    if isinstance(c, kvjax.QuantizedKVCache):
      lam = np.asarray(c.k_lambda)
      assert np.all(np.isfinite(lam)) and np.all(lam > 0)
      np.testing.assert_allclose(np.log(lam).mean(-1), 0.0, atol=1e-4)  # geometric mean 1
      # The default recipe keeps the sink key exact: a [.., B, H, D] error buffer, stacked
      # like the layer's other fields; without it the buffer is empty.
      assert c.array("k_sink").shape == c.k_codes.shape[:-2] + (cfg.head_dim,)
  off = smoothing.calibrate_caches(q, stats, dataclasses.replace(smoothing.KeyCalibration(),
                                                                 sink=False),
                                   value_metric=model.value_output_metric())
  for c in jax.tree_util.tree_leaves(off, is_leaf=lambda x: isinstance(x, kvjax.QuantizedKVCache)):
    if isinstance(c, kvjax.QuantizedKVCache):
      assert c.config.correction(kc.KeySink) is None and c.correction_arrays("key_sink") is None


def test_value_calibration_lowers_the_error_the_output_projection_sees():
  # Values with uneven channel scales and a metric M = A A^T that reads 12 main directions
  # (like the output projection): value λ and feedback rounding from `value_params` must cut
  # the mean e^T M e of the stored values well below nearest rounding with λ = 1, on fresh
  # values from the same distribution (not the calibration ones), and stay exact where M
  # does not care (λ has geometric mean 1; feedback strictly upper triangular).
  rng = np.random.default_rng(7)
  b, n, h, d = 1, 256, 2, 64
  chan = rng.uniform(0.2, 4.0, (h, d))
  draw = lambda: (rng.standard_normal((b, n, h, d)) * chan).astype(np.float32)
  a = rng.standard_normal((h, d, 12)) * rng.uniform(0.5, 2.0, (h, d, 1))
  metric = np.einsum("hik,hjk->hij", a, a) + 1e-3 * np.eye(d)
  stats = kvjax.with_stats(kvjax.init_cache(b, h, n, d, dtype=jnp.float32))
  v_cal = draw()
  stats = kvjax.cache.accumulate_stats(stats, draw(), draw(), v_cal)
  q = kvjax.QuantConfig()
  plain = kvjax.init_cache(b, h, n, d, quant=q)
  recipe = dataclasses.replace(smoothing.KeyCalibration(), value_alpha=0.5, value_feedback=True)
  params = smoothing.value_params(stats, metric, plain.v_rotation, recipe)
  lam, fb = params["v_lambda"], params["v_feedback"]
  assert lam.shape == (h, d) and fb.shape == (h, d, d)
  np.testing.assert_allclose(np.log(lam).mean(-1), 0.0, atol=1e-6)
  assert np.all(np.tril(fb) == 0) and np.abs(fb).max() > 0
  cal = kvjax.init_cache(b, h, n, d, quant=q.with_corrections(kc.ValueFeedback()),
                         value_lambda=lam, params={"v_feedback": fb})
  v = draw()
  k = draw()

  def cost(cache):
    c = kvjax.append(cache, k, v)
    seq = lambda x: jnp.swapaxes(x, 1, 2)[:, :n]                   # [B, N, H, ...]
    v_hat = np.asarray(kvjax.quantizer.dequantize(seq(c.v_codes), seq(c.v_scales),
                                                  c.v_rotation, c.v_lambda, bits=4,
                                                  group_size=32), np.float64)
    e = v_hat - np.asarray(v, np.float64)                            # [B, N, H, D]
    return np.einsum("bnhd,hde,bnhe->", e, metric, e) / n

  base, better = cost(plain), cost(cal)
  assert better < 0.5 * base, (better, base)
  # Only λ (no feedback) already helps, less.
  lam_only = kvjax.init_cache(b, h, n, d, quant=q, value_lambda=lam)
  assert better < cost(lam_only) < base
  with pytest.raises(ValueError, match="value_metric must be"):
    smoothing.value_params(stats, metric[:, :-1], plain.v_rotation, recipe)


def test_calibrate_caches_value_options(tiny):
  # The default recipe keeps the sink value exact and needs no value metric; value λ and
  # feedback (fact 7) need the model's output-projection metric and say so without it.
  model, runner = tiny
  tokens = np.random.default_rng(2).integers(3, model.config.vocab_size, 24).astype(np.int32)
  stats = ev.collect_stats(runner, tokens, chunk=8, progress=False)
  q = model.init_cache(1, 32, quant=kvjax.QuantConfig())
  base = smoothing.calibrate_caches(q, stats)
  values = dataclasses.replace(smoothing.KeyCalibration(), value_alpha=0.5, value_feedback=True)
  with pytest.raises(ValueError, match="value_metric"):
    smoothing.calibrate_caches(q, stats, values)
  full = smoothing.calibrate_caches(q, stats, values, value_metric=model.value_output_metric(0.5))
  is_q = lambda x: isinstance(x, kvjax.QuantizedKVCache)
  for a, c in zip(jax.tree_util.tree_leaves(base, is_leaf=is_q),
                  jax.tree_util.tree_leaves(full, is_leaf=is_q)):
    if is_q(a):
      assert a.array("v_sink").shape == a.array("k_sink").shape
      assert not a.config.correction(kc.ValueFeedback) and c.config.correction(kc.ValueFeedback)
      assert np.all(np.asarray(a.v_lambda) == 1.0)
      assert np.abs(np.asarray(c.array("v_feedback"))).max() > 0
      lam = np.asarray(c.v_lambda)
      assert np.all(lam > 0) and np.abs(np.log(lam)).max() > 1e-3
      np.testing.assert_array_equal(np.asarray(a.k_lambda), np.asarray(c.k_lambda))
  with pytest.raises(ValueError, match="head_correlation"):
    model.value_output_metric(1.5)


def test_key_mean_is_exact_for_attention():
  # Keys with a big shared offset: storing k - mean changes nothing in exact arithmetic,
  # and the quantized result gets much closer to float.
  rng = np.random.default_rng(4)
  b, n, h, d = 1, 64, 1, 64
  k = rng.standard_normal((b, n, h, d)).astype(np.float32)
  offset = np.zeros(d, np.float32)
  offset[:8] = 40.0
  k += offset
  v = rng.standard_normal((b, n, h, d)).astype(np.float32)
  q = rng.standard_normal((b, 1, 2, d)).astype(np.float32)
  dense = kvjax.append(kvjax.init_cache(b, h, n, d, dtype=jnp.float32), k, v)
  ref = np.asarray(kvjax.attend(q, dense))
  errs = {}
  for name, mean in (("plain", None), ("mean", offset)):
    c = kvjax.init_cache(b, h, n, d, quant=kvjax.QuantConfig(
        corrections=() if mean is None else (kc.KeyOffset(),)),
        params=None if mean is None else {"k_mean": mean})
    c = kvjax.append(c, k, v)
    out = np.asarray(kvjax.attend(q, c, impl="xla"))
    np.testing.assert_allclose(out, np.asarray(kvjax.attend(q, c, impl="reference")), atol=1e-5)
    errs[name] = np.abs(out - ref).max()
  assert errs["mean"] < 0.5 * errs["plain"]


def test_parse_spec_and_errors():
  s = ev.parse_spec("K8V4-g64-srht-cal")
  assert s.quant.key_bits == 8 and s.quant.group_size == 64 and s.quant.rotation == "srht"
  assert s.calibrate
  with pytest.raises(ValueError, match="unknown cache"):
    ev.parse_spec("fp3")
  mixed = ev.parse_spec("int4+k8@4,1,4")
  assert mixed.key8_layers == (1, 4) and mixed.calibrate and mixed.quant.key_bits == 4
  assert {l: q.key_bits for l, q in mixed.layer_quant().items()} == {1: 8, 4: 8}
  assert ev.separate_layers([mixed, ev.parse_spec("bf16")]) == (1, 4)
  with pytest.raises(ValueError, match="layer indices"):
    ev.parse_spec("int4+k8@four")
  with pytest.raises(ValueError, match="8-bit key layers.*need a quantized cache"):
    ev.parse_spec("bf16+k8@1")
  auto = ev.parse_spec("int4+k8@auto2")
  assert auto.key8_auto == 2 and auto.key8_layers == ()
  with pytest.raises(ValueError, match="positive count"):
    ev.parse_spec("int4+k8@auto")


def test_parse_per_layer_formats():
  cfg = ModelConfig.preset("gemma3-tiny")             # layers 0-4 local, 5 global
  spec = ev.parse_spec("int4+g128@global+k8@4,1+v8@local")
  assert spec.calibrate and spec.key8_layers == (1, 4)
  assert spec.layer_formats == (("group_size", 128, ("global",)), ("value_bits", 8, ("local",)))
  with pytest.raises(ValueError, match="resolve 'global'"):
    spec.layer_quant()
  r = spec.resolve_layers(cfg)
  assert r.layer_formats == (("group_size", 128, (5,)), ("value_bits", 8, (0, 1, 2, 3, 4)))
  got = {l: (q.key_bits, q.value_bits, q.group_size) for l, q in r.layer_quant().items()}
  assert got == {0: (4, 8, 32), 1: (8, 8, 32), 2: (4, 8, 32), 3: (4, 8, 32), 4: (8, 8, 32),
                 5: (4, 4, 128)}
  assert ev.separate_layers([r, ev.parse_spec("bf16")]) == (0, 1, 2, 3, 4, 5)
  assert r.layer_quant()[1].rotation == "srft" and "groups of 128 in layers global" in r.description
  for bad, match in [("int4+g100@1", "group_size"), ("int4+x8@1", "not a per-layer format"),
                     ("int4+g128@everywhere", "comma-separated layer indices"),
                     ("int4+g128", "not a per-layer format"), ("bf16+v8@1", "need a quantized")]:
    with pytest.raises(ValueError, match=match):
      ev.parse_spec(bad)
  with pytest.raises(ValueError, match="out of range"):
    ev.parse_spec("int4+v8@6").resolve_layers(cfg)
  with pytest.raises(ValueError, match="names no layer"):
    ev.parse_spec("int4+v8@global").resolve_layers(ModelConfig.preset("qwen2-tiny").replace(
        layer_types=("local",) * 3, sliding_window=8))


def test_key_sensitivity_ranks_layers_on_calibration_text(tiny):
  """One run per layer with only that layer quantized; a layer with a coarser cache ranks higher."""
  from flax import nnx
  # A soft-capped copy of the tiny model: its random logits would otherwise be so peaked that
  # every KL underflows to 0. Three layers (local, local, global) keep both layer kinds at half
  # the compilations of six.
  cfg = ModelConfig.preset("gemma3-tiny").replace(final_logit_softcap=4.0, num_layers=3,
                                                  layer_types=("local", "local", "global"))
  model = model_class(cfg)(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(4)
  cal = rng.integers(3, cfg.vocab_size, 48).tolist()
  probe = rng.integers(3, cfg.vocab_size, 40).tolist()
  sens = ev.key_sensitivity(model, cal, probe, kvjax.QuantConfig(rotation="none"), chunk=16,
                            progress=False)
  assert sens.shape == (cfg.num_layers,)
  assert np.all(np.isfinite(sens)) and np.all(sens > 1e-7)  # every layer's cache costs something
  # 8-bit caches cost far less in every layer than 4-bit ones.
  sens8 = ev.key_sensitivity(model, cal, probe, kvjax.QuantConfig(rotation="none", key_bits=8,
                                                                  value_bits=8),
                             chunk=16, progress=False)
  assert np.all(sens8 < 0.2 * sens)


def test_mixed_key_bits_spec_runs_and_counts_its_bits(tiny):
  """'+k8@L' caches: the model is split at L, layer L stores 8-bit keys, bits are slot-weighted."""
  from kvjax.models import with_separate_layers
  model, _ = tiny
  cfg = model.config                                  # 5 local layers (window 16), then 1 global
  spec = ev.parse_spec("K4V4-g32-srft+k8@1")
  split = with_separate_layers(model, ev.separate_layers([spec]))
  caches = ev._make_caches(split, spec, 40, None)
  assert [c.config.key_bits for c in caches["groups"]] == [4, 8, 4, 4]
  base = spec.quant.bits_per_value()                  # 4.5
  # At 40 tokens: 5 local layers hold 16 slots each, the global one 40; layer 1's keys +4 bits.
  want = base + 0.5 * 4.0 * 16 / (5 * 16 + 40)
  assert ev.bits_per_value(split, spec, 40) == pytest.approx(want)
  assert ev.bits_per_value(split, ev.parse_spec("K4V4-g32-srft"), 40) == pytest.approx(base)
  tokens = np.random.default_rng(1).integers(3, cfg.vocab_size, 40).astype(np.int32)
  plain = ev.parse_spec("K4V4-g32-srft")
  res = ev.evaluate_window(Runner(split, attention_impl="xla"), tokens, [ev.CacheSpec("f32", None), spec, plain],
                           max_len=48, chunk=16, progress=False)
  nll = {name: r["hook"][0] for name, r in res.items()}
  assert all(np.isfinite(v).all() for v in nll.values())
  # (This random model's logits are so peaked that KL underflows; its NLLs still move.)
  assert np.abs(nll[spec.name] - nll["f32"]).max() > 0
  assert np.abs(nll[spec.name] - nll[plain.name]).max() > 0   # layer 1 really is different


class _CharTokenizer:
  bos_id = 1

  def encode(self, text, add_bos=False):
    return ([1] if add_bos else []) + [3 + (ord(ch) % 90) for ch in text]


def test_passkey_prompt_places_the_needle():
  from kvjax import retrieval
  tok = _CharTokenizer()
  filler = "abcdefghij" * 100
  p = retrieval.build_prompt(tok, filler, length=300, depth=0.5, key="12345", add_bos=True)
  assert len(p) == 300 and p[0] == 1
  needle = tok.encode("The pass key is 12345.")
  starts = [i for i in range(len(p)) if p[i:i + len(needle)] == needle]
  assert len(starts) == 1 and 100 < starts[0] < 200
  with pytest.raises(ValueError, match="depth"):
    retrieval.build_prompt(tok, filler, length=300, depth=1.5, key="1", add_bos=False)
  with pytest.raises(ValueError, match="fewer than"):
    retrieval.build_prompt(tok, "short", length=300, depth=0.5, key="1", add_bos=False)


def test_bench_fill_caches_sets_lengths_and_random_contents(tiny):
  from kvjax import bench
  model, runner = tiny
  caches = model.init_cache(1, 64, quant=kvjax.QuantConfig())
  filled = bench.fill_caches(caches, 40, jax.random.key(0))
  leaves = [c for c in jax.tree_util.tree_leaves(
      filled, is_leaf=lambda x: isinstance(x, kvjax.QuantizedKVCache))
      if isinstance(c, kvjax.QuantizedKVCache)]
  assert leaves
  for c in leaves:
    assert np.all(np.asarray(c.lengths) == 40)
    assert np.asarray(c.k_codes).std() > 10 and np.all(np.asarray(c.k_scales, np.float32) > 0)
  logits, _ = runner(np.zeros((1, 1), np.int32), filled)
  assert np.all(np.isfinite(np.asarray(logits)))


def test_retrieved_number_is_the_first_run_of_digits():
  from kvjax.retrieval import retrieved_number
  assert retrieved_number(" 60494. Remember it, 123") == "60494"
  assert retrieved_number(" 6049.\n\n") == "6049"
  assert retrieved_number(" the key") is None


def test_first_token_margin_is_the_log_probability_gap():
  from kvjax import retrieval
  rng = np.random.default_rng(3)
  logits = rng.standard_normal(500).astype(np.float32) * 4
  lp = logits - np.log(np.exp(logits.astype(np.float64)).sum())
  top = np.sort(lp)[::-1]
  assert retrieval.first_token_margin(logits) == pytest.approx(top[0] - top[1], rel=1e-5)
  logits[7] = logits[3] = logits.max() + 1.0    # an exact tie
  assert retrieval.first_token_margin(logits) == 0.0


def test_windows_are_disjoint_stretches_each_opened_with_bos():
  ids = [2] + list(range(100, 140))               # BOS, then 40 text tokens
  wins = ev.windows(ids, 10, 3, bos=True)
  assert [w.tolist() for w in wins] == [[2] + list(range(100 + 9 * i, 109 + 9 * i))
                                        for i in range(3)]
  assert len(ev.windows(ids, 10, 99, bos=True)) == 4      # only 4 x 9 text tokens fit
  plain = ev.windows(list(range(25)), 10, 5, bos=False)
  assert [w.tolist() for w in plain] == [list(range(10)), list(range(10, 20))]
  assert len(ev.windows(list(range(10)), 10, 0, bos=False)) == 1  # at least one


def test_table_lists_the_paired_incremental_interval():
  row = dict(context=1024, cache="int4", mode="incremental", ppl=20.0, delta_ppl=0.1,
             delta_ppl_pct=0.5, kl_mean=0.01, top1_agree=0.9, bits_per_value=4.5,
             cache_bytes=2**20, tokens_scored=1008, windows=16, incremental_vs_hook_pct=0.2,
             incremental_vs_hook_ci95_pct=[-0.21, 0.62])
  hook = {k: v for k, v in row.items() if not k.startswith("incremental_vs")} | {"mode": "hook"}
  table = ev.format_table([hook, row])
  assert "+0.20% [-0.21%, +0.62%] over 1008 tokens, 16 windows" in table
  assert "incremental vs hook" not in ev.format_table([hook])
