import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvjax import rotations

DIMS = (64, 80, 96, 128, 192, 256)
KINDS = ("none", "srht", "srft", "householder", "learned")


def _applies(kind, d):
  return not (kind == "srht" and d & (d - 1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", DIMS)
def test_orthogonal_and_round_trip(kind, d):
  if not _applies(kind, d):
    with pytest.raises(ValueError, match="power-of-two"):
      rotations.make_rotation(kind, d, seed=1)
    return
  r = rotations.make_rotation(kind, d, seed=1)
  m = np.asarray(r.matrix(), np.float64)
  assert np.abs(m @ m.T - np.eye(d)).max() < 1e-5
  x = np.random.default_rng(d).standard_normal((7, 3, d)).astype(np.float32)
  y = np.asarray(r.apply(jnp.asarray(x)))
  np.testing.assert_allclose(y, x @ m.T, atol=2e-5, rtol=0)
  back = np.asarray(r.inverse(jnp.asarray(y)))
  np.testing.assert_allclose(back, x, atol=2e-5, rtol=0)
  # Norms are preserved per vector.
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("kind", ("srht", "srft", "householder"))
def test_seeded_and_deterministic(kind):
  a = rotations.make_rotation(kind, 64, seed=3).matrix()
  b = rotations.make_rotation(kind, 64, seed=3).matrix()
  c = rotations.make_rotation(kind, 64, seed=4).matrix()
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0.1


def test_random_rotations_spread_an_outlier_channel():
  # One huge channel: after a good rotation no coordinate keeps most of the energy.
  x = np.zeros((1, 128), np.float32)
  x[0, 5] = 100.0
  for kind in ("srht", "srft"):
    y = np.asarray(rotations.make_rotation(kind, 128, 0).apply(jnp.asarray(x)))
    assert np.abs(y).max() < 0.2 * 100.0, kind


def test_householder_reflector_count():
  r = rotations.make_rotation("householder", 96, 0, num_reflectors=5)
  assert r.vectors.shape == (5, 96)
  assert rotations.make_rotation("householder", 96, 0).vectors.shape == (48, 96)


def test_learned_rotation_stays_orthogonal_under_gradient_steps():
  d = 32
  r = rotations.make_rotation("learned", d, seed=0)
  x = jax.random.normal(jax.random.key(0), (64, d))
  target = jax.random.normal(jax.random.key(1), (64, d))

  def loss(w):
    rr = rotations.LearnedRotation(dim=d, weights=w, base=r.base)
    return jnp.mean((rr.apply(x) - target) ** 2)

  w = r.weights
  l0 = loss(w)
  for _ in range(20):
    w = w - 0.5 * jax.grad(loss)(w)
  m = np.asarray(rotations.LearnedRotation(dim=d, weights=w, base=r.base).matrix(), np.float64)
  assert np.abs(m @ m.T - np.eye(d)).max() < 1e-5
  assert loss(w) < l0  # the parameterization actually moves
  # Zero weights give back the base exactly.
  np.testing.assert_allclose(np.asarray(r.matrix()), np.asarray(r.base), atol=1e-6)


def test_rotation_is_a_pytree_under_jit():
  r = rotations.make_rotation("srft", 96, 2)
  x = jax.random.normal(jax.random.key(0), (4, 96))
  y = jax.jit(lambda rr, xx: rr.apply(xx))(r, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(r.apply(x)), atol=1e-5)


def test_bad_inputs():
  with pytest.raises(ValueError, match="rotation kind"):
    rotations.make_rotation("qr", 64)
  with pytest.raises(ValueError, match="even"):
    rotations.make_rotation("srft", 63)
  with pytest.raises(ValueError, match="last axis"):
    rotations.make_rotation("srft", 64).apply(jnp.ones((2, 32)))


@settings(max_examples=25, deadline=None)
@given(half=st.integers(2, 80), seed=st.integers(0, 2**16), kind=st.sampled_from(["srft", "householder"]))
def test_property_any_even_dim(half, seed, kind):
  d = 2 * half
  r = rotations.make_rotation(kind, d, seed)
  x = np.random.default_rng(seed).standard_normal((3, d)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(r.inverse(r.apply(jnp.asarray(x)))), x, atol=3e-5)
