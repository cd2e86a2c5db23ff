"""`kvjax eval`: quantized KV caches against the bf16 cache on a real model and real text.

For each context length C and each cache, windows of C tokens of the evaluation text
(Pride and Prejudice unless `--text`) are scored: consecutive, disjoint stretches of the
text from its start, as many as make up `score_tokens` (default 2048: two windows at
1K, one at 4K; at least one), each opened with BOS when the model's tokenizer adds one,
so every window is a sequence as the model sees it. Scores are pooled over the windows'
tokens, in two modes:

  hook         teacher-forced: the window goes through the model in chunks, every
               key/value passing through the cache (stored, then read back in its
               storage form), so each position sees exactly what decode would see;
  incremental  true decode: the first C - m tokens of each window are prefilled through
               the cache, then the last m tokens are fed one at a time, as generation
               does; from the same prefilled cache they are also fed teacher-forced, so
               the two modes are compared token by token from an identical start
               (`evaluate_incremental`; the windows run as one batch).

Reported per (context, cache, mode): perplexity, ΔPPL (absolute and %), mean
per-token KL(bf16 ‖ cache) in nats, top-1 agreement with the bf16 cache, and the
cache's real bytes. All caches run in lockstep chunk by chunk, so the bf16
distribution is available for KL without storing [C, vocab] logits.

JSON schema (`eval.json`): {"meta": {...}, "rows": [{model, corpus, context, cache,
mode, ppl, delta_ppl, delta_ppl_pct, kl_mean, top1_agree, cache_bytes,
bits_per_value, tokens_scored, windows}]}. Rows of mode "incremental" score only the
last m - 1 positions of each of their windows (`incremental_windows`, default the scored
ones), and carry `hook_ppl_same_positions` (teacher-forced from the same prefilled cache),
`incremental_vs_hook_pct` (PPL ratio - 1 over the same tokens) and
`incremental_vs_hook_ci95_pct` (its 95% interval, `paired_ppl_ratio`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import calibration as artifact
from kvjax import certified as certified_lib
from kvjax.cache import nbytes
from kvjax.certified import CertifiedConfig
from kvjax.config import QuantConfig
from kvjax.models import calibrated
from kvjax.models.runner import Runner, collect_stats, prefill, progress_bar as _progress, windows
from kvjax.smoothing import OFFSET_AND_LAMBDA, KeyCalibration, calibrate_caches, calibrated_config


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """A cache to evaluate. quant None = dense (bf16); calibrate = the closed-form recipe `recipe`
  (`kvjax.models.calibrated`), made in process once per run; calibration = a calibration
  artifact directory (`kvjax calibrate --out DIR`) or "auto" (the model's default one, from the
  user cache) that the cache is built from instead; key8_layers = layers whose keys are stored
  at 8 bits (the model is then loaded with them as separate layers,
  `ModelConfig.separate_layers`)."""

  name: str
  quant: QuantConfig | None
  calibrate: bool = False
  description: str = ""
  calibration: str | None = None
  key8_layers: tuple[int, ...] = ()
  key8_auto: int = 0  # pick this many key8_layers by `key_sensitivity` on calibration text
  recipe: KeyCalibration = KeyCalibration()  # what `calibrate` derives from the statistics
  # Other per-layer formats: ((QuantConfig field, value, layers), ...), applied in order after
  # the 8-bit keys; layers are indices or "global" / "local" (see `resolve_layers`).
  layer_formats: tuple[tuple[str, int, tuple[int | str, ...]], ...] = ()
  # A certified cache (`kvjax.certified`): `quant` is its compressed tier's format.
  certified: CertifiedConfig | None = None

  def __post_init__(self):
    if self.certified is not None and (self.calibrate or self.calibration is not None
                                       or self.key8_layers or self.layer_formats):
      raise ValueError(f"cache {self.name!r}: a certified cache takes a plain format "
                       "(no calibration, no per-layer formats)")
    if ((self.key8_layers or self.key8_auto or self.layer_formats)
        and (self.quant is None or self.calibration is not None)):
      raise ValueError(f"cache {self.name!r}: per-layer formats (8-bit key layers, '+g<N>@', "
                       "'+v8@') need a quantized cache calibrated in process, not an artifact")
    if not isinstance(self.key8_auto, int) or self.key8_auto < 0:
      raise ValueError(f"cache {self.name!r}: key8_auto must be an int >= 0, got {self.key8_auto!r}")
    for field, value, layers in self.layer_formats:
      if field not in _LAYER_FIELDS.values():
        raise ValueError(f"cache {self.name!r}: a per-layer format sets one of "
                         f"{sorted(_LAYER_FIELDS.values())}, got {field!r}")
      dataclasses.replace(self.quant, **{field: value})  # QuantConfig validates the value
      if not layers or any(not isinstance(l, int) and l not in ("global", "local") for l in layers):
        raise ValueError(f"cache {self.name!r}: per-layer format {field}={value} needs layer "
                         f"indices or 'global'/'local', got {layers!r}")

  def resolve_layers(self, config) -> "CacheSpec":
    """This spec with 'global' / 'local' replaced by those layers of the model `config`."""
    formats = []
    for field, value, layers in self.layer_formats:
      out = set()
      for l in layers:
        if isinstance(l, str):
          out |= {i for i, kind in enumerate(config.layer_types) if kind == l}
        elif not 0 <= l < config.num_layers:
          raise ValueError(f"cache {self.name!r}: layer {l} is out of range for a model of "
                           f"{config.num_layers} layers")
        else:
          out.add(l)
      if not out:
        raise ValueError(f"cache {self.name!r}: {layers} names no layer of this model "
                         f"(layer types {sorted(set(config.layer_types))})")
      formats.append((field, value, tuple(sorted(out))))
    bad = [l for l in self.key8_layers if not 0 <= l < config.num_layers]
    if bad:
      raise ValueError(f"cache {self.name!r}: layers {bad} are out of range for a model of "
                       f"{config.num_layers} layers")
    return dataclasses.replace(self, layer_formats=tuple(formats))

  def formats(self, head_dim: int):
    """(quant, {layer: QuantConfig}) as this spec's caches really run: for a calibrated spec,
    the configs `calibrate_caches` gives them (rotary key offsets, feedback rounding, the sink
    buffers), which change a step's work and the bytes held."""
    fmt = ((lambda q: calibrated_config(q, self.recipe, head_dim=head_dim)) if self.calibrate
           else (lambda q: q))
    return fmt(self.quant), {l: fmt(q) for l, q in self.layer_quant().items()}

  def layer_quant(self) -> dict:
    """{layer: QuantConfig} overrides for `model.init_cache(layer_quant=...)`."""
    out = {l: dataclasses.replace(self.quant, key_bits=8) for l in self.key8_layers}
    for field, value, layers in self.layer_formats:
      if any(isinstance(l, str) for l in layers):
        raise ValueError(f"cache {self.name!r}: resolve 'global' / 'local' layers first "
                         "(CacheSpec.resolve_layers(model.config))")
      for l in layers:
        out[l] = dataclasses.replace(out.get(l, self.quant), **{field: value})
    return out


