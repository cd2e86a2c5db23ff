"""Continuous batching over a paged cache: requests join and leave the running batch at any step.

    engine = Engine(model, num_pages=512, page_size=32, max_slots=8)
    rid = engine.add_request(prompt_ids, max_new_tokens=64)
    while engine.has_work():
      for event in engine.step():          # (request id, token, finished, reason)
        ...

The model's every layer keeps one page pool (`kvjax.paged.PagedKVCache`, in the format of the
model's calibration by default, else `quant` or a dense cache); a request holds a slot (its
correction state and length) and a list of pages (`kvjax.paged.PageAllocator`). Each `step()`:

  1. admits waiting requests, first come first served, while a slot is free and the pool can
     hold the prompt (pages for the whole prompt are taken at admission);
  2. runs one prefill chunk (at most `prefill_chunk` tokens) of the oldest request still
     prefilling, so a long prompt holds running decodes back by one chunk per step at most; the
     chunk that completes the prompt samples the request's first token and `insert`s it into
     the decode batch;
  3. runs one decode step (`generate`) for every request in the decode batch: a page is taken
     for each sequence that filled its last one; when the pool is full the most recently
     admitted request is preempted (its pages and slot freed, queued again at the front to
     recompute prompt + tokens so far), never a crash and never another sequence's pages.

The method names follow JetStream's engine API (`prefill`, `insert`, `generate`, `free`), so a
JetStream-style orchestrator can drive the engine one call at a time; `step()` is that loop.
Shapes are fixed (decode: [max_slots, 1]; prefill: [1, bucket] for power-of-two buckets up to
`prefill_chunk`), so a server compiles a handful of programs once.

Every layer reads its pages through `kvjax.paged.PagedBatch`: on the CPU and GPU a contiguous
view of `max_seq_len` tokens per row and the contiguous cache's own attention; decode steps
lowered for TPU read the pages in place (fused paged kernel). So on the CPU a request's codes,
correction state and attention are those `kvjax.generate` computes for it alone with
`max_len=engine.view_len` and the same `prefill_chunk`: greedy tokens equal, bit for bit, up
to the float reductions of a larger batch (tests/test_engine.py). Sliding-window layers mask
the window over pages that keep the whole sequence (the page table is shared by all layers).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kvjax
from kvjax import paged
from kvjax.models.config import LOCAL
from kvjax.models.decoder import CausalLM, layer_layout
from kvjax.models.generate import prompt_bucket


# ------------------------------------------------------------------------------- pools and views


def init_pools(model: CausalLM, num_pages: int, page_size: int, num_slots: int, *,
               max_seq_len: int, quant: kvjax.QuantConfig | None = None, dtype=None,
               calibration=None):
  """One page pool per layer, laid out like `model.init_cache`'s caches (stacked per run).

  calibration (a Calibration or artifact directory; its tensors chosen for `max_seq_len`),
  quant or dtype pick the format as in `model.init_cache`. Returns {"groups": (PagedKVCache
  stacked [groups, run, ...], ...), "tail": (...)}.
  """
  if model.layout is not None:
    raise ValueError("paged pools are not sharded yet; run the engine on an unsharded model")
  if calibration is not None and calibration is not False:
    if quant is not None or dtype is not None:
      raise ValueError("give either calibration or quant / dtype, not both")
    from kvjax.models import calibrated
    template = calibrated.init_cache(model, num_slots, page_size, calibration,
                                     context=max_seq_len)
  else:
    template = model.init_cache(num_slots, page_size, quant=quant, dtype=dtype, _unplaced=True)
  return {part: tuple(paged.pool_like(c, num_pages, page_size) for c in template[part])
          for part in ("groups", "tail")}


def layer_windows(model: CausalLM):
  """Each run's sliding window (None for global layers), laid out like the pools."""
  cfg = model.config
  _, group_runs, tail_runs = layer_layout(cfg)
  w = lambda t: cfg.sliding_window if t == LOCAL else None
  return {"groups": tuple(w(t) for t, _, _ in group_runs),
          "tail": tuple(w(t) for t, _, _ in tail_runs)}


