"""kvjax.certified: the certificate is sound against float64 exact attention over many random
head-steps per family, the ladder returns rows within the tolerance or bitwise exact, a broken
certificate is caught, and the cache keeps its exact tier in host memory."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import certified as C
from kvjax.certified import cache as ccache
from kvjax.certified import soundness

# Head-steps (rows: one query token of one query head) checked per family (at 512 tokens, and the
# Gaussian family at 8,192); benchmarks/certified_soundness.py runs every family at both.
ROWS = int(os.environ.get("KVJAX_CERTIFIED_ROWS", "100000"))
H, R, D = 2, 4, 64
LOOSE = C.CertifiedConfig(tol=1e9, atol=1e30)  # rung 0 only: every row keeps its compressed-tier bound


def _family(name, key, b, n):
  return soundness.family(name, key, b, n, H, D)


def _queries(key, b, t, name):
  return soundness.queries(key, b, t, H * R, D, name)


def _exact64(q, cache, n):
  return soundness.exact64(q, cache, n)


_attend = soundness._attend


def _run(name, config, n, rows, seed=0):
  return soundness.check_rows(name, config, length=n, rows=rows, seed=seed, heads=H, group=R,
                              head_dim=D)


FAMILIES = soundness.FAMILIES


@pytest.mark.parametrize("name", FAMILIES)
def test_certificate_bounds_the_actual_error_on_every_row(name):
  err, cert = _run(name, LOOSE, 512, ROWS)
  assert err.size >= ROWS * 0.9
  assert np.all(np.isfinite(cert.bound))
  worst = np.max(err / cert.bound)
  assert worst <= 1.0, f"{name}: actual error exceeds the certificate by {worst:.3g}x"
  # Not vacuous: the bound is within a few hundred times the actual error on a typical row.
  assert np.median(cert.bound / np.maximum(err, 1e-12)) < 500


def test_certificate_holds_at_8k_context():
  err, cert = _run("gaussian", LOOSE, 8192, ROWS, seed=3)
  assert np.max(err / cert.bound) <= 1.0


@pytest.mark.parametrize("name", ["gaussian", "needle", "key_offset"])
def test_ladder_rows_are_within_tolerance_or_bitwise_exact(name):
  config = C.CertifiedConfig(tol=0.02, promote=(2, 8))
  b, t, n = 2, 16, 384
  k, v = _family(name, jax.random.key(7), b, n)
  cache = C.write(C.init_cache(b, H, n, D, config=config), k, v)
  q = _queries(jax.random.key(8), b, t, name)
  pos = jnp.full((b, t), n - 1, jnp.int32)
  out, cert, new = jax.jit(lambda q, c: C.attend(q, c, q_positions=pos))(q, cache)
  exact = C.exact_attention(q, cache, q_positions=pos)
  exact64 = _exact64(q, cache, n)
  err = np.linalg.norm(np.asarray(out, np.float64) - exact64, axis=-1)
  rung = np.asarray(cert.rung)
  last = len(config.rungs) - 1
  certified = rung < last
  assert np.all(np.asarray(cert.bound)[certified] <= np.asarray(cert.allowed)[certified])
  assert np.all(err[certified] <= np.asarray(cert.bound)[certified])
  # Within tolerance relative to the exact output's norm.
  norm64 = np.linalg.norm(exact64, axis=-1)
  assert np.all(err[certified] <= config.tol * norm64[certified] + 1e-12)
  np.testing.assert_array_equal(np.asarray(out)[~certified], np.asarray(exact)[~certified])
  counts = np.bincount(rung.ravel(), minlength=len(config.rungs))
  np.testing.assert_array_equal(np.asarray(new.stats["rows"]), counts)
  assert counts.sum() == b * t * H * R


def test_a_block_mean_value_error_breaks_the_certificate():
  """η must be the block's MAX absolute error: a block mean (as the paper's code stores in
  places) under-covers a needle whose value error is its block's largest."""
  b, n = 2, 512
  k, v = _family("needle", jax.random.key(11), b, n)
  cache = C.write(C.init_cache(b, H, n, D, config=LOOSE), k, v)
  _, meta = ccache.token_metadata(cache, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
  per_token = meta["v_err"].transpose(0, 2, 1)                     # [B, H, N]
  mean = per_token.reshape(b, H, n // 16, 16).mean(-1)
  broken = dataclasses.replace(cache, v_err=mean)
  q = _queries(jax.random.key(12), b, 64, "needle")
  pos = jnp.full((b, 64), n - 1, jnp.int32)
  exact = _exact64(q, cache, n)
  for c, should_hold in ((cache, True), (broken, False)):
    out, cert = _attend(q, c, pos)
    err = np.linalg.norm(np.asarray(out, np.float64) - exact, axis=-1)
    violated = np.sum(err > np.asarray(cert.bound))
    assert (violated == 0) == should_hold, (should_hold, violated)


def test_compressed_tier_holds_the_codes_kvjax_append_writes():
  config = C.CertifiedConfig(center=False)
  k, v = _family("gaussian", jax.random.key(3), 2, 40)
  kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
  cache = C.write(C.init_cache(2, H, 64, D, config=config), k, v, num_tokens=jnp.array([40, 23]))
  plain = kvjax.append(kvjax.init_cache(2, H, 64, D, quant=config.quant), kb, vb,
                       num_tokens=jnp.array([40, 23]), impl="xla")
  for name in ("k_codes", "k_scales", "v_codes", "v_scales", "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(cache.tier, name)),
                                  np.asarray(getattr(plain, name)), err_msg=name)
  np.testing.assert_array_equal(np.asarray(jax.device_get(cache.k_exact))[1, :, :23],
                                np.asarray(kb)[1, :23].transpose(1, 0, 2))
  assert not np.any(np.asarray(jax.device_get(cache.k_exact))[1, :, 23:].astype(np.float32))
  # Block metadata: block 1 of sequence 1 holds tokens 16..22 only.
  _, meta = ccache.token_metadata(cache, kb, vb)
  np.testing.assert_array_equal(np.asarray(cache.v_norm)[1, :, 1],
                                np.asarray(meta["v_norm"])[1, 16:23].max(0))


def test_exact_tier_stays_in_host_memory_and_steps_move_only_blocks():
  config = C.CertifiedConfig(tol=1e-4, promote=(2,))
  k, v = _family("gaussian", jax.random.key(5), 1, 100)
  cache = C.write(C.init_cache(1, H, 128, D, config=config), k, v)
  assert cache.k_exact.sharding.memory_kind == "pinned_host"
  step = jax.jit(lambda c, q, k, v: C.append_and_attend(c, q, k, v))
  q = _queries(jax.random.key(6), 1, 1, "gaussian")
  out, new = step(cache, q, k[:, :1], v[:, :1])
  assert new.k_exact.sharding.memory_kind == "pinned_host"
  assert int(new.lengths[0]) == 101
  rows = np.asarray(new.stats["rows"])
  assert rows.sum() == H * R
  _, cert, _ = jax.jit(lambda q, c: C.attend(q, c))(q, new)
  rung = np.asarray(cert.rung)[0, 0].reshape(H, R)
  # A promote rung fetched 2 blocks per KV head; the exact rung all 8 blocks of the failing
  # heads: of one head (config.exact_heads) or, beyond it, of the layer.
  promoted = np.any(rung >= 1)
  exact_heads = np.sum(np.any(rung == 2, axis=1))
  exact_blocks = 0 if exact_heads == 0 else 8 * (1 if exact_heads == 1 else H)
  assert int(cert.host_blocks) == H * 2 * promoted + exact_blocks


def test_the_exact_rung_of_some_heads_is_bitwise_exact_attention():
  from kvjax.certified import attention as cattn
  k, v = _family("gaussian", jax.random.key(5), 2, 100)
  cache = C.write(C.init_cache(2, H, 128, D), k, v)
  q = _queries(jax.random.key(6), 2, 3, "gaussian")
  pos = jnp.full((2, 3), 99, jnp.int32)
  full = np.asarray(C.exact_attention(q, cache, q_positions=pos))    # [B, T, Hq, D]
  scale = 1 / np.sqrt(D)
  part = jax.jit(lambda q, c, heads: cattn._exact_heads(q, c, pos, None, scale, None, heads))(
      q, cache, jnp.array([3, 0], jnp.int32))                        # [2, T, R, D]
  grouped = full.reshape(2, 3, H, R, D).transpose(0, 2, 1, 3, 4).reshape(2 * H, 3, R, D)
  np.testing.assert_array_equal(np.asarray(part), grouped[[3, 0]])


def test_a_certified_step_exports_for_tpu_and_cuda():
  config = C.CertifiedConfig()
  cache = C.init_cache(1, H, 64, D, config=config)
  k, v = _family("gaussian", jax.random.key(5), 1, 1)
  q = _queries(jax.random.key(6), 1, 1, "gaussian")
  step = jax.jit(lambda c, q, k, v: C.append_and_attend(c, q, k, v))
  kernel = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
  for platform in ("tpu", "cuda"):
    exported = jax.export.export(step, platforms=[platform], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(kernel["cuda"])])(cache, q, k, v)
    text = exported.mlir_module()
    assert "_xla_compute_type" in text and "pinned_host" in text, platform
    # Rung 0 of the decode step is the fused kernel with its block log-sum-exps.
    assert kernel[platform] in text, platform


def test_kvjax_append_and_attend_runs_the_ladder_for_a_certified_cache():
  config = C.CertifiedConfig(tol=0.05)
  cache = C.init_cache(1, H, 64, D, config=config)
  k, v = _family("gaussian", jax.random.key(9), 1, 8)
  q = _queries(jax.random.key(10), 1, 8, "gaussian")
  out, new = kvjax.append_and_attend(cache, q, k, v, impl="xla")
  assert isinstance(new, C.CertifiedKVCache) and int(new.lengths[0]) == 8
  assert int(np.asarray(new.stats["rows"]).sum()) == 8 * H * R
  summary = C.stats_summary({"a": new, "b": (new,)})
  assert sum(summary["rows"].values()) == 2 * 8 * H * R


@pytest.mark.parametrize("kwargs, match", [
    (dict(tol=-1.0), "tol"),
    (dict(tol=0.0), "both 0"),
    (dict(promote=(8, 4)), "promote"),
    (dict(block_size=0), "block_size"),
    (dict(exact_heads=0), "exact_heads"),
    (dict(center=1), "center"),
    (dict(memory_kind="gpu"), "memory_kind"),
    (dict(quant=kvjax.QuantConfig().with_corrections(kvjax.corrections.KeyOffset())),
     "corrections"),
])
def test_config_errors_name_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    C.CertifiedConfig(**kwargs)


def test_overflow_outside_jit_is_an_error():
  cache = C.init_cache(1, H, 16, D)
  k, v = _family("gaussian", jax.random.key(1), 1, 17)
  with pytest.raises(ValueError, match="overflows"):
    C.write(cache, k, v)


def test_a_model_runs_on_certified_caches_close_to_its_bf16_cache():
  from flax import nnx
  from kvjax.models.config import ModelConfig
  from kvjax.models.qwen2 import Qwen2ForCausalLM
  # head_dim 32: a whole quantization group per head
  cfg = dataclasses.replace(ModelConfig.qwen2_tiny(), head_dim=32)
  model = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, model.config.vocab_size)
  config = C.CertifiedConfig(tol=0.01)
  run = jax.jit(lambda t, c: model(t, c))
  logits, caches = run(tokens, model.init_cache(2, 40, certified=config))
  ref, ref_caches = run(tokens, model.init_cache(2, 40, dtype=jnp.bfloat16))
  step, caches = run(tokens[:, :1], caches)
  ref_step, _ = run(tokens[:, :1], ref_caches)
  # Every row is within 1% of exact attention over the bf16 originals: the logits follow the
  # bf16 cache's (which differs from exact only by rounding q and p to bf16).
  for a, b in ((logits, ref), (step, ref_step)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05 * float(jnp.abs(b).max()))
  summary = C.stats_summary(caches)
  layers = model.config.num_layers
  heads = model.config.num_heads
  assert sum(summary["rows"].values()) == layers * 2 * 25 * heads
  with pytest.raises(ValueError, match="certified fixes"):
    model.init_cache(1, 8, certified=config, quant=kvjax.QuantConfig())