# '+<letter><value>@layers' in a cache name -> the QuantConfig field it sets.
_LAYER_FIELDS = {"k": "key_bits", "v": "value_bits", "g": "group_size"}


def with_layers_for(model, specs):
  """`model`, or a copy scanning on their own the layers these resolved specs give their own
  cache format (`kvjax.models.with_separate_layers`)."""
  layers = separate_layers(specs)
  if not layers:
    return model
  from kvjax.models import with_separate_layers
  return with_separate_layers(model, layers)


def separate_layers(specs) -> tuple[int, ...]:
  """Layers the model must scan on their own for these specs' per-layer caches (resolved
  specs: see `CacheSpec.resolve_layers`)."""
  return tuple(sorted({l for s in specs for l in s.layer_quant()}))


def default_specs() -> list[CacheSpec]:
  return [
      CacheSpec("bf16", None, description="dense bfloat16 cache (baseline)"),
      CacheSpec("int4-naive", QuantConfig(rotation="none"),
                description="K4V4 g32, per-token abs-max, no rotation"),
      CacheSpec("int4-srft", QuantConfig(rotation="srft"),
                description="K4V4 g32, SRFT rotation only"),
      CacheSpec("int4", QuantConfig(rotation="srft"), calibrate=True, calibration="auto",
                description="kvjax default: K4V4 g32, SRFT + calibrated key offsets (constant "
                            "and rotary), λ, feedback rounding; exact sink key and value, "
                            "exact recent values (4)"),
      CacheSpec("K8V4", QuantConfig(key_bits=8, rotation="srft"), calibrate=True,
                description="8-bit keys, 4-bit values, g32, SRFT + calibrated key offsets, λ, "
                            "feedback rounding; exact sink key and value, exact recent values (4)"),
  ]


def ablation_specs() -> list[CacheSpec]:
  """The default int4 recipe with one calibration step at a time (what bought what)."""
  q = QuantConfig(rotation="srft")
  return [
      CacheSpec("int4-novrec", q, calibrate=True,
                recipe=dataclasses.replace(KeyCalibration(), value_recent=0),
                description="K4V4 g32, the default without the exact recent values"),
      CacheSpec("int4-vrec1", q, calibrate=True,
                recipe=dataclasses.replace(KeyCalibration(), value_recent=1),
                description="K4V4 g32, the default with only the current value exact"),
      CacheSpec("int4-novsink", q, calibrate=True,
                recipe=dataclasses.replace(KeyCalibration(), value_sink=False),
                description="K4V4 g32, the default without the exact sink value"),
      CacheSpec("int4-value-lambda", q, calibrate=True,
                recipe=dataclasses.replace(KeyCalibration(), value_alpha=0.5),
                description="K4V4 g32, the default plus value λ balanced against the output "
                            "projection (kvjax.smoothing fact 7)"),
      CacheSpec("int4-value-feedback", q, calibrate=True,
                recipe=dataclasses.replace(KeyCalibration(), value_alpha=0.5,
                                           value_feedback=True),
                description="K4V4 g32, the default plus value λ and value feedback rounding "
                            "through the output projection (fact 7)"),
      CacheSpec("int4-offset-lambda", q, calibrate=True, recipe=OFFSET_AND_LAMBDA,
                description="K4V4 g32, SRFT + constant key offset and λ"),
      CacheSpec("int4-rotary", q, calibrate=True,
                recipe=dataclasses.replace(KeyCalibration(), feedback=False),
                description="K4V4 g32, SRFT + constant and rotary key offsets, λ; exact "
                            "sink key and value"),
      CacheSpec("int4-feedback", q, calibrate=True,
                recipe=dataclasses.replace(KeyCalibration(), rope_pairs=0),
                description="K4V4 g32, SRFT + constant key offset, λ, feedback rounding; "
                            "exact sink key and value"),
      CacheSpec("int4-nosink", q, calibrate=True,
                recipe=dataclasses.replace(KeyCalibration(), sink=False),
                description="K4V4 g32, SRFT + constant and rotary key offsets, λ and feedback "
                            "rounding; exact sink value (no exact sink key)"),
  ]


SPEC_CHOICES = {s.name: s for s in default_specs() + ablation_specs()}


