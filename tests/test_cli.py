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
    (["eval", "--contexts", "1024", "-5"], "--contexts must be ints >= 2"),
    (["eval", "--calibration", "/nonexistent/cal"], "no calibration directory"),
    (["eval", "--caches", "K4V4-g32-srft-cla"], "unknown cache 'K4V4-g32-srft-cla'"),
    (["bench", "--contexts", "-5"], "--contexts must be an int >= 1"),
    (["bench", "--repeats", "0"], "--repeats must be an int >= 1"),
    (["bench", "--out", "FILE"], "--out .* is a file"),
    (["passkey", "--depths", "1.5"], r"--depths must be fractions in \[0, 1\]"),
    (["calibrate", "--out", "EXISTING"], "already exists"),
    (["calibrate", "--out", "NEW", "--text", "/nonexistent.txt"], "no such file"),
    (["calibrate", "--out", "NEW", "--windows", "1"], "--windows must be token counts >= 2"),
])
def test_bad_arguments_fail_fast_and_name_the_argument(argv, message, tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  (tmp_path / "existing").mkdir()
  subs = {"FILE": str(tmp_path / "file"), "EXISTING": str(tmp_path / "existing"),
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
