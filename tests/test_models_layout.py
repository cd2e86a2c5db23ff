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