def parse_spec(text: str) -> CacheSpec:
  """Parses a cache name: a default ('bf16', 'int4', ...) or 'K4V4-g64-srht[-cal]', optionally
  followed by per-layer formats, each '+<what>@<layers>':
    k8@L1,L2,...   those layers' keys at 8 bits (or k8@auto<N>: the N most key-sensitive);
    v8@L1,...      those layers' values at 8 bits;
    g<N>@L1,...    those layers' quantization group of N channels;
  where layers are indices or 'global' / 'local' (the model's full-attention or
  sliding-window layers), e.g. 'int4+g128@global+k8@4'."""
  if text.startswith("cert"):  # 'cert[<tol>]-<format>': a certified cache over that format
    head, _, base = text.partition("-")
    try:
      tol = float(head[4:]) if head[4:] else CertifiedConfig.tol
    except ValueError:
      tol = None
    if tol is None or not base:
      raise ValueError(f"cache {text!r}: a certified cache is 'cert[<tol>]-<format>', e.g. "
                       "cert-int4-naive or cert0.005-K8V4-g32-srft")
    spec = parse_spec(base)
    if spec.quant is None or spec.calibrate or spec.calibration is not None or spec.layer_formats:
      raise ValueError(f"cache {text!r}: the format after 'cert-' must be an uncalibrated "
                       f"quantized cache without per-layer formats, got {base!r}")
    try:
      config = CertifiedConfig(tol=tol, quant=spec.quant)
    except ValueError as e:
      raise ValueError(f"cache {text!r}: {e}") from None
    return CacheSpec(text, spec.quant, certified=config,
                     description=f"{spec.description or base}, certified within {tol:g} "
                                 "(kvjax.certified)")
  if ":" in text:  # '<cache>:<artifact directory>'
    base, _, path = text.partition(":")
    spec = parse_spec(base)
    if spec.quant is None or not spec.calibrate or spec.layer_formats or spec.key8_layers:
      raise ValueError(f"cache {text!r}: '<cache>:DIR' takes a calibrated cache without "
                       "per-layer formats before the colon (e.g. int4:cal/gemma3-270m)")
    if not path:
      raise ValueError(f"cache {text!r}: give the artifact directory after the colon")
    return dataclasses.replace(spec, name=text, calibration=path,
                               description=f"{spec.description} (artifact {path})")
  base, *formats = text.split("+")
  if formats:
    spec = parse_spec(base)
    spec = dataclasses.replace(spec, calibration=None)  # per-layer formats: calibrated in process
    layer_formats, described = [], []
    for part in formats:
      what, at, layers = part.partition("@")
      if not at or len(what) < 2 or what[0] not in "kvg" or not what[1:].isdigit():
        raise ValueError(f"cache {text!r}: {'+' + part!r} is not a per-layer format; use "
                         "+k8@L1,L2 / +v8@L1,L2 / +g<N>@L1,L2 (layers: indices, 'global' or "
                         "'local'), or +k8@auto<N>")
      field, value = _LAYER_FIELDS[what[0]], int(what[1:])
      if what == "k8" and layers.startswith("auto"):
        try:
          count = int(layers[4:])
        except ValueError:
          count = -1
        if count < 1:
          raise ValueError(f"cache {text!r}: '+k8@auto' must be followed by a positive count, "
                           "e.g. int4+k8@auto4") from None
        spec = dataclasses.replace(spec, key8_auto=count)
        described.append(f"keys of the {count} most sensitive layers at 8 bits")
        continue
      try:
        ids = tuple(l if l in ("global", "local") else int(l) for l in layers.split(","))
      except ValueError:
        raise ValueError(f"cache {text!r}: '+{what}@' must be followed by comma-separated layer "
                         "indices (e.g. int4+k8@1,2,4,10), 'global' or 'local'"
                         + (", or auto<count> (e.g. int4+k8@auto4)" if what == "k8" else "")) from None
      if what == "k8" and all(isinstance(l, int) for l in ids):
        spec = dataclasses.replace(spec, key8_layers=tuple(sorted(set(spec.key8_layers) | set(ids))))
      else:
        layer_formats.append((field, value, ids))
      described.append({"key_bits": f"keys at {value} bits", "value_bits": f"values at {value} bits",
                        "group_size": f"groups of {value}"}[field]
                       + f" in layers {', '.join(map(str, ids))}")
    try:
      return dataclasses.replace(spec, name=text, layer_formats=spec.layer_formats + tuple(layer_formats),
                                 description="; ".join([spec.description or base] + described))
    except ValueError as e:
      raise ValueError(f"cache {text!r}: {e}") from None
  if text in SPEC_CHOICES:
    return SPEC_CHOICES[text]
  parts = text.split("-")
  try:
    kv = parts[0].upper()
    kb, vb = int(kv[1:kv.index("V")]), int(kv[kv.index("V") + 1:])
    g = int(parts[1].lstrip("g"))
    rot = parts[2] if len(parts) > 2 else "srft"
    cal = len(parts) > 3 and parts[3] == "cal"
    if len(parts) > 4 or (len(parts) > 3 and not cal) or not parts[1].startswith("g"):
      raise ValueError(text)
  except (ValueError, IndexError):
    raise ValueError(f"unknown cache {text!r}: use one of {sorted(SPEC_CHOICES)} or a "
                     "description like K4V4-g32-srft or K4V4-g64-srht-cal") from None
  return CacheSpec(text, QuantConfig(key_bits=kb, value_bits=vb, group_size=g, rotation=rot),
                   calibrate=cal)


# ------------------------------------------------------------------------------ model steps


@jax.jit
def _reference_stats(ref_logits):
  """What every cache's statistics need of the reference logits [T, V], computed once:
  (logits, p_ref [T, V], logsumexp [T], argmax [T])."""
  ref = ref_logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(ref, axis=-1)
  return ref, jnp.exp(ref - lse[:, None]), lse, jnp.argmax(ref, axis=-1)


@jax.jit
def _token_stats(ref, logits, targets, valid):
  """Per-token NLL of `logits` [T, V], KL(ref ‖ logits) and top-1 agreement; [T] each.

  ref = `_reference_stats(ref_logits)`. KL = sum p_ref (log p_ref - log p) =
  sum p_ref (ref - logits) + lse(logits) - lse(ref) (sum p_ref = 1): the quantized logits
  are never normalized in memory, and the logit difference keeps small KLs exact."""
  ref_logits, p_ref, lse_ref, top_ref = ref
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  nll = lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  kl = jnp.sum(p_ref * (ref_logits - logits), axis=-1) + (lse - lse_ref)
  agree = (jnp.argmax(logits, axis=-1) == top_ref).astype(jnp.float32)
  z = jnp.zeros_like(nll)
  return jnp.where(valid, nll, z), jnp.where(valid, kl, z), jnp.where(valid, agree, z)


def _make_caches(model, spec: CacheSpec, max_len: int, calibrations=None, *, batch: int = 1):
  """The caches of `spec` for `batch` sequences of up to `max_len` tokens. (Quality is measured
  with the exact quantized-domain XLA path, `Runner(model, attention_impl="xla")`, one order of
  summation for every cache: the "int8dot" path adds ~2e-4 per attention row, and through 4-bit
  codes even that re-rolls the rounding of later layers' K/V, which reads as +-2% PPL noise over
  a few dozen tokens; the CPU default, "native", differs from "xla" by summation order only.)"""
  if spec.quant is None:
    return model.init_cache(batch, max_len, dtype=jnp.bfloat16)
  if spec.certified is not None:
    return model.init_cache(batch, max_len, certified=spec.certified)
  if spec.calibrate or spec.calibration is not None:
    cal = (calibrations or {}).get(spec.name)
    if cal is None:
      raise ValueError(f"cache {spec.name!r} is calibrated: pass calibrations="
                       "calibrations_for(model, specs, ...) holding its Calibration")
    # The path every user takes: model.init_cache(..., calibration=...).
    return model.init_cache(batch, max_len, calibration=cal)
  return model.init_cache(batch, max_len, quant=spec.quant, layer_quant=spec.layer_quant())


