"""`kvjax` commands: bad arguments fail before any model loads, with the argument named."""

import time

import jax.numpy as jnp
import pytest

import kvjax
from kvjax import cli
from kvjax import eval as ev


def _run(argv, capsys):
  t0 = time.time()
  code = cli.main(argv)
  err = capsys.readouterr().err
  return code, err, time.time() - t0


@pytest.mark.parametrize("argv, message", [
    (["eval", "--out", "FILE"], "--out .* is a file"),
    (["eval", "--text", "/nonexistent/book.txt"], "--text /nonexistent/book.txt: no such file"),
    (["eval", "--chunk", "0"], "--chunk must be an int >= 1"),
    (["eval", "--text", "LATIN1"], "is not UTF-8"),
    (["eval", "--contexts", "1024", "-5"], "--contexts must be ints >= 2"),
    (["eval", "--calibration", "/nonexistent/cal"], "no calibration directory"),
    (["eval", "--caches", "K4V4-g32-srft-cla"], "unknown cache 'K4V4-g32-srft-cla'"),
    (["eval", "--caches", "int4+k8@999"], r"layers \[999\] are out of range for a model of 18"),
    (["eval", "--caches", "int4+g64@40"], "layer 40 is out of range"),
    (["eval", "--text", "SHORT"], "fewer tokens than the longest context 4096"),
    (["bench", "--contexts", "-5"], "--contexts must be an int >= 1"),
    (["bench", "--repeats", "0"], "--repeats must be an int >= 4"),
    (["bench", "--out", "FILE"], "--out .* is a file"),
    (["passkey", "--depths", "1.5"], r"--depths must be fractions in \[0, 1\]"),
    (["calibrate", "--out", "EXISTING"], "already exists"),
    (["calibrate", "--out", "NEW", "--text", "/nonexistent.txt"], "no such file"),
    (["calibrate", "--out", "NEW", "--windows", "1"], "--windows must be token counts >= 2"),
])
def test_bad_arguments_fail_fast_and_name_the_argument(argv, message, tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  (tmp_path / "existing").mkdir()
  (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
  (tmp_path / "short.txt").write_text("A short book. " * 100)
  subs = {"FILE": str(tmp_path / "file"), "EXISTING": str(tmp_path / "existing"),
          "LATIN1": str(tmp_path / "latin1.txt"), "SHORT": str(tmp_path / "short.txt"),
          "NEW": str(tmp_path / "new")}
  argv = [subs.get(a, a) for a in argv]
  code, err, seconds = _run(argv, capsys)
  assert code == 2
  assert pytest.importorskip("re").search(message, err), err
  assert seconds < 20                       # no model was loaded
  assert not (tmp_path / "new").exists()


def test_quant_config_rejects_non_integer_sizes():
  for kw in ({"key_bits": 4.0}, {"value_bits": True}, {"group_size": 32.0},
             {"householder_reflectors": 2.5}):
    with pytest.raises(ValueError, match=f"QuantConfig.{next(iter(kw))} must be"):
      kvjax.QuantConfig(**kw)


def test_parse_spec_refuses_typos():
  for bad in ("K4V4-g32-srft-cla", "K4V4-g32-srft-calibrated", "K4V4-32-srft", "K4V4-g32-srft-cal-x"):
    with pytest.raises(ValueError, match="unknown cache"):
      ev.parse_spec(bad)
  assert ev.parse_spec("K4V4-g64-srht-cal").calibrate


def test_load_refuses_dtypes_that_break_the_model():
  from kvjax.models import load
  for dtype in (jnp.float16, jnp.int8):
    with pytest.raises(ValueError, match="dtype must be jnp.float32 or jnp.bfloat16"):
      load("gemma3-270m", dtype=dtype)


def test_float16_scales_saturate_instead_of_turning_attention_nan():
  import jax
  cfg = kvjax.QuantConfig(scale_dtype="float16")
  cache = kvjax.init_cache(1, 2, 64, 64, quant=cfg)
  k = jax.random.normal(jax.random.key(0), (1, 8, 2, 64)) * 1e7      # scales past float16's max
  cache = kvjax.append(cache, k, k)
  assert bool(jnp.all(jnp.isfinite(cache.k_scales.astype(jnp.float32))))
  out = kvjax.attend(jax.random.normal(jax.random.key(1), (1, 1, 4, 64)), cache, impl="xla")
  assert bool(jnp.all(jnp.isfinite(out)))


def test_init_cache_refuses_broken_calibration_values():
  import numpy as np
  d = 64
  for kw, message in (({"key_rotation": 2 * np.eye(d)}, "key_rotation must be orthogonal"),
                      ({"value_rotation": np.ones((d, d))}, "value_rotation must be orthogonal"),
                      ({"key_lambda": np.zeros(d)}, "key_lambda must be > 0"),
                      ({"params": {"k_mean": np.full(d, np.nan)}}, "k_mean.*non-finite"),
                      ({"params": {"k_feedback": np.eye(d)}}, "k_feedback must be strictly upper")):
    with pytest.raises(ValueError, match=message):
      kvjax.init_cache(1, 2, 16, d, quant=kvjax.QuantConfig(
          corrections=(kvjax.corrections.KeyOffset(), kvjax.corrections.KeyFeedback())), **kw)


def test_generate_refuses_float_ids_and_prompts_past_the_context():
  from flax import nnx
  from kvjax.models import ModelConfig, model_class
  from kvjax.models.generate import generate_tokens
  cfg = ModelConfig.preset("gemma3-tiny")
  model = model_class(cfg)(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"prompts\[0\] must hold integer token ids"):
    generate_tokens(model, [[2.0, 5.7]], max_new_tokens=2)
  too_long = [2] * cfg.max_position_embeddings
  with pytest.raises(ValueError, match="exceeds the model's context"):
    generate_tokens(model, [too_long], max_new_tokens=1)


def test_damaged_checkpoints_name_the_file(tmp_path):
  from kvjax.models import load
  import gguf
  import numpy as np
  good = tmp_path / "tiny.gguf"
  w = gguf.GGUFWriter(str(good), "gemma3")
  w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((64, 256), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError) as intact:     # readable, but no model metadata: another error
    load(str(good))
  assert "not a readable GGUF" not in str(intact.value)
  data = good.read_bytes()
  for cut in (len(data) // 2, len(data) - 8, 40):
    bad = tmp_path / f"truncated{cut}.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=f"truncated{cut}.gguf is not a readable GGUF checkpoint"):
      load(str(bad))
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text('{"model_type": "gemma3_text", ')
  with pytest.raises(ValueError, match="config.json is corrupted: not valid JSON"):
    load(str(hf))


@pytest.mark.parametrize("argv, message", [
    (["eval", "--chunk", "0"], "--chunk must be an int >= 1"),
    (["eval", "--caches", "int4+k8@999"], "out of range"),
    (["eval", "--caches", "K4V4-g32-srft-calibrated"], "unknown cache 'K4V4-g32-srft-calibrated'"),
    (["bench", "--repeats", "0"], "--repeats must be an int >= 4"),
    (["passkey", "--depths", "1.5"], r"--depths must be fractions in \[0, 1\]"),
    (["calibrate", "--out", "NEW", "--windows", "1"], "--windows must be token counts >= 2"),
])
def test_cli_subprocess_reports_bad_arguments_in_seconds(argv, message, tmp_path):
  """As a user runs it: a fresh `python -m kvjax` process, exit code 2, the argument named on
  stderr, well before any model could load (the interpreter and JAX imports are ~3 s of it)."""
  import re
  import subprocess
  import sys
  argv = [str(tmp_path / "new") if a == "NEW" else a for a in argv]
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-m", "kvjax", *argv], capture_output=True, text=True,
                        timeout=60, cwd=tmp_path)
  seconds = time.time() - t0
  assert proc.returncode == 2, proc.stderr
  assert re.search(message, proc.stderr), proc.stderr
  assert "Traceback" not in proc.stderr
  assert seconds < 5, seconds
  assert not (tmp_path / "new").exists()
