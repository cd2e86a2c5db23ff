"""kvjax.timing: pairwise, interleaved timing with spreads, used by `kvjax bench` and the CPU
attention benchmark. Only ratios are checked, never absolute times."""

import json
import time

import numpy as np
import pytest

from kvjax import timing


def test_pairwise_measures_the_ratio_with_its_spread():
  calls = []

  def sleeper(ms, tag):
    def go():
      calls.append(tag)
      time.sleep(ms / 1e3)
      return np.zeros(())
    return go

  r = timing.pairwise(sleeper(4, "a"), sleeper(12, "b"), repeats=8, warmup=1)
  assert 2.0 < r["ratio"] < 4.0, r                  # 12 ms against 4 ms (sleep overshoots a bit)
  lo, hi = r["ratio_iqr"]
  assert lo <= r["ratio"] <= hi
  assert r["base_iqr_ms"][0] <= r["base_ms"] <= r["base_iqr_ms"][1]
  # Interleaved, alternating which side goes first: a b b a a b ...
  timed = calls[2:]
  assert timed[:4] == ["a", "b", "b", "a"] and len(timed) == 16
  with pytest.raises(ValueError, match="repeats must be >= 4"):
    timing.pairwise(sleeper(1, "a"), sleeper(1, "b"), repeats=3)


def test_machine_names_the_flags_a_cpu_figure_depends_on():
  m = timing.machine()
  assert set(m["flags"]) >= {"amx_tile", "avx512_bf16", "avx512_vnni"}
  assert m["cores"] >= 1 and m["backend"] == "cpu"
  json.dumps(m)


def test_bench_times_each_cache_against_bf16(monkeypatch, tmp_path):
  import jax.numpy as jnp
  from flax import nnx
  import kvjax.models
  from kvjax import bench
  from kvjax.models import ModelConfig, model_class
  cfg = ModelConfig.preset("gemma3-tiny")
  model = model_class(cfg)(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
  monkeypatch.setattr(kvjax.models, "load", lambda name, **kw: (model, None))
  doc = bench.run("tiny", contexts=[16, 40], repeats=4, caches=["bf16", "K4V4-g32-srft"],
                  out_dir=str(tmp_path / "bench"), log=lambda *a: None)
  rows = doc["rows"]
  assert [(r["context"], r["cache"]) for r in rows] == [(16, "K4V4-g32-srft"),
                                                        (40, "K4V4-g32-srft")]
  for r in rows:
    assert r["base"] == "bf16" and r["ratio_iqr"][0] <= r["ratio_vs_bf16"] <= r["ratio_iqr"][1]
    assert r["compression_vs_bf16"] > 1
  assert "avx512_vnni" in doc["meta"]["machine"]["flags"]
  assert (tmp_path / "bench" / "bench.json").exists() and (tmp_path / "bench" / "bench.png").exists()
  # Weights in bfloat16 by default; each step set against the measured-bandwidth roofline.
  meta = doc["meta"]
  assert meta["dtype"] == "bfloat16" and meta["read_bandwidth"]["bytes_per_s"] > 1e8
  assert meta["weight_bytes"] == bench.weight_bytes(model)
  for r in rows:
    assert r["roofline_ms"] < r["base_roofline_ms"]  # the int4 cache reads fewer bytes
    expect = 1e3 * (meta["weight_bytes"] + r["cache_bytes"]) / meta["read_bandwidth"]["bytes_per_s"]
    assert abs(r["roofline_ms"] - expect) < 1e-9 * expect
    assert r["vs_roofline"] == r["median_ms"] / r["roofline_ms"]
  with pytest.raises(ValueError, match="--dtype"):
    bench.run("tiny", contexts=[16], repeats=4, dtype="float16", out_dir=str(tmp_path / "b2"))


def test_read_bandwidth_reports_bytes_per_second():
  bw = timing.read_bandwidth(nbytes=64 << 20, repeats=4)
  assert bw["nbytes"] == 64 << 20 and bw["bytes_per_s"] > 0
  assert bw["iqr_ms"][0] <= bw["median_ms"] <= bw["iqr_ms"][1]
  with pytest.raises(ValueError, match="repeats"):
    timing.read_bandwidth(repeats=2)
