"""The CPU kernels: quantized-domain decode attention over int4/int8 codes, and products with
bfloat16 weights, every core.

XLA's CPU backend runs the int8-dot formulation of `kvjax.attention` one (batch, head) block at
a time, on one core, and its int8 products do not use the CPU's dot-product instructions; and it
has no bfloat16 dot: it writes a float32 copy of every bfloat16 weight before each product. This
package holds two C++ XLA FFI kernels:

  * quant_attention.cc (`quant_attention`): dequantizes each cached token's codes in registers
    (never to memory), meets them with the rotated queries, and splits (pair, block of tokens)
    tasks over XLA's own intra-op thread pool with a flash-decoding merge;
  * linear.cc (`linear`): x @ W for a few rows x and a bfloat16 W, reading each weight once
    where it lies (a scanned model's layer weight inside its stack, by index), float32 sums.

They are compiled on first use with the host compiler (`c++`, or `$CXX`) for the host's own
instruction set (`-march=native`; `$KVJAX_NATIVE_ARCH` names another) into one library in the
kvjax cache directory, keyed by the sources, the compiler, the flags, jaxlib's FFI headers and
the CPU's flags, and loaded and registered with `jax.ffi`. Nothing half-built is ever loaded:
the library is written under a temporary name and moved into place. Where no compiler works,
`available()` is False (with the reason in `unavailable_reason()`) and kvjax keeps its XLA paths
(`impl="auto"` the int8-dot attention, the models XLA's dot); `KVJAX_NATIVE=0` turns both
kernels off.

    from kvjax import native
    native.available()                 # compiles on first call (~20 s), then cached
    o_rot, w = native.quant_attention(q_rot, k_codes, k_scales, v_codes, v_scales, offset,
                                      mask, slots, key_bits=4, value_bits=4, group_size=32,
                                      heads=H, scale=s, softcap=None)
    y = native.linear(x, w_bf16)       # x [..., K] @ w [K, N] -> float32 [..., N]
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "kvjax_quant_attention"
LINEAR_TARGET = "kvjax_bf16_linear"
_HERE = pathlib.Path(__file__).parent
_SOURCES = (_HERE / "quant_attention.cc", _HERE / "linear.cc")
_HEADERS = (_HERE / "simd.h",)
_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-DNDEBUG")


def _arch_flag() -> str:
  """-march=native, or `$KVJAX_NATIVE_ARCH` (e.g. x86-64-v3: AVX2 without AVX-512) to build for
  an older instruction set than the host's (tests/test_native.py checks that path)."""
  return f"-march={os.environ.get('KVJAX_NATIVE_ARCH') or 'native'}"


# Tokens per task: big enough that a task's work dwarfs claiming it, small enough that one
# sequence of one KV head still splits over the cores.
BLOCK = 512

_lock = threading.Lock()
_state: dict = {}


def _compiler() -> str | None:
  return (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
          or shutil.which("clang++"))


def _cpu_signature() -> str:
  from kvjax import timing
  flags = timing.cpu_flags()
  if flags:
    return " ".join(sorted(flags))
  import platform
  return platform.processor() or platform.machine()


def _build(cxx: str) -> pathlib.Path:
  from kvjax import user_cache
  include = jax.ffi.include_dir()
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
  headers = sorted(pathlib.Path(include, "xla", "ffi", "api").glob("*.h"))
  h = hashlib.sha256()
  flags = (*_FLAGS, _arch_flag())
  for part in (*(p.read_bytes() for p in _SOURCES + _HEADERS), version.encode(),
               " ".join(flags).encode(),
               _cpu_signature().encode(), *(p.read_bytes() for p in headers)):
    h.update(hashlib.sha256(part).digest())
  out_dir = user_cache.cache_dir() / "native"
  out_dir.mkdir(parents=True, exist_ok=True)
  lib = out_dir / f"kvjax_native-{h.hexdigest()[:16]}.so"
  if lib.exists():
    return lib
  fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
  os.close(fd)
  try:
    cmd = [cxx, *flags, f"-I{include}", f"-I{_HERE}", *map(str, _SOURCES), "-o", tmp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    os.replace(tmp, lib)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return lib


def _load() -> None:
  if os.environ.get("KVJAX_NATIVE", "1") == "0":
    raise RuntimeError("turned off by KVJAX_NATIVE=0")
  if not sys.platform.startswith("linux") and sys.platform != "darwin":
    raise RuntimeError(f"not built on {sys.platform}")
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
  lib = ctypes.CDLL(str(_build(cxx)))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.KvjaxQuantAttention),
                              platform="cpu")
  jax.ffi.register_ffi_target(LINEAR_TARGET, jax.ffi.pycapsule(lib.KvjaxBf16Linear),
                              platform="cpu")