def calibrations_for(model, specs: Sequence[CacheSpec], *, tokenizer=None, ids=None,
                     stats=None, window_lengths: Sequence[int] = calibrated.DEFAULT_WINDOWS,
                     chunk: int = 512, progress: bool = True, log=print) -> dict:
  """{spec name: kvjax.calibration.Calibration} for the calibrated specs, each made once and
  used at every context.

  A spec with `calibration` reads that artifact ("auto": the model's default calibration from
  the user cache, computed on first use exactly as `kvjax.models.load(..., calibration="auto")`
  does; needs `tokenizer`). A spec with `calibrate` and no artifact is calibrated in process
  with its own recipe and per-layer formats (`kvjax.models.calibrated.from_stats`) from `stats`,
  or from statistics over `window_lengths` windows of `ids` (calibration text token ids),
  gathered once for all such specs.
  """
  out = {}
  fp = None
  for s in specs:
    if s.quant is None or not (s.calibrate or s.calibration is not None):
      continue
    if s.calibration is not None:
      if s.calibration == "auto":
        out[s.name] = calibrated.auto(model, tokenizer, quant=s.quant, recipe=s.recipe,
                                      window_lengths=window_lengths, progress=progress, log=log)
      else:
        fp = fp or calibrated.fingerprint(model)
        out[s.name] = artifact.load(s.calibration, fingerprint=fp)
      continue
    if stats is None:
      if ids is None:
        raise ValueError(f"cache {s.name!r} is calibrated in process: give ids (calibration "
                         "text) or stats")
      wins = calibrated.calibration_windows(ids, window_lengths, bos=model.config.add_bos)
      log(f"calibration statistics over windows of {[len(w) for w in wins]} tokens")
      stats = calibrated.collect_window_stats(model, wins, chunk=chunk, progress=progress)
    out[s.name] = calibrated.from_stats(model, stats, quant=s.quant, layer_quant=s.layer_quant(),
                                        recipe=s.recipe)
  return out


def cache_bytes(model, spec: CacheSpec, context: int, calibration=None) -> int:
  """Real bytes of the caches of one sequence of `context` tokens (from `calibration`'s formats
  when the spec's cache is built from one)."""
  if spec.certified is not None:
    # Allocated for real (one sequence): every layer keeps every token (no ring), and the
    # device holds the tier and its block metadata; the bfloat16 copy is in host memory.
    return certified_lib.device_nbytes(model.init_cache(1, context, certified=spec.certified))
  if calibration is not None:
    # Allocated for real (one sequence: a few MB): the calibrated caches hold its tensors.
    caches = model.init_cache(1, context, calibration=calibration)
  else:
    caches = jax.eval_shape(lambda: _make_caches_shape(model, spec, context))
  return _tree_nbytes(caches)


def _make_caches_shape(model, spec, context):
  if spec.quant is None:
    return model.init_cache(1, context, dtype=jnp.bfloat16)
  # As calibration configures the caches (the exact sink buffers count).
  quant, layer_quant = spec.formats(model.config.head_dim)
  return model.init_cache(1, context, quant=quant, layer_quant=layer_quant)


def bits_per_value(model, spec: CacheSpec, context: int, calibration=None) -> float:
  """Mean stored bits per cached K/V value at `context` tokens (per-layer formats weighted by
  the slots each layer holds: a sliding-window layer holds at most its window; from
  `calibration`'s formats when the spec's cache is built from one)."""
  if spec.quant is None:
    return 16.0
  cfg = model.config
  if calibration is not None:
    formats = list(calibration.configs)
  else:
    overrides = spec.layer_quant()
    formats = [overrides.get(l, spec.quant) for l in range(cfg.num_layers)]
  total = weight = 0.0
  for layer, kind in enumerate(cfg.layer_types):
    slots = min(context, cfg.sliding_window) if kind == "local" else context
    total += slots * formats[layer].bits_per_value()
    weight += slots
  return total / weight


def _tree_nbytes(caches) -> int:
  from kvjax.cache import DenseKVCache, QuantizedKVCache
  total = 0
  for c in jax.tree_util.tree_leaves(caches, is_leaf=lambda x: isinstance(x, (DenseKVCache, QuantizedKVCache))):
    if isinstance(c, (DenseKVCache, QuantizedKVCache)):
      total += nbytes(c)
  return total


def key_sensitivity(model, calibration_tokens: Sequence[int], probe_tokens: Sequence[int],
                    quant: QuantConfig, *, calibrate: bool = True, chunk: int = 512,
                    progress: bool = True) -> np.ndarray:
  """Per layer: mean KL(dense ‖ dense with only that layer's cache quantized) on probe text.

  The model is run with every layer separate (`with_separate_layers`), a bf16 cache in every
  layer but one, which gets `quant` (key offset and λ from statistics of
  `calibration_tokens` when `calibrate`), over `probe_tokens`; one run per layer. The result,
  float [num_layers], ranks where a cache's error hurts the model, which a layer's own
  reconstruction or logit error does not predict (on Gemma-3-270M the most sensitive
  layer, 4, has one of the smallest key logit errors). Costs num_layers prefills of the probe.
  """
  from kvjax.cache import DenseKVCache, QuantizedKVCache
  from kvjax.models import with_separate_layers

  cfg = model.config
  split = with_separate_layers(model, range(cfg.num_layers))
  runner = Runner(split, attention_impl="xla")
  stats = collect_stats(runner, calibration_tokens, chunk=chunk, progress=False) if calibrate else None
  max_len = len(probe_tokens)

  def log_probs(caches):
    out = []
    for lo in range(0, max_len, chunk):
      part = np.asarray([probe_tokens[lo:lo + chunk]], np.int32)
      logits, caches = runner(part, caches)
      out.append(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1))
    return jnp.concatenate(out)

  ref = log_probs(split.init_cache(1, max_len, dtype=jnp.bfloat16))
  is_cache = lambda x: isinstance(x, (DenseKVCache, QuantizedKVCache))
  metric = split.value_output_metric(KeyCalibration().value_head_correlation)
  result = np.zeros(cfg.num_layers)
  bar = _progress(cfg.num_layers, "key sensitivity", progress)
  for layer in range(cfg.num_layers):
    caches = split.init_cache(1, max_len, dtype=jnp.bfloat16, layer_quant={layer: quant})
    if calibrate:
      caches = jax.tree_util.tree_map(
          lambda c, st, m: (calibrate_caches(c, st, KeyCalibration(), value_metric=m)
                            if isinstance(c, QuantizedKVCache) else c),
          caches, stats, metric, is_leaf=is_cache)
    lp = log_probs(caches)
    result[layer] = float(jnp.mean(jnp.sum(jnp.exp(ref) * (ref - lp), axis=-1)))
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  return result


