"""The continuous-batching engine (kvjax.models.engine) against kvjax.generate run alone.

Tiny random models (float32 weights): a 4-layer Llama and the 6-layer Gemma-3 layout with a
16-token sliding window. Real checkpoints are left out on purpose: a calibrated int4 cache
turns ulp-level differences (here: the float sums of an 8-row decode batch against a 1-row one)
into other tokens now and then (docs/sharding.md, "Why"), so "the same tokens" is a claim
about the computation, which tiny models check exactly.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

import kvjax
from kvjax.models import Gemma3ForCausalLM, LlamaForCausalLM, ModelConfig
from kvjax.models.engine import Engine, sample_rows
from kvjax.models.generate import generate_tokens

CHUNK = 256


def llama():
  return LlamaForCausalLM(ModelConfig.llama_tiny(), rngs=nnx.Rngs(0))


def gemma():
  return Gemma3ForCausalLM(ModelConfig.gemma3_tiny(), rngs=nnx.Rngs(3))


CACHES = {"bf16": dict(cache_dtype=jnp.bfloat16), "int4": dict(quant=kvjax.QuantConfig())}


def alone(model, engine, prompt, max_new, kw):
  """What kvjax.generate gives this request run by itself (same view length and chunking)."""
  return generate_tokens(model, [prompt], max_new_tokens=max_new, max_len=engine.view_len,
                         prefill_chunk=engine.prefill_chunk, eos_token_ids=sorted(engine.eos),
                         **kw)[0]


@pytest.mark.parametrize("cache", ["bf16", "int4"])
def test_32_requests_arriving_over_time_equal_generate_alone(cache):
  """32 requests, prompts of 16..2K tokens, output lengths 1..24, arriving over time into 8
  slots: every request's greedy tokens equal kvjax.generate's for it alone."""
  model, kw = llama(), CACHES[cache]
  rng = np.random.default_rng(1)
  lengths = np.concatenate([[16, 2048], rng.integers(16, 2049, 6), rng.integers(16, 300, 24)])
  rng.shuffle(lengths)
  prompts = [rng.integers(3, 512, n).tolist() for n in lengths]
  news = rng.integers(1, 25, len(prompts)).tolist()
  engine = Engine(model, num_pages=1200, page_size=16, max_slots=8, max_seq_len=2080,
                  prefill_chunk=CHUNK, **kw)
  arrivals = sorted(rng.integers(0, 120, len(prompts)).tolist())
  ids, step = {}, 0
  while len(ids) < len(prompts) or engine.has_work():
    while len(ids) < len(prompts) and arrivals[len(ids)] <= step:
      i = len(ids)
      ids[i] = engine.add_request(prompts[i], max_new_tokens=news[i])
    engine.step()
    step += 1
  assert engine.metrics()["pages_in_use"] == 0
  assert engine.metrics()["prefill_tokens"] == sum(lengths)
  differ = [i for i in ids
            if engine.requests[ids[i]].tokens != alone(model, engine, prompts[i], news[i], kw)]
  assert not differ, f"requests {differ} differ from generate alone"
  assert all(engine.requests[ids[i]].finish_reason in ("stop", "length") for i in ids)


@pytest.mark.parametrize("cache", ["int4"])
def test_sliding_window_model_equals_generate_alone(cache):
  """Gemma-3 layout: local layers mask their 16-token window over pages holding every position,
  where generate alone uses ring buffers; prompts cross several windows and chunks."""
  model, kw = gemma(), CACHES[cache]
  rng = np.random.default_rng(2)
  prompts = [rng.integers(3, 512, n).tolist() for n in (5, 130, 300, 17)]
  news = [12, 9, 6, 10]
  engine = Engine(model, num_pages=128, page_size=16, max_slots=4, max_seq_len=320,
                  prefill_chunk=64, **kw)
  ids = [engine.add_request(p, max_new_tokens=m) for p, m in zip(prompts, news)]
  out = engine.run()
  for rid, p, m in zip(ids, prompts, news):
    assert out[rid] == alone(model, engine, p, m, kw), rid


def test_preemption_when_pages_run_out():
  """A pool too small for every running sequence: the newest are preempted and recomputed,
  every request completes with its full length, and the tokens are those of generate alone
  (bf16 cache: the recomputed prefill stores the same bf16 keys and values)."""
  model, kw = llama(), CACHES["bf16"]
  rng = np.random.default_rng(3)
  prompts = [rng.integers(3, 512, n).tolist() for n in (40, 33, 60, 20, 45)]
  engine = Engine(model, num_pages=14, page_size=16, max_slots=4, max_seq_len=112,
                  prefill_chunk=32, eos_token_ids=(), **kw)
  ids = [engine.add_request(p, max_new_tokens=40) for p in prompts]
  out = engine.run()
  assert engine.counters["preemptions"] > 0
  assert engine.metrics()["pages_in_use"] == 0
  for rid, p in zip(ids, prompts):
    assert len(out[rid]) == 40
    assert out[rid] == alone(model, engine, p, 40, kw), rid


def test_free_and_admit_leave_others_unchanged_and_cancel():
  """Cancelling a running request frees its pages; a request admitted into them later and the
  requests running beside it produce what they produce without the cancelled one."""
  model, kw = llama(), CACHES["int4"]
  rng = np.random.default_rng(4)
  prompts = [rng.integers(3, 512, n).tolist() for n in (30, 50, 25)]

  engine = Engine(model, num_pages=16, page_size=16, max_slots=2, max_seq_len=128,
                  prefill_chunk=64, eos_token_ids=(), **kw)
  a = engine.add_request(prompts[0], max_new_tokens=30)
  b = engine.add_request(prompts[1], max_new_tokens=20)
  for _ in range(4):
    engine.step()
  held = set(engine.allocator.pages[a])
  engine.cancel(a)
  assert engine.requests[a].finish_reason == "cancelled"
  assert held <= set(engine.allocator.free_pages)           # its pages are free again
  c = engine.add_request(prompts[2], max_new_tokens=10)
  engine.step()
  assert engine.requests[c].slot == engine.slots.index(engine.requests[c])
  assert set(engine.allocator.pages[c]) & held               # c took some of a's pages
  out = engine.run()
  assert len(out[a]) < 30 and engine.metrics()["pages_in_use"] == 0
  assert out[b] == alone(model, engine, prompts[1], 20, kw)
  assert out[c] == alone(model, engine, prompts[2], 10, kw)
  assert engine.forget(a).finish_reason == "cancelled" and a not in engine.requests
  waiting = engine.add_request(prompts[0], max_new_tokens=1)
  with pytest.raises(ValueError, match="cancel it first"):
    engine.forget(waiting)


def test_sampling_is_per_request_and_batch_independent():
  """A sampled request gives the same tokens alone and among others (its keys come from its
  seed and token index); top_k=1 is greedy; different seeds differ."""
  model = llama()
  rng = np.random.default_rng(5)
  prompt = rng.integers(3, 512, 20).tolist()
  others = [rng.integers(3, 512, n).tolist() for n in (9, 31, 14)]

  def engine():
    return Engine(model, num_pages=64, page_size=16, max_slots=4, max_seq_len=64,
                  prefill_chunk=32, eos_token_ids=(), cache_dtype=jnp.bfloat16)

  e = engine()
  rid = e.add_request(prompt, max_new_tokens=16, temperature=1.0, seed=7)
  solo = e.run()[rid]
  e = engine()
  for o in others[:2]:
    e.add_request(o, max_new_tokens=16, temperature=0.7, top_p=0.9, seed=1)
  rid = e.add_request(prompt, max_new_tokens=16, temperature=1.0, seed=7)
  greedy = e.add_request(prompt, max_new_tokens=16, temperature=1.5, top_k=1, seed=3)
  other_seed = e.add_request(prompt, max_new_tokens=16, temperature=1.0, seed=8)
  out = e.run()
  assert out[rid] == solo
  assert out[greedy] == alone(model, e, prompt, 16, dict(cache_dtype=jnp.bfloat16))
  assert out[other_seed] != solo


def test_sample_rows_against_masks():
  """Per-row top-k / top-p: sampled tokens always lie inside each row's allowed set."""
  logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
  temp = jnp.array([1.0, 1.0, 0.8, 0.0])
  top_k = jnp.array([3, 0, 5, 0], jnp.int32)
  top_p = jnp.array([1.0, 0.5, 0.9, 1.0])
  allowed = np.zeros((4, 50), bool)
  order = np.argsort(-np.asarray(logits), axis=1)
  allowed[0, order[0, :3]] = True
  p1 = np.asarray(jax.nn.softmax(logits[1]))[order[1]]
  allowed[1, order[1, :np.searchsorted(np.cumsum(p1), 0.5) + 1]] = True
  # row 2: the top 5 at temperature 0.8, then the nucleus of 0.9 over their renormalised mass
  top5 = np.asarray(logits[2])[order[2, :5]] / 0.8
  p5 = np.exp(top5 - top5.max()) / np.exp(top5 - top5.max()).sum()
  allowed[2, order[2, :np.searchsorted(np.cumsum(p5), 0.9) + 1]] = True
  allowed[3, order[3, 0]] = True
  seen = np.zeros_like(allowed)
  for c in range(200):
    tok = np.asarray(sample_rows(logits, temp, top_k, top_p, jnp.arange(4, dtype=jnp.uint32),
                                 jnp.full((4,), c, jnp.int32)))
    seen[np.arange(4), tok] = True
  assert not (seen & ~allowed).any()
  assert seen[0].sum() == 3 and seen[1].sum() == allowed[1].sum()


def test_bad_input_is_refused_before_work():
  model = llama()
  with pytest.raises(ValueError, match="num_pages"):
    Engine(model, num_pages=0)
  with pytest.raises(ValueError, match="max_seq_len"):
    Engine(model, num_pages=4, page_size=16, max_seq_len=100)
  engine = Engine(model, num_pages=8, page_size=16, max_seq_len=64, cache_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="max_seq_len=64"):
    engine.add_request(list(range(3, 60)), max_new_tokens=10)
  with pytest.raises(ValueError, match="token ids outside"):
    engine.add_request([3, 512], max_new_tokens=1)
  with pytest.raises(ValueError, match="non-empty"):
    engine.add_request([], max_new_tokens=1)
  with pytest.raises(ValueError, match="max_new_tokens"):
    engine.add_request([3], max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    engine.add_request([3], max_new_tokens=1, temperature=1.0, top_p=0.0)
  assert not engine.has_work()
