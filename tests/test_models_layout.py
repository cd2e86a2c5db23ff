"""Separate layers: the same model scanned with some layers on their own, caches per layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.models import Gemma3ForCausalLM, ModelConfig, with_separate_layers
from kvjax.models.decoder import layer_layout


def _tiny13():
  types = tuple("global" if l % 6 == 5 else "local" for l in range(13))
  cfg = ModelConfig.gemma3_tiny().replace(num_layers=13, layer_types=types)
  return Gemma3ForCausalLM(cfg, rngs=nnx.Rngs(5))


def _run(model, caches, tokens, chunk):
  logits = []
  for lo in range(0, tokens.shape[1], chunk):
    out, caches = model(tokens[:, lo:lo + chunk], caches)
    logits.append(out)
  return jnp.concatenate(logits, axis=1), caches


def test_separate_layers_keep_the_outputs_and_split_the_runs():
  model = _tiny13()
  assert layer_layout(model.config)[0] == 2  # two groups of (5 local, 1 global) + a tail of 1
  split = with_separate_layers(model, (4, 12))
  assert split.config.separate_layers == (4, 12)
  groups, runs, tail = layer_layout(split.config)
  assert groups == 1 and not tail
  assert [(n, off) for _, n, off in runs] == [(4, 0), (1, 4), (1, 5), (5, 6), (1, 11), (1, 12)]
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 512)  # longer than the window 16
  ref, _ = _run(model, model.init_cache(2, 48, dtype=jnp.float32), tokens, 13)
  got, caches = _run(split, split.init_cache(2, 48, dtype=jnp.float32), tokens, 13)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0,
                             atol=1e-5 * float(jnp.abs(ref).max()))
  step_ref, _ = model(tokens[:, :1], _run(model, model.init_cache(2, 48, dtype=jnp.float32),
                                          tokens, 13)[1])
  step, _ = split(tokens[:, :1], caches)
  np.testing.assert_allclose(np.asarray(step), np.asarray(step_ref), rtol=0,
                             atol=1e-5 * float(jnp.abs(step_ref).max()))
  assert model.config.separate_layers == ()  # the original is untouched


def test_layer_quant_gives_a_separate_layer_its_own_cache_format():
  model = with_separate_layers(_tiny13(), (4,))
  base = kvjax.QuantConfig(group_size=32)
  caches = model.init_cache(1, 48, quant=base, layer_quant={4: kvjax.QuantConfig(key_bits=8, group_size=32)})
  bits = [c.config.key_bits for c in caches["groups"]]
  assert bits == [4, 8, 4, 4, 4, 4]   # runs: layers 0-3, 4, 5, 6-10, 11, 12
  assert caches["groups"][1].k_codes.shape[-1] == 32 and caches["groups"][0].k_codes.shape[-1] == 16
  tokens = jax.random.randint(jax.random.key(2), (1, 30), 0, 512)
  mixed, _ = _run(model, caches, tokens, 10)
  uniform, _ = _run(model, model.init_cache(1, 48, quant=base), tokens, 10)
  assert np.isfinite(np.asarray(mixed)).all()
  assert np.abs(np.asarray(mixed) - np.asarray(uniform)).max() > 0  # the override took effect
  dense = model.init_cache(1, 48, layer_quant={4: base})  # one quantized layer in a dense model
  assert [type(c).__name__ for c in dense["groups"]][:2] == ["DenseKVCache", "QuantizedKVCache"]


def test_layer_quant_bad_input():
  model = _tiny13()
  with pytest.raises(ValueError, match="separate_layers"):
    model.init_cache(1, 8, layer_quant={4: kvjax.QuantConfig()})
  split = with_separate_layers(model, (4,))
  with pytest.raises(TypeError, match=r"layer_quant\[4\]"):
    split.init_cache(1, 8, layer_quant={4: "int8"})
  with pytest.raises(ValueError, match="separate_layers"):
    with_separate_layers(model, (13,))


def test_value_output_metric_is_what_a_value_error_costs_per_layer():
  # e^T M e must equal the squared change of the layer's attention output (after the output
  # projection and the post-attention norm's scale) that a value error e in one KV head causes
  # when every query head reading it gives that token weight 1; checked per checkpoint layer,
  # in the stacked layout and with layers split off, which must agree.
  model = _tiny13()
  cfg = model.config
  d, hq, hk = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  rng = np.random.default_rng(0)
  for run in list(model.group_runs) + list(model.tail_runs):  # norm scales other than ones
    scale = run.post_attention_norm.scale
    scale.value = jnp.asarray(rng.uniform(0.2, 3.0, scale.value.shape), scale.value.dtype)
  split = with_separate_layers(model, (4, 12))
  for m in (model, split):
    metric = m.value_output_metric()
    num_groups, group_runs, tail_runs = layer_layout(m.config)
    slots = [("groups", r, (g, s)) for r, (_, n, _) in enumerate(group_runs)
             for g in range(num_groups) for s in range(n)]
    slots += [("tail", r, (s,)) for r, (_, n, _) in enumerate(tail_runs) for s in range(n)]
    assert len(slots) == cfg.num_layers
    for part, r, idx in slots:
      run = (m.group_runs if part == "groups" else m.tail_runs)[r]
      w = np.asarray(run.attention.o_proj.kernel[...], np.float64)[idx]       # [Hq*D, E]
      g = np.asarray(run.post_attention_norm.scale[...], np.float64)[idx]     # [E]
      got = np.asarray(metric[part][r], np.float64)[idx]                      # [Hk, D, D]
      assert got.shape == (hk, d, d)
      for kv in range(hk):
        e = rng.standard_normal(d)
        heads = range(kv * (hq // hk), (kv + 1) * (hq // hk))
        want = sum(np.sum((g * (e @ w[h * d:(h + 1) * d])) ** 2) for h in heads)
        np.testing.assert_allclose(e @ got[kv] @ e, want, rtol=1e-5)