def test_eval_and_bench_cache_names():
  from kvjax import eval as ev
  spec = ev.parse_spec("cert0.005-int4-naive")
  assert spec.certified.tol == 0.005 and spec.quant.rotation == "none"
  for bad in ("cert-int4", "certx-int4-naive", "cert-bf16"):
    with pytest.raises(ValueError, match="cert"):
      ev.parse_spec(bad)


@pytest.mark.parametrize("name", ["gaussian", "needle"])
def test_rung0_with_the_fused_kernel_is_sound_and_matches_the_xla_rung0(name):
  """impl="pallas": the decode kernel (interpret mode here) returns the output and every
  block's log-sum-exp in one pass; its certificate (with the kernel's bfloat16-split margins)
  bounds the actual error, and output and bound agree with the XLA rung 0."""
  b, n = 2, 200
  k, v = _family(name, jax.random.key(21), b, n)
  cache = C.write(C.init_cache(b, H, 256, D, config=LOOSE), k, v)
  errs, ratios = [], []
  for i in range(3):
    q = _queries(jax.random.key(30 + i), b, 1, name)
    out_k, cert_k, _ = C.attend(q, cache, impl="pallas")
    out_x, cert_x, _ = C.attend(q, cache, impl="xla")
    exact = _exact64(q, cache, n)
    err = np.linalg.norm(np.asarray(out_k, np.float64) - exact, axis=-1)
    assert np.all(err <= np.asarray(cert_k.bound)), name
    np.testing.assert_allclose(np.asarray(out_k), np.asarray(out_x), rtol=0,
                               atol=1e-4 * float(np.abs(np.asarray(out_x)).max()))
    ratios.append(np.asarray(cert_k.bound) / np.asarray(cert_x.bound))
    errs.append(err)
  ratios = np.concatenate([r.ravel() for r in ratios])
  # The kernel's margins are wider (bfloat16 splits, exp within 4 ulp), not the bound's terms.
  assert np.all(ratios >= 0.99) and np.median(ratios) < 1.2, (ratios.min(), np.median(ratios))