def bind(pools, windows, slot_ids, page_table):
  """The pools as the caches a model call takes: one `PagedBatch` per run, with the rows'
  slot ids [B] and page table [B, P] broadcast over the run's stacked layer axes."""
  def one(pool, window):
    lead = pool.slots.lengths.shape[:-1]
    return paged.PagedBatch(pool, jnp.broadcast_to(slot_ids, lead + slot_ids.shape),
                            jnp.broadcast_to(page_table, lead + page_table.shape), window)

  return {part: tuple(one(p, w) for p, w in zip(pools[part], windows[part]))
          for part in ("groups", "tail")}


def unbind(caches):
  return {part: tuple(c.pool for c in caches[part]) for part in ("groups", "tail")}


def sample_rows(logits, temperature, top_k, top_p, seeds, counters):
  """One token per row of logits [B, V] with per-row settings: temperature [B] (0: greedy),
  top_k [B] int (0: off), top_p [B] (1: off), and a key per row from seeds [B] and counters
  [B] (the request's token index), so a request samples the same tokens in any batch."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
  x = logits / t
  desc = -jnp.sort(-x, axis=-1)
  v = x.shape[-1]
  kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
  x = jnp.where((top_k[:, None] > 0) & (x < kth), -jnp.inf, x)
  desc = jnp.where((top_k[:, None] > 0) & (desc < kth), -jnp.inf, desc)
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  cut = jnp.min(jnp.where(before < top_p[:, None], desc, jnp.inf), axis=-1, keepdims=True)
  x = jnp.where((top_p[:, None] < 1.0) & (x < cut), -jnp.inf, x)
  keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
  sampled = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "windows", "impl"),
                   donate_argnames=("pools",))
def _forward(graphdef, state, pools, tokens, slot_ids, page_table, num_tokens, logits_at,
             sampling, windows, impl):
  model = nnx.merge(graphdef, state)
  caches = bind(pools, dict(windows), slot_ids, page_table)
  logits, caches = model(tokens, caches, num_tokens=num_tokens, logits_at=logits_at,
                         attention_impl=impl)
  return sample_rows(logits[:, 0], *sampling), unbind(caches)


@functools.partial(jax.jit, donate_argnames=("pools",))
def _reset(pools, slot):
  return jax.tree.map(lambda p: paged.reset_slot(p, slot), pools,
                      is_leaf=lambda x: isinstance(x, paged.PagedKVCache))


# ------------------------------------------------------------------------------------- requests


WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"


@dataclasses.dataclass
class Request:
  """A request and its progress. `tokens` are the generated ones; `context` is what the cache
  must hold before the next token (the prompt, plus the tokens so far after a preemption)."""

  id: int
  prompt: list
  max_new_tokens: int
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  seed: int = 0
  stop_token_ids: frozenset = frozenset()
  tokens: list = dataclasses.field(default_factory=list)
  context: list = dataclasses.field(default_factory=list)
  cached: int = 0
  slot: int | None = None
  state: str = WAITING
  finish_reason: str | None = None
  preemptions: int = 0
  admitted: int = -1
  arrival: float = 0.0
  first_token_time: float | None = None


@dataclasses.dataclass(frozen=True)
class Event:
  """A token for a request; `finished` with its reason ("stop", "length") on the last one."""

  request_id: int
  token: int
  finished: bool
  reason: str | None = None


class Engine:
  """Continuous batching over paged caches; see the module docstring.

  Args:
    model: a `CausalLM` (unsharded).
    num_pages, page_size: the pool of every layer: num_pages pages of page_size tokens (a
      multiple of 32 lets TPU decode steps read pages in place, `kvjax.paged`).
    max_slots: requests running at once (the decode batch).
    max_seq_len: longest sequence (prompt + generated) a request may reach; default the
      model's context or the pool's size, whichever is smaller. Every row's view covers
      `view_len` = max_seq_len rounded up to whole pages.
    prefill_chunk: most prompt tokens one prefill call writes.
    calibration: the calibrated int4 cache (default: `model.calibration`, as `load(...,
      calibration=...)` set it); False for `quant` / a dense cache.
    quant, cache_dtype: an uncalibrated quantized format, or the dense cache's dtype.
    attention_impl: as in `kvjax.generate`.
    eos_token_ids: tokens that end every request (default: the model config's).
  """

  def __init__(self, model: CausalLM, *, num_pages: int, page_size: int = 32,
               max_slots: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 512,
               calibration=None, quant: kvjax.QuantConfig | None = None, cache_dtype=None,
               attention_impl: str = "auto", eos_token_ids: Sequence[int] | None = None):
    if not isinstance(model, CausalLM):
      raise TypeError(f"model must be a kvjax.models.CausalLM, got {type(model).__name__}")
    for name, v in (("num_pages", num_pages), ("page_size", page_size),
                    ("max_slots", max_slots), ("prefill_chunk", prefill_chunk)):
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    from kvjax.attention import check_impl
    check_impl(attention_impl)
    limit = min(model.config.max_position_embeddings, num_pages * page_size)
    if max_seq_len is None:
      max_seq_len = limit
    elif not isinstance(max_seq_len, int) or not 1 <= max_seq_len <= limit:
      raise ValueError(f"max_seq_len must be an int in [1, {limit}] (the model's context and the "
                       f"pool's {num_pages} x {page_size} tokens), got {max_seq_len!r}")
    if calibration is None and quant is None and cache_dtype is None:
      calibration = getattr(model, "calibration", None)
    self.model = model
    self.page_size, self.num_pages, self.max_slots = page_size, num_pages, max_slots
    self.max_seq_len, self.prefill_chunk = max_seq_len, prefill_chunk
    self.max_pages = -(-max_seq_len // page_size)
    self.view_len = self.max_pages * page_size
    self.impl = attention_impl
    self.eos = frozenset(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    self._graphdef, self._state = nnx.split(model)
    self._windows = tuple(sorted(layer_windows(model).items()))
    # Calibration tensors for the view's length, as kvjax.generate(max_len=view_len) picks them.
    self._pool_args = dict(max_seq_len=self.view_len, quant=quant, dtype=cache_dtype,
                           calibration=calibration if calibration is not False else None)
    self.pools = init_pools(model, num_pages, page_size, max_slots, **self._pool_args)
    self.allocator = paged.PageAllocator(num_pages, page_size)
    self.requests: dict[int, Request] = {}
    self.waiting: collections.deque[Request] = collections.deque()
    self.slots: list[Request | None] = [None] * max_slots
    self._ids = itertools.count()
    self._admissions = itertools.count()
    self.counters = collections.Counter()

  # ------------------------------------------------------------------------------- requests

  def add_request(self, prompt: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                  stop_token_ids: Sequence[int] = ()) -> int:
    """Queues a request (token ids); returns its id. Checked now: a request that could never
    run (too long for max_seq_len or the whole pool, bad ids or settings) raises ValueError."""
    from kvjax.models.generate import _check_sampling
    vocab = self.model.config.vocab_size
    _check_sampling(temperature, top_k, top_p, seed, vocab)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
      raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    ids = np.asarray(prompt)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError("prompt must be a non-empty sequence of integer token ids")
    if ids.min() < 0 or ids.max() >= vocab:
      raise ValueError(f"prompt has token ids outside [0, {vocab})")
    need = ids.size + max_new_tokens
    if need > self.max_seq_len:
      raise ValueError(f"prompt of {ids.size} tokens + max_new_tokens={max_new_tokens} = {need} "
                       f"exceeds the engine's max_seq_len={self.max_seq_len}")
    rid = next(self._ids)
    prompt = [int(t) for t in ids]
    req = Request(rid, prompt, max_new_tokens, float(temperature), top_k, top_p, seed,
                  frozenset(int(t) for t in stop_token_ids), context=list(prompt),
                  arrival=time.perf_counter())
    self.requests[rid] = req
    self.waiting.append(req)
    return rid

  def cancel(self, request_id: int) -> None:
    """Stops a request (waiting or running) and frees what it holds."""
    req = self.requests[request_id]
    if req.state == DONE:
      return
    if req in self.waiting:
      self.waiting.remove(req)
    self._release(req)
    req.state, req.finish_reason = DONE, "cancelled"

  def reset(self) -> None:
    """Drops every request and starts from empty pools (after a failed step, whose donated
    buffers may be gone)."""
    self.pools = init_pools(self.model, self.num_pages, self.page_size, self.max_slots,
                            **self._pool_args)
    self.allocator = paged.PageAllocator(self.num_pages, self.page_size)
    self.requests.clear()
    self.waiting.clear()
    self.slots = [None] * self.max_slots

  def forget(self, request_id: int) -> Request:
    """Drops a finished request's record (a long-running server calls this for each one, so the
    engine holds only live requests); returns it."""
    req = self.requests[request_id]
    if req.state != DONE:
      raise ValueError(f"request {request_id} is {req.state}; cancel it first")
    return self.requests.pop(request_id)

  def has_work(self) -> bool:
    return bool(self.waiting) or any(r is not None for r in self.slots)

  def metrics(self) -> dict:
    """Counts a server reports: requests waiting / prefilling / decoding, pages in use, tokens
    generated and prefilled, preemptions, steps."""
    running = [r for r in self.slots if r is not None]
    return dict(waiting=len(self.waiting),
                prefilling=sum(r.state == PREFILL for r in running),
                decoding=sum(r.state == DECODE for r in running),
                pages_in_use=self.num_pages - len(self.allocator.free_pages),
                pages_total=self.num_pages, **self.counters)

  def cache_bytes(self) -> int:
    """Bytes of every layer's pages and slot state (the engine's KV memory)."""
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self.pools)))

  # ------------------------------------------------------------------ JetStream-style calls

  def _admit(self) -> None:
    while self.waiting and None in self.slots:
      req = self.waiting[0]
      if not self.allocator.can_fit(req.id, len(req.context)):
        return
      self.waiting.popleft()
      self.allocator.extend(req.id, len(req.context))
      req.slot = self.slots.index(None)
      self.slots[req.slot] = req
      req.state, req.cached, req.admitted = PREFILL, 0, next(self._admissions)
      self.pools = _reset(self.pools, req.slot)

  def _sampling(self, rows):
    pick = lambda f, off, dt: np.array([off if r is None or f(r) is None else f(r) for r in rows],
                                       dt)
    return (pick(lambda r: r.temperature, 0.0, np.float32),
            pick(lambda r: r.top_k, 0, np.int32),
            pick(lambda r: r.top_p, 1.0, np.float32),
            pick(lambda r: r.seed, 0, np.uint32),
            pick(lambda r: len(r.tokens), 0, np.int32))

  def _run(self, tokens, rows, num_tokens, logits_at):
    # Decode rows are the slots in order (row i is slot i, running or not); a prefill row is
    # its request's slot.
    slot_ids = np.array([r.slot if r is not None else i for i, r in enumerate(rows)], np.int32)
    table = np.zeros((len(rows), self.max_pages), np.int32)
    for i, r in enumerate(rows):
      if r is not None:
        table[i] = self.allocator.table([r.id], self.max_pages)[0]
    out, self.pools = _forward(self._graphdef, self._state, self.pools, jnp.asarray(tokens),
                               jnp.asarray(slot_ids), jnp.asarray(table),
                               jnp.asarray(num_tokens, jnp.int32),
                               jnp.asarray(logits_at, jnp.int32),
                               tuple(jnp.asarray(a) for a in self._sampling(rows)),
                               self._windows, self.impl)
    return np.asarray(out)

  def prefill(self, request_id: int) -> int | None:
    """Writes the next chunk of the request's prompt (at most `prefill_chunk` tokens) into its
    pages; returns its first token when the chunk completes the prompt, else None."""
    req = self.requests[request_id]
    if req.state != PREFILL:
      raise ValueError(f"request {request_id} is {req.state}, not prefilling")
    remaining = len(req.context) - req.cached
    n = min(self.prefill_chunk, remaining)
    t = min(self.prefill_chunk, prompt_bucket(remaining))
    tokens = np.zeros((1, t), np.int32)
    tokens[0, :n] = req.context[req.cached:req.cached + n]
    out = self._run(tokens, [req], [n], [n - 1])
    req.cached += n
    self.counters["prefill_tokens"] += n
    return int(out[0]) if req.cached == len(req.context) else None

  def insert(self, request_id: int, token: int) -> Event:
    """Puts a prefilled request into the decode batch with its newly sampled `token`."""
    req = self.requests[request_id]
    if req.state != PREFILL or req.cached != len(req.context):
      raise ValueError(f"request {request_id} has not finished its prefill")
    req.state = DECODE
    return self._emit(req, token)

  def generate(self) -> list[Event]:
    """One decode step of every request in the decode batch; returns their tokens."""
    active = [r for r in self.slots if r is not None and r.state == DECODE]
    for req in sorted(active, key=lambda r: r.admitted):
      if req.state == DECODE:
        self._reserve(req)
    rows = [r if r is not None and r.state == DECODE else None for r in self.slots]
    if not any(rows):
      return []
    tokens = np.array([[r.tokens[-1] if r is not None else 0] for r in rows], np.int32)
    mask = [int(r is not None) for r in rows]
    out = self._run(tokens, rows, mask, [0] * len(rows))
    self.counters["decode_steps"] += 1
    events = []
    for r, tok in zip(rows, out):
      if r is not None:
        r.cached += 1
        events.append(self._emit(r, int(tok)))
    return events

  def free(self, request_id: int) -> None:
    """Releases the request's slot and pages (JetStream's free_resource); a request still
    running is cancelled."""
    self.cancel(request_id)

  def step(self) -> list[Event]:
    """Admit, one prefill chunk, one decode step; returns the tokens produced."""
    self._admit()
    events = []
    prefilling = [r for r in self.slots if r is not None and r.state == PREFILL]
    if prefilling:
      req = min(prefilling, key=lambda r: r.admitted)
      token = self.prefill(req.id)
      if token is not None:
        events.append(self.insert(req.id, token))
    events += self.generate()
    self.counters["steps"] += 1
    return events

  def run(self) -> dict[int, list[int]]:
    """Steps until every request is done; returns {request id: generated tokens}."""
    while self.has_work():
      self.step()
    return {rid: r.tokens for rid, r in self.requests.items()}

  # -------------------------------------------------------------------------------- internal

  def _reserve(self, req: Request) -> None:
    """A page for req's next token, preempting the most recently admitted requests when the
    pool is full (possibly req itself)."""
    while not self.allocator.can_fit(req.id, 1):
      victim = max((r for r in self.slots if r is not None), key=lambda r: r.admitted)
      self._preempt(victim)
      if victim is req:
        return
    self.allocator.extend(req.id, 1)

  def _release(self, req: Request) -> None:
    """Gives back the request's slot and pages."""
    if req.slot is None:
      return
    self.allocator.free(req.id)
    self.slots[req.slot] = None
    req.slot = None

  def _preempt(self, req: Request) -> None:
    self._release(req)
    req.context = req.prompt + req.tokens
    req.cached, req.state = 0, WAITING
    req.preemptions += 1
    self.counters["preemptions"] += 1
    self.waiting.appendleft(req)

  def _emit(self, req: Request, token: int) -> Event:
    req.tokens.append(token)
    if req.first_token_time is None:
      req.first_token_time = time.perf_counter()
    self.counters["tokens_generated"] += 1
    reason = ("stop" if token in self.eos or token in req.stop_token_ids
              else "length" if len(req.tokens) >= req.max_new_tokens else None)
    if reason is not None:
      self._release(req)
      req.state, req.finish_reason = DONE, reason
    return Event(req.id, token, reason is not None, reason)
