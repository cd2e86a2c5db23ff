"""Top-k routing with capacity, dispatch/combine and router losses vs a per-token loop."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kvjax.foe import routing
from kvjax.foe.config import expert_capacity


def naive_moe(x, router, w_gate, w_up, w_down, top_k, capacity):
  """Token-by-token MoE in float64: choice-major priority, drops past `capacity`."""
  x = np.asarray(x, np.float64)
  logits = x @ np.asarray(router, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  order = np.argsort(-probs, axis=-1)[:, :top_k]
  used = np.zeros(router.shape[1], int)
  out = np.zeros_like(x)
  dropped = 0
  for choice in range(top_k):
    for n in range(x.shape[0]):
      e = order[n, choice]
      if used[e] >= capacity:
        dropped += 1
        continue
      used[e] += 1
      g = x[n] @ np.asarray(w_gate[e], np.float64)
      u = x[n] @ np.asarray(w_up[e], np.float64)
      hidden = g / (1 + np.exp(-g)) * u
      out[n] += probs[n, e] * (hidden @ np.asarray(w_down[e], np.float64))
  counts = np.bincount(order.reshape(-1), minlength=router.shape[1])
  stats = {"assignment_fraction": counts / order.size, "mean_prob": probs.mean(0),
           "mean_sq_logsumexp": np.mean((np.log(np.exp(logits).sum(-1))) ** 2),
           "dropped_fraction": dropped / order.size}
  return out, stats


def worst_row_error(got, want):
  got = np.asarray(got, np.float64)
  scale = np.maximum(1.0, np.abs(want).max(-1))
  return float((np.abs(got - want).max(-1) / scale).max())


@pytest.mark.parametrize("tokens,experts,top_k,capacity_factor",
                         [(16, 4, 1, 1.0), (24, 8, 2, 1.0), (32, 8, 3, 0.5), (12, 6, 2, 4.0),
                          (9, 3, 3, 1.25)])
def test_moe_layer_matches_per_token_loop(tokens, experts, top_k, capacity_factor):
  rng = np.random.default_rng(tokens * 100 + experts * 10 + top_k)
  d, f = 16, 12
  x = rng.standard_normal((tokens, d), dtype=np.float32)
  router = rng.standard_normal((d, experts), dtype=np.float32)
  w_gate = rng.standard_normal((experts, d, f), dtype=np.float32) / 4
  w_up = rng.standard_normal((experts, d, f), dtype=np.float32) / 4
  w_down = rng.standard_normal((experts, f, d), dtype=np.float32) / 4
  capacity = expert_capacity(tokens, top_k, experts, capacity_factor)
  out, stats = jax.jit(routing.moe_layer, static_argnames=("top_k", "capacity"))(
      x, router, w_gate, w_up, w_down, top_k=top_k, capacity=capacity)
  want, want_stats = naive_moe(x, router, w_gate, w_up, w_down, top_k, capacity)
  # f32 against f64: one token's output sums <= top_k expert products of length <= 16; a
  # few ulps of float32 (1.2e-7) each. A wrong slot or a missed drop changes a row by O(1).
  assert worst_row_error(out, want) <= 1e-5
  for name, value in want_stats.items():
    np.testing.assert_allclose(np.asarray(getattr(stats, name)), value, rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_capacity_drops_later_choices_first():
  # Every token prefers expert 0 and then expert 1; capacity 2 keeps the first two tokens'
  # first choices and the first two tokens' second choices, nothing else.
  logits = jnp.array([[3.0, 2.0, 0.0]] * 4) + jnp.arange(4)[:, None] * 1e-3
  r = routing.route(logits, top_k=2, capacity=2)
  np.testing.assert_array_equal(np.asarray(r.expert_index), [[0, 1]] * 4)
  np.testing.assert_array_equal(np.asarray(r.kept), [[1, 1], [1, 1], [0, 0], [0, 0]])
  np.testing.assert_array_equal(np.asarray(r.slot)[:2], [[0, 2], [1, 3]])
  assert (np.asarray(r.slot)[2:] == 3 * 2).all()  # out of range: dropped


def test_dispatch_then_combine_with_identity_experts_returns_gated_tokens():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((10, 8), dtype=np.float32)
  logits = rng.standard_normal((10, 5), dtype=np.float32)

  @jax.jit
  def roundtrip(x, logits):
    r = routing.route(logits, top_k=2, capacity=3)
    return routing.combine(routing.dispatch(x, r, 5, 3), r), r

  got, r = roundtrip(x, logits)
  weight = np.where(np.asarray(r.kept), np.asarray(r.gate), 0).sum(-1)
  want = np.asarray(x) * weight[:, None]
  assert worst_row_error(got, want) <= 1e-6


def test_router_losses_formula():
  probs_logits = np.random.default_rng(3).standard_normal((64, 8), dtype=np.float32)

  @jax.jit
  def losses(logits):
    r = routing.route(logits, top_k=2, capacity=100)
    return routing.router_losses(routing.router_stats(r)), r

  (balance, z), r = losses(probs_logits)
  f = np.bincount(np.asarray(r.expert_index).reshape(-1), minlength=8) / (64 * 2)
  p = np.asarray(jax.nn.softmax(probs_logits)).mean(0)
  np.testing.assert_allclose(float(balance), 8 * np.sum(f * p), rtol=1e-6)
  lse = np.log(np.exp(np.asarray(probs_logits, np.float64)).sum(-1))
  np.testing.assert_allclose(float(z), np.mean(lse ** 2), rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=5, capacity=2), "top_k=5"),
    (dict(top_k=0, capacity=2), "top_k=0"),
    (dict(top_k=1, capacity=0), "capacity"),
])
def test_route_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    routing.route(jnp.ones((3, 4)), **kwargs)


def test_route_rejects_wrong_rank():
  with pytest.raises(ValueError, match="logits"):
    routing.route(jnp.ones((2, 3, 4)), top_k=1, capacity=1)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(tokens=st.integers(1, 12), experts=st.integers(1, 6), data=st.data())
def test_route_invariants(tokens, experts, data):
  top_k = data.draw(st.integers(1, experts))
  capacity = data.draw(st.integers(1, tokens * top_k))
  seed = data.draw(st.integers(0, 2**31 - 1))
  logits = np.random.default_rng(seed).standard_normal((tokens, experts)).astype(np.float32)
  r = jax.jit(routing.route, static_argnums=(1, 2))(logits, top_k, capacity)
  index, kept, slot = (np.asarray(a) for a in (r.expert_index, r.kept, r.slot))
  # Chosen experts are the top-k by probability, best first, without repeats.
  want = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
  np.testing.assert_array_equal(index, want)
  # Walking choice-major, an assignment is kept iff its expert still had a free slot.
  used = np.zeros(experts, int)
  for choice in range(top_k):
    for n in range(tokens):
      e = index[n, choice]
      assert kept[n, choice] == (used[e] < capacity)
      if kept[n, choice]:
        assert slot[n, choice] == e * capacity + used[e]
        used[e] += 1
      else:
        assert slot[n, choice] == experts * capacity
