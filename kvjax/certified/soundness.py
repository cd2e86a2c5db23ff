"""Checking a certificate against float64 exact attention: adversarial families of keys,
values and queries, the float64 reference, and a checker that runs many rows.

Used by the tests and `benchmarks/certified_soundness.py`; also a way to check the certificate
on one's own keys and values (`check_rows`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.certified.attention import attend
from kvjax.certified.cache import init_cache, write
from kvjax.certified.config import CertifiedConfig

FAMILIES = ("gaussian", "outliers", "key_offset", "near_tied", "needle")


def family(name: str, key, batch: int, length: int, heads: int, head_dim: int):
  """Keys and values [batch, length, heads, head_dim] of one family:
  gaussian    N(0, 1) keys and values;
  outliers    4 key channels x30 and 2 value channels x20;
  key_offset  a huge key offset shared by every token (Qwen's k_proj bias), 40 x N(0, 1);
  near_tied   every key within 1e-3 of one shared key: near-tied logits;
  needle      one token per sequence with a key offset of 12 (on the all-ones direction) and a
              value offset of 25: it carries most of the mass of `queries(..., "needle")`."""
  if name not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {name!r}")
  kk, kv, kn, ko = jax.random.split(key, 4)
  shape = (batch, length, heads, head_dim)
  k = jax.random.normal(kk, shape)
  v = jax.random.normal(kv, shape)
  if name == "outliers":
    k = k.at[..., :4].multiply(30.0)
    v = v.at[..., 5:7].multiply(20.0)
  elif name == "key_offset":
    k = k + 40.0 * jax.random.normal(ko, (1, 1, heads, head_dim))
  elif name == "near_tied":
    k = jax.random.normal(ko, (1, 1, heads, head_dim)) + 1e-3 * k
  elif name == "needle":
    where = jax.random.randint(kn, (batch,), 0, length)
    onehot = jax.nn.one_hot(where, length)[:, :, None, None]
    k = k + onehot * 12.0
    v = v + onehot * 25.0
  return k, v


def queries(key, batch: int, tokens: int, q_heads: int, head_dim: int, name: str = "gaussian"):
  """Queries [batch, tokens, q_heads, head_dim] with per-row scales log-uniform in [0.2, 6]
  (flat to peaked attention); aligned with the needle for the "needle" family."""
  kq, ks = jax.random.split(key)
  q = jax.random.normal(kq, (batch, tokens, q_heads, head_dim))
  scale = jnp.exp(jax.random.uniform(ks, (batch, tokens, q_heads, 1), minval=np.log(0.2),
                                     maxval=np.log(6.0)))
  if name == "needle":
    q = q * 0.3 + 1.0
  return q * scale


def exact64(q, cache, length: int, *, scale: float | None = None) -> np.ndarray:
  """Exact attention in float64 over the cache's exact tier, every query seeing the first
  `length` tokens. q [B, T, Hq, D] -> [B, T, Hq, D]."""
  k = np.asarray(jax.device_get(cache.k_exact), np.float64)[:, :, :length]
  v = np.asarray(jax.device_get(cache.v_exact), np.float64)[:, :, :length]
  b, t, hq, d = q.shape
  h = k.shape[1]
  r = hq // h
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  qq = np.asarray(q, np.float64).reshape(b, t, h, r, d).transpose(0, 2, 1, 3, 4)
  s = np.matmul(qq.reshape(b, h, t * r, d), np.swapaxes(k, -1, -2)) * scale
  s -= s.max(-1, keepdims=True)
  p = np.exp(s)
  p /= p.sum(-1, keepdims=True)
  o = np.matmul(p, v).reshape(b, h, t, r, d).transpose(0, 2, 1, 3, 4)
  return o.reshape(b, t, hq, d)


_attend = jax.jit(lambda q, c, pos: attend(q, c, q_positions=pos)[:2])


def check_rows(name: str, config: CertifiedConfig, *, length: int, rows: int, seed: int = 0,
               heads: int = 2, group: int = 4, head_dim: int = 64, caches: int = 4,
               progress=None):
  """Runs `rows` rows (query token x query head) of family `name` through certified attention
  and compares each with float64 exact attention. Returns (errors [rows], Certificate with
  [rows] fields), errors being ||O - O_exact||_2 per row."""
  b, t = 2, 64
  per_call = b * t * heads * group
  calls = max(1, -(-rows // per_call))
  errs, certs = [], []
  start = time.time()
  for i in range(calls):
    key = jax.random.fold_in(jax.random.key(seed), i)
    if i % max(1, calls // caches) == 0:
      k, v = family(name, jax.random.fold_in(key, 1), b, length, heads, head_dim)
      cache = write(init_cache(b, heads, length, head_dim, config=config), k, v)
    q = queries(jax.random.fold_in(key, 2), b, t, heads * group, head_dim, name)
    pos = jnp.full((b, t), length - 1, jnp.int32)
    out, cert = _attend(q, cache, pos)
    exact = exact64(q, cache, length)
    errs.append(np.linalg.norm(np.asarray(out, np.float64) - exact, axis=-1).ravel())
    certs.append(jax.tree.map(np.asarray, cert))
    if progress is not None:
      progress(i + 1, calls, time.time() - start)
  cert = jax.tree.map(lambda *x: np.concatenate([np.ravel(a) for a in x]), *certs)
  return np.concatenate(errs), cert
