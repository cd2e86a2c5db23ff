"""Calibrations for models: fingerprint a model, calibrate it in closed form, put an artifact
into its caches, and keep the default one in the user cache ("auto").

    cal = kvjax.models.calibrated.calibrate(model, tokens)           # a kvjax.calibration.Calibration
    kvjax.calibration.save(cal, "cal/gemma3-270m")
    caches = model.init_cache(batch, max_len, calibration="cal/gemma3-270m")

The closed-form recipe is `kvjax.smoothing` (constant and rotary key offsets, λ, feedback
rounding, the exact sink key and value, exact recent values): one pass of the model over
calibration windows gathers statistics, and the recipe turns them into per-layer tensors. The
windows span several lengths (by default 2 x 1,024 and 1 x 4,096 tokens, consecutive and
disjoint, each opened with BOS); the statistics of each length give one context band of the
artifact (caches of at most 1,024 tokens take the 1K windows' parameters, longer ones the 4K
windows'), so one artifact serves every context up to the model's window; nothing is
recalibrated per context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import calibration as artifact
from kvjax.cache import QuantizedKVCache, with_config
from kvjax.config import QuantConfig
from kvjax.smoothing import KeyCalibration, calibrate_caches
from kvjax.models.decoder import layer_slots, with_separate_layers
from kvjax.models.runner import Runner, collect_stats, windows

# Calibration windows of the default artifact, in tokens: consecutive, disjoint, BOS-opened.
DEFAULT_WINDOWS = (1024, 1024, 4096)

# What each step of the closed-form recipe does (kvjax.smoothing's facts), for the manifest.
RECIPE_STEPS = {
    "offset": "constant key offset: keys stored minus their mean; attention adds q . mu back",
    "rope_pairs": "rotary key offset: the pre-RoPE key mean, turned by RoPE, removed per position "
                  "in the pairs where it helps most; attention adds q . A(wt) m back per slot",
    "alpha": "per-channel lambda = (rms(k) / rms(q)) ** alpha, balancing key error against "
             "where queries look",
    "feedback": "key codes chosen with GPTQ-style error feedback through E[q q^T]",
    "sink": "the key at position 0 kept exact (its rounding error stored in float32)",
    "value_sink": "the value at position 0 kept exact",
    "value_recent": "each new query reads the W most recent values exact",
    "value_alpha": "value lambda balanced against the output projection (off by default)",
    "value_feedback": "value codes chosen with error feedback through the output projection "
                      "(off by default)",
}


def _layer_params(model, part: str, run: int):
  runs = model.group_runs if part == "groups" else model.tail_runs
  return runs[run].attention


def fingerprint(model) -> dict:
  """What a calibration must match: the architecture fields of `kvjax.calibration` and a sha256
  of every layer's query/key projections and norms, in checkpoint layer order, rounded to
  bfloat16 (so float32 and bfloat16 copies of one checkpoint share a fingerprint) and
  independent of how the layers are stacked."""
  cfg = model.config
  out = {"name": getattr(model, "checkpoint_name", None)}
  for f in artifact.ARCHITECTURE_FIELDS:
    v = getattr(cfg, f)
    if dataclasses.is_dataclass(v):
      v = dataclasses.asdict(v)
    out[f] = list(v) if isinstance(v, tuple) else v
  h = hashlib.sha256()
  for part, run, index, layer in sorted(layer_slots(cfg), key=lambda s: s[3]):
    att = _layer_params(model, part, run)
    for name in ("q_proj", "k_proj", "q_norm", "k_norm"):
      mod = getattr(att, name, None)
      if mod is None:
        continue
      for pname in ("kernel", "bias", "scale"):
        p = getattr(mod, pname, None)
        if p is None:
          continue
        # numpy only: safe inside a trace (jax.eval_shape), where jnp ops would stage tracers.
        a = _host(p[...])[index].astype(jnp.bfloat16).view(np.uint16)
        h.update(f"{layer}/{name}/{pname}/{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
  out["qk_sha256"] = h.hexdigest()
  return out


def _host(x) -> np.ndarray:
  """x as a numpy array; a parameter sharded across processes is gathered first (every process
  computes the fingerprint, so every process takes part)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# ---------------------------------------------------------------------------------- calibrate


def calibration_windows(ids: Sequence[int], lengths: Sequence[int], *,
                        bos: bool) -> list[np.ndarray]:
  """Consecutive, disjoint windows of the given lengths from the start of `ids` (each opened
  with BOS when `bos`, ids[0] being the BOS token). Raises ValueError if the text is too short."""
  lengths = [int(n) for n in lengths]
  if not lengths or any(n < 2 for n in lengths):
    raise ValueError(f"window lengths must be ints >= 2, got {list(lengths)}")
  need = sum(n - 1 for n in lengths) + 1 if bos else sum(lengths)
  if len(ids) < need:
    raise ValueError(f"the calibration text has {len(ids)} tokens; windows of {lengths} tokens "
                     f"need {need}. Give a longer text or shorter windows")
  out, start = [], 0
  for n in lengths:
    out.append(windows(ids, n, 1, bos=bos, start=start)[0])
    start += n - 1 if bos else n
  return out


