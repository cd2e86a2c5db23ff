"""Parity of the Flax decoders with Hugging Face transformers on tiny random checkpoints.

Each test builds a random transformers model, saves it with `save_pretrained` (safetensors),
loads it with `kvjax.models.load`, prefills 44 tokens and decodes 8 more one at a time through
the dense float32 cache, and compares every position's logits with transformers' forward pass
over all 52 tokens. Error is measured per row (batch, position): max|a - b| / max|b|. The bound
1e-4 is float32 round-off accumulated over a few layers (about 1e-6 per op) with margin, and far
below what any layout or formula mistake gives (those show up as O(1) relative errors).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import kvjax  # noqa: E402
from kvjax.models import load  # noqa: E402

PREFILL, DECODE, BATCH = 44, 8, 2
TOLERANCE = 1e-4


def _randomize(model, seed):
  """Random weights everywhere, norms and biases included (HF inits norms to 0 or 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      std = 0.3 if p.ndim == 1 else 1.5 / np.sqrt(p.shape[-1])
      p.copy_(torch.randn(p.shape, generator=gen) * std)
  return model


def _save(model, tmp_path):
  path = os.fspath(tmp_path / "ckpt")
  model.save_pretrained(path, safe_serialization=True)
  return path


def _worst_row_error(ours: np.ndarray, ref: np.ndarray) -> float:
  """max over (batch, position) of max|a-b| / max|b| along the vocabulary."""
  num = np.abs(ours - ref).max(-1)
  den = np.abs(ref).max(-1)
  return float((num / den).max())


def _run_ours(model, tokens):
  caches = model.init_cache(BATCH, PREFILL + DECODE + 4, dtype=jnp.float32)
  step = jax.jit(lambda m, t, c: m(t, c))
  logits, caches = model(jnp.asarray(tokens[:, :PREFILL]), caches)
  outs = [np.asarray(logits)]
  for t in range(PREFILL, PREFILL + DECODE):
    logits, caches = step(model, jnp.asarray(tokens[:, t:t + 1]), caches)
    outs.append(np.asarray(logits))
  lengths = np.asarray(kvjax.models.cache_lengths(caches))
  assert lengths.tolist() == [PREFILL + DECODE] * BATCH
  return np.concatenate(outs, axis=1)


def _run_hf(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


def _tokens(vocab, seed):
  return np.random.default_rng(seed).integers(0, vocab, (BATCH, PREFILL + DECODE), dtype=np.int32)


def _check(hf_model, tmp_path, seed):
  hf_model = _randomize(hf_model.eval(), seed)
  path = _save(hf_model, tmp_path)
  model, tokenizer = load(path, dtype=jnp.float32)
  assert tokenizer is None
  tokens = _tokens(hf_model.config.vocab_size, seed)
  ref = _run_hf(hf_model, tokens)
  ours = _run_ours(model, tokens)
  assert ours.shape == ref.shape
  err = _worst_row_error(ours, ref)
  assert err < TOLERANCE, f"worst row relative error {err:.3g}"
  return model, err


def test_gemma3_matches_transformers(tmp_path):
  cfg = transformers.Gemma3TextConfig(
      vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
      num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=16,
      query_pre_attn_scalar=24, final_logit_softcapping=30.0,
      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                       "full_attention": {"rope_type": "linear", "factor": 8.0,
                                          "rope_theta": 1_000_000.0}},
      attn_implementation="eager")
  model, _ = _check(transformers.Gemma3ForCausalLM(cfg), tmp_path, seed=0)
  # 8 layers = one scanned group of (5 local, 1 global) plus a tail of 2 local layers; the
  # window (16) is shorter than the prefill, so local caches are rings of 16 slots.
  caches = model.init_cache(1, 64)
  local, glob = caches["groups"]
  assert local.k.shape == (1, 5, 1, 2, 16, 32) and local.ring
  assert glob.k.shape == (1, 1, 1, 2, 64, 32) and not glob.ring
  assert caches["tail"][0].k.shape == (2, 1, 2, 16, 32)


def test_qwen2_matches_transformers(tmp_path):
  cfg = transformers.Qwen2Config(
      vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=1_000_000.0,
      tie_word_embeddings=True, attn_implementation="eager")
  model, _ = _check(transformers.Qwen2ForCausalLM(cfg), tmp_path, seed=1)
  assert model.config.qkv_bias and model.config.tie_word_embeddings


def test_llama_matches_transformers(tmp_path):
  cfg = transformers.LlamaConfig(
      vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
      rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32},
      attn_implementation="eager")
  model, _ = _check(transformers.LlamaForCausalLM(cfg), tmp_path, seed=2)
  assert model.config.rope_scaling.kind == "llama3" and not model.config.tie_word_embeddings
