"""The C++ CPU attention kernel (kvjax.native) against the float32 quantized-domain path."""

import os
import pathlib
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import native

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not native.available(),
    reason=f"the CPU kernel is not available here: {native.unavailable_reason()}")


def _rand(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _row_rel_err(a, ref):
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(a - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)


# float32 throughout, like "xla": the two differ in summation order and in the kernel's exp
# (a degree-6 polynomial, < 2e-7 relative). Over a few hundred to a few thousand tokens that is
# ~1e-6 of a row (measured below 5e-7); the int8dot path is 1e-4 away, the int4 cache ~15%.
BOUND = 1e-5


@pytest.mark.parametrize("kb,vb,g,d,rep,tq", [
    (4, 4, 32, 128, 4, 1), (4, 4, 64, 128, 1, 1), (4, 4, 128, 128, 2, 1),
    (8, 4, 64, 64, 1, 1), (4, 4, 32, 64, 2, 3), (4, 8, 128, 256, 8, 1),
    (8, 8, 32, 256, 2, 1), (4, 4, 32, 256, 4, 2)])
def test_native_equals_the_float32_path(kb, vb, g, d, rep, tq):
  """Every bit width, head dim and group size the kernel has, ragged lengths (one sequence
  empty: zeros, not NaN), decode and short chunks (causal within the chunk)."""
  b, h, n = 3, 2, 700
  cfg = kvjax.QuantConfig(key_bits=kb, value_bits=vb, group_size=g, seed=3)
  c = kvjax.init_cache(b, h, 1024, d, quant=cfg, dtype=jnp.bfloat16)
  c = kvjax.append(c, jnp.asarray(_rand(50, b, n, h, d)), jnp.asarray(_rand(51, b, n, h, d)),
                   num_tokens=jnp.array([700, 123, 0]))
  q = jnp.asarray(4 * _rand(52, b, tq, h * rep, d))  # peaked attention, as in real models
  ref = np.asarray(kvjax.attend(q, c, impl="xla"), np.float64)
  out = np.asarray(kvjax.attend(q, c, impl="native"))
  assert out.shape == q.shape and np.isfinite(out).all()
  assert _row_rel_err(out[:2], ref[:2]).max() < BOUND
  assert np.all(out[2] == 0)
  if tq == 1:  # the CPU default for decode
    np.testing.assert_array_equal(np.asarray(kvjax.attend(q, c)), out)


def test_blocks_merge_to_the_same_result():
  """Tokens split into blocks of 16 (44 blocks per sequence, flash-decoding merge) or taken
  whole: the same output and slot weights to float32 rounding."""
  x, m, d, n, g = 4, 4, 128, 700, 32
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((x, m, d)) * 0.3, jnp.float32)
  kc = jnp.asarray(rng.integers(0, 256, (x, n, d // 2)), jnp.uint8)
  vc = jnp.asarray(rng.integers(0, 256, (x, n, d // 2)), jnp.uint8)
  ks = jnp.asarray(rng.random((x, n, d // g)) * 0.1, jnp.bfloat16)
  vs = jnp.asarray(rng.random((x, n, d // g)) * 0.1, jnp.bfloat16)
  off = jnp.asarray(rng.standard_normal((x, m, n)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 1, n)) < 0.8)
  slots = jnp.asarray([[[0, 5, 699, -1]], [[3, 400, -1, 1]]], jnp.int32)
  kw = dict(key_bits=4, value_bits=4, group_size=g, heads=2, scale=0.2, softcap=20.0)
  small = native.quant_attention(q, kc, ks, vc, vs, off, mask, slots, block=16, **kw)
  whole = native.quant_attention(q, kc, ks, vc, vs, off, mask, slots, block=4096, **kw)
  for a, b in zip(small, whole):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)
  # The slot weights are the softmax weights at those positions; a masked slot has weight 0.
  w = np.asarray(whole[1])
  vis = np.asarray(mask)[:, 0]
  for pair in range(x):
    for k, pos in enumerate(np.asarray(slots)[pair // 2, 0]):
      if pos < 0 or not vis[pair // 2, pos]:
        assert np.all(w[pair, :, k] == 0)
      else:
        assert np.all(w[pair, :, k] > 0)


def test_slot_weights_are_the_softmax_weights():
  """Against a numpy softmax over the dequantized codes (float64)."""
  x, m, d, n, g = 2, 3, 64, 90, 32
  rng = np.random.default_rng(1)
  q = rng.standard_normal((x, m, d)).astype(np.float32)
  kc = rng.integers(0, 256, (x, n, d // 2)).astype(np.uint8)
  vc = rng.integers(0, 256, (x, n, d // 2)).astype(np.uint8)
  ks = (rng.random((x, n, d // g)) * 0.1).astype(np.float32)
  vs = (rng.random((x, n, d // g)) * 0.1).astype(np.float32)
  off = rng.standard_normal((x, m, 1)).astype(np.float32)
  mask = np.ones((1, 1, n), bool)
  mask[0, 0, 80:] = False
  slots = np.array([[[2, 85, 40]]], np.int32)
  out, w = native.quant_attention(*(jnp.asarray(a) for a in (q, kc, ks, vc, vs, off, mask,
                                                             slots)),
                                  key_bits=4, value_bits=4, group_size=g, heads=2, scale=0.125)

  def levels(codes):
    lo, hi = codes & 15, codes >> 4
    c = np.concatenate([lo, hi], -1).astype(np.int64)
    return 2 * np.where(c >= 8, c - 16, c) + 1

  kf = levels(kc) * np.repeat(ks, g, -1)
  vf = levels(vc) * np.repeat(vs, g, -1)
  s = (np.einsum("xmd,xnd->xmn", q.astype(np.float64), kf) + off) * 0.125
  s = np.where(mask[0, 0], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  assert _row_rel_err(out, np.einsum("xmn,xnd->xmd", p, vf)).max() < BOUND
  np.testing.assert_allclose(np.asarray(w), np.stack([p[..., 2], np.zeros_like(p[..., 2]),
                                                      p[..., 40]], -1), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("bits,d", [(4, 64), (4, 128), (4, 256), (8, 64), (8, 128)])
def test_channel_order_is_a_permutation_and_its_inverse(bits, d):
  x = jnp.arange(3 * d, dtype=jnp.float32).reshape(3, d)
  ln = native.lanes(d)
  y = native.to_kernel_order(x, bits, ln)
  assert sorted(np.asarray(y[0]).tolist()) == list(range(d))
  np.testing.assert_array_equal(np.asarray(native.from_kernel_order(y, bits, ln)), np.asarray(x))
  # The kernel's first vector: byte position 0 of the first L words -> channels 0, 4, 8, ...
  np.testing.assert_array_equal(np.asarray(y[0, :ln]), 4 * np.arange(ln))


def test_unsupported_shapes_fall_back_to_int8dot():
  from kvjax import attention as attn
  odd = kvjax.init_cache(1, 2, 64, 96, quant=kvjax.QuantConfig(group_size=32))
  assert not native.supported(4, 4, 96, 32)
  assert attn.choose_impl("auto", odd, 1, "cpu") == "int8dot"
  c = kvjax.init_cache(1, 2, 64, 128, quant=kvjax.QuantConfig(group_size=32))
  assert attn.choose_impl("auto", c, 1, "cpu") == "native"
  with pytest.raises(ValueError, match="head_dim=96"):
    native.quant_attention(jnp.zeros((2, 1, 96)), jnp.zeros((2, 4, 48), jnp.uint8),
                           jnp.ones((2, 4, 3)), jnp.zeros((2, 4, 48), jnp.uint8),
                           jnp.ones((2, 4, 3)), jnp.zeros((2, 1, 1)), jnp.ones((1, 1, 4), bool),
                           jnp.zeros((1, 1, 0), jnp.int32), key_bits=4, value_bits=4,
                           group_size=32, heads=2, scale=1.0)


def test_a_failed_build_leaves_nothing_and_is_reported(tmp_path, monkeypatch):
  """A compiler that fails: RuntimeError with its output, no library and no temporary left."""
  bad = tmp_path / "badcxx"
  bad.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo bad 1.0 && exit 0\n"
                 "echo 'error: no such thing' >&2\nexit 1\n")
  bad.chmod(bad.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("KVJAX_CACHE_DIR", str(tmp_path / "cache"))
  with pytest.raises(RuntimeError, match="no such thing"):
    native._build(str(bad))
  assert list((tmp_path / "cache" / "native").iterdir()) == []


def test_the_library_is_cached_by_source_compiler_and_cpu(tmp_path, monkeypatch):
  """Built once per key (a stand-in compiler counts its runs), reused after, rebuilt for
  another instruction set; nothing but finished libraries in the directory."""
  cxx = tmp_path / "fakecxx"
  runs = tmp_path / "runs"
  cxx.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\n"
                 f"echo run >> {runs}\n"
                 "while [ $# -gt 1 ]; do shift; done; echo lib > \"$1\"\n")
  cxx.chmod(cxx.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("KVJAX_CACHE_DIR", str(tmp_path / "cache"))
  first = native._build(str(cxx))
  assert native._build(str(cxx)) == first and runs.read_text().count("run") == 1  # reused
  monkeypatch.setenv("KVJAX_NATIVE_ARCH", "x86-64-v3")
  other = native._build(str(cxx))
  assert other != first and runs.read_text().count("run") == 2
  assert sorted(p.name for p in (tmp_path / "cache" / "native").iterdir()) == \
      sorted([first.name, other.name])


def test_cpu_export_holds_the_native_kernel():
  """A decode step exported for the CPU carries the kernel's custom call (so a process that
  runs it must import kvjax and have the kernel; `jax.export` needs the check disabled)."""
  c = kvjax.init_cache(1, 2, 64, 128, quant=kvjax.QuantConfig())
  q = jnp.ones((1, 1, 4, 128), jnp.float32)
  step = jax.jit(lambda q, c: kvjax.attend(q, c))
  text = jax.export.export(step, platforms=["cpu"], disabled_checks=[
      jax.export.DisabledSafetyCheck.custom_call(native.TARGET)])(q, c).mlir_module()
  assert native.TARGET in text


_OTHER_ISA = """
import numpy as np, jax.numpy as jnp, kvjax
from kvjax import native
assert native.available(), native.unavailable_reason()
rng = np.random.default_rng(0)
worst = 0.0
for kb, vb, g, d in [(4, 4, 32, 64), (4, 4, 32, 128), (8, 4, 64, 256), (4, 8, 128, 128)]:
  cfg = kvjax.QuantConfig(key_bits=kb, value_bits=vb, group_size=g)
  c = kvjax.init_cache(2, 2, 256, d, quant=cfg)
  c = kvjax.append(c, jnp.asarray(rng.standard_normal((2, 200, 2, d)), jnp.float32),
                   jnp.asarray(rng.standard_normal((2, 200, 2, d)), jnp.float32),
                   num_tokens=jnp.array([200, 57]))
  q = jnp.asarray(4 * rng.standard_normal((2, 1, 8, d)), jnp.float32)
  ref = np.asarray(kvjax.attend(q, c, impl="xla"), np.float64)
  out = np.asarray(kvjax.attend(q, c, impl="native"), np.float64)
  err = np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
  worst = max(worst, float(err.max()))
# The bfloat16 product, both layouts, against float64 (relative to sum |x| |w| per output).
for layout, shape in (("kn", (300, 2080)), ("nk", (4099, 640))):
  x = rng.standard_normal((3, 300 if layout == "kn" else 640)).astype(np.float32)
  w = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  wf = np.asarray(w.astype(jnp.float32), np.float64)
  wf = wf if layout == "kn" else wf.T
  y = np.asarray(native.linear(jnp.asarray(x), w, layout=layout), np.float64)
  rel = np.abs(y - x @ wf) / (np.abs(x) @ np.abs(wf))
  print("LINEAR", float(rel.max()))
  assert rel.max() < 1e-5
print("WORST", worst)
"""


@pytest.mark.skipif(not os.uname().machine in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize("arch", ["x86-64-v3"])  # AVX2 + FMA, no AVX-512 (x86-64-v2 passed too)
def test_the_kernel_built_for_an_older_instruction_set(arch, tmp_path):
  """The vector code lowers to whatever the target has: built without AVX-512 (the path CPUs
  without it take), its outputs are the float32 path's just the same."""
  import subprocess
  import sys
  env = dict(os.environ, KVJAX_NATIVE_ARCH=arch, KVJAX_CACHE_DIR=str(tmp_path),
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", _OTHER_ISA], env=env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert float(res.stdout.split("WORST")[1]) < BOUND
  assert res.stdout.count("LINEAR") == 2
  assert [p.suffix for p in (tmp_path / "native").iterdir()] == [".so"]


def test_invisible_slots_never_reach_the_output():
  """Slots no query sees (past the end, outside a window) may hold anything, NaN included: the
  output is the same as with clean slots, bit for bit, and finite."""
  x, m, d, n, g = 4, 4, 128, 600, 32
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((x, m, d)) * 0.3, jnp.float32)
  kc = jnp.asarray(rng.integers(0, 256, (x, n, d // 2)), jnp.uint8)
  vc = jnp.asarray(rng.integers(0, 256, (x, n, d // 2)), jnp.uint8)
  ks = rng.random((x, n, d // g)).astype(np.float32) * 0.1
  vs = rng.random((x, n, d // g)).astype(np.float32) * 0.1
  mask = np.zeros((2, 1, n), bool)
  mask[0, 0, 100:230] = True     # a window in the middle (partial tiles at both ends)
  mask[1, 0, :37] = True         # a short sequence in a long allocation
  off = jnp.zeros((x, m, 1), jnp.float32)
  slots = jnp.asarray([[[120, 5]], [[0, 300]]], jnp.int32)
  kw = dict(key_bits=4, value_bits=4, group_size=g, heads=2, scale=0.2)
  clean = native.quant_attention(q, kc, jnp.asarray(ks), vc, jnp.asarray(vs), off,
                                 jnp.asarray(mask), slots, **kw)
  hidden = np.repeat(~mask[:, 0], 2, axis=0)            # [x, n]: invisible to every row
  ks[hidden], vs[hidden] = np.nan, np.inf
  dirty = native.quant_attention(q, kc, jnp.asarray(ks), vc, jnp.asarray(vs), off,
                                 jnp.asarray(mask), slots, **kw)
  for a, b in zip(clean, dirty):
    assert np.isfinite(np.asarray(b)).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- the bfloat16 matrix product (linear.cc) ----------------------------------------------------

def _linear_bound(x, w_kn):
  """|y - x W| <= gamma_K sum_k |x_k| |W_kn| per output, gamma_K = K u / (1 - K u), u = 2^-24:
  float32 sums of exact products (a bfloat16 weight times a float32 input is exact in float64,
  rounded once in float32) in any order (Higham, Accuracy and Stability, eq. 3.5)."""
  k = x.shape[-1]
  u = 2.0 ** -24
  gamma = (k + 1) * u / (1 - (k + 1) * u)  # + 1: the product's own rounding
  return gamma * (np.abs(x) @ np.abs(w_kn))


@pytest.mark.parametrize("m,k,n,layout,stack", [
    (1, 640, 1024, "kn", None),    # one column block, rows in 16 blocks
    (3, 2048, 640, "kn", None),    # a width no power of two
    (16, 1002, 96, "kn", None),    # the most rows; K not a multiple of 4 (single-row tail)
    (2, 640, 2080, "kn", None),    # three column blocks, the last one partial
    (1, 640, 4099, "nk", None),    # the LM head's layout; a partial last tile of 16 rows
    (5, 96, 300, "nk", (2, 3)),    # a stack, read at one index
    (7, 640, 1024, "kn", (3, 2)),
])
def test_linear_against_float64(m, k, n, layout, stack):
  rng = np.random.default_rng(m * 1000 + k)
  x = rng.standard_normal((m, k)).astype(np.float32)
  shape = (k, n) if layout == "kn" else (n, k)
  lead = stack or ()
  w = jnp.asarray(rng.standard_normal(lead + shape), jnp.bfloat16)
  index = None if stack is None else int(rng.integers(0, np.prod(stack)))
  flat = w if stack is None else w.reshape((-1,) + shape)
  y = np.asarray(jax.jit(lambda x, w: native.linear(x, w, layout=layout, index=index))(
      jnp.asarray(x), flat))
  one = np.asarray((flat if stack is None else flat[index]).astype(jnp.float32), np.float64)
  w_kn = one if layout == "kn" else one.T
  ref = x.astype(np.float64) @ w_kn
  assert y.shape == (m, n) and y.dtype == np.float32
  err = np.abs(y - ref)
  assert (err <= _linear_bound(x.astype(np.float64), w_kn)).all(), err.max()
  assert err.max() > 0 or m * k < 100  # float32 sums: not the float64 product by accident


def test_linear_bad_input():
  w = jnp.ones((64, 96), jnp.bfloat16)
  with pytest.raises(ValueError, match="layout"):
    native.linear(jnp.ones((1, 64)), w, layout="nm")
  with pytest.raises(ValueError, match="bfloat16"):
    native.linear(jnp.ones((1, 64)), w.astype(jnp.float32))
  with pytest.raises(ValueError, match="features"):
    native.linear(jnp.ones((1, 63)), w)
  with pytest.raises(ValueError, match="multiple of 32"):
    native.linear(jnp.ones((1, 64)), jnp.ones((64, 90), jnp.bfloat16))
  with pytest.raises(ValueError, match="index"):
    native.linear(jnp.ones((1, 64)), jnp.ones((2, 64, 96), jnp.bfloat16))
  assert not native.linear_supported(native.LINEAR_MAX_ROWS + 1, 64, 96, jnp.bfloat16)
  assert not native.linear_supported(1, 64, 96, jnp.float32)


def test_a_scanned_layer_reads_its_weight_in_place():
  """`LayerView` + `project` inside a scan over (group, slot): each step's product is its own
  layer's weight times x (float32 inputs, so the output is not rounded to bfloat16), within the
  float32 bound of the float64 product, and equal to XLA's slice-then-dot to that bound."""
  from kvjax.models.layers import LayerView, project
  groups, slots, k, n = 2, 3, 160, 96
  rng = np.random.default_rng(7)
  stack = jnp.asarray(rng.standard_normal((groups, slots, k, n)), jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal((groups, slots, 2, 1, k)), jnp.float32)

  def run(use_native):
    def group_body(_, g):
      def slot_body(_, j):
        view = LayerView(stack, (g, j))
        return None, project(x[g, j], view, native=use_native)
      return None, jax.lax.scan(slot_body, None, jnp.arange(slots))[1]
    return np.asarray(jax.jit(lambda: jax.lax.scan(group_body, None, jnp.arange(groups))[1])())

  got, xla = run(True), run(False)
  one = LayerView(stack, (jnp.int32(0), jnp.int32(1)))
  text = jax.jit(lambda: project(x[0, 0], one)).lower().as_text()
  assert native.LINEAR_TARGET in text
  w = np.asarray(stack.astype(jnp.float32), np.float64)
  xs = np.asarray(x, np.float64)
  for g in range(groups):
    for j in range(slots):
      ref = xs[g, j] @ w[g, j]
      bound = _linear_bound(xs[g, j], w[g, j])
      assert (np.abs(got[g, j] - ref) <= bound).all() and (np.abs(xla[g, j] - ref) <= bound).all()


def test_the_native_product_is_differentiable():
  """jvp and grad through `linear` (a stack read at an index, both layouts) equal those of
  XLA's product: the derivatives are XLA's products, the primal the kernel's."""
  rng = np.random.default_rng(11)
  for layout, shape in (("kn", (3, 64, 96)), ("nk", (3, 96, 64))):
    w = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.float32)
    ref = lambda x, w: jnp.dot(x, (w[1] if layout == "kn" else w[1].T).astype(jnp.float32),
                               precision="highest")
    ours = lambda x, w: native.linear(x, w, layout=layout, index=1)
    loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))
    gx, gw = jax.grad(loss(ours), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(loss(ref), argnums=(0, 1))(x, w)
    # cos(y) at the kernel's y, whose float32 sums run in another order than XLA's
    np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gw, np.float32), np.asarray(rw, np.float32), rtol=2e-2,
                               atol=2e-2)  # bfloat16 cotangents
    assert float(jnp.abs(gw[0]).max()) == 0 and float(jnp.abs(gw[1]).max()) > 0
    dx = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    _, t = jax.jvp(lambda x: ours(x, w), (x,), (dx,))
    _, rt = jax.jvp(lambda x: ref(x, w), (x,), (dx,))
    np.testing.assert_allclose(t, rt, rtol=1e-5, atol=1e-5)


def test_a_bfloat16_decode_step_takes_the_native_product(monkeypatch):
  """A bfloat16 model's decode step multiplies by its weights with the native product (every
  projection and the tied LM head); a prefill chunk and a float32 model keep XLA's dot. The
  logits agree with the XLA path's to bfloat16 rounding (a layer read at the wrong stack index
  would not)."""
  from kvjax.models import Gemma3ForCausalLM, ModelConfig
  from kvjax.models import layers
  from flax import nnx
  types = tuple("global" if l % 6 == 5 else "local" for l in range(13))
  cfg = ModelConfig.gemma3_tiny().replace(num_layers=13, layer_types=types)
  model = Gemma3ForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(5))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)

  def decode(m, steps=4):
    run = jax.jit(lambda t, c: m(t, c))
    logits, caches = run(tokens, m.init_cache(2, 64))
    out = []
    for _ in range(steps):
      logits, caches = run(jnp.argmax(logits[:, -1:], -1).astype(jnp.int32), caches)
      out.append(np.asarray(logits[:, -1], np.float64))
    return np.stack(out)

  step_text = jax.jit(lambda t, c: model(t, c)).lower(tokens[:, :1], model.init_cache(2, 64)).as_text()
  chunk_text = jax.jit(lambda t, c: model(t, c)).lower(tokens, model.init_cache(2, 64)).as_text()
  # The decode step: 7 projections in each of the 3 scanned layer bodies (local, global, tail),
  # and the LM head.
  assert step_text.count(native.LINEAR_TARGET) == 7 * 3 + 1
  assert native.LINEAR_TARGET not in chunk_text
  f32 = Gemma3ForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(5))
  f32_text = jax.jit(lambda t, c: f32(t, c)).lower(tokens[:, :1], f32.init_cache(2, 64)).as_text()
  assert native.LINEAR_TARGET not in f32_text

  got = decode(model)
  monkeypatch.setattr(layers, "_native_linear", lambda *a: False)
  ref = decode(model)
  # Per (step, sequence) row of logits, against that row's own scale. Measured 2.4e-4 of a 59
  # logit at worst; a layer read from a wrong stack index: 27.
  err = np.abs(got - ref).max(axis=-1)
  scale = np.abs(ref).max(axis=-1)
  assert (err < 0.01 * scale).all(), (err.max(), scale.min())