def available() -> bool:
  """Whether the kernel is built and registered (builds it on the first call)."""
  with _lock:
    if "ok" not in _state:
      try:
        _load()
        _state["ok"], _state["why"] = True, None
      except Exception as e:  # noqa: BLE001 - any failure means: use the XLA path
        _state["ok"], _state["why"] = False, f"{type(e).__name__}: {e}"
    return _state["ok"]


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True or was not asked yet)."""
  return _state.get("why")


def supported(key_bits: int, value_bits: int, head_dim: int, group_size: int) -> bool:
  """Whether the kernel has a variant for these codes (else kvjax uses its XLA paths)."""
  return (key_bits in (4, 8) and value_bits in (4, 8) and head_dim in (64, 128, 256)
          and group_size in (32, 64, 128) and group_size <= head_dim)


def lanes(head_dim: int) -> int:
  """32-bit words per vector the kernel reads codes as: 16 (one AVX-512 register), 8 for D = 64."""
  return 16 if head_dim % 128 == 0 else 8


def to_kernel_order(x, bits: int, lanes: int):
  """Channels [..., D] into the kernel's order: 4-bit (h, b, v, l) <- channel h D/2 + 4 L v +
  4 l + b; 8-bit (b, v, l) <- channel 4 L v + 4 l + b (see quant_attention.cc)."""
  *lead, d = x.shape
  if bits == 4:
    w = d // (8 * lanes)
    y = x.reshape(*lead, 2, w, lanes, 4)
    return jnp.moveaxis(y, -1, -3).reshape(*lead, d)           # (h, b, w, l)
  w = d // (4 * lanes)
  return jnp.moveaxis(x.reshape(*lead, w, lanes, 4), -1, -3).reshape(*lead, d)  # (b, w, l)


def from_kernel_order(x, bits: int, lanes: int):
  """Inverse of `to_kernel_order`."""
  *lead, d = x.shape
  if bits == 4:
    w = d // (8 * lanes)
    return jnp.moveaxis(x.reshape(*lead, 2, 4, w, lanes), -3, -1).reshape(*lead, d)
  w = d // (4 * lanes)
  return jnp.moveaxis(x.reshape(*lead, 4, w, lanes), -3, -1).reshape(*lead, d)


def quant_attention(q, k_codes, k_scales, v_codes, v_scales, offset, mask, slots, *,
                    key_bits: int, value_bits: int, group_size: int, heads: int, scale: float,
                    softcap: float | None = None, block: int = BLOCK):
  """Softmax attention of rotated queries over codes, in the rotated domain, on the CPU.

  q: float32 [X, M, D] (X = batch * KV heads pairs, M = Tq * R rows: query token major);
  k_codes / v_codes: uint8 (4-bit, [X, N, D/2]) or int8 (8-bit, [X, N, D]);
  k_scales / v_scales: [X, N, D / group_size] (float32 or bfloat16; float16 is widened);
  offset: float32 [X, M, 1 or N], added to each score before `scale`;
  mask: bool [B, Tq, N] (B = X / heads), False = not visible;
  slots: int32 [B, Tq, K], positions whose softmax weight is also returned (-1: none).
  Returns (out float32 [X, M, D], normalised; slot weights float32 [X, M, K]); a row with no
  visible key gets zeros. Call `available()` first.
  """
  x, m, d = q.shape
  n = k_codes.shape[1]
  if not supported(key_bits, value_bits, d, group_size):
    raise ValueError(f"kvjax.native has no kernel for key_bits={key_bits}, "
                     f"value_bits={value_bits}, head_dim={d}, group_size={group_size}")
  ln = lanes(d)
  if k_scales.dtype not in (jnp.float32, jnp.bfloat16) or k_scales.dtype != v_scales.dtype:
    k_scales, v_scales = k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)
  k = slots.shape[-1]
  if k == 0:  # the kernel wants every buffer non-empty
    slots = jnp.full(slots.shape[:-1] + (1,), -1, jnp.int32)
  call = jax.ffi.ffi_call(
      TARGET, (jax.ShapeDtypeStruct((x, m, d), jnp.float32),
               jax.ShapeDtypeStruct((x, m, max(k, 1)), jnp.float32)),
      vmap_method="sequential")
  out, w = call(to_kernel_order(q.astype(jnp.float32), key_bits, ln), k_codes, k_scales, v_codes, v_scales,
                jnp.asarray(offset, jnp.float32), mask.astype(jnp.bool_), slots.astype(jnp.int32),
                key_bits=np.int64(key_bits), value_bits=np.int64(value_bits),
                group_size=np.int64(group_size), heads=np.int64(heads),
                scale=np.float32(scale), softcap=np.float32(0.0 if softcap is None else softcap),
                block=np.int64(block), lanes=np.int64(ln))
  return from_kernel_order(out, value_bits, ln), w[..., :k]


# Rows (tokens) up to which `linear` is the faster product: each weight is read once and meets
# every row in registers, so the cost is the weight bytes until the multiply-adds catch up.
LINEAR_MAX_ROWS = 16


def linear_supported(rows: int, in_features: int, out_features: int, dtype, *,
                     layout: str = "kn") -> bool:
  """Whether `linear` takes a product of `rows` vectors with a [in, out] ("kn") or [out, in]
  ("nk") weight of `dtype`: bfloat16 weights, at most `LINEAR_MAX_ROWS` rows, and the weight's
  contiguous axis (out for "kn", in for "nk") a multiple of 32."""
  contiguous = out_features if layout == "kn" else in_features
  return (jnp.dtype(dtype) == jnp.bfloat16 and 0 < rows <= LINEAR_MAX_ROWS
          and contiguous % 32 == 0 and layout in ("kn", "nk"))


def linear(x, w, *, layout: str = "kn", index=None):
  """x @ W for bfloat16 weights on the CPU, reading each weight once (linear.cc).

  x: [..., K] (any float dtype; computed in float32); w: bfloat16 [K, N] (layout "kn", a Linear
  kernel) or [N, K] ("nk", an embedding used as the LM head), or a stack [S, K, N] / [S, N, K]
  of them with `index` (an int, traced or not) choosing one: a scanned model's layer weight is
  read in place, never sliced out. Returns float32 [..., N]. Differentiable: derivatives (jvp
  and grad) are XLA's products. Call `available()` first.
  """
  if layout not in ("kn", "nk"):
    raise ValueError(f"layout must be 'kn' or 'nk', got {layout!r}")
  if w.dtype != jnp.bfloat16 or w.ndim not in (2, 3):
    raise ValueError(f"w must be a bfloat16 matrix or a stack [S, ...] of matrices, got "
                     f"{w.dtype} {w.shape}")
  k, n = w.shape[-2:] if layout == "kn" else w.shape[-2:][::-1]
  if x.shape[-1] != k:
    raise ValueError(f"x has {x.shape[-1]} features, the weight takes {k}")
  if (n if layout == "kn" else k) % 32:
    raise ValueError(f"the weight's contiguous axis must be a multiple of 32, got {w.shape}")
  if (index is None) != (w.ndim == 2):
    raise ValueError("give index exactly when w is a stack of matrices")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k).astype(jnp.float32)
  idx = jnp.zeros((), jnp.int32) if index is None else jnp.asarray(index, jnp.int32).reshape(())
  return _linear(x2, w, idx, 0 if layout == "kn" else 1).reshape(*lead, n)


def _linear_call(x2, w, idx, layout_code):
  n = w.shape[-1] if layout_code == 0 else w.shape[-2]
  call = jax.ffi.ffi_call(LINEAR_TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32),
                          vmap_method="sequential")
  return call(x2, w, idx, layout=np.int64(layout_code))


_linear = jax.custom_jvp(_linear_call, nondiff_argnums=(3,))


@_linear.defjvp
def _linear_jvp(layout_code, primals, tangents):
  # Tangents through XLA's products (transposable, so reverse mode works too).
  x2, w, idx = primals
  dx, dw, _ = tangents

  def matrix(a):
    a = a if a.ndim == 2 else jax.lax.dynamic_index_in_dim(a, idx, keepdims=False)
    a = a.astype(jnp.float32)
    return a if layout_code == 0 else a.T

  hi = jax.lax.Precision.HIGHEST
  dy = jnp.dot(dx, matrix(w), precision=hi) + jnp.dot(x2, matrix(dw), precision=hi)
  return _linear_call(x2, w, idx, layout_code), dy
