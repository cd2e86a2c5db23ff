"""Generation on tiny random models: batched ragged prompts vs a cache-free reference, EOS,
sampling filters, int4 decode vs a teacher-forced forward, and input errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.models import Gemma3ForCausalLM, ModelConfig, Qwen2ForCausalLM
from kvjax.models.generate import generate_tokens, prompt_bucket, sample_logits


@pytest.fixture(scope="module")
def gemma():
  # window 16 < the longest prompt, so local layers are ring buffers during the test
  return Gemma3ForCausalLM(ModelConfig.gemma3_tiny(), rngs=nnx.Rngs(3))


def _prompts(vocab, lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, n).tolist() for n in lengths]


def _greedy_reference(model, prompt, steps):
  """Greedy decoding that re-runs the whole sequence through a fresh cache every step (right-
  padded to 64 tokens, the padding not written, so one compilation serves every length)."""
  seq = list(prompt)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t, n, c: nnx.merge(graphdef, s)(t, c, num_tokens=n,
                                                              logits_at=n - 1)[0][:, 0])
  for _ in range(steps):
    caches = model.init_cache(1, 64)
    padded = np.zeros((1, 64), np.int32)
    padded[0, :len(seq)] = seq
    logits = forward(state, jnp.asarray(padded), jnp.asarray([len(seq)], jnp.int32), caches)
    seq.append(int(jnp.argmax(logits[0])))
  return seq[len(prompt):]


def test_batched_ragged_greedy_matches_reference(gemma):
  prompts = _prompts(gemma.config.vocab_size, (5, 23, 31))
  steps = 10
  batched = generate_tokens(gemma, prompts, max_new_tokens=steps, eos_token_ids=())
  for prompt, got in zip(prompts, batched):
    assert got == _greedy_reference(gemma, prompt, steps)
  alone = [generate_tokens(gemma, [p], max_new_tokens=steps, eos_token_ids=())[0] for p in prompts]
  assert alone == batched


def test_eos_stops_each_sequence(gemma):
  prompts = _prompts(gemma.config.vocab_size, (7, 12), seed=1)
  free = generate_tokens(gemma, prompts, max_new_tokens=8, eos_token_ids=())
  stop = free[0][3]  # make the 4th token of sequence 0 its stop token
  out = generate_tokens(gemma, prompts, max_new_tokens=8, eos_token_ids=(stop,))
  assert out[0] == free[0][:free[0].index(stop) + 1]
  cut = free[1].index(stop) + 1 if stop in free[1] else 8
  assert out[1] == free[1][:cut]


def test_quantized_cache_generation_runs_and_is_close(gemma):
  prompts = _prompts(gemma.config.vocab_size, (9, 20), seed=2)
  dense = generate_tokens(gemma, prompts, max_new_tokens=6, eos_token_ids=())
  int8 = generate_tokens(gemma, prompts, max_new_tokens=6, eos_token_ids=(),
                         quant=kvjax.QuantConfig(key_bits=8, value_bits=8))
  assert [len(s) for s in int8] == [6, 6]
  # 8-bit K/V barely move the logits of a random model: the first tokens agree.
  assert [s[0] for s in int8] == [s[0] for s in dense]


def test_int4_decode_matches_teacher_forced_chunk():
  """Step-by-step decode through an int4 cache equals one chunk forward whose K/V are
  quantized the same way (append_and_attend quantizes the chunk before attending)."""
  cfg = ModelConfig.gemma3_tiny()
  model = Gemma3ForCausalLM(cfg, rngs=nnx.Rngs(5))
  # The exact quantized-domain attention on both paths, in one summation order ("int8dot" rounds
  # queries and weights to two int8 levels by design); storage is the default SRFT / g=32 / 4-bit.
  quant = kvjax.QuantConfig()
  tokens = jnp.asarray(_prompts(cfg.vocab_size, (40,), seed=3))
  chunk_logits, _ = model(tokens, model.init_cache(1, 48, quant=quant), attention_impl="xla")
  caches = model.init_cache(1, 48, quant=quant)
  step = jax.jit(lambda m, t, c: m(t, c, attention_impl="xla"))
  rows = []
  for t in range(tokens.shape[1]):
    logits, caches = step(model, tokens[:, t:t + 1], caches)
    rows.append(logits)
  stepped = jnp.concatenate(rows, axis=1)
  err = jnp.abs(stepped - chunk_logits).max(-1) / jnp.abs(chunk_logits).max(-1)
  assert float(err.max()) < 1e-3, float(err.max())


def test_sampling_filters():
  rng = jax.random.key(0)
  logits = jax.random.normal(rng, (4, 50)) * 3
  greedy = sample_logits(logits, None, temperature=0.0, top_k=None, top_p=None)
  assert (greedy == jnp.argmax(logits, -1)).all()
  # top_k=1 and a tiny top_p leave only the argmax
  for kw in ({"top_k": 1, "top_p": None}, {"top_k": None, "top_p": 1e-6}):
    got = sample_logits(logits, jax.random.key(1), temperature=1.0, **kw)
    assert (got == greedy).all()
  # top_k=5: 200 draws per row never leave the 5 largest logits
  keys = jax.random.split(jax.random.key(2), 200)
  draws = jax.vmap(lambda k: sample_logits(logits, k, temperature=2.0, top_k=5, top_p=None))(keys)
  top5 = jax.lax.top_k(logits, 5)[1]
  assert (draws[:, :, None] == top5[None]).any(-1).all()
  # top_p=0.5: every drawn token lies in the smallest set of mass >= 0.5
  probs = jax.nn.softmax(logits, -1)
  order = jnp.argsort(-probs, -1)
  mass_before = jnp.cumsum(jnp.take_along_axis(probs, order, -1), -1) - jnp.take_along_axis(
      probs, order, -1)
  draws = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_k=None, top_p=0.5))(keys)
  for row in range(4):
    allowed = set(np.asarray(order[row])[np.asarray(mass_before[row]) < 0.5].tolist())
    assert set(np.asarray(draws[:, row]).tolist()) <= allowed
    assert len(set(np.asarray(draws[:, row]).tolist())) >= min(2, len(allowed))


def test_seeded_sampling_is_reproducible():
  model = Qwen2ForCausalLM(ModelConfig.qwen2_tiny(), rngs=nnx.Rngs(0))
  prompts = _prompts(model.config.vocab_size, (4, 6))
  a = generate_tokens(model, prompts, max_new_tokens=5, temperature=1.0, top_k=20,
                      rng=jax.random.key(7), eos_token_ids=())
  b = generate_tokens(model, prompts, max_new_tokens=5, temperature=1.0, top_k=20,
                      rng=jax.random.key(7), eos_token_ids=())
  assert a == b


def test_bad_inputs_raise_clear_errors(gemma):
  ok = _prompts(gemma.config.vocab_size, (10,))
  with pytest.raises(ValueError, match="longer than the cache"):
    generate_tokens(gemma, ok, max_new_tokens=4, max_len=8)
  with pytest.raises(ValueError, match="exceeds the cache"):
    generate_tokens(gemma, ok, max_new_tokens=10, max_len=16)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate_tokens(gemma, ok, max_new_tokens=0)
  with pytest.raises(ValueError, match="rng"):
    generate_tokens(gemma, ok, max_new_tokens=2, temperature=0.7)
  with pytest.raises(ValueError, match="at least one token"):
    generate_tokens(gemma, [[]], max_new_tokens=2)
  with pytest.raises(ValueError, match="outside"):
    generate_tokens(gemma, [[gemma.config.vocab_size]], max_new_tokens=2)
  with pytest.raises(ValueError, match="tokens must be"):
    gemma(jnp.zeros((3,), jnp.int32), gemma.init_cache(1, 8))


def test_prompt_bucket():
  assert [prompt_bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]


class _CharTokenizer:
  """Deterministic toy tokenizer: one id per character, BOS = 2."""

  def encode(self, text, *, add_bos=None):
    return ([2] if add_bos else []) + [3 + ord(ch) % 500 for ch in text]

  def decode(self, ids):
    return "".join(chr(97 + i % 26) for i in ids)


def test_text_generate_wraps_generate_tokens(gemma):
  from kvjax.models.generate import generate
  assert kvjax.generate is generate
  tokenizer = _CharTokenizer()
  prompts = ["hello", "a longer prompt"]
  texts = generate(gemma, tokenizer, prompts, max_new_tokens=5)
  ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
  tokens = generate_tokens(gemma, ids, max_new_tokens=5)
  eos = set(gemma.config.eos_token_ids)
  assert texts == [tokenizer.decode([t for t in seq if t not in eos]) for seq in tokens]
  with pytest.raises(ValueError, match="tokenizer"):
    generate(gemma, None, prompts, max_new_tokens=2)