def collect_window_stats(model, wins: Sequence[np.ndarray], *, chunk: int = 512,
                         progress: bool = True, runner: Runner | None = None) -> dict:
  """{window length: statistics caches} over windows of any lengths; the windows of one length
  run as one batch and their statistics are summed (`collect_stats`)."""
  runner = runner if runner is not None else Runner(model)
  by_len: dict[int, list] = {}
  for w in wins:
    by_len.setdefault(len(w), []).append(np.asarray(w, np.int32))
  return {n: collect_stats(runner, np.stack(ws), chunk=min(chunk, n), progress=progress)
          for n, ws in sorted(by_len.items())}


def _layer_formats(cfg, quant: QuantConfig, layer_quant: dict | None) -> list[QuantConfig]:
  layer_quant = dict(layer_quant or {})
  for l in layer_quant:
    if not isinstance(l, int) or not 0 <= l < cfg.num_layers:
      raise ValueError(f"layer_quant: layer {l!r} is not a layer index in [0, {cfg.num_layers})")
  return [layer_quant.get(l, quant) for l in range(cfg.num_layers)]


def from_stats(model, stats, *, quant: QuantConfig | None = None, layer_quant=None,
               recipe: KeyCalibration = KeyCalibration(), manifest: dict | None = None
               ) -> artifact.Calibration:
  """A Calibration from statistics caches of this model's layout: one tree (`collect_stats`),
  or {window length: tree} (`collect_window_stats`), which gives a banded calibration: the
  longest windows' parameters are the main tensors, each shorter length L a band for caches of
  at most L tokens (`kvjax.calibration`).

  quant: the base format (default `QuantConfig()`: K4V4, groups of 32, SRFT); layer_quant:
  {layer: QuantConfig} for per-layer formats (the model must scan those layers on their own:
  `with_separate_layers`); recipe: which closed-form steps to apply (`kvjax.smoothing`).
  """
  quant = QuantConfig() if quant is None else quant
  cfg = model.config
  _layer_formats(cfg, quant, layer_quant)
  metric = model.value_output_metric(recipe.value_head_correlation) if recipe.calibrates_values \
      else None

  def one(tree):
    caches = model.init_cache(1, 1, quant=quant, layer_quant=layer_quant, _unplaced=True)
    caches = calibrate_caches(caches, tree, recipe, value_metric=metric)
    configs: list = [None] * cfg.num_layers
    tensors: list = [None] * cfg.num_layers
    for part, run, index, layer in layer_slots(cfg):
      c = caches[part][run]
      configs[layer] = c.config
      tensors[layer] = {f: np.asarray(c.array(f)[index])
                        for f in artifact.tensor_fields(c.config)}
    return tuple(configs), tuple(tensors)

  banded = isinstance(stats, dict) and stats and all(isinstance(k, int) for k in stats)
  by_len = dict(sorted(stats.items())) if banded else {None: stats}
  lengths = list(by_len)
  configs, tensors = one(by_len[lengths[-1]])
  bands = tuple((n, one(by_len[n])[1]) for n in lengths[:-1])
  info = {"model": fingerprint(model), "recipe": dataclasses.asdict(recipe),
          "recipe_steps": _steps(recipe), "method": "closed-form (kvjax.smoothing)"}
  if bands:
    info["bands_from"] = ("each band's tensors come from the calibration windows of its limit's "
                          "length; the main tensors from the longest windows")
  info.update(manifest or {})
  return artifact.Calibration(configs=configs, tensors=tensors, manifest=info, bands=bands)


def _steps(recipe: KeyCalibration) -> dict:
  on = {"offset": recipe.offset, "rope_pairs": recipe.offset and recipe.rope_pairs > 0,
        "alpha": recipe.alpha != 0, "feedback": recipe.feedback, "sink": recipe.sink,
        "value_sink": recipe.value_sink, "value_recent": recipe.value_recent > 0,
        "value_alpha": recipe.value_alpha != 0, "value_feedback": recipe.value_feedback}
  return {k: {"on": bool(v), "what": RECIPE_STEPS[k]} for k, v in on.items()}


