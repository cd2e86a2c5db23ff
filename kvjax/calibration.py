"""A calibration artifact: the calibrated cache format of one model, as a value and on disk.

A `Calibration` holds, per layer (checkpoint order), the `QuantConfig` the layer's cache runs
with and the tensors calibration fills into it (rotations, λ, constant and rotary key offsets,
rounding feedback), plus a JSON manifest saying what it was made for and how. It describes a
cache independently of batch and the model's layer stacking, so one artifact serves every
context length and every layout (`kvjax.models.calibrated` puts it into a model's caches).

Context bands. Key statistics depend on the positions a cache holds (the rotary key offset and
the constant one are fitted over them; early tokens weigh more in a short context), and
parameters fitted on a 4K-token window cost a 1K cache about 40% more KL than ones fitted on
1K-token windows, and 1K-fitted parameters cost a 4K cache twice the KL (docs/calibration.md).
So an artifact may hold, besides its main tensors, tensors for shorter caches: `bands` =
((limit, per-layer tensors), ...); a cache created for at most `limit` tokens takes the first
band whose limit covers it, any longer cache the main tensors (`tensors_for(max_len)`). The
formats are the same in every band.

On disk a calibration is a directory:

    manifest.json   format version, kvjax version, the model's fingerprint, per-layer formats,
                    the calibration text and token count, the recipe and its steps, and the
                    sha256 of every file under tensors/
    tensors/        an Orbax checkpoint: {"layer_000": {"k_rotation": ..., ...}, ...,
                    "band_01024": {"layer_000": {...}, ...}, ...}

`save` writes it under a temporary name beside the target and renames it into place, so an
interrupted save (a signal, a full disk) leaves no directory behind; `load` checks the format
version, the file hashes, the shapes and the values (finite, orthogonal rotations, positive λ)
before anything uses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np

from kvjax.config import QuantConfig

FORMAT_VERSION = 3
MANIFEST = "manifest.json"
TENSORS = "tensors"
# The basis every layer's tensors hold, in the cache's per-layer shapes: rotations [Hr, D, D]
# and λ [Hr, D]. Besides these, a layer holds the params of its format's corrections
# (`tensor_fields`), e.g. k_mean [Hr, D], the rotary offset's [P] / [P, 2] / [Hr, 2, P].
BASIS_FIELDS = ("k_rotation", "v_rotation", "k_lambda", "v_lambda")


def tensor_fields(config: QuantConfig) -> tuple[str, ...]:
  """The tensors a layer of format `config` holds: the basis, then its corrections' params."""
  return BASIS_FIELDS + tuple(n for c in config.corrections for n in c.params)

# Fingerprint fields whose mismatch makes an artifact unusable for a model (the weight hash is
# checked too, but a mismatch there is reported separately: same shapes, other weights).
ARCHITECTURE_FIELDS = ("arch", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                       "layer_types", "sliding_window", "rope_theta", "rope_local_theta",
                       "rope_scaling")
_ORTHOGONALITY_TOL = 1e-3


def _version() -> str:
  from kvjax import __version__
  return __version__


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
  """A calibrated cache format for one model.

  Attributes:
    configs: one `QuantConfig` per layer (checkpoint order): bits, group size, scale dtype and
      which corrections the layer's cache applies.
    tensors: one dict per layer, name -> numpy array for each of `tensor_fields(config)` (the
      basis, then the corrections' params), in the cache's per-layer shapes (no batch or
      stacking axes).
    manifest: JSON-able description: "model" (the fingerprint), "text", "recipe", "steps", ...
    bands: ((limit, tensors), ...) with increasing limits: the tensors of caches created for at
      most `limit` tokens (see the module docstring); () for one set for every cache.

  Equality is identity (it holds arrays); compare `tensors` explicitly.
  """

  configs: tuple[QuantConfig, ...]
  tensors: tuple[dict, ...]
  manifest: dict = dataclasses.field(default_factory=dict)
  bands: tuple = ()

  def __post_init__(self):
    as_arrays = lambda layers: tuple({k: np.asarray(v) for k, v in layer.items()}
                                     for layer in layers)
    object.__setattr__(self, "configs", tuple(self.configs))
    object.__setattr__(self, "tensors", as_arrays(self.tensors))
    bands = []
    for band in self.bands:
      try:
        limit, layers = band
      except (TypeError, ValueError):
        raise ValueError("Calibration.bands must be (limit, per-layer tensors) pairs") from None
      if not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"Calibration.bands: limit must be a positive int, got {limit!r}")
      bands.append((int(limit), as_arrays(layers)))
    limits = [b[0] for b in bands]
    if limits != sorted(set(limits)):
      raise ValueError(f"Calibration.bands: limits must increase, got {limits}")
    object.__setattr__(self, "bands", tuple(bands))
    validate(self)

  def tensors_for(self, max_len: int) -> tuple[dict, ...]:
    """The per-layer tensors of a cache created for `max_len` tokens."""
    for limit, layers in self.bands:
      if max_len <= limit:
        return layers
    return self.tensors

  @property
  def num_layers(self) -> int:
    return len(self.configs)

  @property
  def fingerprint(self) -> dict:
    return self.manifest.get("model", {})

  def check_model(self, fingerprint: dict, *, source: str = "the calibration") -> None:
    """Raises ValueError naming every field where `fingerprint` (the model's) differs from the
    one this calibration was made for."""
    check_fingerprint(self.fingerprint, fingerprint, source=source)

  def bits_per_value(self) -> list[float]:
    """Code and scale bits per cached value of each layer."""
    return [c.bits_per_value() for c in self.configs]


