"""A paged KV cache: a pool of fixed-size pages shared by every sequence, addressed by page tables.

Serving stacks (vLLM's tpu-inference, JetStream) keep one pool of pages per layer and give each
request a list of pages, so requests can arrive, grow, share a prefix and leave without moving
anyone else's tokens. `PagedKVCache` is that pool for every kvjax format:

  pages:  {"k", "v"} (dense) or {"k_codes", "k_scales", "v_codes", "v_scales"} (quantized), each
          [num_pages, kv_heads, page_size, ...]: page p holds page_size consecutive tokens of
          one sequence, stored exactly as a contiguous cache stores them (`docs/cache_layout.md`).
  slots:  a `DenseKVCache` / `QuantizedKVCache` with no token storage, one row per slot (a
          running request): lengths, and the quantized cache's basis (rotations, λ) and
          corrections (per-layer params; per-slot state such as the exact sink key).

A sequence is (slot id, row of the page table): token t of it lives in page
`page_table[t // page_size]` at offset `t % page_size`. `write` encodes new tokens with the
contiguous cache's own `encode` (same codes, same correction state, bit for bit) and scatters
them into their pages; `view` gathers sequences' pages back into a contiguous cache, over which
every kvjax attention path runs unchanged; `ragged_attention` is the serving interface (queries
packed across sequences, `kv_lens`, `page_indices`, `cu_q_lens`, `num_seqs`) on top of that.
`PageAllocator` hands out pages on the host: allocation, release (of a whole sequence, or of the
pages a sliding-window layer will not read again), and prefixes shared by reference count with
the last, partly filled page copied (copy-on-write at the first page two sequences would both
write).

Decode steps on TPU and GPU read pages in place: the fused decode kernels take the page table
(scalar-prefetched on TPU, one page per grid step; a table row per program on GPU) and load each
page where it lies (`PagedBatch`, `append_and_attend`). Prefill chunks and the CPU read through
`view` (a gather of the rows' pages); a ragged paged prefill kernel is still to write.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as cache_lib
from kvjax.cache import DenseKVCache, QuantizedKVCache
from kvjax.config import QuantConfig

DENSE_STORAGE = ("k", "v")
QUANT_STORAGE = ("k_codes", "k_scales", "v_codes", "v_scales")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """Pages of K/V (or codes and scales) and the per-slot state; see the module docstring."""

  pages: dict
  slots: cache_lib.KVCache
  page_size: int = dataclasses.field(metadata=dict(static=True))

  @property
  def num_pages(self) -> int:
    return next(iter(self.pages.values())).shape[0]

  @property
  def num_slots(self) -> int:
    return self.slots.lengths.shape[0]

  @property
  def num_kv_heads(self) -> int:
    return next(iter(self.pages.values())).shape[1]

  @property
  def storage(self) -> tuple[str, ...]:
    return QUANT_STORAGE if isinstance(self.slots, QuantizedKVCache) else DENSE_STORAGE


def init_paged_cache(num_pages: int, page_size: int, num_slots: int, num_kv_heads: int,
                     head_dim: int, *, quant: QuantConfig | None = None, dtype=jnp.bfloat16,
                     **params) -> PagedKVCache:
  """An empty pool of `num_pages` pages of `page_size` tokens for up to `num_slots` sequences.

  quant, dtype and params (key_rotation, value_rotation, key_lambda, value_lambda, params) are
  `kvjax.init_cache`'s: the pool stores what a contiguous cache of that format stores.
  """
  for name, v in (("num_pages", num_pages), ("page_size", page_size), ("num_slots", num_slots)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  template = cache_lib.init_cache(num_slots, num_kv_heads, page_size, head_dim, quant=quant,
                                  dtype=dtype, **params)
  return pool_like(template, num_pages, page_size)


def pool_like(template: cache_lib.KVCache, num_pages: int, page_size: int) -> PagedKVCache:
  """An empty pool of `num_pages` pages storing what `template` (a contiguous cache, possibly
  stacked on leading layer axes [L..., B, H, S, ...]) stores, with its basis, corrections'
  params and one slot per batch row. Stacked templates give pools stacked the same way (what a
  model's scanned layers carry: `kvjax.models.engine.init_pools`)."""
  if not isinstance(template, (DenseKVCache, QuantizedKVCache)):
    raise TypeError(f"template must be a kvjax DenseKVCache or QuantizedKVCache, got "
                    f"{type(template).__name__}")
  for name, v in (("num_pages", num_pages), ("page_size", page_size)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  lead = template.lengths.ndim - 1                         # stacked layer axes
  names = QUANT_STORAGE if isinstance(template, QuantizedKVCache) else DENSE_STORAGE
  pages = {}
  for n in names:
    a = getattr(template, n)                              # [L..., B, H, S, ...]
    shape = a.shape[:lead] + (num_pages, a.shape[lead + 1], page_size) + a.shape[lead + 3:]
    pages[n] = jnp.zeros(shape, a.dtype)
  empty = {n: jax.lax.slice_in_dim(getattr(template, n), 0, 0, axis=lead + 2) for n in names}
  slots = dataclasses.replace(template, capacity=0, window=None, ring=False, **empty)
  return PagedKVCache(pages=pages, slots=slots, page_size=page_size)


def _rows(pool: PagedKVCache, slot_ids, capacity: int, storage: dict):
  """The slots' state as a contiguous cache of `capacity` tokens holding `storage`."""
  s = pool.slots
  fields = dict(lengths=s.lengths[slot_ids], overflow=jnp.zeros(slot_ids.shape, bool))
  if isinstance(s, QuantizedKVCache):
    fields["corrections"] = tuple(
        {n: (a[slot_ids] if n in c.state else a) for n, a in arrays.items()}
        for c, arrays in zip(s.config.corrections, s.corrections))
  return dataclasses.replace(s, capacity=capacity, window=None, ring=False, **storage, **fields)


def _check_tables(pool: PagedKVCache, slot_ids, page_table):
  slot_ids, page_table = jnp.asarray(slot_ids), jnp.asarray(page_table)
  if slot_ids.ndim != 1 or not jnp.issubdtype(slot_ids.dtype, jnp.integer):
    raise ValueError(f"slot_ids must be integer [batch], got {slot_ids.dtype}{list(slot_ids.shape)}")
  if (page_table.ndim != 2 or page_table.shape[0] != slot_ids.shape[0]
      or not jnp.issubdtype(page_table.dtype, jnp.integer)):
    raise ValueError(f"page_table must be integer [batch={slot_ids.shape[0]}, pages], got "
                     f"{page_table.dtype}{list(page_table.shape)}")
  return slot_ids.astype(jnp.int32), page_table.astype(jnp.int32)


def view(pool: PagedKVCache, slot_ids, page_table, *, window: int | None = None
         ) -> cache_lib.KVCache:
  """The sequences (slot_ids [B], page_table [B, P]) as a contiguous cache of P * page_size
  tokens: their pages gathered in order, their slots' lengths and correction state. Every
  `kvjax.attend` path runs over it. window: the sliding window its attention masks to (a
  plain, non-ring cache: pages hold every position)."""
  slot_ids, page_table = _check_tables(pool, slot_ids, page_table)
  b, p = page_table.shape
  storage = {}
  for n, buf in pool.pages.items():
    g = buf[page_table]                                   # [B, P, H, page, ...]
    g = jnp.moveaxis(g, 2, 1)                             # [B, H, P, page, ...]
    storage[n] = g.reshape((b, g.shape[1], p * pool.page_size) + g.shape[4:])
  return dataclasses.replace(_rows(pool, slot_ids, p * pool.page_size, storage), window=window)


def _scatter(pool: PagedKVCache, page_table, positions, written, arrays: dict) -> dict:
  """Pages with arrays[n] [B, T, H, ...] stored at token positions [B, T] of each row's pages
  where `written` [B, T]; other tokens are dropped."""
  pos = jnp.where(written, positions, 0)
  page = jnp.take_along_axis(page_table, pos // pool.page_size, axis=1)
  page = jnp.where(written, page, pool.num_pages)         # out of range: dropped
  offset = pos % pool.page_size
  return {n: buf.at[page, :, offset].set(arrays[n].astype(buf.dtype), mode="drop")
          for n, buf in pool.pages.items()}


def _with_rows(pool: PagedKVCache, slot_ids, lengths, corrections, overflow=None) -> PagedKVCache:
  """The pool's slots with rows `slot_ids` holding these lengths and correction state."""
  s = pool.slots
  fields = dict(lengths=s.lengths.at[slot_ids].set(lengths))
  if overflow is not None:
    fields["overflow"] = s.overflow.at[slot_ids].set(s.overflow[slot_ids] | overflow)
  if isinstance(s, QuantizedKVCache):
    fields["corrections"] = tuple(
        {n: (a.at[slot_ids].set(new[n]) if n in c.state else a) for n, a in arrays.items()}
        for c, arrays, new in zip(s.config.corrections, s.corrections, corrections))
  return dataclasses.replace(pool, slots=dataclasses.replace(s, **fields))


def write(pool: PagedKVCache, k: jax.Array, v: jax.Array, *, slot_ids, page_table,
          num_tokens=None, impl: str = "xla") -> PagedKVCache:
  """Appends k, v [B, T, H, D] to the sequences (slot_ids [B], page_table [B, P]); returns the
  new pool. Only the first num_tokens[b] tokens of row b are written (ragged chunks). The codes,
  scales and correction state are those `kvjax.append` gives a contiguous cache, bit for bit.
  Tokens past P * page_size are refused outside jit (ValueError) and dropped under jit."""
  slot_ids, page_table = _check_tables(pool, slot_ids, page_table)
  return _encode_into_pages(pool, k, v, slot_ids, page_table, num_tokens, impl)[0]


def _encode_into_pages(pool, k, v, slot_ids, page_table, num_tokens, impl):
  """(new pool, the encoded chunk, the rows' state before it as a storage-less contiguous
  cache): the new tokens encoded as a contiguous cache of the table's length encodes them and
  scattered into their pages, the slots' lengths and correction state updated."""
  b, p = page_table.shape
  empty = {n: jnp.zeros((b,) + a.shape[1:2] + (0,) + a.shape[3:], a.dtype)
           for n, a in pool.pages.items()}
  rows = _rows(pool, slot_ids, p * pool.page_size, empty)
  chunk = cache_lib.encode(rows, k, v, num_tokens=num_tokens, impl=impl)
  written = chunk.slots < p * pool.page_size              # [B, T]: token lands in the cache
  pages = _scatter(pool, page_table, chunk.slots, written, chunk.arrays)
  new = _with_rows(dataclasses.replace(pool, pages=pages), slot_ids, chunk.new_lengths,
                   chunk.corrections, overflow=chunk.new_overflow)
  return new, chunk, rows


def reset_slot(pool: PagedKVCache, slot: int, *, like: int | None = None) -> PagedKVCache:
  """The pool with `slot` emptied (length 0, correction state zero) or, with `like`, holding a
  copy of slot `like`'s length and state (a forked sequence). Works on stacked pools too."""
  s = pool.slots
  lead = (slice(None),) * (s.lengths.ndim - 1)           # stacked layer axes

  def one(a, fresh):
    return a.at[lead + (slot,)].set(a[lead + (like,)] if like is not None else fresh)

  fields = dict(lengths=one(s.lengths, 0), overflow=one(s.overflow, False))
  if isinstance(s, QuantizedKVCache):
    fields["corrections"] = tuple(
        {n: (one(a, 0) if n in c.state else a) for n, a in arrays.items()}
        for c, arrays in zip(s.config.corrections, s.corrections))
  return dataclasses.replace(pool, slots=dataclasses.replace(s, **fields))


def copy_page(pool: PagedKVCache, src: int, dst: int) -> PagedKVCache:
  """The pool with page `dst` a copy of page `src` (copy-on-write)."""
  return dataclasses.replace(pool, pages={n: b.at[dst].set(b[src]) for n, b in pool.pages.items()})


def ragged_attention(q: jax.Array, pool: PagedKVCache, kv_lens, page_indices, cu_q_lens,
                     num_seqs, *, slot_ids, sliding_window: int | None = None,
                     soft_cap: float | None = None, scale: float | None = None,
                     impl: str = "xla") -> jax.Array:
  """Attention for queries packed across sequences, over their pages (the serving interface).

  Args:
    q: [T, Hq, D]: sequence s's query tokens are rows cu_q_lens[s] .. cu_q_lens[s+1] - 1; they
      are its last tokens (already written), at positions kv_lens[s] - q_len .. kv_lens[s] - 1.
      A prefill chunk has many, a decode row one; both mix in one call.
    pool: the layer's pool; kv_lens [S] int32 (tokens of each sequence, these queries' own
      included); page_indices [S, P]; cu_q_lens [S + 1]; num_seqs: the first num_seqs rows are
      real; slot_ids [S]: each sequence's slot (its correction state).
    sliding_window, soft_cap, scale: the layer's mask window, logit soft cap and scale.
  Returns [T, Hq, D] in q's dtype; rows of no sequence are zeros.
  """
  from kvjax import attention
  t = q.shape[0]
  kv_lens = jnp.asarray(kv_lens, jnp.int32)
  cu = jnp.asarray(cu_q_lens, jnp.int32)
  real = jnp.arange(kv_lens.shape[0]) < num_seqs
  q_lens = jnp.where(real, cu[1:] - cu[:-1], 0)                        # [S]
  j = jnp.arange(t, dtype=jnp.int32)[None, :]
  rows = cu[:-1, None] + j                                             # [S, T] packed row
  valid = j < q_lens[:, None]
  qs = jnp.where(valid[..., None, None], q[jnp.clip(rows, 0, t - 1)], 0)   # [S, T, Hq, D]
  q_pos = kv_lens[:, None] - q_lens[:, None] + j
  c = dataclasses.replace(view(pool, slot_ids, page_indices), lengths=kv_lens)
  out = attention.attend(qs, c, scale=scale, softcap=soft_cap, window=sliding_window,
                         q_positions=jnp.where(valid, q_pos, 0), impl=impl)
  out = jnp.where(valid[..., None, None], out, 0)
  packed = jnp.zeros_like(q)
  return packed.at[jnp.where(valid, rows, t)].set(out, mode="drop")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedBatch:
  """A layer's pool bound to the sequences of one model call: what a model layer receives in
  place of a contiguous cache (`kvjax.append_and_attend` accepts it).

  pool: the layer's `PagedKVCache`; slot_ids int32 [B]: each row's slot; page_table int32
  [B, P]: each row's pages (P * page_size tokens of view); window: the layer's sliding window
  (a mask over pages that hold every position), None for global layers. The three arrays may
  carry leading stacked layer axes (a model's scanned runs), sliced by the scan like a cache's.
  """

  pool: PagedKVCache
  slot_ids: jax.Array
  page_table: jax.Array
  window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def lengths(self) -> jax.Array:
    """int32 [..., B]: tokens written so far by each row's sequence."""
    return jnp.take_along_axis(self.pool.slots.lengths, self.slot_ids, axis=-1)


def append_and_attend(cache: PagedBatch, q, k, v, *, scale=None, softcap=None, num_tokens=None,
                      impl: str = "auto"):
  """`kvjax.append_and_attend` over pages: the rows' pages viewed as a contiguous cache, the
  contiguous cache's own append_and_attend (so the codes, correction state and attention are
  those of a contiguous cache of P * page_size tokens, bit for bit), and the new tokens and
  state stored back into the pages and slots. Returns (out [B, T, Hq, D], new PagedBatch).

  Decode steps over a quantized pool never gather on TPU and GPU: impl "auto" lowers there to
  the fused write kernel, a scatter into the token's page and the decode kernel reading pages
  in place through the table (`kvjax.pallas_kernels.decode_attention(page_table=)`; pages of
  a multiple of 32 tokens for TPU, a power of two >= 16 for GPU); "pallas" runs that path on
  the default backend (interpret mode on the CPU). Everything else (prefill chunks, dense
  pools, the CPU) goes through the view, whose cost is one gather of every page in the table
  per layer per step."""
  if not isinstance(cache, PagedBatch):
    raise TypeError(f"cache must be a PagedBatch, got {type(cache).__name__}")
  pool = cache.pool
  slot_ids, page_table = _check_tables(pool, cache.slot_ids, cache.page_table)
  decode = isinstance(pool.slots, QuantizedKVCache) and q.shape[1] == 1
  ps = pool.page_size
  # The kernels' page constraints: TPU int8 tiles of 32 rows; GPU power-of-two tiles >= 16.
  fits = {"tpu": ps % 32 == 0 or page_table.shape[1] == 1, "gpu": ps >= 16 and not ps & (ps - 1)}
  in_place = lambda backend: lambda: _decode_in_place(
      cache, q, k, v, scale=scale, softcap=softcap, num_tokens=num_tokens, backend=backend)
  through_view = lambda: _through_view(cache, q, k, v, scale=scale, softcap=softcap,
                                       num_tokens=num_tokens, impl=impl)
  from kvjax.pallas_kernels import tuning
  if decode and impl == "pallas" and fits[tuning.resolve_backend(None)]:
    return in_place(None)()
  if decode and impl == "auto" and (fits["tpu"] or fits["gpu"]):
    # Chosen when the step is lowered: on TPU and CUDA the kernels read pages in place;
    # elsewhere (the CPU) the gathered view.
    branches = {p: in_place(b) for p, b in (("tpu", "tpu"), ("cuda", "gpu")) if fits[b]}
    return jax.lax.platform_dependent(**branches, default=through_view)
  return through_view()


def _through_view(cache: PagedBatch, q, k, v, *, scale, softcap, num_tokens, impl):
  """append_and_attend over the rows' pages gathered into a contiguous cache."""
  from kvjax import attention
  pool = cache.pool
  slot_ids, page_table = _check_tables(pool, cache.slot_ids, cache.page_table)
  contiguous = view(pool, slot_ids, page_table, window=cache.window)
  out, new = attention.append_and_attend(contiguous, q, k, v, scale=scale, softcap=softcap,
                                         num_tokens=num_tokens, impl=impl)
  t = q.shape[1]
  positions = contiguous.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  written = positions < new.lengths[:, None]
  b_idx = jnp.arange(positions.shape[0], dtype=jnp.int32)[:, None]
  safe = jnp.where(written, positions, 0)
  arrays = {n: getattr(new, n)[b_idx, :, safe] for n in pool.pages}     # [B, T, H, ...]
  pool = dataclasses.replace(pool, pages=_scatter(pool, page_table, positions, written, arrays))
  corrections = new.corrections if isinstance(new, QuantizedKVCache) else ()
  pool = _with_rows(pool, slot_ids, new.lengths, corrections, overflow=new.overflow)
  return out, dataclasses.replace(cache, pool=pool)


def _decode_in_place(cache: PagedBatch, q, k, v, *, scale, softcap, num_tokens, backend):
  """A decode step that never gathers: the token is encoded (the fused write kernel under
  "pallas" / on TPU) and scattered into its page, then the fused decode kernel reads the
  pages through the table (`kvjax.pallas_kernels.decode_attention(page_table=)`)."""
  from kvjax import _pallas_dispatch, attention
  pool = cache.pool
  slot_ids, page_table = _check_tables(pool, cache.slot_ids, cache.page_table)
  new_pool, chunk, rows = _encode_into_pages(pool, k, v, slot_ids, page_table, num_tokens,
                                             "pallas" if backend is None else "auto")
  scale = attention._resolve(q, rows, scale, None, "auto")[0]
  over_pages = dataclasses.replace(rows, lengths=chunk.new_lengths,
                                   corrections=chunk.corrections, **new_pool.pages)
  out = _pallas_dispatch.decode(q, over_pages, scale=scale, softcap=softcap,
                                window=cache.window, pending=chunk.pending, backend=backend,
                                page_table=page_table)
  return out, dataclasses.replace(cache, pool=new_pool)


def _attend_bound(q, cache: PagedBatch, *, scale=None, softcap=None, window=None,
                  q_positions=None):
  from kvjax import attention
  c = view(cache.pool, cache.slot_ids, cache.page_table, window=cache.window)
  return attention.attend(q, c, scale=scale, softcap=softcap, window=window,
                          q_positions=q_positions)


def _register():
  from kvjax import attention
  attention.register_cache_type(PagedBatch, attend=_attend_bound,
                                append_and_attend=append_and_attend)


_register()


class PageAllocator:
  """Host-side bookkeeping of a pool's pages: which sequence holds which pages, reference counts
  for shared prefixes, free list. Device work (copying a page, resetting a slot) is returned
  to the caller as what to do, so the pool stays a pure value.

  Sequences are named by any hashable id; each holds a list of pages in token order.
  """

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 1 or page_size < 1:
      raise ValueError(f"num_pages and page_size must be positive, got {num_pages}, {page_size}")
    self.page_size = page_size
    self.free_pages = list(range(num_pages - 1, -1, -1))   # pop() hands out low pages first
    self.refs = np.zeros(num_pages, np.int32)
    self.pages: dict = {}
    self.lengths: dict = {}

  def _take(self) -> int:
    if not self.free_pages:
      raise MemoryError("the page pool is full: free a sequence or queue the request")
    page = self.free_pages.pop()
    self.refs[page] = 1
    return page

  def can_fit(self, seq, new_tokens: int) -> bool:
    length = self.lengths.get(seq, 0) + new_tokens
    need = -(-length // self.page_size) - len(self.pages.get(seq, []))
    return need <= len(self.free_pages)

  def extend(self, seq, new_tokens: int) -> list[int]:
    """Pages for `new_tokens` more tokens of `seq` (created if new); returns its page list.
    Raises MemoryError, changing nothing, if the pool cannot hold them."""
    if not self.can_fit(seq, new_tokens):
      raise MemoryError(f"the page pool is full ({len(self.free_pages)} free pages): free a "
                        "sequence or queue the request")
    pages = self.pages.setdefault(seq, [])
    self.lengths[seq] = self.lengths.get(seq, 0) + new_tokens
    while len(pages) * self.page_size < self.lengths[seq]:
      pages.append(self._take())
    return pages

  def free(self, seq) -> None:
    for page in self.pages.pop(seq):
      if page < 0:
        continue  # released already
      self.refs[page] -= 1
      if self.refs[page] == 0:
        self.free_pages.append(page)
    del self.lengths[seq]

  def fork(self, parent, child) -> tuple[int, int] | None:
    """`child` starts as a copy of `parent`: full pages are shared (reference counted); a partly
    filled last page, which both would write next, is copied now. Returns (src, dst) of that
    copy for `copy_page`, or None."""
    if child in self.pages:
      raise ValueError(f"sequence {child!r} already exists")
    pages, length = self.pages[parent], self.lengths[parent]
    if any(p < 0 for p in pages):
      raise ValueError(f"sequence {parent!r} released pages outside its window; fork it before")
    full = length // self.page_size
    shared = pages[:full]
    for page in shared:
      self.refs[page] += 1
    self.pages[child] = list(shared)
    self.lengths[child] = length
    if full < len(pages):
      dst = self._take()
      self.pages[child].append(dst)
      return pages[full], dst
    return None

  def release_outside_window(self, seq, window: int) -> list[int]:
    """Frees `seq`'s pages whose every token is older than the last `window` tokens (a
    sliding-window layer never reads them again); returns them. Their places in the page list
    become holes (-1; page 0 in `table`), which the window mask never reads."""
    if not isinstance(window, int) or window < 1:
      raise ValueError(f"window must be a positive int, got {window!r}")
    pages = self.pages[seq]
    first_visible = max(0, self.lengths[seq] - window)
    freed = []
    for i in range(first_visible // self.page_size):
      page = pages[i]
      if page < 0:
        continue
      self.refs[page] -= 1
      if self.refs[page] == 0:
        self.free_pages.append(page)
      freed.append(page)
      pages[i] = -1
    return freed

  def table(self, seqs, max_pages: int) -> np.ndarray:
    """int32 [len(seqs), max_pages]: each sequence's pages, padded with page 0 (never read:
    lengths and, for released pages, the window mask it)."""
    out = np.zeros((len(seqs), max_pages), np.int32)
    for i, s in enumerate(seqs):
      pages = self.pages.get(s, [])
      if len(pages) > max_pages:
        raise ValueError(f"sequence {s!r} holds {len(pages)} pages > max_pages={max_pages}")
      out[i, :len(pages)] = np.maximum(pages, 0)
    return out