def calibrate(model, tokens: Sequence[int], *, quant: QuantConfig | None = None,
              layer_quant=None, recipe: KeyCalibration = KeyCalibration(),
              window_lengths: Sequence[int] = DEFAULT_WINDOWS, text_name: str | None = None,
              chunk: int = 512, progress: bool = True) -> artifact.Calibration:
  """The closed-form calibration of `model` on `tokens` (the token ids of a calibration text,
  BOS first when the model adds one): statistics over consecutive windows of `window_lengths`
  tokens, then `from_stats`."""
  quant = QuantConfig() if quant is None else quant
  if not isinstance(quant, QuantConfig):
    raise TypeError(f"quant must be a kvjax.QuantConfig, got {type(quant).__name__}")
  if not isinstance(recipe, KeyCalibration):
    raise TypeError(f"recipe must be a kvjax.smoothing.KeyCalibration, got "
                    f"{type(recipe).__name__}")
  cfg = model.config
  formats = _layer_formats(cfg, quant, layer_quant)
  for l, q in enumerate(formats):
    try:
      q.check_head_dim(cfg.head_dim)
    except ValueError as e:
      raise ValueError(f"layer {l}: {e}") from None
  if layer_quant:
    model = with_separate_layers(model, tuple(sorted(set(cfg.separate_layers) | set(layer_quant))))
  ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
  if ids and (min(ids) < 0 or max(ids) >= cfg.vocab_size):
    raise ValueError(f"tokens must be ids in [0, {cfg.vocab_size})")
  wins = calibration_windows(ids, window_lengths, bos=cfg.add_bos)
  stats = collect_window_stats(model, wins, chunk=chunk, progress=progress)
  return from_stats(model, stats, quant=quant, layer_quant=layer_quant, recipe=recipe,
                    manifest={"text": {"name": text_name or "tokens given by the caller",
                                       "tokens": int(sum(len(w) for w in wins)),
                                       "windows": [len(w) for w in wins]}})


# ------------------------------------------------------------------------------------ apply


def required_separate_layers(calibration: artifact.Calibration, cfg) -> tuple[int, ...]:
  """Layers a model must scan on their own to give each layer this calibration's format: those
  whose format differs from the one most layers share."""
  if calibration.num_layers != cfg.num_layers:
    raise ValueError(f"the calibration has {calibration.num_layers} layers, the model "
                     f"{cfg.num_layers}")
  names = [c for c in calibration.configs]
  common = max(names, key=names.count)
  return tuple(l for l, c in enumerate(names) if c != common)


def init_cache(model, batch: int, max_len: int, calibration, *, context: int | None = None):
  """Empty caches for `model` in the format of `calibration` (a Calibration or an artifact
  directory), holding its tensors for caches of `max_len` tokens (`Calibration.tensors_for`;
  `context`: for sequences of up to that many tokens instead, e.g. a paged pool's template).
  The model must scan on their own the layers whose format differs from the others'
  (`required_separate_layers`; `kvjax.models.load(..., calibration=...)` does this)."""
  cfg = model.config
  cal = artifact.resolve(calibration, fingerprint=fingerprint(model))
  if cal.num_layers != cfg.num_layers:
    raise ValueError(f"the calibration has {cal.num_layers} layers, the model {cfg.num_layers}")
  stacked = [l for l in range(cfg.num_layers) if l not in cfg.separate_layers]
  formats = [cal.configs[l] for l in stacked]
  if len(set(formats)) > 1:
    common = max(formats, key=formats.count)
    need = sorted(set(cfg.separate_layers) | {l for l in stacked if cal.configs[l] != common})
    raise ValueError(f"the calibration gives layers {sorted(set(need) - set(cfg.separate_layers))} "
                     f"their own cache format; load the model with separate_layers="
                     f"{tuple(need)} (kvjax.models.load(..., calibration=...) does this)")
  configs = list(cal.configs)
  # The caches are created in the calibration's formats, then take its tensors (rotations are
  # values: the generated ones are replaced).
  common = configs[stacked[0]] if stacked else configs[0]
  layer_quant = {l: configs[l] for l in cfg.separate_layers}
  caches = model.init_cache(batch, max_len, quant=common, layer_quant=layer_quant,
                            _unplaced=True)
  chosen = cal.tensors_for(max_len if context is None else context)
  slots = layer_slots(cfg)
  out = {"groups": [], "tail": []}
  for part in ("groups", "tail"):
    for r, c in enumerate(caches[part]):
      mine = [(index, layer) for p, rr, index, layer in slots if p == part and rr == r]
      if len({configs[layer] for _, layer in mine}) != 1:
        raise ValueError(f"layers {[l for _, l in mine]} share one stacked cache but the "
                         "calibration gives them different formats; load the model with them "
                         "as separate_layers")
      if not isinstance(c, QuantizedKVCache):
        raise TypeError("internal: a calibrated layer got a dense cache")
      lead = c.lengths.shape[:-1]
      fields = {}
      for f in artifact.tensor_fields(c.config):
        arrays = [chosen[layer][f] for _, layer in mine]
        shape = tuple(max(a.shape[i] for a in arrays) for i in range(arrays[0].ndim))
        buf = np.zeros(lead + shape, arrays[0].dtype)
        for (index, _), a in zip(mine, arrays):
          buf[index] = np.broadcast_to(a, shape)
        _check_fits(f, shape, c)
        fields[f] = jnp.asarray(buf)
      out[part].append(with_config(c, c.config, **fields))
  return {"groups": tuple(out["groups"]), "tail": tuple(out["tail"])}


