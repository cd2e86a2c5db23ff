"""Evaluation and calibration text: Jane Austen's six novels, and user-supplied files.

The novels (public domain) come from Debian's `r-cran-janeaustenr` package (MIT), fetched with
`apt-get download` and unpacked with `dpkg-deb -x`; no R is needed. R's lazy-load database
`data/Rdata.rdb` holds one serialized R object per novel (a character vector, one element per
line of the Project Gutenberg text), indexed by `data/Rdata.rdx`. The small reader of R's
serialization format below turns them into Python strings, which are cached as UTF-8 text files
under `<kvjax cache>/corpus/janeaustenr/`.

The split is fixed and disjoint:

    eval_text()         Pride and Prejudice   (perplexity, KL divergence, retrieval)
    calibration_text()  Emma                  (per-channel scales, learned rotations)

so nothing that is calibrated has seen the evaluation text.
"""

from __future__ import annotations

import dataclasses
import gzip
import bz2
import lzma
import os
import pathlib
import shutil
import struct
import subprocess
import tempfile
import zlib

from kvjax.user_cache import (atomic_write_text, cache_dir as _cache_dir, exclusive,
                              sigterm_as_interrupt, sweep_stale)

__all__ = [
    "BOOKS", "EVAL_BOOK", "CALIBRATION_BOOK", "load_austen", "load_text", "eval_text",
    "calibration_text", "read_rds", "read_rdb", "RObject", "CorpusUnavailableError",
]

DEBIAN_PACKAGE = "r-cran-janeaustenr"

# Title -> the R object's name in the package, in publication order.
BOOKS = {
    "Sense & Sensibility": "sensesensibility",
    "Pride & Prejudice": "prideprejudice",
    "Mansfield Park": "mansfieldpark",
    "Emma": "emma",
    "Northanger Abbey": "northangerabbey",
    "Persuasion": "persuasion",
}
EVAL_BOOK = "Pride & Prejudice"
CALIBRATION_BOOK = "Emma"


class CorpusUnavailableError(RuntimeError):
  """The Debian package holding the novels could not be fetched or unpacked on this machine."""


# --------------------------------------------------------------------------------------------
# Public API.

def load_austen(book: str | None = None, *, cache_dir: str | os.PathLike | None = None
                ) -> dict[str, str] | str:
  """Jane Austen's novels as text, one line of the Gutenberg edition per line.

  Args:
    book: None for all six novels, or one of them by title ("Pride & Prejudice", "Pride and
      Prejudice"), R object name ("prideprejudice") or a unique word of the title ("pride",
      "emma", "sense"); case-insensitive.
    cache_dir: kvjax cache directory (default `$KVJAX_CACHE_DIR`, `$XDG_CACHE_HOME/kvjax` or
      `~/.cache/kvjax`).

  Returns:
    {title: text} for all novels in publication order, or the text of one novel.

  Raises:
    ValueError: `book` names no novel, or more than one.
    CorpusUnavailableError: the Debian package could not be downloaded (says which command to
      run, or to use `load_text` instead).
  """
  titles = list(BOOKS) if book is None else [_resolve_book(book)]
  directory = _cache_dir(cache_dir) / "corpus" / "janeaustenr"
  paths = {title: directory / f"{BOOKS[title]}.txt" for title in titles}
  if not all(p.exists() for p in paths.values()):
    with sigterm_as_interrupt(), exclusive(directory.parent / "janeaustenr.lock"):
      sweep_stale(directory, ".extract-")  # left by a killed extraction
      if not all(p.exists() for p in paths.values()):
        _extract_all(directory)
  texts = {title: path.read_text(encoding="utf-8") for title, path in paths.items()}
  return texts if book is None else texts[titles[0]]


