"""Sharded models (kvjax.models.shard) on 8 simulated CPU devices, and across two processes.

Each case runs in a fresh subprocess (tests/sharding_worker.py), because XLA fixes the device
count when the backend starts. Three tiny random models cover the head layouts of the real ones:
8 KV heads (split over the model axis), 1 KV head like Gemma-3-270M (stored once per device that
reads it, then attention replicated when 8 devices split 4 query heads), and 14 query heads over
2 KV heads like Qwen2.5-0.5B (split at 2, replicated at 4 and 8). Greedy tokens for 16 steps
must equal the unsharded model's exactly, for the dense bfloat16 cache and for a calibrated int4
cache (calibrated on random ids: the corrections' arrays exist and are split with the heads).

On these small float32 models exact equality holds: the partial sums of the tensor-parallel
matmuls move logits by ~1e-6, far from any argmax tie over 16 steps. (Real models with an int4
cache are chaotic under such ulp-level changes; benchmarks/sharded_generate.py measures them
against a noise floor instead, docs/sharding.md.)
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from kvjax.models import ModelConfig, sharding

WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")
MODELS = ("llama-8kv", "gemma-1kv", "qwen-14q2kv")


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run_single(name, tmp_path) -> dict:
  out = tmp_path / f"{name}.json"
  proc = subprocess.run([sys.executable, str(WORKER), "single", str(out), name], env=_env(),
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


# What each model's heads allow on a model axis of 8, 4 and 2 devices (meshes 1x8, 2x4, 4x2).
EXPECTED_LAYOUT = {
    "llama-8kv": {"1x8": ("heads", 1), "2x4": ("heads", 1), "4x2": ("heads", 1)},
    "gemma-1kv": {"1x8": ("replicated", 1), "2x4": ("heads", 4), "4x2": ("heads", 2)},
    "qwen-14q2kv": {"1x8": ("replicated", 1), "2x4": ("replicated", 1), "4x2": ("heads", 1)},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS[1:])
def test_sharded_greedy_tokens_equal_the_unsharded_models(name, tmp_path):
  _check_model(name, run_single(name, tmp_path))


def _check_model(name, result):
  assert result["devices"] == 8
  model = result["models"][name]
  for key, run in model["runs"].items():
    cache, mesh = key.split()
    data, tp = (int(x) for x in mesh.split("x"))
    assert run["equal"], f"{name} {key}: tokens differ from the unsharded model's"
    assert (run["attention"], run["kv_repeat"]) == EXPECTED_LAYOUT[name][mesh], (name, key)
    # Per-token cache arrays on the busiest device: split by data shards, and by the model
    # axis over distinct KV heads only when attention is split (kv_repeat copies share it).
    kv_shards = tp // run["kv_repeat"] if run["attention"] == "heads" else 1
    assert run["per_token_bytes_busiest"] * data * kv_shards == run["per_token_bytes_unsharded"], \
        (name, key, run["per_token_bytes_busiest"], run["per_token_bytes_unsharded"])
    if cache == "int4":
      _check_collectives(run["collectives"], model, data, tp, run["attention"])


def _check_collectives(ops, model, data, tp, attention):
  """One greedy decode step holds only: the vocabulary-parallel embedding's all-reduce, one
  all-reduce per distinct layer body after the MLP (and one after attention when heads are split),
  all of the hidden state [B/data, 1, E] over the model axis; small all-gathers for the argmax
  over the split vocabulary ([B/data, tp] values and indices) and the replicated tokens. No
  collective carries cache codes, scales or correction arrays."""
  batch = 4 // data
  reduces = [o for o in ops if o["kind"] == "all-reduce"]
  gathers = [o for o in ops if o["kind"] == "all-gather"]
  assert len(reduces) + len(gathers) == len(ops), [o["kind"] for o in ops]
  per_body = 2 if attention == "heads" else 1
  assert len(reduces) == 1 + per_body * model["layer_types"], [o["shapes"] for o in reduces]
  for o in reduces:
    [(dtype, shape)] = o["shapes"]
    assert dtype == "f32" and shape[:2] == [batch, 1], o
    assert all(len(g) == tp for g in o["groups"]), o
    # model-axis groups: consecutive device ids (mesh row-major, model axis last)
    assert all(g == list(range(g[0], g[0] + tp)) for g in o["groups"]), o
  for o in gathers:
    [(dtype, shape)] = o["shapes"]
    assert shape in ([batch, tp], [4]), o


def test_plan_splits_heads_only_where_they_divide():
  import jax
  mesh = jax.make_mesh((1,), ("model",))
  cfg = ModelConfig.preset("gemma3-tiny")
  layout = sharding.plan(cfg, mesh, data_axis=None)
  assert layout.model_size == 1 and layout.data_size == 1 and layout.attention == "heads"
  with pytest.raises(ValueError, match="data_axis='data' is not an axis"):
    sharding.plan(cfg, mesh)
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    sharding.plan(cfg, "1x8")
  with pytest.raises(ValueError, match="must differ"):
    sharding.plan(cfg, mesh, data_axis="model")


@pytest.mark.slow
def test_two_processes_produce_the_tokens_of_one_process_with_eight_devices(tmp_path):
  """Mesh 2x4 with the data axis across two processes of 4 devices each (gloo collectives)."""
  multi_out = tmp_path / "multi.json"
  proc = subprocess.run([sys.executable, "-m", "kvjax.distributed", "--processes", "2",
                         "--local-devices", "4", "--timeout", "900", "--",
                         str(WORKER), "multi", str(multi_out)],
                        env=_env(), capture_output=True, text=True, timeout=1000)
  assert proc.returncode == 0, proc.stderr[-4000:]
  multi = json.loads(multi_out.read_text())
  assert (multi["processes"], multi["devices"], multi["local_devices"]) == (2, 8, 4)
  # The reference: the same model in one process with 8 devices, whose every mesh is checked
  # against the unsharded model here too (the llama-8kv case of the test above).
  reference = run_single("llama-8kv", tmp_path)
  _check_model("llama-8kv", reference)
  for cache in ("bf16", "int4"):
    assert multi["tokens"][cache] == reference["models"]["llama-8kv"]["runs"][f"{cache} 2x4"][
        "tokens"], cache
