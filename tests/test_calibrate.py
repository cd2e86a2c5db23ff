"""kvjax.calibrate: straight-through quantizer, training, Orbax round trips, resume, loading."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import calibrate as cal
from kvjax import eval as ev
from kvjax.models.runner import Runner
from kvjax import quantizer, smoothing
from kvjax.models import ModelConfig, model_class
from kvjax.rotations import rotation_matrix_np


def _synthetic_data(seed=0, layers=2, heads=2, n=96, d=64, m=24):
  """Keys with a shared offset and a few loud channels (what rotations and λ are for)."""
  rng = np.random.default_rng(seed)
  keys = rng.standard_normal((layers, heads, n, d)).astype(np.float32)
  keys[..., :3] *= 12.0
  keys += rng.standard_normal((layers, heads, 1, d)).astype(np.float32) * 4.0
  values = rng.standard_normal((layers, heads, n, d)).astype(np.float32)
  values[..., 5] *= 8.0
  queries = rng.standard_normal((layers, heads, m, d)).astype(np.float32)
  counts = np.array([n, n - 30][:layers] + [n] * max(0, layers - 2), np.int64)
  return cal.CalibrationData(keys=keys, values=values, counts=counts, queries=queries)


# ------------------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64), (4, 128)])
def test_straight_through_forward_is_the_cache_quantizer(bits, group_size):
  rng = np.random.default_rng(bits * 1000 + group_size)
  d = 128
  x = jnp.asarray(rng.standard_normal((40, d)) * 3 + 1, jnp.float32)
  rot = jnp.asarray(rotation_matrix_np("srft", d, 7))
  lam = jnp.asarray(np.exp(rng.normal(0, 0.5, d)), jnp.float32)
  mean = jnp.asarray(rng.standard_normal(d), jnp.float32)
  got = cal.fake_quantize_ste(x, rot, lam, mean, bits=bits, group_size=group_size)
  ref = quantizer.fake_quantize((x - mean)[:, None], rot[None], lam[None], bits=bits,
                                group_size=group_size)[:, 0] + mean
  # Same arithmetic in the same order: rows agree to float32 rounding of the two
  # matmuls (a code would have to sit within ~1e-6 of a rounding tie to flip).
  err = np.max(np.abs(np.asarray(got) - np.asarray(ref)), axis=-1)
  scale = np.max(np.abs(np.asarray(x - mean)), axis=-1) * np.max(np.asarray(lam))
  print("worst row error / row scale:", float(np.max(err / scale)))
  assert np.all(err <= 1e-5 * scale)


def test_straight_through_gradient_reaches_rotation_and_lambda():
  rng = np.random.default_rng(1)
  d = 64
  x = jnp.asarray(rng.standard_normal((32, d)), jnp.float32)
  base = jnp.asarray(rotation_matrix_np("srft", d, 0))
  w = jnp.asarray(rng.normal(0, 0.01, (d, d)), jnp.float32)

  def loss(w, log_lam):
    r = kvjax.rotations.cayley(w) @ base   # small d: the plain solve is fine here
    x_hat = cal.fake_quantize_ste(x, r, jnp.exp(log_lam), jnp.zeros(d), bits=4, group_size=32)
    return jnp.mean((x - x_hat) ** 2)

  gw, gl = jax.grad(loss, argnums=(0, 1))(w, jnp.zeros(d))
  assert np.all(np.isfinite(gw)) and np.all(np.isfinite(gl))
  assert np.abs(np.asarray(gw)).max() > 0 and np.abs(np.asarray(gl)).max() > 0


def test_host_cayley_value_and_gradient_match_the_reference():
  rng = np.random.default_rng(6)
  d = 24
  w = jnp.asarray(rng.normal(0, 0.3, (d, d)), jnp.float32)
  probe = jnp.asarray(rng.standard_normal((d, d)), jnp.float32)
  rot, inv = cal.cayley_host(w)
  ref = kvjax.rotations.cayley(w)
  # Per row of R, against the float32 reference solve.
  row_err = np.max(np.abs(rot - np.asarray(ref)), axis=-1)
  assert row_err.max() < 1e-5
  f_ref = lambda w: jnp.sum(jnp.sin(kvjax.rotations.cayley(w)) * probe)
  f_lin = lambda w: jnp.sum(jnp.sin(cal.cayley_linearized(w, jnp.asarray(rot),
                                                          jnp.asarray(inv))) * probe)
  g_ref, g_lin = np.asarray(jax.grad(f_ref)(w)), np.asarray(jax.grad(f_lin)(w))
  # Gradient rows are O(1); float32 solve vs float64 inverse differ at ~1e-6 relative.
  row_err = np.max(np.abs(g_ref - g_lin), axis=-1) / np.max(np.abs(g_ref), axis=-1)
  print("worst relative gradient row error:", row_err.max())
  assert row_err.max() < 1e-4


# ------------------------------------------------------------------------------------- training


FAST = cal.CalibrationConfig(steps=6, learning_rate=5e-3, warmup_steps=2, batch_tokens=48,
                             batch_queries=16, checkpoint_every=2, seed=3)


@pytest.mark.parametrize("objective", ["mse", "attention"])
def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, objective):
  data = _synthetic_data()
  quant = kvjax.QuantConfig()
  cc = dataclasses.replace(FAST, objective=objective)
  full_params, _, full_losses = cal.train(data, quant, cc, attn_scale=0.125,
                                          checkpoint_dir=tmp_path / "a", progress=False)

  class Interrupt(Exception):
    pass

  def stop(step, loss):
    if step == 2:      # checkpoints exist after steps 2 and 4; step index 2 is lost
      raise Interrupt
  with pytest.raises(Interrupt):
    cal.train(data, quant, cc, attn_scale=0.125, checkpoint_dir=tmp_path / "b",
              progress=False, on_step=stop)
  seen = []
  params, _, losses = cal.train(data, quant, cc, attn_scale=0.125,
                                checkpoint_dir=tmp_path / "b", progress=False,
                                on_step=lambda s, l: seen.append(s))
  assert seen == [2, 3, 4, 5]        # resumed from the checkpoint after 2 steps
  assert losses == full_losses
  for name in full_params:
    np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(full_params[name]))


def test_resume_refuses_a_different_config(tmp_path):
  data = _synthetic_data()
  quant = kvjax.QuantConfig()
  cal.train(data, quant, dataclasses.replace(FAST, steps=2), attn_scale=0.125,
            checkpoint_dir=tmp_path, progress=False)
  with pytest.raises(ValueError, match="another CalibrationConfig"):
    cal.train(data, quant, dataclasses.replace(FAST, steps=4, seed=9), attn_scale=0.125,
              checkpoint_dir=tmp_path, progress=False)


@pytest.mark.parametrize("base", ["srft", "none"])
def test_learned_rotation_stays_orthogonal_and_lowers_the_error(base):
  data = _synthetic_data(seed=5)
  quant = kvjax.QuantConfig()
  cc = cal.CalibrationConfig(steps=40, learning_rate=1e-2, warmup_steps=4, batch_tokens=64,
                             base=base, checkpoint_every=0)
  params, fixed, losses = cal.train(data, quant, cc, attn_scale=0.125, progress=False)
  arrays = cal.finalize(params, fixed)
  # The parameters moved far from the start, and R stayed orthogonal: per matrix row,
  # |R R^T - I| at float32 rounding of a d=64 solve and product.
  assert np.abs(np.asarray(params["k_weights"])).max() > 1e-2
  for name in ("k_rotation", "v_rotation"):
    r = arrays[name].astype(np.float64)
    gram = r @ np.swapaxes(r, -1, -2)
    row_err = np.max(np.abs(gram - np.eye(r.shape[-1])), axis=-1)
    print(name, "worst |R R^T - I| per row:", row_err.max())
    assert row_err.max() < 1e-5
  start = cal.finalize(*cal.init_state(data, quant, cc)[:2])
  before = cal.reconstruction_mse(data, start, quant)
  after = cal.reconstruction_mse(data, arrays, quant)
  print("key MSE", before["key"], "->", after["key"], "value MSE", before["value"], "->",
        after["value"])
  assert np.all(after["key"] < before["key"]) and np.all(after["value"] < before["value"])
  assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_lambda_only_from_the_closed_form_keeps_the_base_rotation():
  data = _synthetic_data(seed=6)
  quant = kvjax.QuantConfig()
  cc = cal.CalibrationConfig(objective="attention", steps=12, learning_rate=1e-2, warmup_steps=2,
                             batch_tokens=64, batch_queries=16, learn_rotation=False,
                             init="closed-form", checkpoint_every=0)
  params, fixed, losses = cal.train(data, quant, cc, attn_scale=0.125, progress=False)
  arrays = cal.finalize(params, fixed)
  start = cal.finalize(*cal.init_state(data, quant, cc)[:2])
  # R is exactly the SRFT base; the key λ starts at the closed form and moves.
  for name in ("k_rotation", "v_rotation"):
    np.testing.assert_array_equal(arrays[name], start[name])
  np.testing.assert_allclose(start["k_lambda"], cal.closed_form_key_lambda(data, start["k_mean"]),
                             rtol=1e-6)
  assert np.abs(np.log(arrays["k_lambda"] / start["k_lambda"])).max() > 1e-3
  assert np.all(np.isfinite(losses))


def _vectors_and_stats(model, seed):
  """40 random tokens through the model: calibrate's vectors (a query at every position) and
  the statistics caches of kvjax.smoothing."""
  tokens = np.random.default_rng(seed).integers(3, model.config.vocab_size, 40).tolist()
  runner = Runner(model)
  data = cal.collect(runner, tokens, query_samples=40, chunk=16, progress=False)
  return data, ev.collect_stats(runner, tokens, chunk=16, progress=False)


def test_closed_form_init_equals_the_smoothing_lambda(tiny_model):
  # Same formula from two routes: the collected vectors (calibrate) and the statistics
  # caches (kvjax.smoothing). Compared on global layers, which keep every token.
  cfg = tiny_model.config
  data, stats = _vectors_and_stats(tiny_model, seed=4)
  cc = cal.CalibrationConfig(init="closed-form")
  params, fixed, _ = cal.init_state(data, kvjax.QuantConfig(), cc)
  lam = np.exp(np.asarray(params["k_log_lambda"]))
  checked = 0
  for part, run, index, layer in cal._layer_slots(cfg):
    if cfg.layer_types[layer] != "global":
      continue
    p = smoothing.key_params(stats[part][run], smoothing.OFFSET_AND_LAMBDA)
    mean, ref = p["k_mean"], p["k_lambda"]
    np.testing.assert_allclose(np.asarray(fixed["k_mean"])[layer], np.asarray(mean)[index],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lam[layer], np.asarray(ref)[index], rtol=2e-3)
    checked += 1
  assert checked > 0


def test_bad_configuration_is_rejected():
  with pytest.raises(ValueError, match="objective"):
    cal.CalibrationConfig(objective="kl")
  with pytest.raises(ValueError, match="base"):
    cal.CalibrationConfig(base="srht")
  with pytest.raises(ValueError, match="steps"):
    cal.CalibrationConfig(steps=0)
  with pytest.raises(ValueError, match="init"):
    cal.CalibrationConfig(init="random")
  with pytest.raises(ValueError, match="nothing to learn"):
    cal.CalibrationConfig(learn_lambda=False, learn_rotation=False)
  d = _synthetic_data()
  with pytest.raises(ValueError, match="counts"):
    cal.CalibrationData(keys=d.keys, values=d.values, counts=d.counts * 0, queries=d.queries)
  with pytest.raises(ValueError, match="queries"):
    cal.CalibrationData(keys=d.keys, values=d.values, counts=d.counts, queries=d.queries[..., :3])


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_model():
  cfg = ModelConfig.preset("gemma3-tiny")
  return model_class(cfg)(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3))


def test_query_samples_are_the_queries_attention_sees(tiny_model):
  # With a sample at every position, the sampled queries' squares must add up to the
  # q_sq statistics the core's StatsKVCache accumulates in the same attention calls.
  cfg = tiny_model.config
  data, stats = _vectors_and_stats(tiny_model, seed=2)
  q_sq = np.zeros((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim))
  for part, run, index, layer in cal._layer_slots(cfg):
    q_sq[layer] = np.asarray(stats[part][run].q_sq[index])
  got = (data.queries.astype(np.float64) ** 2).sum(axis=2)
  np.testing.assert_allclose(got, q_sq, rtol=1e-4, atol=1e-4 * q_sq.max())
  # Sliding-window layers keep their window, global layers every token.
  for layer, t in enumerate(cfg.layer_types):
    assert data.counts[layer] == (min(40, cfg.sliding_window) if t == "local" else 40)


def test_learned_ablation_on_top_of_the_closed_form(tiny_model, tmp_path):
  """--learned keeps the closed form's offsets, replaces R and λ by orthogonal / positive learned
  ones, recomputes the key feedback for them, and the artifact runs in the model."""
  from kvjax import calibration as artifact
  cfg = tiny_model.config
  tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, 200).tolist()
  tokens[0] = cfg.bos_token_id
  kw = dict(window_lengths=(32, 64), chunk=16, progress=False, log=lambda *a: None)
  closed = cal.calibrate(tiny_model, tokens, **kw)
  cc = cal.CalibrationConfig(objective="attention", steps=6, batch_tokens=32, batch_queries=16,
                             checkpoint_every=3, warmup_steps=2, init="closed-form")
  learned = cal.calibrate(tiny_model, tokens, learned=cc, query_samples=16,
                          checkpoint_dir=tmp_path / "train", **kw)
  # The formats are the closed form's; the learned rotations are values in the tensors.
  assert learned.configs == closed.configs
  assert len(learned.manifest["learned"]["losses"]) == 6
  for c, l in zip(closed.tensors, learned.tensors):
    for name in ("k_mean", "k_rope_mean", "k_rope_freq", "k_rope_channels"):
      np.testing.assert_array_equal(c[name], l[name])
    r = l["k_rotation"].astype(np.float64)
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(32), r.shape),
                               atol=1e-4)
    assert not np.allclose(c["k_rotation"], l["k_rotation"])
    assert not np.array_equal(c["k_feedback"], l["k_feedback"]) and np.any(l["k_feedback"])
  path = artifact.save(learned, tmp_path / "learned")
  back = artifact.load(path)
  assert back.manifest["method"].startswith("closed-form") and "learned" in back.manifest
  runner = Runner(tiny_model)
  window = np.asarray(tokens[:48], np.int32)
  specs = [ev.CacheSpec("f32", None), ev.parse_spec(f"int4:{path}")]
  cals = ev.calibrations_for(tiny_model, specs)
  res = ev.evaluate_window(runner, window, specs, max_len=48, chunk=16, progress=False,
                           calibrations=cals)
  nll_ref, nll = res["f32"]["hook"][0], res[specs[1].name]["hook"][0]
  rel = np.abs(nll - nll_ref) / np.abs(nll_ref)
  assert np.all(np.isfinite(nll)) and 0 < rel.max() and rel.mean() < 0.05
