"""The public runner: jitted chunk and decode steps for one model, chunked prefill, windows of
text, and the statistics pass that calibration reads.

    runner = kvjax.models.Runner(model)
    logits, caches = kvjax.models.prefill(runner, tokens, model.init_cache(1, 4096))
    stats = kvjax.models.collect_stats(runner, windows)      # for kvjax.smoothing

Applications (`kvjax eval`, `bench`, `passkey`, `calibrate`) and calibration build on these; they
hold no cache logic of their own.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import with_stats


class Runner:
  """Jitted chunk and decode steps for one model (compiled once per cache structure and chunk
  shape; the caches are donated, so XLA updates them in place).

  attention_impl: the attention implementation every step runs (`kvjax.attend`'s impl; "xla"
  is the exact quantized-domain path that quality measurements use)."""

  def __init__(self, model, *, attention_impl: str = "auto"):
    from kvjax.attention import check_impl
    check_impl(attention_impl)
    self.attention_impl = attention_impl
    from flax import nnx
    self.model = model
    self.graphdef, self.state = nnx.split(model)
    graphdef = self.graphdef

    def fwd(state, tokens, caches, num_tokens):
      m = nnx.merge(graphdef, state)
      return m(tokens, caches, num_tokens=num_tokens, attention_impl=attention_impl)

    def fwd_last(state, tokens, caches, num_tokens):
      m = nnx.merge(graphdef, state)
      logits, caches = m(tokens, caches, num_tokens=num_tokens, logits_at=num_tokens - 1,
                         attention_impl=attention_impl)
      return logits[:, 0], caches

    self.fwd = jax.jit(fwd, donate_argnums=(2,))
    self.fwd_last = jax.jit(fwd_last, donate_argnums=(2,))

  def __call__(self, tokens, caches, num_tokens=None, *, last_only: bool = False):
    """(logits [B, T, V] float32, caches); last_only: logits [B, V] of each sequence's last
    real token only (what a prefill needs: skips the vocabulary projection elsewhere)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if num_tokens is None:
      num_tokens = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    fwd = self.fwd_last if last_only else self.fwd
    return fwd(self.state, tokens, caches, num_tokens)


def progress_bar(total, desc, enabled):
  """A tqdm bar over `total` tokens, or None when not `enabled`."""
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="tok", leave=False)


def prefill(runner: Runner, tokens, caches, *, chunk: int = 512, bar=None):
  """Feeds `tokens` through the caches in fixed-size chunks (one compiled shape).

  tokens: one sequence [n], or equal-length sequences [B, n] (one per cache batch row). The
  last chunk is right-padded and only its real tokens enter the caches; logits are computed
  for the last token only. Returns (logits of the last token [B, V], caches).
  """
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
    raise ValueError(f"chunk must be a positive int, got {chunk!r}")
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim == 1:
    tokens = tokens[None]
  if tokens.ndim != 2 or tokens.shape[1] < 1:
    raise ValueError(f"prefill tokens must be [n] or [batch, n] with n >= 1, got shape "
                     f"{tokens.shape}")
  w, n = tokens.shape
  logits = None
  for lo in range(0, n, chunk):
    part = tokens[:, lo:lo + chunk]
    piece = np.zeros((w, chunk), np.int32)
    piece[:, :part.shape[1]] = part
    logits, caches = runner(piece, caches, jnp.full((w,), part.shape[1], jnp.int32),
                            last_only=True)
    if bar is not None:
      bar.update(part.size)
  return logits, caches


def collect_stats(runner: Runner, tokens, *, chunk: int = 512, progress: bool = True):
  """Runs the model over calibration tokens with statistics caches (`kvjax.with_stats`, float32,
  RoPE frequencies attached); returns them.

  tokens: one sequence [n], or equal-length windows [W, n] run as one batch (the statistics
  are sums over every sequence and position)."""
  model = runner.model
  shape = np.shape(tokens)
  w, n = (1, shape[0]) if len(shape) == 1 else shape if len(shape) == 2 else (0, 0)
  if not w or n < 1:
    raise ValueError(f"calibration tokens must be [n] or [windows, n] with n >= 1, got shape "
                     f"{shape}")
  caches = with_stats(model.init_cache(w, n, dtype=jnp.float32),
                      rope_freq=model.rope_frequencies())
  bar = progress_bar(w * n, "calibration statistics", progress)
  _, caches = prefill(runner, tokens, caches, chunk=chunk, bar=bar)
  if bar is not None:
    bar.close()
  return caches


def windows(ids: Sequence[int], context: int, count: int, *, bos: bool,
            start: int = 0) -> list[np.ndarray]:
  """Up to `count` consecutive, disjoint windows of `context` tokens of `ids`, the first one
  starting `start` tokens into the text (after the BOS, with `bos`).

  With bos (ids[0] is the BOS token) every window opens with BOS followed by the next
  context - 1 tokens of text, as a fresh sequence would; otherwise windows are plain slices.
  Returns at least one window (the caller checks that the text holds `context` tokens).
  """
  if bos:
    body, first = list(ids[1 + start:]), [ids[0]]
    n = context - 1
  else:
    body, first, n = list(ids[start:]), [], context
  count = max(1, min(count, len(body) // n))
  return [np.asarray(first + body[i * n:(i + 1) * n], np.int32) for i in range(count)]
