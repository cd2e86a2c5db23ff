"""The paged pool (kvjax.paged) against contiguous caches.

Three sequences of 1, 37 and 300 tokens, page size 16, pages handed out in a shuffled order; the
quantized format carries every correction kvjax has, with random per-head params (so the sink,
recent-value and offset state is real). Checks: stored codes, scales and correction state
bitwise equal to `kvjax.append`'s; attention over the pages (decode rows and a ragged mix of a
prefill chunk and decode rows) within 1e-5 per row of attention over the contiguous cache
(the same computation over another padding length); freeing a sequence and admitting a new one
into its pages leaves the others' outputs bitwise unchanged; a forked (shared-prefix) sequence
gives the outputs of an unshared copy.
"""

import copy
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kvjax
from kvjax import corrections as kc
from kvjax import paged

H, HQ, D, PS = 2, 4, 64, 16
LENGTHS = (1, 37, 300)


def quant_config():
  return kvjax.QuantConfig(corrections=(kc.KeyOffset(), kc.RotaryKeyOffset(4), kc.KeyFeedback(),
                                        kc.KeySink(), kc.ValueSink(), kc.RecentValues(window=4)))


def params(seed=0):
  rng = np.random.default_rng(seed)
  pairs, half = 4, D // 2
  return dict(
      key_lambda=rng.uniform(0.5, 2.0, (H, D)).astype(np.float32),
      params={"k_rope_freq": rng.uniform(0.05, 1.0, pairs).astype(np.float32),
              "k_rope_channels": np.stack([np.arange(pairs), np.arange(pairs) + half], 1),
              "k_rope_mean": rng.normal(size=(H, 2, pairs)).astype(np.float32),
              "k_feedback": np.triu(0.2 * rng.normal(size=(H, D, D)), 1).astype(np.float32),
              "k_mean": rng.normal(size=(H, D)).astype(np.float32)})


FORMATS = {"int4+corrections": lambda: (dict(quant=quant_config(), **params()), "quant"),
           "bf16": lambda: (dict(dtype=jnp.bfloat16), "dense")}


def kv(seed, b, t):
  k = jax.random.normal(jax.random.key(seed), (b, t, H, D)) * 2 + 0.5
  v = jax.random.normal(jax.random.key(seed + 1), (b, t, H, D))
  return k, v


def fill(fmt):
  """(contiguous cache, pool, allocator) after `_fill`: computed once per format; the caller
  gets its own allocator (the caches are immutable values)."""
  contiguous, pool, alloc = _fill(fmt)
  return contiguous, pool, copy.deepcopy(alloc)


@functools.lru_cache(maxsize=None)
def _fill(fmt, num_pages=64, seed=0):
  """The three sequences written in two ragged chunks, to a contiguous cache and to the pool."""
  kw, _ = FORMATS[fmt]()
  contiguous = kvjax.init_cache(3, H, 320, D, **kw)
  pool = paged.init_paged_cache(num_pages, PS, 4, H, D, **kw)
  alloc = paged.PageAllocator(num_pages, PS)
  rng = np.random.default_rng(seed)
  alloc.free_pages = list(rng.permutation(num_pages))        # shuffled page order
  first = np.array([1, 20, 250], np.int32)
  second = np.array(LENGTHS, np.int32) - first
  for i, n in enumerate((first, second)):
    k, v = kv(10 + i, 3, int(n.max()))
    contiguous = kvjax.append(contiguous, k, v, num_tokens=jnp.asarray(n), impl="xla")
    for s in range(3):
      alloc.extend(s, int(n[s]))
    pool = paged.write(pool, k, v, slot_ids=np.arange(3), page_table=alloc.table(range(3), 20),
                       num_tokens=jnp.asarray(n))
  return contiguous, pool, alloc


def stored(c, name, b, n):
  return np.asarray(getattr(c, name)[b, :, :n])


@pytest.mark.parametrize("fmt", FORMATS)
def test_pages_hold_the_contiguous_caches_codes_bitwise(fmt):
  contiguous, pool, alloc = fill(fmt)
  v = paged.view(pool, np.arange(3), alloc.table(range(3), 20))
  assert np.array_equal(np.asarray(v.lengths), LENGTHS)
  assert sorted(p for s in range(3) for p in alloc.pages[s]) != list(range(23))  # shuffled
  for name in pool.storage:
    for b, n in enumerate(LENGTHS):
      np.testing.assert_array_equal(stored(v, name, b, n), stored(contiguous, name, b, n))
  if fmt != "bf16":
    for c, want, got in zip(contiguous.config.corrections, contiguous.corrections,
                            pool.slots.corrections):
      for name in c.state:
        np.testing.assert_array_equal(np.asarray(got[name][:3]), np.asarray(want[name]))