def load_text(path: str | os.PathLike) -> str:
  """The UTF-8 text of a file (what `--text FILE` evaluates on), with line endings normalized."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"text file {str(path)!r} does not exist or is not a file")
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"text file {str(path)!r} is not UTF-8: {e}") from None
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  if not text.strip():
    raise ValueError(f"text file {str(path)!r} is empty")
  return text


def eval_text(*, cache_dir: str | os.PathLike | None = None) -> str:
  """The evaluation text: Pride and Prejudice. Disjoint from `calibration_text()`."""
  return load_austen(EVAL_BOOK, cache_dir=cache_dir)


def calibration_text(*, cache_dir: str | os.PathLike | None = None) -> str:
  """The calibration text: Emma. Disjoint from `eval_text()`."""
  return load_austen(CALIBRATION_BOOK, cache_dir=cache_dir)


def _resolve_book(book: str) -> str:
  if not isinstance(book, str):
    raise TypeError(f"book must be a str or None, got {type(book).__name__}")
  def squash(s):
    return "".join(ch for ch in s.lower().replace("&", "and") if ch.isalnum())
  key = squash(book)
  matches = [t for t, obj in BOOKS.items()
             if key in (squash(t), obj) or (key and any(w == key for w in _title_words(t)))]
  if len(matches) != 1:
    raise ValueError(f"book {book!r} names {'no' if not matches else 'more than one'} novel; "
                     f"known: {', '.join(BOOKS)} (or a word of the title, e.g. 'pride')")
  return matches[0]


def _title_words(title: str) -> list[str]:
  return ["".join(ch for ch in w if ch.isalnum()) for w in title.lower().split()]


# --------------------------------------------------------------------------------------------
# Fetching and extracting the Debian package.

def _extract_all(directory: pathlib.Path) -> None:
  """Downloads the .deb into a temporary directory, parses the novels and writes every
  `<object>.txt` atomically into `directory`."""
  directory.mkdir(parents=True, exist_ok=True)
  work = pathlib.Path(tempfile.mkdtemp(dir=directory, prefix=".extract-"))
  try:
    deb = _apt_download(work)
    root = work / "root"
    _run(["dpkg-deb", "-x", str(deb), str(root)], what="unpack the Debian package")
    rdbs = sorted(root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"))
    if not rdbs:
      raise CorpusUnavailableError(f"{deb.name} has no janeaustenr/data/Rdata.rdb")
    objects = read_rdb(rdbs[0])
    for title, name in BOOKS.items():
      if name not in objects:
        raise RuntimeError(f"{rdbs[0]} has no object {name!r} ({title}); it has {sorted(objects)}")
      atomic_write_text(directory / f"{name}.txt", lines_to_text(objects[name], name))
  finally:
    shutil.rmtree(work, ignore_errors=True)


def lines_to_text(obj, name: str) -> str:
  """Joins an R character vector of lines (NA lines dropped) into text ending with a newline."""
  value = obj.value if isinstance(obj, RObject) else obj
  if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
    raise RuntimeError(f"R object {name!r} is not a character vector")
  return "\n".join(v for v in value if v is not None) + "\n"


def _apt_download(dest: pathlib.Path) -> pathlib.Path:
  """`apt-get download r-cran-janeaustenr` into `dest`; runs `apt-get update` first only when
  the package is unknown and we are root (an unprivileged user gets the command to run)."""
  if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
    raise CorpusUnavailableError(
        f"the Jane Austen corpus comes from Debian's {DEBIAN_PACKAGE} package, which needs "
        "apt-get and dpkg-deb (Debian/Ubuntu). Elsewhere, evaluate on your own file with "
        "kvjax.corpus.load_text(PATH) / --text FILE.")
  cmd = ["apt-get", "download", DEBIAN_PACKAGE]
  proc = subprocess.run(cmd, cwd=dest, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if proc.returncode != 0 and _package_unknown(proc.stdout):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
      _run(["apt-get", "update"], what="refresh the package lists")
      proc = subprocess.run(cmd, cwd=dest, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    else:
      raise CorpusUnavailableError(
          f"apt does not know {DEBIAN_PACKAGE} yet: run `sudo apt-get update` once, then retry "
          f"(apt-get download itself needs no root).\n{proc.stdout.strip()}")
  if proc.returncode != 0:
    raise CorpusUnavailableError(f"`{' '.join(cmd)}` failed with exit status {proc.returncode}:\n"
                       f"{proc.stdout.strip()}")
  debs = sorted(dest.glob(f"{DEBIAN_PACKAGE}_*.deb"))
  if len(debs) != 1:
    raise CorpusUnavailableError(f"`{' '.join(cmd)}` did not leave one .deb in {dest}: {debs}")
  return debs[0]


def _package_unknown(output: str) -> bool:
  return any(s in output for s in ("Unable to locate package", "has no installation candidate",
                                   "Can't select candidate"))


def _run(cmd: list[str], *, what: str) -> None:
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if proc.returncode != 0:
    raise CorpusUnavailableError(f"could not {what}: `{' '.join(cmd)}` exited with {proc.returncode}:\n"
                       f"{proc.stdout.strip()}")


# --------------------------------------------------------------------------------------------
# R's serialization format (the subset data packages use).
#
# A stream is "X\n" (XDR: big-endian ints and doubles), then the format version (2 or 3), the
# writer's and the minimum reader's R versions, and for version 3 the native encoding. Then one
# item: a 32-bit flags word (low byte: SEXP type; bit 8: is object; bit 9: has attributes;
# bit 10: has tag; bits 12+: "levels", which carry a string's encoding), followed by the body of
# that type. Symbols and environments enter a reference table that later REFSXP items point to.

@dataclasses.dataclass
class RObject:
  """An R value with attributes (names, class, dim, ...); `value` is what a bare one would be."""

  value: object
  attributes: dict[str, object]


@dataclasses.dataclass(frozen=True)
class RSymbol:
  name: str


@dataclasses.dataclass
class RPairList:
  """A pairlist or language object: (tag or None, value) pairs."""

  items: list[tuple[str | None, object]]
  kind: str = "pairlist"


@dataclasses.dataclass
class REnvironment:
  frame: object = None
  enclos: object = None


_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _CPLXSXP, _STRSXP, _DOTSXP = 9, 10, 13, 14, 15, 16, 17
_VECSXP, _EXPRSXP, _BCODESXP, _EXTPTRSXP, _WEAKREFSXP, _RAWSXP, _S4SXP = 19, 20, 21, 22, 23, 24, 25
_ALTREP_SXP, _ATTRLISTSXP, _ATTRLANGSXP = 238, 239, 240
_BASEENV_SXP, _EMPTYENV_SXP, _BCREPREF, _BCREPDEF, _GENERICREFSXP, _CLASSREFSXP = \
    241, 242, 243, 244, 245, 246
_PERSISTSXP, _PACKAGESXP, _NAMESPACESXP, _BASENAMESPACE_SXP, _MISSINGARG_SXP = \
    247, 248, 249, 250, 251
_UNBOUNDVALUE_SXP, _GLOBALENV_SXP, _NILVALUE_SXP, _REFSXP = 252, 253, 254, 255

_NA_INTEGER = -(2 ** 31)
_LATIN1_MASK, _UTF8_MASK, _BYTES_MASK = 1 << 2, 1 << 3, 1 << 1


class _RReader:
  """Reads one XDR-serialized R object from bytes."""

  def __init__(self, data: bytes):
    self.data = memoryview(data)
    self.pos = 0
    self.refs: list[object] = []

  def read(self):
    fmt = bytes(self.data[:2])
    if fmt != b"X\n":
      raise ValueError(f"only XDR ('X\\n') R serializations are supported, got {fmt!r}")
    self.pos = 2
    version = self._int()
    self._int()  # writer's R version
    self._int()  # minimal R version that can read it
    if version == 3:
      self._bytes(self._int())  # native encoding name
    elif version != 2:
      raise ValueError(f"unsupported R serialization version {version}")
    return self._item()

  # Primitive readers. ------------------------------------------------------------------------

  def _take(self, n: int) -> memoryview:
    if self.pos + n > len(self.data):
      raise ValueError(f"truncated R serialization at byte {self.pos} (needs {n} more)")
    view = self.data[self.pos:self.pos + n]
    self.pos += n
    return view

  def _int(self) -> int:
    return struct.unpack(">i", self._take(4))[0]

  def _bytes(self, n: int) -> bytes:
    return bytes(self._take(n))

  def _length(self) -> int:
    n = self._int()
    if n == -1:  # long vector: upper and lower 32 bits follow
      upper, lower = struct.unpack(">II", self._take(8))
      n = (upper << 32) | lower
    return n

  # Items. ------------------------------------------------------------------------------------

  def _item(self):
    flags = self._int()
    kind = flags & 0xFF
    levels = flags >> 12
    has_attr = bool(flags & (1 << 9))
    has_tag = bool(flags & (1 << 10))

    if kind == _NILVALUE_SXP:
      return None
    if kind in (_EMPTYENV_SXP, _BASEENV_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP,
                _MISSINGARG_SXP, _BASENAMESPACE_SXP):
      return REnvironment()
    if kind == _REFSXP:
      index = flags >> 8
      if index == 0:
        index = self._int()
      return self.refs[index - 1]
    if kind in (_PERSISTSXP, _NAMESPACESXP, _PACKAGESXP):
      if self._int() != 0:
        raise ValueError("unexpected non-zero in a persistent-name item")
      names = [self._item() for _ in range(self._int())]  # CHARSXP items
      value = REnvironment(frame=names)
      self.refs.append(value)
      return value
    if kind == _SYMSXP:
      value = RSymbol(self._item())
      self.refs.append(value)
      return value
    if kind == _ENVSXP:
      self._int()  # locked
      env = REnvironment()
      self.refs.append(env)
      env.enclos = self._item()
      env.frame = self._item()
      self._item()  # hash table
      attributes = self._item()
      return RObject(env, self._attributes(attributes)) if attributes is not None else env
    if kind in (_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP, _DOTSXP, _ATTRLISTSXP, _ATTRLANGSXP):
      return self._pairlist(kind, has_attr, has_tag)
    if kind == _CHARSXP:
      return self._charsxp(levels)
    if kind == _ALTREP_SXP:
      info = self._item()
      state = self._item()
      attributes = self._item()
      value = self._altrep(info, state)
      return RObject(value, self._attributes(attributes)) if attributes is not None else value

    if kind in (_LGLSXP, _INTSXP):
      n = self._length()
      ints = struct.unpack(f">{n}i", self._take(4 * n))
      value = [None if v == _NA_INTEGER else (bool(v) if kind == _LGLSXP else v) for v in ints]
    elif kind == _REALSXP:
      n = self._length()
      value = list(struct.unpack(f">{n}d", self._take(8 * n)))
    elif kind == _CPLXSXP:
      n = self._length()
      parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
      value = [complex(parts[2 * i], parts[2 * i + 1]) for i in range(n)]
    elif kind == _STRSXP:
      value = [self._item() for _ in range(self._length())]
    elif kind in (_VECSXP, _EXPRSXP):
      value = [self._item() for _ in range(self._length())]
    elif kind == _RAWSXP:
      value = self._bytes(self._length())
    elif kind == _S4SXP:
      value = None
    else:
      raise ValueError(f"R serialization: unsupported SEXP type {kind} at byte {self.pos - 4}")
    if has_attr:
      return RObject(value, self._attributes(self._item()))
    return value

  def _charsxp(self, levels: int) -> str | None:
    n = self._int()
    if n == -1:
      return None  # NA_character_
    raw = self._bytes(n)
    if levels & _LATIN1_MASK:
      return raw.decode("latin-1")
    # UTF-8, ASCII and native strings of data packages built in UTF-8 locales.
    return raw.decode("utf-8", errors="surrogateescape" if levels & _BYTES_MASK else "replace")

  def _pairlist(self, kind: int, has_attr: bool, has_tag: bool):
    # Pairlists are serialized head first with the tail as the CDR; walk iteratively so that
    # long pairlists don't recurse once per element.
    items = []
    attributes = None
    while True:
      if has_attr:
        attr = self._item()
        attributes = attributes if attributes is not None else attr
      tag = self._item() if has_tag else None
      value = self._item()
      items.append((tag.name if isinstance(tag, RSymbol) else tag, value))
      flags = self._int()
      next_kind = flags & 0xFF
      if next_kind not in (_LISTSXP, _ATTRLISTSXP) or kind not in (_LISTSXP, _ATTRLISTSXP):
        self.pos -= 4
        tail = self._item()
        if tail is not None:
          items.append((None, tail))
        break
      has_attr = bool(flags & (1 << 9))
      has_tag = bool(flags & (1 << 10))
    kind_name = {_LANGSXP: "call", _CLOSXP: "closure", _PROMSXP: "promise",
                 _ATTRLANGSXP: "call"}.get(kind, "pairlist")
    result = RPairList(items, kind_name)
    return RObject(result, self._attributes(attributes)) if attributes is not None else result

  def _attributes(self, pairlist) -> dict[str, object]:
    if isinstance(pairlist, RObject):
      pairlist = pairlist.value
    if not isinstance(pairlist, RPairList):
      raise ValueError(f"R attributes must be a pairlist, got {type(pairlist).__name__}")
    return {tag: value for tag, value in pairlist.items}

  def _altrep(self, info, state):
    # The ALTREP classes base R writes for plain data: compact integer/real sequences and
    # wrappers / deferred strings whose state holds the ordinary vector.
    cls = info.items[0][1].name if isinstance(info, RPairList) and info.items else None
    if cls in ("compact_intseq", "compact_realseq"):
      seq = state.value if isinstance(state, RObject) else state
      n, start, step = int(seq[0]), seq[1], seq[2]
      values = [start + i * step for i in range(n)]
      return [int(v) for v in values] if cls == "compact_intseq" else values
    if cls in ("wrap_integer", "wrap_real", "wrap_string", "wrap_logical", "wrap_list",
               "wrap_complex", "wrap_raw"):
      return state.items[0][1] if isinstance(state, RPairList) else state
    if cls == "deferred_string":
      inner = state.items[0][1] if isinstance(state, RPairList) else state
      inner = inner.value if isinstance(inner, RObject) else inner
      return [None if v is None else (str(int(v)) if float(v).is_integer() else repr(v))
              for v in inner]
    raise ValueError(f"R serialization: unsupported ALTREP class {cls!r}")


def _decompress(blob: bytes) -> bytes:
  """A `.rds` file (gzip, bzip2, xz or plain) or one `.rdb` record (4-byte big-endian
  uncompressed length, then zlib data, or a type byte 'Z' xz / '2' bzip2 / '0' none)."""
  if blob[:2] == b"\x1f\x8b":
    return gzip.decompress(blob)
  if blob[:3] == b"BZh":
    return bz2.decompress(blob)
  if blob[:6] == b"\xfd7zXZ\x00":
    return lzma.decompress(blob)
  if blob[:2] in (b"X\n", b"A\n", b"B\n"):
    return blob
  size = struct.unpack(">I", blob[:4])[0]
  body = blob[4:]
  if body[:1] == b"Z":
    data = lzma.decompress(body[1:])
  elif body[:1] == b"2":
    data = bz2.decompress(body[1:])
  elif body[:1] == b"0":
    data = body[1:]
  else:
    data = zlib.decompress(body)
  if len(data) != size:
    raise ValueError(f"R database record: expected {size} bytes, decompressed {len(data)}")
  return data


def read_rds(source: str | os.PathLike | bytes):
  """An R object from a `.rds` file (or its bytes)."""
  blob = source if isinstance(source, bytes) else pathlib.Path(source).read_bytes()
  return _RReader(_decompress(blob)).read()


def read_rdb(rdb_path: str | os.PathLike) -> dict[str, object]:
  """Every variable of an R lazy-load database: `<name>.rdb` read through its `<name>.rdx` index.

  The index is a serialized list whose `variables` element maps each name to (offset, length)
  of its record in the `.rdb`.
  """
  rdb_path = pathlib.Path(rdb_path)
  index = read_rds(rdb_path.with_suffix(".rdx"))
  fields = index.attributes["names"] if isinstance(index, RObject) else None
  if fields is None or "variables" not in fields:
    raise ValueError(f"{rdb_path.with_suffix('.rdx')} is not an R lazy-load index")
  variables = index.value[fields.index("variables")]
  names = variables.attributes["names"]
  blob = rdb_path.read_bytes()
  result = {}
  for name, (offset, length) in zip(names, variables.value):
    offset, length = int(offset), int(length)
    result[name] = _RReader(_decompress(blob[offset:offset + length])).read()
  return result