def check_fingerprint(made_for: dict, model: dict, *, source: str = "the calibration") -> None:
  """Raises ValueError listing the fields where two model fingerprints differ."""
  diffs = []
  for f in ARCHITECTURE_FIELDS + ("qk_sha256",):
    a, b = made_for.get(f), model.get(f)
    if a != b:
      diffs.append(f"{f}: made for {_short(a)}, model has {_short(b)}")
  if diffs:
    name = made_for.get("name") or "another model"
    raise ValueError(f"{source} was made for {name!r}, not this model: " + "; ".join(diffs)
                     + ". Calibrate this model (`kvjax calibrate --model ...`) or pass "
                     "calibration='auto'")


def _short(v):
  s = repr(v)
  return s if len(s) <= 70 else s[:67] + "..."


def validate(calibration: Calibration) -> None:
  """Checks a calibration's configs and tensors; raises ValueError naming the layer and field."""
  configs, tensors = calibration.configs, calibration.tensors
  if not configs:
    raise ValueError("a Calibration needs at least one layer")
  if len(tensors) != len(configs):
    raise ValueError(f"Calibration has {len(configs)} layer configs but {len(tensors)} layers "
                     "of tensors")
  for limit, layers in calibration.bands:
    if len(layers) != len(configs):
      raise ValueError(f"Calibration band {limit} has {len(layers)} layers of tensors, not "
                       f"{len(configs)}")
    _validate_layers(configs, layers, f" (band {limit})")
  _validate_layers(configs, tensors, "")


def _validate_layers(configs, tensors, band: str) -> None:
  for layer, (cfg, t) in enumerate(zip(configs, tensors)):
    where = f"calibration layer {layer}{band}"
    if not isinstance(cfg, QuantConfig):
      raise ValueError(f"{where}: config must be a kvjax.QuantConfig, got {type(cfg).__name__}")
    fields = tensor_fields(cfg)
    missing = [f for f in fields if f not in t]
    extra = [f for f in t if f not in fields]
    if missing or extra:
      raise ValueError(f"{where}: tensors must be exactly {fields} (format {cfg.name}); missing "
                       f"{missing}, unexpected {extra}")
    rot = t["k_rotation"]
    if rot.ndim != 3 or rot.shape[1] != rot.shape[2]:
      raise ValueError(f"{where}: k_rotation must be [Hr, D, D], got {rot.shape}")
    d = rot.shape[1]
    try:
      cfg.check_head_dim(d)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    shared = {n for c in cfg.corrections for n in c.shared}
    tails = {"k_rotation": (d, d), "v_rotation": (d, d), "k_lambda": (d,), "v_lambda": (d,)}
    for c in cfg.corrections:
      tails.update(c.param_shapes(d))
    # Per-head fields hold one row per KV head, or one row shared by all heads.
    hr = max(t[n].shape[0] if t[n].ndim else 0 for n in fields if n not in shared)
    for name in fields:
      a, tail = t[name], tails[name]
      if name in shared:
        if a.shape != tail:
          raise ValueError(f"{where}: {name} must have shape {tail}, got {a.shape}")
      elif a.shape[1:] != tail or a.shape[0] not in (1, hr):
        raise ValueError(f"{where}: {name} must be [Hr, {', '.join(map(str, tail))}] with Hr in "
                         f"(1, {hr}), got {a.shape}")
      want_int = any(name in c.params and np.issubdtype(c.param_dtype(name), np.integer)
                     for c in cfg.corrections)
      if want_int:
        if not np.issubdtype(a.dtype, np.integer):
          raise ValueError(f"{where}: {name} must be integers, got {a.dtype}")
        continue
      if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{where}: {name} must be floating point, got {a.dtype}")
      if not np.all(np.isfinite(a)):
        raise ValueError(f"{where}: {name} holds non-finite values (NaN or inf)")
    for name in ("k_lambda", "v_lambda"):
      if np.any(t[name] <= 0):
        raise ValueError(f"{where}: {name} must be > 0 everywhere (it divides the keys/values), "
                         f"min {float(t[name].min())!r}")
    for name in ("k_rotation", "v_rotation"):
      r = t[name].astype(np.float64)
      err = np.abs(r @ np.swapaxes(r, -1, -2) - np.eye(d)).max()
      if err > _ORTHOGONALITY_TOL:
        raise ValueError(f"{where}: {name} is not orthogonal (max |R R^T - I| = {err:.3g} > "
                         f"{_ORTHOGONALITY_TOL}); attention in the rotated domain needs an "
                         "orthogonal rotation")
    for c in cfg.corrections:
      try:
        c.check_params({n: t[n] for n in c.params}, d)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------------ on disk


