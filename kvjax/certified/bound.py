"""The certificate: a rigorous bound on ||O - O_exact||_2 for one attention row.

Notation (docs/certified.md derives each line): a row is one query token of one query head;
t runs over its visible tokens, grouped in blocks b. z_t = α q·k_t are the exact logits,
ẑ_t the logits the step computed (quantized keys for quantized blocks, exact keys for
promoted ones), â = softmax(ẑ) and a = softmax(z). With ε_t = z_t - ẑ_t and |ε_t| <= Δ_b:

    a_t = â_t e^{ε_t} / S,   S = Σ_s â_s e^{ε_s} ∈ [S_lo, S_hi],
    S_lo = Σ_b ρ_b e^{-Δ_b},  S_hi = Σ_b ρ_b e^{Δ_b}           (ρ_b = Σ_{t∈b} â_t)
    |a_t / â_t - 1| <= m_b = max(e^{Δ_b} / S_lo - 1, 1 - e^{-Δ_b} / S_hi)
    TV(a, â) <= min(tanh(max_b Δ_b / 2), ½ Σ_b ρ_b m_b)

and O_comp - O = (O_comp - Σ â v̂) + Σ â (v̂ - v) + Σ (â - a) v gives

    E_key = min(2 TV · max_t ||v_t||,  Σ_b ρ_b m_b ν_b)
    E_val = Σ_b ρ_b η_b
    E_fp  = the rounding of the softmax, the value sums and the un-rotation (`output_rounding`)
    bound = (E_key + E_val + E_fp) (1 + γ)    (γ covers evaluating this bound in float32)

The masses ρ_b used are the computed ones; the exact-arithmetic masses lie in
[ρ_b / (1 + θ), ρ_b / (1 - θ)] (θ the softmax's relative rounding), plus an underflow allowance.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kvjax.certified.cache import U, gamma


def softmax_rounding(zmax, num_tokens: int, *, exp_ulps: int = 2):
  """θ: max_t |p_t / â_t - 1| for the float32 softmax of logits with |ẑ| <= zmax over
  `num_tokens` tokens: the exponent's argument ẑ - max ẑ is rounded by <= 2 u zmax, exp is
  taken to be within `exp_ulps` ulp (2: XLA's float32 exp; the fused kernels are given 4), the
  normaliser is a num_tokens-term sum (γ_N), and the division rounds once."""
  # The argument's and exp's errors (κ) enter p_t and, the other way, its normaliser: 2κ.
  kappa = 2 * U * zmax + 2 * exp_ulps * U
  return jnp.exp(2 * kappa) * (1 + U) / (1 - gamma(num_tokens)) - 1


def output_rounding(theta, vhat_max, *, num_tokens: int, head_dim: int, promoted_tokens: int,
                    defect, split: float = 0.0):
  """E_fp: ||O_comp - Σ_t â_t v̂_t|| for a row whose stored values have norms <= vhat_max.

  p vs â: θ vhat_max; the value sum Σ p_t ŷ_t over N tokens: γ_N (1 + θ) vhat_max (any order);
  the un-rotation λ R^T o (a D-term dot per channel): γ_D sqrt(D) (1 + ε_R) ||o||; the exact
  blocks' sum and its addition: γ_{P+2}. ||R||_2 <= 1 + ε_R carries each through R^T.
  split: the relative error of each p_t ŷ_t product in the fused kernels (bfloat16 parts)."""
  d = head_dim
  inner = (split + gamma(num_tokens) + (1 + gamma(num_tokens)) * gamma(d) * np.sqrt(d) * (1 + defect)
           + gamma(promoted_tokens + 2) + 2 * U)
  return vhat_max * (1 + defect) * (theta + (1 + theta) * inner)


def certificate(rho, delta, eta, nu, vmax, e_fp, theta, visible=None, block_size: int = 16):
  """The bound on ||O_comp - O_exact||_2 per row, and its key and value terms.

  rho:   [..., NB] computed attention mass of each block (0 for blocks the row cannot see)
  delta: [..., NB] bound on |z_t - ẑ_t| over the block's tokens (logit units, after the
         attention scale and soft cap)
  eta:   [..., NB] value error of the block (0 for exact blocks)
  nu:    [..., NB] max ||v_t|| over the block
  vmax:  [...] max ||v_t|| over the visible tokens
  e_fp:  [...] `output_rounding`; theta: [...] `softmax_rounding`
  visible: [..., NB] bool, the blocks the row's mask lets it see (default rho > 0); a visible
         block keeps its delta whatever its computed mass
  block_size: tokens per block (the underflow allowance below)
  Returns (bound, e_key, e_val), each [...].
  """
  nb = rho.shape[-1]
  visible = rho > 0 if visible is None else jnp.broadcast_to(visible, rho.shape)
  delta = jnp.where(visible, delta, 0.0)
  ed, emd = jnp.exp(delta), jnp.exp(-delta)
  # Exact masses: rho / (1 + θ) <= ρ̂ <= rho / (1 - θ), plus block_size 2^-125 for weights that
  # left float32's normal range (θ does not describe them; each is below 2^-126 exactly).
  rho_lo = rho / (1 + theta)[..., None]
  rho_up = jnp.where(visible, rho / jnp.maximum(1 - theta, 1e-30)[..., None]
                     + block_size * 2.0 ** -125, 0.0)
  s_lo = jnp.sum(rho_lo * emd, axis=-1) / (1 + gamma(nb))
  s_hi = jnp.sum(rho_up * ed, axis=-1) * (1 + gamma(nb))
  s_lo = jnp.where(s_lo > 0, s_lo, 1.0)[..., None]
  s_hi = jnp.where(s_hi > 0, s_hi, 1.0)[..., None]
  # exp(Δ) - 1 carries exp's and s_lo's rounding absolutely, not relative to m: a margin.
  m = jnp.maximum(ed / s_lo - 1, 1 - emd / s_hi) + 12 * U * ed / s_lo
  tv = jnp.minimum(jnp.tanh(jnp.max(delta, axis=-1) / 2), 0.5 * jnp.sum(rho_up * m, axis=-1))
  tv = jnp.minimum(tv, 1.0)
  e_key = jnp.minimum(2 * tv * vmax, jnp.sum(rho_up * m * nu, axis=-1))
  e_val = jnp.sum(rho_up * eta, axis=-1)
  bound = (e_key + e_val + e_fp) * (1 + gamma(nb + 16))
  return bound, e_key, e_val