def _lockstep(runner: Runner, caches: dict, specs, tokens, targets, valid, num=None) -> dict:
  """Feeds tokens [B, T] to every spec's caches (updated in `caches`), the first spec being
  the reference; returns {name: (nll, kl, agree)}, numpy [B, T] each, of the logits at
  positions whose next tokens are targets [B, T] (valid [B, T])."""
  b, t = np.shape(targets)
  targets = jnp.asarray(np.reshape(targets, -1), jnp.int32)
  valid = jnp.asarray(np.reshape(valid, -1))
  ref, out = None, {}
  for s in specs:
    logits, caches[s.name] = runner(tokens, caches[s.name], num)
    logits = logits.reshape(b * t, -1)
    if ref is None:
      ref = _reference_stats(logits)
    out[s.name] = tuple(np.asarray(v).reshape(b, t)
                        for v in _token_stats(ref, logits, targets, valid))
  return out


def evaluate_window(runner: Runner, tokens: np.ndarray, specs: Sequence[CacheSpec], *,
                    max_len: int, calibrations=None, chunk: int = 512,
                    progress: bool = True, certified_stats: dict | None = None) -> dict:
  """Scores one window of tokens under every cache in hook mode, in lockstep with the first
  spec (the reference). runner: `Runner(model, attention_impl="xla")` for the exact path
  `kvjax eval` measures. certified_stats: a dict that receives, for each certified spec,
  `kvjax.certified.stats_summary` of its caches after the window.

  Returns {spec name: {"hook": (nll [T-1], kl [T-1], agree [T-1])}}.
  """
  model = runner.model
  n = len(tokens)
  if n < 2:
    raise ValueError("a window needs at least 2 tokens")
  caches = {s.name: _make_caches(model, s, max_len, calibrations) for s in specs}
  out = {s.name: [[], [], []] for s in specs}
  bar = _progress(n * len(specs), f"hook C={n}", progress)
  targets_all = np.asarray(tokens[1:], np.int32)
  for lo in range(0, n, chunk):
    part = tokens[lo:lo + chunk]
    piece = np.zeros((1, chunk), np.int32)
    piece[0, :len(part)] = part
    tgt = np.zeros((1, chunk), np.int32)
    t_part = targets_all[lo:lo + chunk]
    tgt[0, :len(t_part)] = t_part
    valid = (np.arange(chunk) < len(t_part))[None]
    stats_ = _lockstep(runner, caches, specs, piece, tgt, valid,
                       jnp.asarray([len(part)], jnp.int32))
    for name, vals in stats_.items():
      for acc, val in zip(out[name], vals):
        acc.append(val[0, :len(t_part)])
    if bar is not None:
      bar.update(len(part) * len(specs))
  if bar is not None:
    bar.close()
  if certified_stats is not None:
    for s in specs:
      if s.certified is not None:
        certified_stats[s.name] = certified_lib.stats_summary(caches[s.name])
  return {name: {"hook": tuple(np.concatenate(a) for a in accs)} for name, accs in out.items()}


