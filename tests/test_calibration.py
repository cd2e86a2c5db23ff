"""kvjax.calibration: the artifact on disk — exact round trip, atomic writes, and every way a
bad artifact is refused with a clear error."""

import json
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kvjax
from kvjax import calibration as artifact
from kvjax import corrections as kc


def _random_calibration(num_layers=3, heads=2, d=32, pairs=4, seed=0, fingerprint=None):
  """A valid calibration with random orthogonal rotations, positive λ, upper feedback."""
  rng = np.random.default_rng(seed)
  rotary = (kc.RotaryKeyOffset(pairs),) if pairs else ()
  cfg = kvjax.QuantConfig(corrections=(kc.KeyOffset(), *rotary, kc.KeyFeedback(), kc.KeySink()))
  layers = []
  for _ in range(num_layers):
    q, _ = np.linalg.qr(rng.standard_normal((2, 1, d, d)))
    fb = np.triu(rng.standard_normal((heads, d, d)), 1).astype(np.float32)
    layers.append({
        "k_rotation": q[0].astype(np.float32), "v_rotation": q[1].astype(np.float32),
        "k_lambda": np.exp(rng.normal(0, 0.3, (heads, d))).astype(np.float32),
        "v_lambda": np.ones((1, d), np.float32),
        "k_mean": rng.standard_normal((heads, d)).astype(np.float32),
        "k_rope_freq": rng.uniform(0, 1, pairs).astype(np.float32),
        "k_rope_channels": np.stack([np.arange(pairs), np.arange(pairs) + d // 2], 1).astype(np.int32),
        "k_rope_mean": rng.standard_normal((heads, 2, pairs)).astype(np.float32),
        "k_feedback": fb})
    if not pairs:
      for name in ("k_rope_freq", "k_rope_channels", "k_rope_mean"):
        del layers[-1][name]
  fp = fingerprint or {"name": "tiny", "arch": "gemma3", "num_layers": num_layers,
                       "num_heads": 4, "num_kv_heads": heads, "head_dim": d,
                       "layer_types": ["local"] * num_layers, "sliding_window": 16,
                       "rope_theta": 1e6, "rope_local_theta": 1e4, "rope_scaling": None,
                       "qk_sha256": "ab" * 32}
  return artifact.Calibration(configs=(cfg,) * num_layers, tensors=tuple(layers),
                              manifest={"model": fp, "text": {"name": "random", "tokens": 7}})


def test_round_trip_is_bitwise(tmp_path):
  c = _random_calibration()
  path = artifact.save(c, tmp_path / "cal")
  assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "tensors"]
  back = artifact.load(path, fingerprint=c.fingerprint)
  assert back.configs == c.configs
  for a, b in zip(c.tensors, back.tensors):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
      np.testing.assert_array_equal(a[k], b[k])
  m = json.loads((path / "manifest.json").read_text())
  assert m["format_version"] == artifact.FORMAT_VERSION and m["kvjax_version"] == kvjax.__version__
  assert m["layer_format_names"][0] == c.configs[0].name and m["text"]["tokens"] == 7
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
  with pytest.raises(FileExistsError, match="already exists"):
    artifact.save(c, path)
  c2 = _random_calibration(seed=1)
  artifact.save(c2, path, overwrite=True)
  np.testing.assert_array_equal(artifact.load(path).tensors[0]["k_mean"], c2.tensors[0]["k_mean"])
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bands_round_trip_and_are_validated(tmp_path):
  main, short = _random_calibration(seed=0), _random_calibration(seed=1)
  c = artifact.Calibration(configs=main.configs, tensors=main.tensors, manifest=main.manifest,
                           bands=((1024, short.tensors),))
  back = artifact.load(artifact.save(c, tmp_path / "cal"))
  assert [limit for limit, _ in back.bands] == [1024]
  for a, b in zip(short.tensors, back.tensors_for(1024)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  np.testing.assert_array_equal(back.tensors_for(1025)[0]["k_mean"], main.tensors[0]["k_mean"])
  bad = [dict(t) for t in short.tensors]
  bad[2]["k_lambda"] = -bad[2]["k_lambda"]
  with pytest.raises(ValueError, match=r"layer 2 \(band 1024\): k_lambda must be > 0"):
    artifact.Calibration(configs=main.configs, tensors=main.tensors, bands=((1024, bad),))
  with pytest.raises(ValueError, match="limits must increase"):
    artifact.Calibration(configs=main.configs, tensors=main.tensors,
                         bands=((1024, short.tensors), (512, short.tensors)))


def test_another_model_is_refused_naming_the_fields(tmp_path):
  c = _random_calibration()
  path = artifact.save(c, tmp_path / "cal")
  other = dict(c.fingerprint, num_kv_heads=4, head_dim=64, qk_sha256="cd" * 32)
  with pytest.raises(ValueError) as e:
    artifact.load(path, fingerprint=other)
  msg = str(e.value)
  assert "num_kv_heads: made for 2, model has 4" in msg and "head_dim: made for 32" in msg
  assert "qk_sha256" in msg and "num_layers" not in msg
  with pytest.raises(FileNotFoundError):
    artifact.load(tmp_path / "missing")


def _corrupt(path: pathlib.Path, how: str):
  files = sorted(p for p in (path / "tensors").rglob("*") if p.is_file())
  if how == "truncate":
    big = max(files, key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[:big.stat().st_size // 2])
  elif how == "flip":
    big = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0xFF
    big.write_bytes(bytes(data))
  elif how == "delete":
    files[0].unlink()
  elif how == "manifest":
    (path / "manifest.json").write_text('{"format": "kvjax-calibration", "format_vers')
  elif how == "version":
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
  elif how == "no-manifest":
    (path / "manifest.json").unlink()


@pytest.mark.parametrize("how, match", [
    ("truncate", "corrupted or incomplete.*altered"), ("flip", "altered"),
    ("delete", "missing"), ("manifest", "not valid JSON"), ("version", "format version 99"),
    ("no-manifest", "no manifest.json")])
def test_damaged_artifacts_are_clear_errors(tmp_path, how, match):
  path = artifact.save(_random_calibration(), tmp_path / "cal")
  _corrupt(path, how)
  with pytest.raises(ValueError, match=match):
    artifact.load(path)


@pytest.mark.parametrize("field, value, match", [
    ("k_rotation", lambda t: 2 * t, "not orthogonal"),
    ("v_rotation", lambda t: np.ones_like(t), "not orthogonal"),
    ("k_lambda", lambda t: t * 0, "must be > 0"),
    ("k_mean", lambda t: np.where(np.arange(t.size).reshape(t.shape) == 3, np.nan, t),
     "non-finite"),
    ("k_feedback", lambda t: t + np.eye(t.shape[-1], dtype=t.dtype), "strictly upper"),
    ("k_rope_channels", lambda t: t + 100, r"in \[0, 32\)"),
    ("k_lambda", lambda t: t[:, :16], r"k_lambda must be \[Hr, 32\]")])
def test_invalid_tensors_are_refused(field, value, match):
  c = _random_calibration()
  layers = [dict(t) for t in c.tensors]
  layers[1][field] = value(layers[1][field])
  with pytest.raises(ValueError, match=f"layer 1: .*{match}"):
    artifact.Calibration(configs=c.configs, tensors=tuple(layers), manifest=c.manifest)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
  c = _random_calibration()
  real = artifact._write_tensors

  def write_then_interrupt(path, cal):
    real(path, cal)
    raise KeyboardInterrupt

  monkeypatch.setattr(artifact, "_write_tensors", write_then_interrupt)
  with pytest.raises(KeyboardInterrupt):
    artifact.save(c, tmp_path / "cal")
  assert list(tmp_path.iterdir()) == []


def test_sigint_during_a_save_in_another_process_leaves_nothing(tmp_path):
  """A real SIGINT to a process in the middle of writing (the tensors written, the disk slow):
  neither the artifact nor its temporary directory is left behind."""
  script = textwrap.dedent(f"""
      import signal, sys, time
      # A test runner's worker may ignore SIGINT, and a child inherits that: restore the
      # default (KeyboardInterrupt) as a shell gives it.
      signal.signal(signal.SIGINT, signal.default_int_handler)
      sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
      from test_calibration import _random_calibration
      from kvjax import calibration as artifact
      real = artifact._write_tensors
      def slow(path, cal):
        real(path, cal)
        print("written", flush=True)
        time.sleep(60)
      artifact._write_tensors = slow
      artifact.save(_random_calibration(), {str(tmp_path / "cal")!r})
  """)
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  assert line.strip() == "written", proc.stderr.read()
  assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]  # mid-write
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode != 0 and "KeyboardInterrupt" in err
  assert list(tmp_path.iterdir()) == []


def test_a_format_without_rotary_pairs_round_trips(tmp_path):
  """A layer holds exactly its format's tensors: no rotary offset, no rotary tensors."""
  c = _random_calibration(pairs=0)
  assert "k_rope_freq" not in c.tensors[0]
  with pytest.raises(ValueError, match="unexpected \\['k_rope_freq'\\]"):
    artifact.Calibration(configs=c.configs, manifest=c.manifest, tensors=tuple(
        {**t, "k_rope_freq": np.zeros(2, np.float32)} for t in c.tensors))
  back = artifact.load(artifact.save(c, tmp_path / "cal"))
  for a, b in zip(c.tensors, back.tensors):
    for k in a:
      assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
      np.testing.assert_array_equal(a[k], b[k])