def test_pallas_rung0_needs_a_decode_step():
  cache = C.init_cache(1, H, 64, D)
  q = _queries(jax.random.key(1), 1, 2, "gaussian")
  with pytest.raises(ValueError, match="decode step"):
    C.attend(q, cache, impl="pallas")
  with pytest.raises(ValueError, match="impl"):
    C.attend(q, cache, impl="int8dot")


def test_centring_stores_the_first_write_mean_and_leaves_attention_exactly_offset():
  """A key offset shared by every token does not change softmax, a value offset moves the
  output by itself: with centring the compressed tier holds k - mean, v - mean (of the first
  write), the certificate stays sound, and on the key-offset family it is far tighter."""
  k, v = _family("key_offset", jax.random.key(41), 2, 256)
  v = v + 30.0
  q = _queries(jax.random.key(42), 2, 64, "key_offset")
  pos = jnp.full((2, 64), 255, jnp.int32)
  exact = _exact64(q, C.write(C.init_cache(2, H, 256, D), k, v), 256)
  bounds = {}
  for center in (False, True):
    config = C.CertifiedConfig(tol=1e9, atol=1e30, center=center)
    first, rest = C.write(C.init_cache(2, H, 256, D, config=config), k[:, :100], v[:, :100]), None
    rest = C.write(first, k[:, 100:], v[:, 100:])
    if center:
      np.testing.assert_allclose(np.asarray(rest.k_offset),
                                 np.asarray(k[:, :100].astype(jnp.bfloat16).astype(jnp.float32)
                                            .mean(1)), rtol=1e-5, atol=1e-4)
      np.testing.assert_array_equal(np.asarray(rest.k_offset), np.asarray(first.k_offset))
    out, cert = _attend(q, rest, pos)
    err = np.linalg.norm(np.asarray(out, np.float64) - exact, axis=-1)
    assert np.all(err <= np.asarray(cert.bound)), center
    bounds[center] = np.median(np.asarray(cert.bound))
  assert bounds[True] < 0.2 * bounds[False], bounds