def evaluate_incremental(runner: Runner, windows_: np.ndarray, specs: Sequence[CacheSpec], *,
                         steps: int, max_len: int, calibrations=None, chunk: int = 512,
                         progress: bool = True) -> dict:
  """True decode against teacher forcing over the last `steps` positions of each window.

  windows_: [W, C] equal-length windows, run as one batch. For each cache (in lockstep with
  the first spec, the reference), the first C - m tokens (m = min(steps, C - 1)) are prefilled
  once; from that one prefilled cache the last m tokens are then fed (a) teacher-forced in
  chunks, as hook mode does, and (b) one at a time, as generation does. Both modes thus start
  from the identical cache and differ only in how the last m tokens enter it, so the paired
  per-token difference measures exactly what decode changes.

  Returns {spec name: {"hook": (nll, kl, agree), "incremental": (nll, kl, agree)}}, each array
  [W, m - 1] (position i predicts token i + 1; a window's last token has no target), KL and
  top-1 against the reference in the same mode.
  """
  model = runner.model
  wins = np.asarray(windows_, np.int32)
  if wins.ndim != 2 or wins.shape[1] < 2:
    raise ValueError(f"windows must be [W, C] with C >= 2, got shape {wins.shape}")
  if not isinstance(steps, int) or steps < 2:
    raise ValueError(f"steps must be an int >= 2 (one scored position needs two tokens), got "
                     f"{steps!r}")
  w, n = wins.shape
  m = min(steps, n - 1)
  start = n - m
  scored = m - 1
  # Teacher-forced chunks of the suffix hold at most `chunk` token rows in all (the [rows,
  # vocab] logits of a 262K vocabulary are the memory that matters).
  sub = max(1, chunk // w)
  prefilled = {}
  bar = _progress(w * (start + 2 * m - 1) * len(specs), f"incremental C={n} x{w}", progress)
  for s in specs:
    caches = _make_caches(model, s, max_len, calibrations, batch=w)
    _, prefilled[s.name] = prefill(runner, wins[:, :start], caches, chunk=chunk)
    if bar is not None:
      bar.update(w * start)
  out = {s.name: {"hook": [[], [], []], "incremental": [[], [], []]} for s in specs}

  def record(mode, stats_):
    for name, vals in stats_.items():
      for acc, v in zip(out[name][mode], vals):
        acc.append(v)

  # (a) teacher-forced: copies of the prefilled caches (the runner donates what it is given).
  hook = {name: jax.tree_util.tree_map(jnp.copy, c) for name, c in prefilled.items()}
  for lo in range(start, n, sub):
    hi = min(lo + sub, n)
    piece = np.zeros((w, sub), np.int32)
    piece[:, :hi - lo] = wins[:, lo:hi]
    targets = np.zeros((w, sub), np.int32)
    t_hi = min(hi, n - 1)
    targets[:, :t_hi - lo] = wins[:, lo + 1:t_hi + 1]
    valid = np.broadcast_to(np.arange(sub) < t_hi - lo, (w, sub))
    record("hook", _lockstep(runner, hook, specs, piece, targets, valid,
                             jnp.full((w,), hi - lo, jnp.int32)))
    if bar is not None:
      bar.update(w * (hi - lo) * len(specs))
  del hook

  # (b) one token at a time from the same prefilled caches.
  for i in range(start, n - 1):  # the window's last token has no target to score
    record("incremental", _lockstep(runner, prefilled, specs, wins[:, i:i + 1],
                                    wins[:, i + 1:i + 2], np.ones((w, 1), bool)))
    if bar is not None:
      bar.update(w * len(specs))
  if bar is not None:
    bar.close()
  result = {}
  for name, modes in out.items():
    result[name] = {}
    for mode, accs in modes.items():
      arrays = tuple(np.concatenate(a, axis=1)[:, :scored] for a in accs)
      result[name][mode] = arrays
  return result


def paired_ppl_ratio(nll_a, nll_b) -> dict:
  """PPL(a) / PPL(b) - 1 in % over the same tokens, with a 95% interval.

  nll_a, nll_b: [W, T] per-token NLLs of two passes over the same W windows. The ratio is
  exp(mean(d)) - 1 for d = nll_a - nll_b. Its standard error is the larger of the i.i.d.
  token estimate std(d) / sqrt(N) and the cluster-robust one over windows (tokens of one
  window share a cache, so their differences may be correlated); the interval is
  exp(mean(d) +- 1.96 se) - 1. Returns {"pct", "ci95_pct": [lo, hi], "se_nats", "tokens"}.
  """
  if np.ndim(nll_a) != 2 or np.shape(nll_a) != np.shape(nll_b) or np.size(nll_a) < 2:
    raise ValueError(f"nll_a and nll_b must be equal [windows, tokens] arrays with at least 2 "
                     f"tokens, got {np.shape(nll_a)} and {np.shape(nll_b)}")
  d = np.asarray(nll_a, np.float64) - np.asarray(nll_b, np.float64)
  n = d.size
  mean = float(d.mean())
  se = float(d.std(ddof=1) / math.sqrt(n))
  if d.shape[0] > 1:
    resid = (d - mean).sum(axis=1)  # per-window sums of deviations
    g = d.shape[0]
    se = max(se, float(math.sqrt(g / (g - 1) * np.sum(resid ** 2)) / n))
  pct = lambda x: 100.0 * math.expm1(x)
  return {"pct": pct(mean), "ci95_pct": [pct(mean - 1.96 * se), pct(mean + 1.96 * se)],
          "se_nats": se, "tokens": int(n)}


def _pool_windows(per_window: Sequence[dict]) -> dict:
  """Concatenates the per-token arrays of several `evaluate_window` results."""
  return {name: {"hook": tuple(np.concatenate([w[name]["hook"][i] for w in per_window])
                               for i in range(3))}
          for name in per_window[0]}


def _pool_certified(stats: Sequence[dict]) -> dict:
  """Rung statistics of a certified cache over several windows (`stats_summary` dicts)."""
  rows = {}
  for st in stats:
    for rung, n in st["rows"].items():
      rows[rung] = rows.get(rung, 0) + n
  total = max(1, sum(rows.values()))
  return {"rows": rows, "share": {r: n / total for r, n in rows.items()},
          "host_blocks": sum(st["host_blocks"] for st in stats),
          "max_bound": max(st["max_bound"] for st in stats)}


def _summary(nll, kl, agree):
  return {"ppl": float(math.exp(float(np.mean(nll)))), "kl_mean": float(np.mean(kl)),
          "top1_agree": float(np.mean(agree)), "tokens_scored": int(np.size(nll))}


def run(model_name: str = "gemma3-270m", *, text_file: str | None = None,
        contexts: Sequence[int] = (1024, 4096), specs: Sequence[CacheSpec] | None = None,
        incremental_steps: int = 64, incremental_specs: Sequence[str] = ("int4",),
        incremental_windows: int | None = None,
        calibration_windows: Sequence[int] = calibrated.DEFAULT_WINDOWS, chunk: int = 512,
        out_dir: str = "results/eval", progress: bool = True, plot: bool = True, log=print,
        calibration: str | None = None, score_tokens: int = 2048) -> dict:
  """The whole `kvjax eval` job; returns the JSON document it writes.

  calibration: an artifact directory written by `kvjax calibrate`: the `int4` row's cache
  (default "auto": the model's default calibration from the user cache, computed on first use,
  exactly what `kvjax.models.load(..., calibration="auto")` serves).
  score_tokens: each context C is scored on ceil(score_tokens / C) windows (`windows`).
  incremental_steps, incremental_windows: decode the last incremental_steps positions of
  this many windows of each context (default: the scored windows; 0 steps: no incremental
  rows) as one batch, against teacher forcing from the same prefilled cache
  (`evaluate_incremental`), for the reference and `incremental_specs`.
  calibration_windows: window lengths of every calibration the run makes (consecutive
  BOS-opened windows of the calibration book, one context band per length; the `int4` row's
  "auto" artifact is the model's default only with the default windows), made once and used at
  every context.
  """
  from kvjax import corpus
  from kvjax.models import load

  check_out_dir(out_dir)
  check_positive_ints(chunk, "--chunk")
  check_positive_ints(list(contexts), "--contexts", minimum=2)
  check_positive_ints(list(calibration_windows), "--calibration-windows", minimum=2)
  user_text = None
  if text_file is not None:
    if not pathlib.Path(text_file).is_file():
      raise FileNotFoundError(f"--text {text_file}: no such file")
    user_text = corpus.load_text(text_file)  # not UTF-8, or empty: refused before the model loads
  if calibration is not None:
    artifact.read_manifest(calibration)  # a wrong directory fails before the model loads
  specs = list(specs or default_specs())
  if not specs or specs[0].quant is not None:
    specs.insert(0, CacheSpec("bf16", None, description="dense bfloat16 cache (baseline)"))
  contexts = sorted(int(c) for c in contexts)
  if any(c < 2 for c in contexts):
    raise ValueError(f"contexts must be >= 2 tokens, got {contexts}")
  # Checks that need the model's shape or the text's length, before the model loads: a named
  # checkpoint's layout is its preset's, and a text cannot hold more tokens than bytes (+ BOS).
  from kvjax.models.config import PRESETS
  if model_name in PRESETS:
    preset = PRESETS[model_name]()
    for s in specs:
      s.resolve_layers(preset)
  if user_text is not None and len(user_text.encode("utf-8")) + 1 < contexts[-1]:
    raise ValueError(f"--text {text_file} has {len(user_text.encode('utf-8'))} bytes, so fewer "
                     f"tokens than the longest context {contexts[-1]}; give a longer --text or "
                     "shorter --contexts")
  t0 = time.time()
  log(f"loading {model_name} ...")
  model, tokenizer = load(model_name)
  if tokenizer is None:
    raise ValueError(f"{model_name} has no tokenizer; kvjax eval needs one to read text")
  cfg = model.config
  specs = [s.resolve_layers(cfg) for s in specs]
  sensitivity = None
  if any(s.key8_auto for s in specs):
    cal_all = tokenizer.encode(corpus.calibration_text(), add_bos=cfg.add_bos)
    ncal = sum(calibration_windows)
    probe = cal_all[ncal:ncal + 1024]
    log(f"key sensitivity per layer: {cfg.num_layers} runs over {len(probe)} tokens of "
        f"{corpus.CALIBRATION_BOOK} (after the {ncal} calibration tokens)")
    resolved, scans = [], {}
    for s in specs:
      if s.key8_auto:
        if (s.quant, s.calibrate) not in scans:  # one scan per cache format
          scans[s.quant, s.calibrate] = key_sensitivity(
              model, cal_all[:2048], probe, s.quant, calibrate=s.calibrate,
              chunk=chunk, progress=progress)
        sens = scans[s.quant, s.calibrate]
        sensitivity = {int(l): float(v) for l, v in enumerate(sens)}
        top = tuple(sorted(int(l) for l in np.argsort(-sens)[:s.key8_auto]))
        log(f"{s.name}: 8-bit keys in layers {top} (KL with only that layer quantized: "
            + ", ".join(f"{l}: {sens[l]:.4f}" for l in top) + ")")
        s = dataclasses.replace(s, key8_layers=top, key8_auto=0,
                                description=f"{s.description} (layers {', '.join(map(str, top))})")
      resolved.append(s)
    specs = resolved
  model = with_layers_for(model, specs)
  if text_file is None:
    text, corpus_name = corpus.eval_text(), "austen:pride-and-prejudice"
  else:
    text, corpus_name = user_text, str(text_file)
  if not isinstance(score_tokens, int) or score_tokens < 1:
    raise ValueError(f"score_tokens must be a positive int, got {score_tokens!r}")
  if not isinstance(incremental_steps, int) or incremental_steps < 0 or incremental_steps == 1:
    raise ValueError(f"incremental_steps must be 0 (off) or an int >= 2, got "
                     f"{incremental_steps!r}")
  if incremental_windows is not None and (not isinstance(incremental_windows, int)
                                          or incremental_windows < 1):
    raise ValueError(f"incremental_windows must be a positive int, got {incremental_windows!r}")
  unknown = [n for n in incremental_specs if n not in {s.name for s in specs}]
  if incremental_steps and unknown:
    log(f"incremental rows: {unknown} not among the caches evaluated; incremental rows for "
        f"{[s.name for s in specs if s.name in incremental_specs] or 'the reference only'}")
  ids = tokenizer.encode(text, add_bos=cfg.add_bos)
  if len(ids) < contexts[-1]:
    raise ValueError(f"the text has {len(ids)} tokens, fewer than the longest context "
                     f"{contexts[-1]}; give a longer --text or shorter --contexts")
  if calibration is not None:
    artifact.load(calibration, fingerprint=calibrated.fingerprint(model))  # refuses early
    specs = [dataclasses.replace(s, calibration=str(calibration),
                                 description=f"{s.description} (artifact {calibration})")
             if s.name == "int4" else s for s in specs]
  runner = Runner(model, attention_impl="xla")
  cal_ids = (tokenizer.encode(corpus.calibration_text(), add_bos=cfg.add_bos)
             if any(s.calibrate and s.calibration is None for s in specs) else None)
  calibrations = calibrations_for(model, specs, tokenizer=tokenizer, ids=cal_ids,
                                  window_lengths=calibration_windows, chunk=chunk,
                                  progress=progress, log=log)
  cal_meta = {name: {"text": c.manifest.get("text"), "method": c.manifest.get("method"),
                     "formats": sorted(set(c.manifest.get("layer_format_names", [])))
                     or sorted({q.name for q in c.configs})}
              for name, c in calibrations.items()}
  rows = []
  for c in contexts:
    max_len = c  # caches sized to the context, as a user sizes them (a calibration's band)
    wins = windows(ids, c, -(-score_tokens // c), bos=cfg.add_bos)
    if len(wins) < -(-score_tokens // c):
      log(f"context {c}: the text holds {len(wins)} window(s), not {-(-score_tokens // c)}")
    cert_stats = []
    per_window = []
    for w in wins:
      cert_stats.append({})
      per_window.append(evaluate_window(runner, w, specs, max_len=max_len,
                                        calibrations=calibrations, chunk=chunk,
                                        progress=progress, certified_stats=cert_stats[-1]))
    res = _pool_windows(per_window)
    inc = None
    if incremental_steps:
      count = incremental_windows or len(wins)
      inc_wins = windows(ids, c, count, bos=cfg.add_bos)
      if len(inc_wins) < count:
        log(f"context {c}: the text holds {len(inc_wins)} window(s) for the incremental rows, "
            f"not {count}")
      inc_specs = [specs[0]] + [s for s in specs[1:] if s.name in incremental_specs]
      inc = evaluate_incremental(runner, np.stack(inc_wins), inc_specs, steps=incremental_steps,
                                 max_len=max_len, calibrations=calibrations, chunk=chunk,
                                 progress=progress)
    base = {}
    for s in specs:
      for mode in ("hook", "incremental"):
        if mode == "hook":
          summ, n_windows = _summary(*res[s.name]["hook"]), len(wins)
        elif inc is not None and s.name in inc:
          summ, n_windows = _summary(*inc[s.name]["incremental"]), len(inc_wins)
        else:
          continue
        summ["windows"] = n_windows
        if s.name == specs[0].name:
          base[mode] = summ["ppl"]
        row = {"model": model_name, "corpus": corpus_name, "context": c, "cache": s.name,
               "mode": mode, **summ}
        row["delta_ppl"] = row["ppl"] - base[mode]
        row["delta_ppl_pct"] = 100.0 * row["delta_ppl"] / base[mode]
        row["cache_bytes"] = cache_bytes(model, s, c, calibrations.get(s.name))
        row["bits_per_value"] = bits_per_value(model, s, c, calibrations.get(s.name))
        if mode == "hook" and s.certified is not None:
          row["certified"] = _pool_certified([w[s.name] for w in cert_stats])
          log(f"context {c} {s.name}: rows per rung {row['certified']['rows']}, "
              f"{row['certified']['host_blocks']} exact blocks moved to the device")
        if mode == "incremental":
          # Teacher-forced from the same prefilled cache, over the same positions.
          row["hook_ppl_same_positions"] = _summary(*inc[s.name]["hook"])["ppl"]
          paired = paired_ppl_ratio(inc[s.name]["incremental"][0], inc[s.name]["hook"][0])
          row["incremental_vs_hook_pct"] = paired["pct"]
          row["incremental_vs_hook_ci95_pct"] = paired["ci95_pct"]
        rows.append(row)
  doc = {"meta": {"model": model_name, "corpus": corpus_name, "contexts": contexts,
                  "caches": {s.name: s.description or (s.quant.name if s.quant else "dense")
                             for s in specs},
                  "incremental_steps": incremental_steps,
                  "incremental_windows": incremental_windows,
                  "calibrations": cal_meta,
                  "calibration_windows": list(calibration_windows),
                  "score_tokens": score_tokens,
                  "key_sensitivity": sensitivity,
                  "seconds": round(time.time() - t0, 1), "jax": jax.__version__,
                  "backend": jax.default_backend()},
         "rows": rows}
  log(format_table(rows))
  out = pathlib.Path(out_dir)
  write_results(out / "eval.json", doc, log=log)
  if plot and not save_plot(lambda: plot_rows(rows, out / "eval.png",
                                              title=f"{model_name} on {corpus_name}"), log=log):
    plot = False
  log(f"wrote {out / 'eval.json'}" + (f" and {out / 'eval.png'}" if plot else "")
      + f" in {time.time() - t0:.0f} s")
  return doc


def write_results(path: pathlib.Path, doc: dict, *, log=print) -> None:
  """Writes a job's JSON atomically (a reader never sees half a file)."""
  from kvjax.user_cache import atomic_write_text
  atomic_write_text(path, json.dumps(doc, indent=2))


def save_plot(draw, *, log=print) -> bool:
  """Runs `draw()`; a failing plot is reported, not fatal (the table and JSON are already out)."""
  try:
    draw()
    return True
  except Exception as e:  # matplotlib backends fail in many ways; the numbers matter more
    log(f"plot not written: {type(e).__name__}: {e}")
    return False


def check_out_dir(path, *, flag: str = "--out") -> pathlib.Path:
  """Fails before any slow work if `path` cannot hold a job's outputs (it is a file, or it or its
  nearest existing parent is not a writable directory)."""
  out = pathlib.Path(path).expanduser()
  if out.exists() and not out.is_dir():
    raise ValueError(f"{flag} {out} is a file; give a directory for the results")
  parent = out
  while not parent.exists():
    parent = parent.parent
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{flag} {out}: {parent} is not writable")
  return out


def check_positive_ints(values, name: str, *, minimum: int = 1) -> list[int]:
  """`values` as a list of ints >= minimum, or a ValueError naming `name`."""
  values = list(values) if not isinstance(values, int) else [values]
  if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < minimum
                       for v in values):
    raise ValueError(f"{name} must be {'an int' if len(values) == 1 else 'ints'} >= {minimum}, "
                     f"got {values}")
  return values


def format_table(rows) -> str:
  w = max([12] + [len(r["cache"]) for r in rows])
  head = (f"{'context':>7} {'cache':<{w}} {'mode':<11} {'ppl':>8} {'dPPL':>8} {'dPPL%':>7} "
          f"{'KL':>7} {'top1':>6} {'bits':>5} {'MiB':>7}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['context']:>7} {r['cache']:<{w}} {r['mode']:<11} {r['ppl']:8.3f} "
                 f"{r['delta_ppl']:+8.3f} {r['delta_ppl_pct']:+6.2f}% {r['kl_mean']:7.4f} "
                 f"{r['top1_agree']:6.3f} {r['bits_per_value']:5.2f} "
                 f"{r['cache_bytes'] / 2**20:7.2f}")
  paired = [r for r in rows if "incremental_vs_hook_ci95_pct" in r]
  if paired:
    lines.append("incremental vs hook, same tokens from the same prefilled cache (PPL ratio - 1, "
                 "95% interval):")
    for r in paired:
      lo, hi = r["incremental_vs_hook_ci95_pct"]
      lines.append(f"{r['context']:>7} {r['cache']:<{w}} {r['incremental_vs_hook_pct']:+6.2f}% "
                   f"[{lo:+.2f}%, {hi:+.2f}%] over {r['tokens_scored']} tokens, "
                   f"{r['windows']} windows")
  return "\n".join(lines)


def plot_rows(rows, path, *, title=""):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  hook = [r for r in rows if r["mode"] == "hook" and r["bits_per_value"] < 16]
  contexts = sorted({r["context"] for r in hook})
  caches = list(dict.fromkeys(r["cache"] for r in hook))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  width = 0.8 / max(len(contexts), 1)
  for i, c in enumerate(contexts):
    vals = {r["cache"]: r for r in hook if r["context"] == c}
    xs = np.arange(len(caches)) + i * width
    axes[0].bar(xs, [vals[n]["delta_ppl_pct"] for n in caches], width, label=f"{c} tokens")
    axes[1].bar(xs, [vals[n]["kl_mean"] for n in caches], width, label=f"{c} tokens")
  for ax, lab in zip(axes, ("ΔPPL vs bf16 cache (%)", "mean KL(bf16 ‖ cache), nats/token")):
    ax.set_xticks(np.arange(len(caches)) + 0.4 - width / 2)
    ax.set_xticklabels(caches, rotation=20)
    ax.set_ylabel(lab)
    ax.set_yscale("symlog", linthresh=0.1 if "PPL" in lab else 0.001)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