def _check_fits(field, shape, cache):
  """A calibration tensor [Hr, ...] (or a shared one) fits this cache's heads and head_dim."""
  h, d = cache.num_kv_heads, cache.head_dim
  for c in cache.config.corrections:
    if field in c.shared:
      want = c.param_shapes(d)[field]
      if shape != want:
        raise ValueError(f"calibration {field} of shape {shape} does not fit this cache "
                         f"(expected {want})")
      return
  tails = {"k_rotation": (d, d), "v_rotation": (d, d), "k_lambda": (d,), "v_lambda": (d,)}
  for c in cache.config.corrections:
    tails.update(c.param_shapes(d))
  if shape[0] not in (1, h) or shape[1:] != tails[field]:
    raise ValueError(f"calibration {field} of shape {shape} does not fit a cache of {h} KV heads "
                     f"and head_dim {d}")


# ------------------------------------------------------------------------------------- auto


def _auto_tag(quant: QuantConfig, recipe: KeyCalibration, lengths) -> str:
  from kvjax import __version__
  key = json.dumps({"quant": quant.to_dict(), "recipe": dataclasses.asdict(recipe),
                    "windows": list(lengths), "bands": "per window length",
                    "format": artifact.FORMAT_VERSION, "kvjax": __version__,
                    "text": "austen:Emma"}, sort_keys=True)
  return hashlib.sha256(key.encode()).hexdigest()[:12]


def auto_path(model, *, quant: QuantConfig | None = None,
              recipe: KeyCalibration = KeyCalibration(),
              window_lengths: Sequence[int] = DEFAULT_WINDOWS,
              cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Where `auto` keeps the default calibration of `model` (the user cache, beside the
  checkpoints: `<cache>/calibrations/<name>-<weights hash>-<recipe hash>`)."""
  from kvjax.user_cache import cache_dir as _cache_dir
  fp = fingerprint(model)
  quant = QuantConfig() if quant is None else quant
  name = fp.get("name") or fp["arch"]
  return (_cache_dir(cache_dir) / "calibrations"
          / f"{name}-{fp['qk_sha256'][:12]}-{_auto_tag(quant, recipe, window_lengths)}")


def auto(model, tokenizer, *, quant: QuantConfig | None = None,
         recipe: KeyCalibration = KeyCalibration(),
         window_lengths: Sequence[int] = DEFAULT_WINDOWS, cache_dir=None, progress: bool = True,
         log=print) -> artifact.Calibration:
  """The default calibration of `model`: read from the user cache, or computed on first use on
  the calibration book (Emma, disjoint from the evaluation text) and stored there atomically."""
  path = auto_path(model, quant=quant, recipe=recipe, window_lengths=window_lengths,
                   cache_dir=cache_dir)
  fp = fingerprint(model)
  from kvjax.user_cache import exclusive, sweep_stale
  # One process computes; others wait for it and read its result.
  with exclusive(path.parent / f".{path.name}.lock"):
    # A save killed without unwinding (SIGKILL) leaves its hidden temporaries beside the target.
    sweep_stale(path.parent, f".{path.name}.partial-")
    sweep_stale(path.parent, f".{path.name}.old-")
    return _auto_locked(model, tokenizer, path, fp, quant=quant, recipe=recipe,
                        window_lengths=window_lengths, progress=progress, log=log)


def _auto_locked(model, tokenizer, path, fp, *, quant, recipe, window_lengths, progress, log):
  if path.is_dir():
    try:
      return artifact.load(path, fingerprint=fp)
    except ValueError as e:
      log(f"recomputing the calibration at {path}: {e}")
  if tokenizer is None:
    raise ValueError("calibration='auto' needs the model's tokenizer to read the calibration "
                     "text; calibrate with `kvjax calibrate --text FILE` instead")
  from kvjax import corpus  # the calibration book: downloaded and cached on first use
  from kvjax.models.generate import encode
  ids = encode(tokenizer, corpus.calibration_text(), model.config)
  log(f"calibrating the int4 cache on {sum(window_lengths)} tokens of "
      f"{corpus.CALIBRATION_BOOK} (first use; kept in {path})")
  cal = calibrate(model, ids, quant=quant, recipe=recipe, window_lengths=window_lengths,
                  text_name=f"austen:{corpus.CALIBRATION_BOOK}", progress=progress)
  artifact.save(cal, path, overwrite=path.exists())
  return cal