def row_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.maximum(1.0, np.abs(want).max(axis=-1))
  return float((np.abs(got - want).max(axis=-1) / scale).max())


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_and_ragged_attention_over_pages_match_the_contiguous_cache(fmt):
  contiguous, pool, alloc = fill(fmt)
  table = alloc.table(range(3), 20)
  q = jax.random.normal(jax.random.key(5), (3, 1, HQ, D))
  want = kvjax.attend(q, contiguous, impl="xla")
  got = kvjax.attend(q, paged.view(pool, np.arange(3), table), impl="xla")
  assert row_error(got, want) <= 1e-5
  # Ragged: sequence 2's last 5 tokens as a prefill chunk, sequences 0 and 1 as decode rows,
  # packed in the order 1, 2, 0.
  order, q_lens = [1, 2, 0], [1, 5, 1]
  qs = jax.random.normal(jax.random.key(6), (sum(q_lens), HQ, D))
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  kv_lens = np.array([LENGTHS[s] for s in order], np.int32)
  got = paged.ragged_attention(qs, pool, kv_lens, table[order], cu, 3, slot_ids=np.array(order))
  for i, s in enumerate(order):
    rows = qs[cu[i]:cu[i + 1]]
    pos = LENGTHS[s] - q_lens[i] + np.arange(q_lens[i])
    ref = kvjax.attend(rows[None], _select(contiguous, s), q_positions=jnp.asarray(pos)[None],
                       impl="xla")[0]
    assert row_error(got[cu[i]:cu[i + 1]], ref) <= 1e-5, (fmt, s)


def _select(c, b):
  """Row b of a contiguous cache (a batch of one)."""
  def take(x):
    return x[b:b + 1] if x.ndim and x.shape[0] == 3 else x
  return jax.tree.map(take, c)


def test_freeing_and_admitting_leaves_the_other_sequences_bitwise_unchanged():
  contiguous, pool, alloc = fill("int4+corrections")
  q = jax.random.normal(jax.random.key(7), (3, 1, HQ, D))
  before = np.asarray(kvjax.attend(q, paged.view(pool, np.arange(3), alloc.table(range(3), 20)),
                                   impl="xla"))
  freed = set(alloc.pages[1])
  alloc.free(1)
  pool = paged.reset_slot(pool, 3)
  alloc.extend("new", 40)
  assert set(alloc.pages["new"]) <= freed                  # reuses the freed pages
  k, v = kv(30, 1, 40)
  pool = paged.write(pool, k, v, slot_ids=np.array([3]), page_table=alloc.table(["new"], 20))
  table = alloc.table([0, 2], 20)
  after = np.asarray(kvjax.attend(q[jnp.array([0, 2])], paged.view(pool, np.array([0, 2]), table),
                                  impl="xla"))
  np.testing.assert_array_equal(after, before[[0, 2]])


def test_a_shared_prefix_gives_the_outputs_of_an_unshared_copy():
  _, pool, alloc = fill("int4+corrections")
  # Sequence 2 (300 tokens: 18 full pages + 12 tokens) forks into slot 3; both continue
  # with different tokens. An unshared copy (slot 3 of a second pool, its own pages) is the
  # reference.
  copy = alloc.fork(2, "fork")
  assert copy is not None and alloc.refs[alloc.pages[2][0]] == 2
  pool = paged.copy_page(pool, *copy)
  pool = paged.reset_slot(pool, 3, like=2)
  ka, va = kv(40, 1, 8)
  kb, vb = kv(50, 1, 8)
  for seq, slot, (k, v) in ((2, 2, (ka, va)), ("fork", 3, (kb, vb))):
    alloc.extend(seq, 8)
    pool = paged.write(pool, k, v, slot_ids=np.array([slot]), page_table=alloc.table([seq], 20))
  assert alloc.pages[2][:18] == alloc.pages["fork"][:18]
  assert alloc.pages[2][18] != alloc.pages["fork"][18]
  q = jax.random.normal(jax.random.key(8), (2, 1, HQ, D))
  shared = kvjax.attend(q, paged.view(pool, np.array([2, 3]), alloc.table([2, "fork"], 20)),
                        impl="xla")
  # Unshared: the same two continuations written to a contiguous cache from scratch.
  contiguous, _, _ = fill("int4+corrections")
  two = _select(contiguous, 2)
  two = jax.tree.map(lambda a: jnp.concatenate([a, a]) if a.ndim and a.shape[0] == 1 else a, two)
  k = jnp.concatenate([ka, kb])
  v = jnp.concatenate([va, vb])
  two = kvjax.append(two, k, v, impl="xla")
  unshared = kvjax.attend(q, two, impl="xla")
  assert row_error(shared, unshared) <= 1e-5
  alloc.free(2)
  assert all(alloc.refs[p] == 1 for p in alloc.pages["fork"])


def test_allocator_refuses_what_does_not_fit_and_changes_nothing():
  alloc = paged.PageAllocator(4, 16)
  alloc.extend("a", 40)                                       # 3 pages
  with pytest.raises(MemoryError, match="pool is full"):
    alloc.extend("b", 20)                                     # needs 2, 1 free
  assert "b" not in alloc.pages and len(alloc.free_pages) == 1
  with pytest.raises(ValueError, match="max_pages"):
    alloc.table(["a"], 2)


