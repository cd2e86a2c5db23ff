"""Batched text generation over kvjax caches (dense or quantized).

Prompts of different lengths share one batch: they are right-padded to a length bucket (powers of
two from 16) and prefilled in one call that writes only each sequence's own tokens
(`num_tokens`), so every sequence is left-aligned at position 0 and continues from its own
length; ring-buffer (sliding-window) caches never see padding. Decoding is one token per step for
the whole batch. Prefill and decode step are jitted with the caches donated (updated in place)
and compiled once per (batch, bucket, cache size); the default cache size is rounded up to a
multiple of 256 so nearby requests reuse the compiled step.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kvjax
from kvjax.models.decoder import CausalLM

_MIN_BUCKET = 16
_CACHE_ROUND = 256


def prompt_bucket(length: int) -> int:
  """Padded prefill length for a prompt of `length` tokens: the next power of two >= 16."""
  return max(_MIN_BUCKET, 1 << max(0, int(length) - 1).bit_length())


def sample_logits(logits: jax.Array, rng: jax.Array | None, *, temperature: float,
                  top_k: int | None, top_p: float | None) -> jax.Array:
  """Next tokens [B] int32 from logits [B, V] float32.

  temperature 0 is greedy (argmax). Otherwise logits / temperature, restricted to the top_k
  largest and/or the smallest set whose probability reaches top_p (nucleus), then sampled.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # keep a token if the tokens ranked above it hold less than top_p (the first always stays)
    kept = mass_before < top_p
    threshold = jnp.min(jnp.where(kept, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "impl"),
                   donate_argnames=("caches",))
def _prefill(graphdef, state, caches, tokens, lengths, rng, sampling, impl, logits_at=None):
  model = nnx.merge(graphdef, state)
  logits, caches = model(tokens, caches, num_tokens=lengths,
                         logits_at=lengths - 1 if logits_at is None else logits_at,
                         attention_impl=impl)
  return _host_readable(model, sample_logits(logits[:, 0], rng, **dict(sampling))), caches


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "impl"),
                   donate_argnames=("caches",))
def _decode_step(graphdef, state, caches, tokens, rng, sampling, impl):
  model = nnx.merge(graphdef, state)
  logits, caches = model(tokens[:, None], caches, attention_impl=impl)
  return _host_readable(model, sample_logits(logits[:, 0], rng, **dict(sampling))), caches


def _host_readable(model, tokens):
  # On a mesh the sampled tokens are replicated, so every process can read them.
  return tokens if model.layout is None else model.layout.replicate(tokens)


