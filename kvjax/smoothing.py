"""Closed-form cache calibration from statistics: key offsets, per-channel scales λ, rounding
feedback, the exact sink.

Five facts make 4-bit keys cheap to fix without touching attention's cost per token; the sixth
is the same for values, the seventh is what did not carry over to them:

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
   The cache keeps that key exact (`kvjax.corrections.KeySink`: its rounding error is stored in
   float32, 1 KiB per sequence, head and layer at D = 256, and added back to its logit).

5. Rounding. What a key's rounding error e (rotated domain) costs is the logit error
   q~ . e, of mean square e^T H e with H = E[q~ q~^T] = R diag(λ) E[q q^T] diag(λ) R^T.
   Queries concentrate on few directions (H has a fast-decaying spectrum), so choosing
   the codes of one key channel by channel with error feedback (GPTQ / LDLQ: feedback
   = U / diag(U) for the upper Cholesky factor U of (H + δ mean(diag H) I)^-1) moves the
   error where queries do not look. `kvjax.quantizer.feedback_levels` applies it at
   write time; nothing changes at read time.

6. Sink value. The sink's weight is large in every query head at once, so the rounding error
   of its value is a bias that every query's output shares instead of noise that averages
   out over tokens. The cache keeps that value exact too (`kvjax.corrections.ValueSink`, its
   error in float32 like fact 4; attention adds p_0 e_0). Gemma-3-270M, four rotation seeds
   at 1K / three at 4K: mean KL 0.0124 -> 0.0111 and 0.0151 -> 0.0137.

7. Values through the output projection (options, off by default). A value error e of one
   token moves the layer's output by Σ_h p_h W_h^T (λ ∘ R^T e) (W_h: query head h's block of
   the output projection times the post-attention norm's scale), of expected square
   e^T H_v e with H_v = R diag(λ) M diag(λ) R^T and M from the weights alone
   (`CausalLM.value_output_metric`). `value_alpha` balances λ for the values as fact 3 does
   for keys (rms(v_c) against sqrt(M_cc)); `value_feedback` rounds values as fact 5 with
   H_v. Measured on Gemma-3-270M: feedback cuts e^T M e 2-10x in the early layers (the top
   tenth of M's eigenvalues holds 70-90% of its trace there) yet raises the model's KL
   (0.0112 -> 0.0117 at 1K, 0.0132 -> 0.0155 at 4K): the layer's own output error is not
   what later layers are sensitive to. Value λ moved KL by less than the spread between
   rotation seeds (1K 0.0111 -> 0.0108, 4K 0.0137 -> 0.0141 with the sink value).

8. Recent values. Like the sink, a query's own token and the few before it often hold much
   of its weight (the diagonal band of attention), so their values' rounding errors reach
   the output almost undiluted. The exact value is in hand when a token is written, so
   `kvjax.corrections.RecentValues(W)` lets each new query read the W most recent values exact
   (attention adds sum_w p_w e_w; the W - 1 older errors are kept per sequence, `v_recent`).
   Gemma-3-270M, hook mode, KL at 1K (four windows) / 4K: none 0.0105 / 0.0135, W = 1
   0.0093 / 0.0124, W = 4 0.0071 / 0.0100; K8V4 0.0049 / 0.0048 -> 0.0014 / 0.0016 (W = 4).
   The current token's key made no difference (scratch, exact own key substituted in the
   reference path: KL 0.0103 -> 0.0102).

Statistics come from running the model once over calibration text with
`kvjax.with_stats(caches, rope_freq=model.rope_frequencies())` caches (post-RoPE q, k,
v as the cache receives them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import corrections as kc
from kvjax.cache import DenseKVCache, QuantizedKVCache, StatsKVCache, with_config


@dataclasses.dataclass(frozen=True)
class KeyCalibration:
  """What to derive from statistics.

  offset: remove the key mean (constant and rotary); alpha: exponent of rms(k)/rms(q)
  (0 disables λ); clip: bound of λ relative to its geometric mean; rope_pairs: channel
  pairs that may get a rotary offset (fewer if fewer pairs gain; needs statistics
  gathered with RoPE frequencies); feedback: error-feedback key rounding; damping: δ of
  fact 5, relative to the mean diagonal of H (guards against directions the calibration
  queries never visited); sink: keep the key at position 0 exact (fact 4); value_sink: the
  same for its value (fact 6); value_recent: W, each new token's query reads the values of
  the W most recent tokens exact (`kvjax.corrections.RecentValues`, fact 8; no statistics);
  value_alpha, value_feedback, value_head_correlation: value λ
  exponent, feedback rounding of values and the head correlation ρ of their metric (fact 7;
  they need the model's output-projection metric, `calibrate_caches(..., value_metric=...)`).
  """

  offset: bool = True
  alpha: float = 0.5
  clip: float = 32.0  # bound λ to [1/clip, clip] relative to its geometric mean
  rope_pairs: int = 32
  feedback: bool = True
  damping: float = 0.01
  sink: bool = True
  value_sink: bool = True
  value_recent: int = 4
  value_alpha: float = 0.0
  value_feedback: bool = False
  value_head_correlation: float = 0.0

  @property
  def calibrates_values(self) -> bool:
    return self.value_feedback or self.value_alpha != 0

  def __post_init__(self):
    if not isinstance(self.rope_pairs, int) or self.rope_pairs < 0:
      raise ValueError(f"KeyCalibration.rope_pairs must be an int >= 0, got {self.rope_pairs!r}")
    if not self.damping > 0:
      raise ValueError(f"KeyCalibration.damping must be > 0, got {self.damping!r}")
    if not self.value_alpha >= 0:
      raise ValueError(f"KeyCalibration.value_alpha must be >= 0, got {self.value_alpha!r}")
    if not 0.0 <= self.value_head_correlation <= 1.0:
      raise ValueError("KeyCalibration.value_head_correlation must be in [0, 1], got "
                       f"{self.value_head_correlation!r}")


# The constant key offset and λ only (facts 1 and 3).
OFFSET_AND_LAMBDA = KeyCalibration(rope_pairs=0, feedback=False, sink=False, value_sink=False,
                                   value_recent=0)


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
  names = ("count", "k_sum", "k_sq", "v_sq", "k_cos", "k_sin", "q_sq", "qq", "trig", "rope_freq")
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


def _feedback_from_moment(moment, lam, rotation, lead, damping):
  """feedback = U / diag(U) for the upper Cholesky factor U of (H + δ mean(diag H) I)^-1,
  H = R diag(λ) M diag(λ) R^T, per [lead..., H] index; float32 [..., H, D, D]."""
  h, d = moment.shape[-3], moment.shape[-1]
  lam = np.broadcast_to(np.asarray(lam, np.float64), lead + (h, d))
  rot = np.broadcast_to(np.asarray(rotation, np.float64), lead + (h, d, d))
  moment = np.broadcast_to(np.asarray(moment, np.float64), lead + (h, d, d))
  out = np.zeros(lead + (h, d, d), np.float32)
  for idx in np.ndindex(*lead, h):
    m = moment[idx]
    if not np.any(m):
      continue
    r = rot[idx] * lam[idx][None, :]                     # R diag(λ)
    hm = r @ m @ r.T
    hm = 0.5 * (hm + hm.T)
    hm += damping * np.mean(np.diag(hm)) * np.eye(d)
    u = np.linalg.cholesky(np.linalg.inv(hm)).T          # (H + δ)^-1 = U^T U, U upper
    out[idx] = np.triu(u / np.diag(u)[:, None], 1)
  return out


def feedback_matrix(stats: StatsKVCache, k_lambda, rotation, *, damping: float = 0.01):
  """The key error-feedback matrix of fact 5, float32 [..., H, D, D] (strictly upper triangular).

  k_lambda [..., H, D] and rotation [..., Hr, D, D] are the cache's (Hr in {1, H}).
  """
  s = _stats_arrays(stats)
  return _feedback_from_moment(s["qq"], k_lambda, rotation, s["count"].shape, damping)


def value_params(stats: StatsKVCache, value_metric, v_rotation,
                 calib: KeyCalibration = KeyCalibration()) -> dict:
  """Value λ and feedback matrix of fact 7 from statistics and the output-projection metric.

  value_metric: [..., H, D, D], the stats' leading axes then the metric M per KV head
  (`CausalLM.value_output_metric`). Returns numpy v_lambda [..., H, D] (geometric mean 1;
  ones when calib.value_alpha == 0) and v_feedback [..., H, D, D] (zeros when
  not calib.value_feedback).
  """
  s = _stats_arrays(stats)
  lead = s["count"].shape
  h, d = s["v_sq"].shape[-2:]
  metric = np.asarray(value_metric, np.float64)
  if metric.shape != lead + (h, d, d):
    raise ValueError(f"value_metric must be [..., H, D, D] = {lead + (h, d, d)} to match the "
                     f"statistics, got {metric.shape}")
  if not np.all(np.isfinite(metric)):
    raise ValueError("value_metric has non-finite entries")
  n = np.maximum(s["count"], 1.0).reshape(lead + (1, 1))
  v_rms = np.sqrt(s["v_sq"] / n)
  w_rms = np.sqrt(np.maximum(np.diagonal(metric, axis1=-2, axis2=-1), 0.0))
  lam = (np.ones(lead + (h, d)) if calib.value_alpha == 0 else
         balance_lambda(v_rms, w_rms, dataclasses.replace(calib, alpha=calib.value_alpha)))
  fb = (_feedback_from_moment(metric, lam, v_rotation, lead, calib.damping)
        if calib.value_feedback else np.zeros(lead + (h, d, d), np.float32))
  return {"v_lambda": lam, "v_feedback": fb}


def calibrated_config(quant, calib: KeyCalibration = KeyCalibration(), *, head_dim: int):
  """The QuantConfig that `calibrate_caches` gives a cache of config `quant` and head_dim: its
  format and rotation, with the corrections of the recipe (what a benchmark must time for a
  calibrated format: rotary offsets, feedback rounding and the sink slot change a step's
  work)."""
  pairs = min(calib.rope_pairs, head_dim // 2) if calib.offset else 0
  chosen = ([kc.KeyOffset()] if calib.offset else []) + (
      [kc.RotaryKeyOffset(pairs)] if pairs else [])
  chosen += [kc.KeyFeedback()] if calib.feedback else []
  chosen += [kc.ValueFeedback()] if calib.calibrates_values and calib.value_feedback else []
  chosen += [kc.KeySink()] if calib.sink else []
  chosen += [kc.ValueSink()] if calib.value_sink else []
  chosen += [kc.RecentValues(calib.value_recent)] if calib.value_recent else []
  return dataclasses.replace(quant, corrections=tuple(chosen))


def calibrate_caches(quant_caches, stats_caches, calib: KeyCalibration = KeyCalibration(), *,
                     value_metric=None):
  """Copies calibrated key (and value) parameters into every quantized cache of a pytree.

  `quant_caches` and `stats_caches` must have the same structure (e.g. both from
  `model.init_cache(...)`, the second wrapped with `kvjax.with_stats` and run
  over calibration text). Layer-stacked caches keep their stacking. Each cache's config gets
  the recipe's corrections (`calibrated_config`); its constant and rotary key offsets, λ and
  feedback matrix come from the statistics. value_metric: the model's output-projection
  metric in the caches' layout (`model.value_output_metric(calib.value_head_correlation)`),
  needed only when `calib.calibrates_values` (value_alpha != 0 or value_feedback; fact 7):
  the value λ and value feedback matrices.
  """
  is_cache = lambda x: isinstance(x, (DenseKVCache, QuantizedKVCache))
  if calib.calibrates_values and value_metric is None:
    raise ValueError("calibrate_caches: the recipe calibrates values (value_alpha="
                     f"{calib.value_alpha}, value_feedback={calib.value_feedback}) but no "
                     "value_metric was given; pass value_metric=model.value_output_metric(), "
                     "or a recipe with value_alpha=0 and value_feedback=False")

  def one(qc, sc, metric=None):
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
    config = calibrated_config(qc.config, calib, head_dim=qc.head_dim)
    fields = {"k_lambda": f32(params["k_lambda"])}
    if config.correction(kc.KeyOffset):
      fields["k_mean"] = f32(params["k_mean"])
    if config.correction(kc.RotaryKeyOffset):
      fields.update(k_rope_freq=f32(params["k_rope_freq"]),
                    k_rope_channels=jnp.asarray(params["k_rope_channels"], jnp.int32),
                    k_rope_mean=f32(params["k_rope_mean"]))
    if config.correction(kc.KeyFeedback):
      fields["k_feedback"] = f32(feedback_matrix(sc, params["k_lambda"], qc.k_rotation,
                                                 damping=calib.damping))
    if calib.calibrates_values:
      vp = value_params(sc, metric, qc.v_rotation, calib)
      fields["v_lambda"] = f32(vp["v_lambda"])
      if config.correction(kc.ValueFeedback):
        fields["v_feedback"] = f32(vp["v_feedback"])
    return with_config(qc, config, **fields)

  if value_metric is None:
    return jax.tree_util.tree_map(one, quant_caches, stats_caches, is_leaf=is_cache)
  return jax.tree_util.tree_map(one, quant_caches, stats_caches, value_metric, is_leaf=is_cache)
