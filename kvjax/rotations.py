"""Orthogonal rotations applied to keys and values before 4-bit quantization.

A rotation spreads the energy of a few large channels over all channels, so a
per-group abs-max scale wastes fewer of the 16 levels on outliers. Every
rotation here is a real orthogonal d x d matrix R acting on the last axis:

    apply(x)   = x @ R.T      (y = R x for each vector)
    inverse(y) = y @ R        (x = R^T y)

`apply`/`inverse` use the fast transform where one exists (FFT, Walsh-Hadamard,
reflections); `matrix()` hands the dense R to kernels, where on TPU/GPU a
rotation is one small matmul per query, not per cached token.

All rotations are seeded and deterministic, and are pytrees (their random
vectors are leaves), so they can be passed through `jit`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _register(cls, data_fields, meta_fields):
  return jax.tree_util.register_dataclass(
      cls, data_fields=list(data_fields), meta_fields=list(meta_fields))


def _check_dim(dim: int, *, even: bool = False, pow2: bool = False, what: str = ""):
  if not isinstance(dim, (int, np.integer)) or dim < 1:
    raise ValueError(f"dim must be a positive integer, got {dim!r}")
  if even and dim % 2:
    raise ValueError(f"{what} needs an even dim, got {dim}")
  if pow2 and dim & (dim - 1):
    raise ValueError(f"{what} needs a power-of-two dim, got {dim}; use 'srft' for other sizes")


def _check_last_axis(x, dim, name="x"):
  if x.shape[-1] != dim:
    raise ValueError(f"{name} last axis must be {dim} for this rotation, got shape {x.shape}")


def _random_signs(seed: int, dim: int) -> np.ndarray:
  rng = np.random.default_rng(np.random.SeedSequence([seed, dim, 0x5167]))
  return rng.choice(np.array([-1.0, 1.0], np.float32), size=dim)


class Rotation:
  """Interface shared by every rotation (see module docstring)."""

  dim: int

  def apply(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError

  def inverse(self, y: jax.Array) -> jax.Array:
    raise NotImplementedError

  def matrix(self) -> jax.Array:
    """The dense R, float32 [dim, dim], with apply(x) == x @ R.T."""
    # Rows of apply(I) are R e_i = column i of R, so apply(I) = R.T.
    return self.apply(jnp.eye(self.dim, dtype=jnp.float32)).T


@functools.partial(_register, data_fields=(), meta_fields=("dim",))
@dataclasses.dataclass(frozen=True)
class IdentityRotation(Rotation):
  dim: int

  def apply(self, x):
    _check_last_axis(x, self.dim)
    return x

  def inverse(self, y):
    _check_last_axis(y, self.dim, "y")
    return y


def fwht(x: jax.Array) -> jax.Array:
  """Orthonormal fast Walsh-Hadamard transform over the last axis (power-of-two length)."""
  d = x.shape[-1]
  lead = x.shape[:-1]
  h = 1
  y = x
  while h < d:
    y = y.reshape(*lead, d // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2)
    h *= 2
  return y.reshape(*lead, d) * (1.0 / math.sqrt(d))


@functools.partial(_register, data_fields=("signs",), meta_fields=("dim",))
@dataclasses.dataclass(frozen=True)
class SRHTRotation(Rotation):
  """R = H diag(signs) with H the orthonormal (Sylvester) Walsh-Hadamard matrix."""

  dim: int
  signs: jax.Array

  @classmethod
  def create(cls, dim: int, seed: int = 0) -> "SRHTRotation":
    _check_dim(dim, pow2=True, what="SRHT")
    return cls(dim=dim, signs=jnp.asarray(_random_signs(seed, dim)))

  def apply(self, x):
    _check_last_axis(x, self.dim)
    return fwht(x * self.signs.astype(x.dtype))

  def inverse(self, y):
    _check_last_axis(y, self.dim, "y")
    # H is symmetric and orthonormal: H^-1 = H.
    return fwht(y) * self.signs.astype(y.dtype)


def _real_fft_forward(x: jax.Array) -> jax.Array:
  """Orthonormal real DFT: x [..., d] (d even) -> real coefficients [..., d].

  Layout: [Re X_0, Re X_{d/2}, sqrt2 Re X_1, sqrt2 Im X_1, ..., sqrt2 Re X_{d/2-1},
  sqrt2 Im X_{d/2-1}] / sqrt(d). X_0 and X_{d/2} of a real signal are real, so
  the d outputs are the coordinates of x in an orthonormal cosine/sine basis.
  """
  d = x.shape[-1]
  spec = jnp.fft.rfft(x.astype(jnp.float32), axis=-1)  # [..., d/2 + 1]
  inner = spec[..., 1:d // 2]
  inner = jnp.stack([inner.real, inner.imag], axis=-1).reshape(*x.shape[:-1], d - 2)
  out = jnp.concatenate(
      [spec[..., :1].real, spec[..., d // 2:d // 2 + 1].real, math.sqrt(2.0) * inner], axis=-1)
  return out / math.sqrt(d)


def _real_fft_inverse(y: jax.Array) -> jax.Array:
  d = y.shape[-1]
  y = y.astype(jnp.float32) * math.sqrt(d)
  inner = y[..., 2:].reshape(*y.shape[:-1], d // 2 - 1, 2) / math.sqrt(2.0)
  spec = jnp.concatenate([
      y[..., :1].astype(jnp.complex64),
      (inner[..., 0] + 1j * inner[..., 1]).astype(jnp.complex64),
      y[..., 1:2].astype(jnp.complex64),
  ], axis=-1)
  return jnp.fft.irfft(spec, n=d, axis=-1)


@functools.partial(_register, data_fields=("signs", "perm", "inv_perm"), meta_fields=("dim",))
@dataclasses.dataclass(frozen=True)
class SRFTRotation(Rotation):
  """Sign-randomized real FFT: R = P F diag(signs).

  F is the orthonormal real DFT (`_real_fft_forward`), P a random permutation of
  the output coefficients, so each quantization group mixes low and high
  frequencies rather than one band. Works for any even dim (80, 96, 192, ...).
  """

  dim: int
  signs: jax.Array
  perm: jax.Array
  inv_perm: jax.Array

  @classmethod
  def create(cls, dim: int, seed: int = 0) -> "SRFTRotation":
    _check_dim(dim, even=True, what="SRFT")
    rng = np.random.default_rng(np.random.SeedSequence([seed, dim, 0x5F57]))
    perm = rng.permutation(dim).astype(np.int32)
    return cls(dim=dim, signs=jnp.asarray(_random_signs(seed, dim)), perm=jnp.asarray(perm),
               inv_perm=jnp.asarray(np.argsort(perm).astype(np.int32)))

  def apply(self, x):
    _check_last_axis(x, self.dim)
    y = _real_fft_forward(x * self.signs.astype(x.dtype))
    return jnp.take(y, self.perm, axis=-1).astype(x.dtype)

  def inverse(self, y):
    _check_last_axis(y, self.dim, "y")
    x = _real_fft_inverse(jnp.take(y, self.inv_perm, axis=-1))
    return (x * self.signs).astype(y.dtype)


@functools.partial(_register, data_fields=("vectors",), meta_fields=("dim",))
@dataclasses.dataclass(frozen=True)
class HouseholderRotation(Rotation):
  """R = H_k ... H_1, H_i = I - 2 u_i u_i^T with random unit vectors u_i [k, dim]."""

  dim: int
  vectors: jax.Array

  @classmethod
  def create(cls, dim: int, seed: int = 0, num_reflectors: int | None = None):
    _check_dim(dim, what="Householder")
    k = dim // 2 if num_reflectors is None else int(num_reflectors)
    if k < 1:
      raise ValueError(f"num_reflectors must be >= 1, got {num_reflectors!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, dim, k, 0x4805]))
    u = rng.standard_normal((k, dim))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    return cls(dim=dim, vectors=jnp.asarray(u, jnp.float32))

  def _reflect(self, x, u):
    return x - 2.0 * jnp.sum(x * u, axis=-1, keepdims=True) * u

  def apply(self, x):
    _check_last_axis(x, self.dim)
    u = self.vectors.astype(x.dtype)
    for i in range(u.shape[0]):
      x = self._reflect(x, u[i])
    return x

  def inverse(self, y):
    _check_last_axis(y, self.dim, "y")
    u = self.vectors.astype(y.dtype)
    for i in reversed(range(u.shape[0])):
      y = self._reflect(y, u[i])
    return y


def cayley(weights: jax.Array) -> jax.Array:
  """Orthogonal matrix (I - A)(I + A)^-1 from the skew part A = W - W^T of `weights` [d, d]."""
  a = weights - jnp.swapaxes(weights, -1, -2)
  eye = jnp.eye(weights.shape[-1], dtype=weights.dtype)
  # (I + A) is invertible for every skew-symmetric A (eigenvalues 1 + i t), and
  # (I - A) and (I + A)^-1 commute, so R = (I + A)^-1 (I - A) = solve(I + A, I - A).
  return jnp.linalg.solve(eye + a, eye - a)


@functools.partial(_register, data_fields=("weights", "base"), meta_fields=("dim",))
@dataclasses.dataclass(frozen=True)
class LearnedRotation(Rotation):
  """R = cayley(weights) @ base: orthogonal for every value of `weights`.

  `weights` [dim, dim] is the free parameter an optimizer updates (only its
  skew-symmetric part matters); `base` [dim, dim] is a fixed orthogonal
  starting point (identity, or an SRFT matrix). weights == 0 gives R == base.
  """

  dim: int
  weights: jax.Array
  base: jax.Array

  @classmethod
  def create(cls, dim: int, base: Rotation | jax.Array | None = None):
    _check_dim(dim, what="learned rotation")
    if base is None:
      base_m = jnp.eye(dim, dtype=jnp.float32)
    elif isinstance(base, Rotation):
      base_m = base.matrix()
    else:
      base_m = jnp.asarray(base, jnp.float32)
    if base_m.shape != (dim, dim):
      raise ValueError(f"base must be [{dim}, {dim}], got {base_m.shape}")
    return cls(dim=dim, weights=jnp.zeros((dim, dim), jnp.float32), base=base_m)

  def matrix(self):
    return cayley(self.weights) @ self.base

  def apply(self, x):
    _check_last_axis(x, self.dim)
    return x @ self.matrix().T.astype(x.dtype)

  def inverse(self, y):
    _check_last_axis(y, self.dim, "y")
    return y @ self.matrix().astype(y.dtype)


@functools.partial(_register, data_fields=("mat",), meta_fields=("dim",))
@dataclasses.dataclass(frozen=True)
class MatrixRotation(Rotation):
  """A rotation given by its dense matrix (e.g. restored from a calibration checkpoint)."""

  dim: int
  mat: jax.Array

  def matrix(self):
    return self.mat

  def apply(self, x):
    _check_last_axis(x, self.dim)
    return x @ self.mat.T.astype(x.dtype)

  def inverse(self, y):
    _check_last_axis(y, self.dim, "y")
    return y @ self.mat.astype(y.dtype)


def make_rotation(kind: str, dim: int, seed: int = 0, *,
                  num_reflectors: int | None = None) -> Rotation:
  """Builds a rotation by name: "none", "srht", "srft", "householder" or "learned".

  "learned" returns a LearnedRotation initialised at the SRFT matrix (its
  weights are zero), which calibration then trains.
  """
  if kind == "none":
    _check_dim(dim, what="identity")
    return IdentityRotation(dim)
  if kind == "srht":
    return SRHTRotation.create(dim, seed)
  if kind == "srft":
    return SRFTRotation.create(dim, seed)
  if kind == "householder":
    return HouseholderRotation.create(dim, seed, num_reflectors)
  if kind == "learned":
    return LearnedRotation.create(dim, SRFTRotation.create(dim, seed))
  raise ValueError(
      f"rotation kind must be one of 'none', 'srht', 'srft', 'householder', 'learned'; got {kind!r}")


@functools.lru_cache(maxsize=256)
def rotation_matrix_np(kind: str, dim: int, seed: int = 0,
                       num_reflectors: int | None = None) -> np.ndarray:
  """Dense float32 R as a host array, computed once per (kind, dim, seed) and cached."""
  with jax.ensure_compile_time_eval():
    m = make_rotation(kind, dim, seed, num_reflectors=num_reflectors).matrix()
  out = np.asarray(jax.device_get(m), np.float32)
  out.setflags(write=False)
  return out
