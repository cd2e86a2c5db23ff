"""A few steps of the FoE vs standard-MoE language-model training script."""

import json
import math

import numpy as np

from kvjax.foe import train


def synthetic_text(num_words=4000, seed=0):
  rng = np.random.default_rng(seed)
  words = ("it is a truth universally acknowledged that a single man in possession of a good "
           "fortune must be in want of a wife").split()
  return " ".join(rng.choice(words, size=num_words))


def test_training_script_runs_and_learns(tmp_path):
  result = train.run_training(str(tmp_path), preset="test", text=synthetic_text(),
                              log=lambda *_: None)
  summary = result["summary"]
  for kind in ("foe", "baseline"):
    curve = [c["ce"] for c in next(r for r in result["results"] if r["kind"] == kind)["curve"]]
    assert len(curve) == train.PRESETS["test"].steps
    assert all(math.isfinite(c) for c in curve)
    # Six steps on text of 20 distinct words must lower the loss.
    assert curve[-1] < curve[0]
    assert summary[f"{kind}_final_eval_ce"] < math.log(256)
  # Same width, depth, experts: parameter counts differ only by FoE's per-cluster norms.
  cfg = train.PRESETS["test"]
  extra_norms = cfg.num_layers * 2 * (cfg.block.num_clusters - 1) * cfg.block.d_model
  assert summary["foe_params"] - summary["baseline_params"] == extra_norms
  for name in ("losses.json", "loss_curves.png", "summary.md"):
    assert (tmp_path / name).stat().st_size > 0
  assert json.loads((tmp_path / "losses.json").read_text())["summary"]["steps"] == cfg.steps