def test_a_sliding_window_layer_releases_old_pages_and_attends_as_before():
  contiguous, pool, alloc = fill("int4+corrections")
  window = 64
  freed = alloc.release_outside_window(2, window)
  used = sum(-(-n // PS) for n in LENGTHS)                    # 1 + 3 + 19 pages
  assert len(freed) == (300 - window) // PS and len(alloc.free_pages) == 64 - used + len(freed)
  # The freed pages are reused (and overwritten) by another sequence.
  alloc.extend("other", len(freed) * PS)
  k, v = kv(60, 1, len(freed) * PS)
  pool = paged.reset_slot(pool, 3)
  pool = paged.write(pool, k, v, slot_ids=np.array([3]), page_table=alloc.table(["other"], 20))
  q = jax.random.normal(jax.random.key(9), (1, 1, HQ, D))
  got = kvjax.attend(q, paged.view(pool, np.array([2]), alloc.table([2], 20)), window=window,
                     impl="xla")
  want = kvjax.attend(q, _select(contiguous, 2), window=window, impl="xla")
  assert row_error(got, want) <= 1e-5
  alloc.free(2)
  assert all(alloc.refs[p] == 1 for p in alloc.pages["other"])


STEP_LENGTHS = (1, 37, 100)


def _model_layer_setup(page_size):
  """Three sequences (STEP_LENGTHS tokens) in a pool of `page_size`-token pages (shuffled) and
  in a contiguous cache; every correction."""
  kw, _ = FORMATS["int4+corrections"]()
  width = -(-(max(STEP_LENGTHS) + 1) // page_size)
  contiguous = kvjax.init_cache(3, H, width * page_size, D, **kw)
  pool = paged.init_paged_cache(3 * width + 2, page_size, 4, H, D, **kw)
  alloc = paged.PageAllocator(3 * width + 2, page_size)
  alloc.free_pages = list(np.random.default_rng(1).permutation(3 * width + 2))
  n = np.array(STEP_LENGTHS, np.int32)
  k, v = kv(10, 3, int(n.max()))
  contiguous = kvjax.append(contiguous, k, v, num_tokens=jnp.asarray(n), impl="xla")
  for s in range(3):
    alloc.extend(s, int(n[s]) + 1)                        # room for the next token
  table = alloc.table(range(3), width)
  pool = paged.write(pool, k, v, slot_ids=np.arange(3), page_table=table,
                     num_tokens=jnp.asarray(n))
  return contiguous, pool, table


def test_paged_batch_decode_step_equals_the_contiguous_step():
  """What a model layer calls: append_and_attend over a PagedBatch. Through the view (xla) the
  output and the stored codes equal the contiguous cache's bit for bit; in place (the fused
  write and decode kernels reading pages through the table, interpret mode) the codes equal
  the contiguous fused write's and the output is within the kernels' bound."""
  contiguous, pool, table = _model_layer_setup(32)
  q = jax.random.normal(jax.random.key(7), (3, 1, HQ, D))
  k, v = kv(20, 3, 1)
  bound = paged.PagedBatch(pool, jnp.arange(3, dtype=jnp.int32), jnp.asarray(table))
  for impl in ("xla", "pallas"):
    want, new_contiguous = kvjax.append_and_attend(contiguous, q, k, v, impl=impl)
    got, new_bound = kvjax.append_and_attend(bound, q, k, v, impl=impl)
    if impl == "xla":
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:
      assert row_error(got, want) <= 1e-4
    v_ = paged.view(new_bound.pool, np.arange(3), table)
    assert np.array_equal(np.asarray(v_.lengths), np.array(STEP_LENGTHS) + 1)
    for name in pool.storage:
      for b, n in enumerate(STEP_LENGTHS):
        np.testing.assert_array_equal(stored(v_, name, b, n + 1),
                                      stored(new_contiguous, name, b, n + 1))


def test_paged_decode_step_exported_for_tpu_and_cuda_holds_the_paged_kernel():
  """A decode step over pages exported for TPU or CUDA from this CPU host carries the fused
  write and the paged decode kernel (chosen when lowered, not from the tracing host's
  backend); exported for the CPU it carries neither."""
  _, pool, table = _model_layer_setup(32)
  bound = paged.PagedBatch(pool, jnp.arange(3, dtype=jnp.int32), jnp.asarray(table))
  q = jax.random.normal(jax.random.key(7), (3, 1, HQ, D))
  k, v = kv(20, 3, 1)
  step = jax.jit(lambda c, q, k, v: kvjax.append_and_attend(c, q, k, v, impl="auto"))
  text = jax.export.export(step, platforms=["tpu"])(bound, q, k, v).mlir_module()
  assert "paged_decode_attention_k4v4_g32" in text and "quantize_pack_int4" in text
  triton = "__gpu$xla.gpu.triton"
  text = jax.export.export(step, platforms=["cuda"], disabled_checks=[
      jax.export.DisabledSafetyCheck.custom_call(triton)])(bound, q, k, v).mlir_module()
  assert "paged_decode_attention_k4v4_g32" in text and triton in text
  cpu = jax.export.export(step, platforms=["cpu"], disabled_checks=[
      jax.export.DisabledSafetyCheck.custom_call("kvjax_quant_attention")])(bound, q, k, v)
  assert "tpu_custom_call" not in cpu.mlir_module()