def generate_tokens(model: CausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    quant: kvjax.QuantConfig | None = None, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None,
                    rng: jax.Array | None = None, max_len: int | None = None,
                    eos_token_ids: Sequence[int] | None = None,
                    cache_dtype=None, calibration=None,
                    attention_impl: str = "auto",
                    prefill_chunk: int | None = None) -> list[list[int]]:
  """Generates up to `max_new_tokens` tokens after each prompt (token ids).

  Args:
    model: a `CausalLM`.
    prompts: B token-id sequences, each non-empty; lengths may differ.
    max_new_tokens: tokens to generate per sequence (fewer if it emits an EOS token).
    quant: None for a dense cache, or a `kvjax.QuantConfig` for a quantized one (uncalibrated).
    calibration: a `kvjax.calibration.Calibration` or an artifact directory: the calibrated
      quantized cache. Default: `model.calibration` (set by `kvjax.models.load(...,
      calibration=...)`) when `quant` is None; False: a dense cache even then.
    temperature, top_k, top_p, rng: sampling (temperature 0 = greedy; rng required otherwise).
    max_len: cache capacity in tokens; default: longest prompt + max_new_tokens, rounded up to a
      multiple of 256.
    eos_token_ids: stop tokens (default: the model config's).
    cache_dtype: dense cache dtype (default: the model's parameter dtype).
    attention_impl: the attention implementation (`kvjax.attend`'s impl; "auto" picks by
      platform and step, "xla" is the exact quantized-domain path).
    prefill_chunk: write prompts in chunks of at most this many tokens (each padded to
      min(prefill_chunk, the power-of-two bucket of what is left), as the serving engine does);
      default: one call for the whole prompt.
  Returns:
    B lists of generated token ids, each ending at (and including) its first EOS token if any.
  """
  _check_sampling(temperature, top_k, top_p, rng, model.config.vocab_size)
  from kvjax.attention import check_impl
  check_impl(attention_impl)
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if prefill_chunk is not None and (not isinstance(prefill_chunk, int)
                                    or isinstance(prefill_chunk, bool) or prefill_chunk < 1):
    raise ValueError(f"prefill_chunk must be a positive int or None, got {prefill_chunk!r}")
  if isinstance(prompts, (str, bytes)) or not len(prompts):
    raise ValueError("prompts must be a non-empty list of token-id sequences")
  raw = [np.asarray(p) for p in prompts]
  for i, p in enumerate(raw):
    if p.size and not np.issubdtype(p.dtype, np.integer):
      raise ValueError(f"prompts[{i}] must hold integer token ids, got dtype {p.dtype}")
  prompts = [p.astype(np.int64).reshape(-1) for p in raw]
  lengths = np.array([len(p) for p in prompts], np.int32)
  if (lengths == 0).any():
    raise ValueError(f"every prompt needs at least one token; empty prompts at "
                     f"{np.nonzero(lengths == 0)[0].tolist()}")
  vocab = model.config.vocab_size
  for i, p in enumerate(prompts):
    if p.min() < 0 or p.max() >= vocab:
      raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
  longest = int(lengths.max())
  needed = longest + max_new_tokens
  limit = model.config.max_position_embeddings
  if needed > limit:
    raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {needed} "
                     f"exceeds the model's context of {limit} tokens "
                     "(ModelConfig.max_position_embeddings); shorten the prompt")
  if max_len is None:
    max_len = -(-needed // _CACHE_ROUND) * _CACHE_ROUND
  elif longest > max_len:
    raise ValueError(f"prompt of {longest} tokens is longer than the cache (max_len={max_len})")
  elif needed > max_len:
    raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {needed} "
                     f"exceeds the cache (max_len={max_len})")
  batch = len(prompts)
  bucket = min(prompt_bucket(longest), max_len)
  padded = np.zeros((batch, bucket), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p

  eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
  sampling = (("temperature", float(temperature)), ("top_k", top_k), ("top_p", top_p))
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  if calibration is None and quant is None and cache_dtype is None:
    calibration = getattr(model, "calibration", None)
  if calibration is not None and calibration is not False:
    if quant is not None or cache_dtype is not None:
      raise ValueError("give either calibration or quant / cache_dtype, not both")
    caches = model.init_cache(batch, max_len, calibration=calibration)
  else:
    caches = model.init_cache(batch, max_len, quant=quant, dtype=cache_dtype)

  place = jnp.asarray
  if model.layout is not None:
    from kvjax.models import sharding
    place = functools.partial(sharding.replicated, model.layout)
  if prefill_chunk is None:
    rng, sub = jax.random.split(rng)
    tokens, caches = _prefill(graphdef, state, caches, place(padded), place(lengths),
                              place(sub), sampling, attention_impl)
  else:
    first = np.zeros(batch, np.int32)
    for start in range(0, longest, prefill_chunk):
      left = np.maximum(lengths - start, 0)
      n = np.minimum(left, prefill_chunk).astype(np.int32)
      t = min(prefill_chunk, prompt_bucket(int(left.max())))
      chunk = np.zeros((batch, t), np.int32)
      for i, p in enumerate(prompts):
        chunk[i, :n[i]] = p[start:start + n[i]]
      rng, sub = jax.random.split(rng)
      # logits_at of a row with nothing left is any index: its token is not kept
      sampled, caches = _prefill(graphdef, state, caches, place(chunk), place(n),
                                 place(sub), sampling, attention_impl, logits_at=place(
                                     np.maximum(n - 1, 0)))
      ends = (lengths > start) & (lengths <= start + prefill_chunk)
      first = np.where(ends, np.asarray(sampled), first)
    tokens = place(first)
  out: list[list[int]] = [[] for _ in range(batch)]
  done = np.zeros(batch, bool)
  for step in range(max_new_tokens):
    host_tokens = np.asarray(tokens)
    for i in range(batch):
      if not done[i]:
        out[i].append(int(host_tokens[i]))
        done[i] = host_tokens[i] in eos
    if done.all() or step == max_new_tokens - 1:
      break
    rng, sub = jax.random.split(rng)
    tokens, caches = _decode_step(graphdef, state, caches, tokens, place(sub), sampling,
                                  attention_impl)
  kvjax.check_overflow(caches)
  return out


def generate(model: CausalLM, tokenizer, prompts: Sequence[str] | str, *, max_new_tokens: int,
             quant: kvjax.QuantConfig | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, rng: jax.Array | None = None,
             max_len: int | None = None, calibration=None,
             attention_impl: str = "auto") -> list[str]:
  """Generates text continuations of `prompts` (a string or a list of strings).

  Prompts are encoded with `tokenizer` (BOS prepended when the model expects it), generation
  runs as in `generate_tokens`, and the new tokens of each sequence are decoded (without the
  EOS token). calibration: as in `generate_tokens`, or "auto" (the model's default
  calibration, from the user cache or computed on first use); attention_impl as there.
  Returns one string per prompt.
  """
  if tokenizer is None:
    raise ValueError("generate needs a tokenizer; use generate_tokens for token ids")
  if isinstance(calibration, str) and calibration == "auto":
    # Resolved for this call only: the caller's model is left as it is.
    from kvjax.models import calibrated
    calibration = calibrated.auto(model, tokenizer)
  if isinstance(prompts, str):
    prompts = [prompts]
  ids = [encode(tokenizer, p, model.config) for p in prompts]
  new = generate_tokens(model, ids, max_new_tokens=max_new_tokens, quant=quant,
                        temperature=temperature, top_k=top_k, top_p=top_p, rng=rng,
                        max_len=max_len, calibration=calibration,
                        attention_impl=attention_impl)
  eos = set(model.config.eos_token_ids)
  return [tokenizer.decode([t for t in seq if t not in eos]) for seq in new]


def encode(tokenizer, text: str, cfg) -> list[int]:
  """Token ids of `text`, with the model's BOS in front when its config asks for one."""
  if not isinstance(text, str):
    raise TypeError(f"prompts must be strings, got {type(text).__name__}")
  try:
    return list(tokenizer.encode(text, add_bos=cfg.add_bos))
  except TypeError:  # a plain tokenizer without the add_bos switch
    ids = list(tokenizer.encode(text))
  if cfg.add_bos and cfg.bos_token_id is not None and (not ids or ids[0] != cfg.bos_token_id):
    ids = [cfg.bos_token_id] + ids
  return ids


def _check_sampling(temperature, top_k, top_p, rng, vocab):
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature!r}")
  if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= vocab):
    raise ValueError(f"top_k must be an int in [1, {vocab}] or None, got {top_k!r}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling with temperature > 0 needs rng=jax.random.key(...)")