def _config_dict(cfg: QuantConfig) -> dict:
  return cfg.to_dict()


def _config_from(d: dict, layer: int) -> QuantConfig:
  try:
    return QuantConfig.from_dict(d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"calibration layer {layer}: invalid format: {e}") from None


def _tree_hashes(root: pathlib.Path) -> dict:
  out = {}
  for p in sorted(root.rglob("*")):
    if p.is_file():
      h = hashlib.sha256()
      with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
      out[p.relative_to(root).as_posix()] = h.hexdigest()
  return out


def _write_tensors(path: pathlib.Path, calibration: Calibration) -> dict:
  """Writes the tensors with Orbax; returns {tree path: [shape, dtype]} of the empty arrays,
  which Orbax refuses to store (e.g. the rotary offset of a format with no rotary pairs)."""
  import orbax.checkpoint as ocp
  empty = {}

  def layers(ts, prefix):
    out = {}
    for i, t in enumerate(ts):
      key = f"layer_{i:03d}"
      out[key] = {}
      for name, a in t.items():
        if a.size:
          out[key][name] = a
        else:
          empty[f"{prefix}{key}/{name}"] = [list(a.shape), str(a.dtype)]
    return out

  tree = layers(calibration.tensors, "")
  for limit, ts in calibration.bands:
    tree[f"band_{limit:08d}"] = layers(ts, f"band_{limit:08d}/")
  ckpt = ocp.StandardCheckpointer()
  try:
    ckpt.save(path, tree)
    ckpt.wait_until_finished()
  finally:
    ckpt.close()
  return empty


def save(calibration: Calibration, directory: str | os.PathLike, *,
         overwrite: bool = False) -> pathlib.Path:
  """Writes `calibration` to `directory` atomically; returns its absolute path.

  The directory is assembled under a hidden temporary name beside it and renamed into place:
  whatever interrupts the save, either the whole artifact exists or nothing does. An existing
  `directory` is an error unless `overwrite`.
  """
  if not isinstance(calibration, Calibration):
    raise TypeError(f"calibration must be a kvjax.calibration.Calibration, got "
                    f"{type(calibration).__name__}")
  target = pathlib.Path(directory).expanduser().absolute()
  if target.exists() and not overwrite:
    raise FileExistsError(f"{target} already exists; choose another directory or remove it")
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
  try:
    empty = _write_tensors(tmp / TENSORS, calibration)
    manifest = dict(calibration.manifest)
    manifest["empty_tensors"] = empty
    manifest.update({
        "format": "kvjax-calibration", "format_version": FORMAT_VERSION,
        "kvjax_version": _version(), "num_layers": calibration.num_layers,
        "layer_formats": [_config_dict(c) for c in calibration.configs],
        "layer_format_names": [c.name for c in calibration.configs],
        "bands": [limit for limit, _ in calibration.bands],
        "files": _tree_hashes(tmp / TENSORS)})
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.chmod(tmp, 0o755)
    if target.exists():  # overwrite: move the old one aside first, drop it after the swap
      old = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
      os.replace(target, old / "x")
      try:
        os.replace(tmp, target)
      except BaseException:
        os.replace(old / "x", target)  # put the old artifact back
        shutil.rmtree(old, ignore_errors=True)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target


