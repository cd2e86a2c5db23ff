"""kvjax.models.calibrated: a calibration artifact in a model's caches, on every path (init_cache,
generate, eval's caches, a fresh process, "auto")."""

import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import calibration as artifact
from kvjax import corrections as kc
from kvjax import eval as ev
from kvjax.models import ModelConfig, Runner, calibrated, model_class, prefill, with_separate_layers
from kvjax.models.generate import generate_tokens

WINDOWS = (32, 32, 64)


def _model(seed=3, dtype=jnp.float32):
  cfg = ModelConfig.preset("gemma3-tiny")
  return model_class(cfg)(cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def _tokens(cfg, n=300, seed=0):
  ids = np.random.default_rng(seed).integers(3, cfg.vocab_size, n)
  ids[0] = cfg.bos_token_id
  return ids.tolist()


@pytest.fixture(scope="module")
def tiny_and_cal(tmp_path_factory):
  model = _model()
  cal = calibrated.calibrate(model, _tokens(model.config), window_lengths=WINDOWS, chunk=16,
                             progress=False)
  path = artifact.save(cal, tmp_path_factory.mktemp("cal") / "tiny")
  return model, cal, path


def test_the_artifact_holds_the_default_recipe(tiny_and_cal):
  model, cal, path = tiny_and_cal
  c = cal.configs[0]
  assert all(q == c for q in cal.configs)
  assert (c.key_bits, c.value_bits, c.group_size, c.rotation) == (4, 4, 32, "srft")
  assert c.corrections == (kc.KeyOffset(), kc.RotaryKeyOffset(16), kc.KeyFeedback(),
                           kc.KeySink(), kc.ValueSink(), kc.RecentValues(4))
  # (16 rotary pairs: min(32, head_dim / 2) at head_dim 32.)
  assert c.bits_per_value() == 4.5
  m = artifact.read_manifest(path)
  assert m["text"]["windows"] == list(WINDOWS) and m["text"]["tokens"] == sum(WINDOWS)
  assert m["recipe_steps"]["feedback"]["on"] and not m["recipe_steps"]["value_feedback"]["on"]
  assert m["model"]["num_layers"] == 6 and len(m["model"]["qk_sha256"]) == 64
  # Context bands: caches of at most 32 tokens take the 32-token windows' parameters, longer
  # ones the 64-token window's; both sets come from the statistics.
  assert [limit for limit, _ in cal.bands] == [32] and m["bands"] == [32]
  short = model.init_cache(1, 32, calibration=cal)["groups"][1]   # the global layer, index 5
  long = model.init_cache(1, 33, calibration=cal)["groups"][1]
  np.testing.assert_array_equal(np.asarray(short.array("k_mean")[0, 0]),
                                cal.bands[0][1][5]["k_mean"])
  np.testing.assert_array_equal(np.asarray(long.array("k_mean")[0, 0]), cal.tensors[5]["k_mean"])
  assert not np.allclose(cal.bands[0][1][5]["k_mean"], cal.tensors[5]["k_mean"])
  assert cal.tensors_for(10) is cal.bands[0][1] and cal.tensors_for(10**6) is cal.tensors
  # The offsets and λ really come from the statistics (not defaults).
  t = cal.tensors[0]
  assert np.any(t["k_mean"]) and np.any(t["k_rope_mean"]) and np.any(t["k_feedback"])
  assert not np.allclose(t["k_lambda"], 1.0)


def test_eval_counts_bytes_and_bits_from_the_artifacts_formats(tiny_and_cal):
  model, cal, path = tiny_and_cal
  spec = ev.parse_spec(f"int4:{path}")
  caches = model.init_cache(1, 40, calibration=cal)
  want = sum(kvjax.nbytes(c) for c in caches["groups"] + caches["tail"])
  assert ev.cache_bytes(model, spec, 40, cal) == want
  assert ev.bits_per_value(model, spec, 40, cal) == 4.5
  k8 = calibrated.calibrate(model, _tokens(model.config), window_lengths=WINDOWS, chunk=16,
                            progress=False, quant=kvjax.QuantConfig(key_bits=8))
  assert ev.bits_per_value(model, spec, 40, k8) == 6.5          # the artifact's, not the spec's
  assert ev.cache_bytes(model, spec, 40, k8) > want
  fp = []
  jax.eval_shape(lambda: fp.append(calibrated.fingerprint(model)) or 0)   # trace-safe
  assert fp[0] == calibrated.fingerprint(model)


def test_generate_with_the_artifact_equals_a_manual_loop_over_evals_cache(tiny_and_cal):
  model, cal, path = tiny_and_cal
  prompts = [_tokens(model.config, 21, seed=5), _tokens(model.config, 21, seed=6)]
  got = generate_tokens(model, prompts, max_new_tokens=10, max_len=256, calibration=str(path))
  spec = ev.SPEC_CHOICES["int4"]
  caches = ev._make_caches(model, spec, 256, {"int4": cal}, batch=2)
  assert caches["groups"][0].config.name == cal.configs[0].name
  runner = Runner(model)
  logits, caches = prefill(runner, np.asarray(prompts, np.int32), caches, chunk=16)
  manual = [[int(t)] for t in jnp.argmax(logits, -1)]
  for _ in range(9):
    step = np.asarray([[m[-1]] for m in manual], np.int32)
    logits, caches = runner(step, caches)
    for m, t in zip(manual, jnp.argmax(logits[:, 0], -1)):
      m.append(int(t))
  assert got == manual
  # The calibration a model was loaded with is generate's default; False asks for dense.
  model.calibration = cal
  try:
    assert generate_tokens(model, prompts, max_new_tokens=10, max_len=256) == got
    dense = generate_tokens(model, prompts, max_new_tokens=10, max_len=256, calibration=False)
  finally:
    model.calibration = None
  assert len(dense) == 2


def test_a_fresh_process_builds_bitwise_equal_caches(tiny_and_cal, tmp_path):
  model, cal, path = tiny_and_cal
  here = model.init_cache(2, 64, calibration=cal)
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
      import jax, numpy as np
      from test_models_calibrated import _model
      caches = _model().init_cache(2, 64, calibration={str(path)!r})
      leaves = [np.asarray(x) for x in jax.tree.leaves(caches)]
      # Raw bytes and dtype names: npz does not keep bfloat16.
      np.savez({str(tmp_path / 'leaves.npz')!r},
               *[np.frombuffer(x.tobytes(), np.uint8) for x in leaves],
               dtypes=np.asarray([str(x.dtype) for x in leaves]),
               shapes=np.asarray([str(x.shape) for x in leaves]))
  """)
  subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
  there = np.load(tmp_path / "leaves.npz")
  mine = jax.tree.leaves(here)
  assert len(there.files) == len(mine) + 2
  for i, x in enumerate(mine):
    x = np.asarray(x)
    assert there["dtypes"][i] == str(x.dtype) and there["shapes"][i] == str(x.shape)
    assert there[f"arr_{i}"].tobytes() == x.tobytes()


def test_layer_layout_does_not_change_the_calibrated_layers(tiny_and_cal):
  model, cal, _ = tiny_and_cal
  split = with_separate_layers(model, (1, 5))
  a = model.init_cache(1, 40, calibration=cal)
  b = split.init_cache(1, 40, calibration=cal)
  from kvjax.models.decoder import layer_slots
  per_layer = {}
  for caches, cfg in ((a, model.config), (b, split.config)):
    for part, run, index, layer in layer_slots(cfg):
      c = caches[part][run]
      per_layer.setdefault(layer, []).append(
          {f: np.asarray(c.array(f)[index]) for f in artifact.tensor_fields(c.config)})
  for layer, (x, y) in per_layer.items():
    assert set(x) == set(y) == set(artifact.tensor_fields(cal.configs[layer]))
    for f in x:
      np.testing.assert_array_equal(x[f], y[f])
      np.testing.assert_array_equal(np.broadcast_to(cal.tensors[layer][f], x[f].shape), x[f])


def test_per_layer_formats_need_their_layers_separate():
  model = _model()
  cal = calibrated.calibrate(model, _tokens(model.config), window_lengths=WINDOWS, chunk=16,
                             progress=False,
                             layer_quant={2: kvjax.QuantConfig(key_bits=8)})
  assert [c.key_bits for c in cal.configs] == [4, 4, 8, 4, 4, 4]
  assert calibrated.required_separate_layers(cal, model.config) == (2,)
  with pytest.raises(ValueError, match=r"separate_layers=\(2,\)"):
    model.init_cache(1, 40, calibration=cal)
  from kvjax.models.loading import attach_calibration
  split = attach_calibration(model, cal)
  caches = split.init_cache(1, 40, calibration=split.calibration)
  assert sorted(c.config.key_bits for c in caches["groups"]) == [4, 4, 4, 8]


def test_a_format_in_most_layers_works_with_those_layers_separate():
  """As `kvjax eval` lays the model out for '+k8@local': the 5 local layers separate, the one
  global layer stacked; the stacked layer's format is the shared one even though most layers
  have the other."""
  model = _model()
  local = {l: kvjax.QuantConfig(key_bits=8) for l in range(5)}
  cal = calibrated.calibrate(model, _tokens(model.config), window_lengths=WINDOWS, chunk=16,
                             progress=False, layer_quant=local)
  split = with_separate_layers(model, tuple(range(5)))
  caches = split.init_cache(1, 40, calibration=cal)
  bits = sorted(c.config.key_bits for c in caches["groups"])
  assert bits == [4, 8, 8, 8, 8, 8]


def test_fingerprint_ignores_dtype_and_layout_but_not_weights(tiny_and_cal):
  model, cal, path = tiny_and_cal
  fp = calibrated.fingerprint(model)
  assert calibrated.fingerprint(_model(dtype=jnp.bfloat16)) == fp
  assert calibrated.fingerprint(with_separate_layers(model, (3,))) == fp
  other = _model(seed=4)
  assert calibrated.fingerprint(other)["qk_sha256"] != fp["qk_sha256"]
  with pytest.raises(ValueError, match="qk_sha256: made for"):
    other.init_cache(1, 40, calibration=path)
  with pytest.raises(ValueError, match="either calibration or quant"):
    model.init_cache(1, 40, calibration=cal, quant=kvjax.QuantConfig())
  with pytest.raises(ValueError, match="not this model: arch: made for .gemma3., model has .qwen2.; num_layers"):
    cfg = ModelConfig.preset("qwen2-tiny")
    model_class(cfg)(cfg, rngs=nnx.Rngs(0)).init_cache(1, 40, calibration=cal)


class _ByteTokenizer:
  """Text -> one id per UTF-8 byte (offset past the special ids); enough to calibrate on."""

  def __init__(self, vocab):
    self.vocab = vocab

  def encode(self, text, add_bos=False):
    ids = [3 + b % (self.vocab - 3) for b in text.encode("utf-8")]
    return ([2] if add_bos else []) + ids


def test_auto_computes_once_then_reuses_and_repairs(tmp_path, monkeypatch):
  from kvjax import corpus
  calls = []
  monkeypatch.setattr(corpus, "calibration_text", lambda **kw: calls.append(1) or "Emma " * 100)
  model = _model()
  tok = _ByteTokenizer(model.config.vocab_size)
  logs = []
  first = calibrated.auto(model, tok, window_lengths=WINDOWS, cache_dir=tmp_path,
                          progress=False, log=logs.append)
  path = calibrated.auto_path(model, window_lengths=WINDOWS, cache_dir=tmp_path)
  assert path.is_dir() and len(calls) == 1 and "first use" in logs[0]
  again = calibrated.auto(model, tok, window_lengths=WINDOWS, cache_dir=tmp_path,
                          progress=False, log=logs.append)
  assert len(calls) == 1                                  # read back, not recomputed
  for a, b in zip(first.tensors, again.tensors):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  (path / "manifest.json").write_text("{")                # damaged: recomputed, not trusted
  calibrated.auto(model, tok, window_lengths=WINDOWS, cache_dir=tmp_path, progress=False,
                  log=logs.append)
  assert len(calls) == 2 and any("recomputing" in l for l in logs)
  artifact.load(path)


def test_kvjax_calibrate_interrupted_by_sigint_leaves_no_directory(tmp_path):
  """`kvjax calibrate` (the CLI entry point, its model load stubbed with the tiny model) gets a
  SIGINT while it writes the artifact: exit code 130, no --out directory, no temporary one."""
  import signal
  text = tmp_path / "text.txt"
  text.write_text("It is a truth universally acknowledged. " * 40)
  out = tmp_path / "out" / "cal"
  script = textwrap.dedent(f"""
      import signal, sys, time
      # A test runner's worker may ignore SIGINT, and a child inherits that: restore the
      # default (KeyboardInterrupt) as a shell gives it.
      signal.signal(signal.SIGINT, signal.default_int_handler)
      sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
      from test_models_calibrated import _model, _ByteTokenizer
      import kvjax.models
      from kvjax import calibration as artifact, cli
      model = _model()
      kvjax.models.load = lambda name, **kw: (model, _ByteTokenizer(model.config.vocab_size))
      real = artifact._write_tensors
      def slow(path, cal):
        real(path, cal)
        print("writing", flush=True)
        time.sleep(60)
      artifact._write_tensors = slow
      sys.exit(cli.main(["calibrate", "--model", "tiny", "--out", {str(out)!r}, "--text",
                         {str(text)!r}, "--windows", "32", "32", "64", "--chunk", "16",
                         "--no-progress"]))
  """)
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.strip() == "writing":
      break
  else:
    raise AssertionError(proc.stderr.read())
  assert [p.name for p in out.parent.iterdir() if ".partial-" in p.name]
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130 and "interrupted" in err, err
  assert list(out.parent.iterdir()) == []
