"""Closed-form key calibration from statistics: offsets, per-channel scales λ, rounding feedback.

Five facts make 4-bit keys cheap to fix without touching attention's cost per token:

1. Offset. Softmax ignores a constant added to all logits of one query, and
   q . (k_t - μ) + q . μ = q . k_t. So keys can be stored minus a per-channel
   mean μ (the cache adds q . μ back once per query; exact). Per-token abs-max
   then spends its 16 levels on what varies between tokens, not on a shared
   offset (Qwen2's k_proj bias, Gemma's un-centred RMS-normed keys).

2. Rotary offset. Keys arrive after RoPE, so a mean m of the *pre*-RoPE keys reaches
   a channel pair of frequency w as A(w t) m, a vector that turns with the position t
   and that no constant μ removes (`kvjax.rotary`). Per pair the least-squares fit of
   k_t ~ A(w t) m + c over the calibration tokens has a closed form from the sums a
   `StatsKVCache` keeps (k cos(w t), k sin(w t), and the trigonometric moments):

       (1 - |E e^{iwt}|^2) m = E[A_t^T k] - E[A_t]^T E[k],    c = E[k] - E[A_t] m

   (E[A_t] is a scaled rotation, so the 2 x 2 system is a scalar division), and it
   removes (1 - |E e^{iwt}|^2) |m|^2 of the pair's key energy. The P pairs whose removal
   shrinks the balanced error of fact 3 the most get a rotary offset; the cache stores
   k_t - A(w t) m - c and attention adds q . A(w t) m per slot (exact).

3. Balance. With a rotation after λ, the quantization error of k / λ is about
   isotropic with variance proportional to Σ_c E[k_c²] / λ_c², and the logit
   error is q . (λ ∘ e), with variance proportional to Σ_c E[q_c²] λ_c². Their
   product is minimal (Cauchy-Schwarz) at λ_c² ∝ rms(k_c) / rms(q_c): the
   SmoothAttention rule with α = 1/2, here derived for rotated per-group
   quantization (rms of the keys after both offsets). q~ = R(λ ∘ q) absorbs λ on
   the query side once per query.

4. Sink. Most queries put much of their attention on the sequence's first token (BOS: the
   "attention sink"), so the rounding error of that one key moves every query's softmax.
   The cache keeps that key exact (`QuantConfig.key_sink`: its rounding error is stored in
   float32, 1 KiB per sequence, head and layer at D = 256, and added back to its logit).

5. Rounding. What a key's rounding error e (rotated domain) costs is the logit error
   q~ . e, of mean square e^T H e with H = E[q~ q~^T] = R diag(λ) E[q q^T] diag(λ) R^T.
   Queries concentrate on few directions (H has a fast-decaying spectrum), so choosing
   the codes of one key channel by channel with error feedback (GPTQ / LDLQ: feedback
   = U / diag(U) for the upper Cholesky factor U of (H + δ mean(diag H) I)^-1) moves the
   error where queries do not look. `kvjax.quantizer.feedback_levels` applies it at
   write time; nothing changes at read time.

Statistics come from running the model once over calibration text with
`kvjax.with_stats(caches, rope_freq=model.rope_frequencies())` caches (post-RoPE q, k,
v as the cache receives them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import DenseKVCache, QuantizedKVCache, StatsKVCache


@dataclasses.dataclass(frozen=True)
class KeyCalibration:
  """What to derive from statistics.

  offset: remove the key mean (constant and rotary); alpha: exponent of rms(k)/rms(q)
  (0 disables λ); clip: bound of λ relative to its geometric mean; rope_pairs: channel
  pairs that may get a rotary offset (fewer if fewer pairs gain; needs statistics
  gathered with RoPE frequencies); feedback: error-feedback key rounding; damping: δ of
  fact 5, relative to the mean diagonal of H (guards against directions the calibration
  queries never visited); sink: keep the key at position 0 exact (fact 4).
  """

  offset: bool = True
  alpha: float = 0.5
  clip: float = 32.0  # bound λ to [1/clip, clip] relative to its geometric mean
  rope_pairs: int = 32
  feedback: bool = True
  damping: float = 0.01
  sink: bool = True

  def __post_init__(self):
    if not isinstance(self.rope_pairs, int) or self.rope_pairs < 0:
      raise ValueError(f"KeyCalibration.rope_pairs must be an int >= 0, got {self.rope_pairs!r}")
    if not self.damping > 0:
      raise ValueError(f"KeyCalibration.damping must be > 0, got {self.damping!r}")


# The constant key offset and λ only (facts 1 and 3).
OFFSET_AND_LAMBDA = KeyCalibration(rope_pairs=0, feedback=False, sink=False)


def balance_lambda(k_rms, q_rms, calib: KeyCalibration = KeyCalibration()):
  """λ = (rms(k) / rms(q)) ** alpha per channel (last axis), geometric mean 1, clipped."""
  xp = jnp if isinstance(k_rms, jax.Array) else np
  tiny = 1e-6 * xp.maximum(xp.max(k_rms, axis=-1, keepdims=True), 1e-30)
  ratio = (k_rms + tiny) / (q_rms + 1e-6 * xp.max(q_rms, axis=-1, keepdims=True) + 1e-30)
  lam = ratio ** calib.alpha
  # Only relative scales matter (the per-group abs-max absorbs a global factor).
  log_lam = xp.log(lam)
  lam = xp.exp(log_lam - xp.mean(log_lam, axis=-1, keepdims=True))
  return xp.clip(lam, 1.0 / calib.clip, calib.clip)


def _stats_arrays(stats: StatsKVCache) -> dict:
  names = ("count", "k_sum", "k_sq", "k_cos", "k_sin", "q_sq", "qq", "trig", "rope_freq")
  return {n: np.asarray(getattr(stats, n), np.float64) for n in names}


def _rotary_fit(s: dict):
  """Per pair: rotary mean (m1, m2), residual constant (c1, c2), residual second moments.

  Arrays of one layer: k_* [H, D], trig [D/2, 5], rope_freq [D/2]. Returns m1, m2, c1, c2,
  r1, r2 (each [H, D/2]) and a bool [D/2] of pairs that turn enough to be fitted.
  """
  n = max(float(s["count"]), 1.0)
  half = s["k_sum"].shape[-1] // 2
  ek, ek2, ekc, eks = (s[f][..., :] / n for f in ("k_sum", "k_sq", "k_cos", "k_sin"))
  ec, es, ecc, ess, ecs = (s["trig"][:, i] / n for i in range(5))
  e1, e2 = ek[:, :half], ek[:, half:]
  denom = 1.0 - (ec ** 2 + es ** 2)
  # A pair must turn through a few radians over the calibration positions (|E e^{iwt}|^2 <
  # 1/2, i.e. w T > 2.8 for positions 0..T) for m and c to be separately determined; one
  # that turns less is left to the constant mean (a fit there extrapolates badly to
  # positions past the calibration text).
  fit = (s["rope_freq"] > 0) & (denom > 0.5)
  safe = np.where(fit, denom, 1.0)
  u1 = ekc[:, :half] + eks[:, half:] - (ec * e1 + es * e2)
  u2 = -eks[:, :half] + ekc[:, half:] - (-es * e1 + ec * e2)
  m1, m2 = np.where(fit, u1 / safe, 0.0), np.where(fit, u2 / safe, 0.0)
  c1, c2 = e1 - (ec * m1 - es * m2), e2 - (es * m1 + ec * m2)
  k1, k2 = ek2[:, :half], ek2[:, half:]
  kc1, kc2, ks1, ks2 = ekc[:, :half], ekc[:, half:], eks[:, :half], eks[:, half:]
  # E[(k1 - (m1 cos - m2 sin) - c1)^2] and E[(k2 - (m2 cos + m1 sin) - c2)^2], expanded.
  r1 = (k1 + m1 ** 2 * ecc + m2 ** 2 * ess - 2 * m1 * m2 * ecs + c1 ** 2 - 2 * m1 * kc1
        + 2 * m2 * ks1 - 2 * c1 * e1 + 2 * c1 * m1 * ec - 2 * c1 * m2 * es)
  r2 = (k2 + m2 ** 2 * ecc + m1 ** 2 * ess + 2 * m1 * m2 * ecs + c2 ** 2 - 2 * m2 * kc2
        - 2 * m1 * ks2 - 2 * c2 * e2 + 2 * c2 * m2 * ec + 2 * c2 * m1 * es)
  return m1, m2, c1, c2, np.maximum(r1, 0.0), np.maximum(r2, 0.0), fit


def _layer_key_params(s: dict, calib: KeyCalibration) -> dict:
  """key_params for the arrays of one layer (no leading axes)."""
  n = max(float(s["count"]), 1.0)
  h, d = s["k_sum"].shape
  half = d // 2
  ek, ek2 = s["k_sum"] / n, s["k_sq"] / n
  q_rms = np.sqrt(s["q_sq"] / n)
  p = min(calib.rope_pairs, half) if calib.offset else 0
  mean = ek if calib.offset else np.zeros_like(ek)
  var = np.maximum(ek2 - mean ** 2, 0.0)
  freq = np.zeros((p,), np.float32)
  channels = np.stack([np.arange(p), np.arange(p) + half], 1).astype(np.int32)
  rope_mean = np.zeros((h, 2, p))
  if p:
    m1, m2, c1, c2, r1, r2, fit = _rotary_fit(s)
    # Gain of a pair: how much it lowers sum_c rms(q_c) rms(k_c), the balanced error (fact 3).
    sd = np.sqrt(var)
    gain = (q_rms[:, :half] * (sd[:, :half] - np.sqrt(r1))
            + q_rms[:, half:] * (sd[:, half:] - np.sqrt(r2))).sum(0)
    gain = np.where(fit, gain, -np.inf)
    order = [i for i in np.argsort(-gain, kind="stable") if gain[i] > 0][:p]
    # Unused slots keep pairs (i, i + D/2) that were not chosen, with zero mean and frequency.
    spare = [i for i in range(half) if i not in order][:p - len(order)]
    for slot, i in enumerate(order + spare):
      channels[slot] = (i, i + half)
      if i in order:
        freq[slot] = s["rope_freq"][i]
        rope_mean[:, 0, slot], rope_mean[:, 1, slot] = m1[:, i], m2[:, i]
        mean[:, i], mean[:, i + half] = c1[:, i], c2[:, i]
        var[:, i], var[:, i + half] = r1[:, i], r2[:, i]
  lam = (np.ones_like(mean) if calib.alpha == 0
         else balance_lambda(np.sqrt(var), q_rms, calib))
  return {"k_mean": mean, "k_lambda": lam, "k_rope_freq": freq, "k_rope_channels": channels,
          "k_rope_mean": rope_mean}


def key_params(stats: StatsKVCache, calib: KeyCalibration = KeyCalibration()) -> dict:
  """Key offsets and λ from one (possibly layer-stacked) statistics cache.

  Returns numpy arrays with the stats' leading axes: k_mean, k_lambda [..., H, D],
  k_rope_freq [..., P], k_rope_channels int32 [..., P, 2], k_rope_mean [..., H, 2, P]
  with P = calib.rope_pairs when calib.offset (else 0).
  """
  s = _stats_arrays(stats)
  lead = s["count"].shape
  flat = {k: v.reshape((-1,) + v.shape[len(lead):]) for k, v in s.items()}
  per = [_layer_key_params({k: v[i] for k, v in flat.items()}, calib)
         for i in range(int(np.prod(lead, dtype=np.int64)))]
  return {k: np.stack([p[k] for p in per]).reshape(lead + per[0][k].shape) for k in per[0]}


def feedback_matrix(stats: StatsKVCache, k_lambda, rotation, *, damping: float = 0.01):
  """The error-feedback matrix of fact 5, float32 [..., H, D, D] (strictly upper triangular).

  k_lambda [..., H, D] and rotation [..., Hr, D, D] are the cache's (Hr in {1, H}).
  """
  s = _stats_arrays(stats)
  lead = s["count"].shape
  qq = s["qq"]
  h, d = qq.shape[-3], qq.shape[-1]
  lam = np.broadcast_to(np.asarray(k_lambda, np.float64), lead + (h, d))
  rot = np.broadcast_to(np.asarray(rotation, np.float64), lead + (h, d, d))
  out = np.zeros(lead + (h, d, d), np.float32)
  for idx in np.ndindex(*lead, h):
    m = qq[idx]
    if not np.any(m):
      continue
    r = rot[idx] * lam[idx][None, :]                     # R diag(λ)
    hm = r @ m @ r.T
    hm = 0.5 * (hm + hm.T)
    hm += damping * np.mean(np.diag(hm)) * np.eye(d)
    u = np.linalg.cholesky(np.linalg.inv(hm)).T          # (H + δ)^-1 = U^T U, U upper
    out[idx] = np.triu(u / np.diag(u)[:, None], 1)
  return out


def calibrate_caches(quant_caches, stats_caches, calib: KeyCalibration = KeyCalibration()):
  """Copies calibrated key parameters into every quantized cache of a pytree.

  `quant_caches` and `stats_caches` must have the same structure (e.g. both from
  `model.init_cache(...)`, the second wrapped with `kvjax.with_stats` and run
  over calibration text). Layer-stacked caches keep their stacking. Each cache's
  config gets key_rope_pairs = calib.rope_pairs (when calib.offset), key_feedback =
  calib.feedback and key_sink = calib.sink; its constant key mean, λ, rotary offsets and
  feedback matrix come from the statistics.
  """
  is_cache = lambda x: isinstance(x, (DenseKVCache, QuantizedKVCache))

  def one(qc, sc):
    if not isinstance(qc, QuantizedKVCache):
      raise TypeError(f"expected a QuantizedKVCache, got {type(qc).__name__}")
    if not isinstance(sc, StatsKVCache):
      raise TypeError(f"expected a StatsKVCache (kvjax.with_stats), got {type(sc).__name__}")
    want = qc.k_codes.shape[:-4] + qc.k_codes.shape[-3:-2] + (qc.head_dim,)
    if sc.k_sum.shape != want:
      raise ValueError(f"statistics of shape {sc.k_sum.shape} do not match the quantized cache "
                       f"{qc.k_codes.shape}")
    params = key_params(sc, calib)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    fields = {"k_mean": f32(params["k_mean"]), "k_lambda": f32(params["k_lambda"]),
              "k_rope_freq": f32(params["k_rope_freq"]),
              "k_rope_channels": jnp.asarray(params["k_rope_channels"], jnp.int32),
              "k_rope_mean": f32(params["k_rope_mean"])}
    if calib.feedback:
      fields["k_feedback"] = f32(feedback_matrix(sc, params["k_lambda"], qc.k_rotation,
                                                 damping=calib.damping))
    else:
      fields["k_feedback"] = jnp.zeros(want + (qc.head_dim,), jnp.float32)
    config = dataclasses.replace(qc.config, key_rope_pairs=params["k_rope_freq"].shape[-1],
                                 key_feedback=calib.feedback, key_sink=calib.sink)
    fields["k_sink"] = jnp.zeros(qc.k_sink.shape[:-1] + (qc.head_dim if calib.sink else 0,),
                                 jnp.float32)
    return dataclasses.replace(qc, config=config, **fields)

  return jax.tree_util.tree_map(one, quant_caches, stats_caches, is_leaf=is_cache)