def read_manifest(directory: str | os.PathLike) -> dict:
  """The manifest of the artifact at `directory`, checked for format and version."""
  path = pathlib.Path(directory).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"no calibration directory at {path}")
  mpath = path / MANIFEST
  if not mpath.is_file():
    raise ValueError(f"{path} is not a kvjax calibration: no {MANIFEST} (an artifact written by "
                     "`kvjax calibrate --out DIR` or kvjax.calibration.save)")
  try:
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{mpath} is corrupted: not valid JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != "kvjax-calibration":
    raise ValueError(f"{mpath} is not a kvjax calibration manifest")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ValueError(f"{path}: calibration format version {version!r} is not supported by this "
                     f"kvjax (reads version {FORMAT_VERSION}); recalibrate with "
                     "`kvjax calibrate`")
  for key, kind in (("layer_formats", list), ("files", dict), ("num_layers", int),
                    ("model", dict)):
    if not isinstance(manifest.get(key), kind):
      raise ValueError(f"{mpath} is corrupted: no valid {key!r} entry")
  return manifest


def load(directory: str | os.PathLike, *, fingerprint: dict | None = None) -> Calibration:
  """Reads and checks the artifact at `directory`.

  fingerprint: the model's (`kvjax.models.calibrated.fingerprint(model)`); when given, an
  artifact made for another model is refused with the mismatching fields named, before the
  tensors are read.
  Raises FileNotFoundError (no directory) or ValueError (not an artifact, another format
  version, missing / truncated / altered files, invalid tensors, another model).
  """
  path = pathlib.Path(directory).expanduser().absolute()
  manifest = read_manifest(path)
  if fingerprint is not None:
    check_fingerprint(manifest["model"], fingerprint, source=f"calibration {path}")
  tensors_dir = path / TENSORS
  want = manifest["files"]
  got = _tree_hashes(tensors_dir) if tensors_dir.is_dir() else {}
  missing = sorted(set(want) - set(got))
  changed = sorted(f for f in want if f in got and got[f] != want[f])
  extra = sorted(set(got) - set(want))
  if missing or changed or extra:
    raise ValueError(f"calibration {path} is corrupted or incomplete: "
                     + "; ".join(s for s in (
                         f"missing {missing}" if missing else "",
                         f"altered (sha256 mismatch) {changed}" if changed else "",
                         f"unexpected {extra}" if extra else "") if s))
  import orbax.checkpoint as ocp
  ckpt = ocp.StandardCheckpointer()
  try:
    tree = ckpt.restore(tensors_dir)
  except Exception as e:  # orbax raises many types for a damaged store
    raise ValueError(f"calibration {path}: cannot read tensors ({type(e).__name__}: {e})") from None
  finally:
    ckpt.close()
  n = manifest["num_layers"]
  configs = [_config_from(d, i) for i, d in enumerate(manifest["layer_formats"])]
  if len(configs) != n:
    raise ValueError(f"calibration {path}: manifest lists {len(configs)} layer formats for "
                     f"{n} layers")

  empty = manifest.get("empty_tensors", {})
  if not isinstance(empty, dict):
    raise ValueError(f"calibration {path}: manifest entry 'empty_tensors' is corrupted")

  def layers(sub, prefix, where):
    out = []
    for i in range(n):
      key = f"layer_{i:03d}"
      if not isinstance(sub, dict) or not isinstance(sub.get(key, {}), dict):
        raise ValueError(f"calibration {path}: no tensors for layer {i}{where}")
      arrays = {k: np.asarray(v) for k, v in sub.get(key, {}).items()}
      for name, spec in empty.items():
        head, _, field = name.rpartition("/")
        if head == f"{prefix}{key}":
          try:
            arrays[field] = np.zeros(tuple(spec[0]), np.dtype(spec[1]))
          except (TypeError, ValueError, IndexError):
            raise ValueError(f"calibration {path}: manifest entry for {name} is corrupted") \
                from None
      out.append(arrays)
    return tuple(out)

  bands = []
  for limit in manifest.get("bands", []):
    band = f"band_{int(limit):08d}"
    bands.append((int(limit), layers(tree.get(band), f"{band}/", f" (band {limit})")))
  try:
    return Calibration(configs=tuple(configs), tensors=layers(tree, "", ""), manifest=manifest,
                       bands=tuple(bands))
  except ValueError as e:
    raise ValueError(f"calibration {path}: {e}") from None


def resolve(calibration, *, fingerprint: dict | None = None) -> Calibration:
  """A Calibration from a Calibration or an artifact directory, checked against `fingerprint`."""
  if isinstance(calibration, Calibration):
    if fingerprint is not None:
      calibration.check_model(fingerprint)
    return calibration
  if isinstance(calibration, (str, os.PathLike)):
    return load(calibration, fingerprint=fingerprint)
  raise TypeError(f"calibration must be a kvjax.calibration.Calibration or an artifact "
                  f"directory, got {type(calibration).__name__}")
