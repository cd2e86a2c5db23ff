"""The corpus: R serialization reader on hand-built streams, the Jane Austen novels, text files."""

import gzip
import struct
import zlib

import pytest

from kvjax import corpus, user_cache
from kvjax.corpus import RObject


# --------------------------------------------------------------------------------------------
# A tiny independent writer of R's XDR serialization, for building test streams.

def _flags(kind, *, attr=False, tag=False, obj=False, levels=0):
  return struct.pack(">i", kind | (obj << 8) | (attr << 9) | (tag << 10) | (levels << 12))


def _charsxp(s):
  if s is None:
    return _flags(9) + struct.pack(">i", -1)
  raw = s.encode("utf-8")
  return _flags(9, levels=8 if any(ord(c) > 127 for c in s) else 64) + struct.pack(">i", len(raw)) + raw


def _strsxp(values, attr=b""):
  return (_flags(16, attr=bool(attr)) + struct.pack(">i", len(values))
          + b"".join(_charsxp(v) for v in values) + attr)


def _symbol(name, refs):
  if name in refs:
    return struct.pack(">i", (refs.index(name) + 1) << 8 | 255)
  refs.append(name)
  return _flags(1) + _charsxp(name)


def _attributes(pairs, refs):
  """A pairlist of (tag, serialized value), terminated by NILVALUE."""
  out = b""
  for tag, value in pairs:
    out += _flags(2, tag=True) + _symbol(tag, refs) + value
  return out + _flags(254)


def _header(version=3):
  out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
  if version == 3:
    out += struct.pack(">i", 5) + b"UTF-8"
  return out


def test_reads_character_vector_with_na_and_unicode():
  stream = _header() + _strsxp(["It is a truth", None, "naïve — “quoted”", ""])
  assert corpus._RReader(stream).read() == ["It is a truth", None, "naïve — “quoted”", ""]


@pytest.mark.parametrize("version", [2, 3])
def test_reads_named_list_with_attributes_and_symbol_refs(version):
  refs = []
  names = _strsxp(["a", "b", "c"])
  ints = _flags(13) + struct.pack(">i", 3) + struct.pack(">3i", 1, -(2 ** 31), 7)
  reals = _flags(14) + struct.pack(">i", 2) + struct.pack(">2d", 0.5, -2.25)
  # The inner vector carries a "names" attribute too: the second "names" symbol is a REFSXP.
  inner_attr = _attributes([("names", _strsxp(["x", "y"]))], refs)
  lgl = _flags(10, attr=True) + struct.pack(">i", 2) + struct.pack(">2i", 1, 0) + inner_attr
  body = ints + reals + lgl
  list_attr = _attributes([("names", names), ("class", _strsxp(["thing"]))], refs)
  stream = _header(version) + _flags(19, attr=True) + struct.pack(">i", 3) + body + list_attr
  out = corpus._RReader(stream).read()
  assert isinstance(out, RObject)
  assert out.attributes == {"names": ["a", "b", "c"], "class": ["thing"]}
  assert out.value[0] == [1, None, 7]
  assert out.value[1] == [0.5, -2.25]
  assert out.value[2] == RObject([True, False], {"names": ["x", "y"]})


def test_reads_compact_intseq_altrep():
  refs = []
  info = (_flags(2) + _symbol("compact_intseq", refs)
          + _flags(2) + _symbol("base", refs) + _flags(2) + _flags(13) + struct.pack(">i", 1)
          + struct.pack(">i", 13) + _flags(254))
  state = _flags(14) + struct.pack(">i", 3) + struct.pack(">3d", 4.0, 10.0, 1.0)
  stream = _header() + _flags(238) + info + state + _flags(254)
  assert corpus._RReader(stream).read() == [10, 11, 12, 13]


def test_reads_namespace_reference_and_back_reference():
  # A list holding the same namespace twice: written in full once, then as a REFSXP.
  namespace = _flags(249) + struct.pack(">ii", 0, 2) + _charsxp("stats") + _charsxp("4.2.1")
  back_ref = struct.pack(">i", (1 << 8) | 255)
  stream = _header() + _flags(19) + struct.pack(">i", 3) + namespace + back_ref + _strsxp(["ok"])
  out = corpus._RReader(stream).read()
  assert out[0].frame == ["stats", "4.2.1"] and out[1] is out[0] and out[2] == ["ok"]


def test_rejects_truncated_and_non_xdr_streams():
  stream = _header() + _strsxp(["abcdef"])
  with pytest.raises(ValueError, match="truncated"):
    corpus._RReader(stream[:-3]).read()
  with pytest.raises(ValueError, match="XDR"):
    corpus._RReader(b"A\n" + stream[2:]).read()


def test_read_rdb_through_its_index(tmp_path):
  """A lazy-load database: zlib records in .rdb, a gzip-compressed named index in .rdx."""
  objects = {"first": ["line one", "line two"], "second": ["x"]}
  blob, offsets = b"", {}
  for name, lines in objects.items():
    data = _header() + _strsxp(lines)
    record = struct.pack(">I", len(data)) + zlib.compress(data)
    offsets[name] = (len(blob), len(record))
    blob += record
  refs = []
  variables = (_flags(19, attr=True) + struct.pack(">i", 2)
               + b"".join(_flags(13) + struct.pack(">i", 2) + struct.pack(">2i", *offsets[n])
                          for n in objects)
               + _attributes([("names", _strsxp(list(objects)))], refs))
  index = (_header() + _flags(19, attr=True) + struct.pack(">i", 1) + variables
           + _attributes([("names", _strsxp(["variables"]))], refs))
  (tmp_path / "Rdata.rdb").write_bytes(blob)
  (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
  assert corpus.read_rdb(tmp_path / "Rdata.rdb") == objects


# --------------------------------------------------------------------------------------------
# Book names, text files, atomic writes.

@pytest.mark.parametrize("query,title", [
    ("Pride & Prejudice", "Pride & Prejudice"), ("pride and prejudice", "Pride & Prejudice"),
    ("pride", "Pride & Prejudice"), ("prideprejudice", "Pride & Prejudice"), ("EMMA", "Emma"),
    ("sense", "Sense & Sensibility"), ("Northanger", "Northanger Abbey"),
    ("persuasion", "Persuasion"), ("mansfield park", "Mansfield Park")])
def test_book_names(query, title):
  assert corpus._resolve_book(query) == title


@pytest.mark.parametrize("query", ["the", "", "Ulysses", "and"])
def test_unknown_book_names(query):
  with pytest.raises(ValueError, match="Pride & Prejudice"):
    corpus._resolve_book(query)


def test_load_text(tmp_path):
  f = tmp_path / "t.txt"
  f.write_bytes("first line\r\nsecond — line\rthird\n".encode("utf-8"))
  assert corpus.load_text(f) == "first line\nsecond — line\nthird\n"
  with pytest.raises(ValueError, match="does not exist"):
    corpus.load_text(tmp_path / "missing.txt")
  (tmp_path / "blank.txt").write_text("  \n")
  with pytest.raises(ValueError, match="empty"):
    corpus.load_text(tmp_path / "blank.txt")
  (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(ValueError, match="not UTF-8"):
    corpus.load_text(tmp_path / "latin.txt")


def test_atomic_write_interrupted_leaves_old_content(tmp_path, monkeypatch):
  target = tmp_path / "book.txt"
  user_cache.atomic_write_text(target, "old")

  def interrupted(src, dst):
    raise KeyboardInterrupt()

  monkeypatch.setattr(user_cache.os, "replace", interrupted)
  with pytest.raises(KeyboardInterrupt):
    user_cache.atomic_write_text(target, "new text")
  assert target.read_text() == "old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["book.txt"]


# --------------------------------------------------------------------------------------------
# The real novels (fetched once from Debian into the user's cache, then reused).

@pytest.fixture(scope="module")
def austen():
  try:
    return corpus.load_austen()
  except corpus.CorpusUnavailableError as e:
    pytest.skip(f"Debian package {corpus.DEBIAN_PACKAGE} unavailable here: {e}")


def test_six_novels_parse(austen):
  assert list(austen) == list(corpus.BOOKS)
  words = {title: len(text.split()) for title, text in austen.items()}
  # janeaustenr's texts: about 717K words in all; Mansfield Park is the longest, Northanger Abbey the shortest.
  assert 700_000 < sum(words.values()) < 740_000
  assert max(words, key=words.get) == "Mansfield Park" and min(words, key=words.get) == "Northanger Abbey"
  for title, text in austen.items():
    assert "\ufffd" not in text, title
    assert text.endswith("\n") and "\r" not in text
    assert text.split("\n", 1)[0].strip().upper() == title.upper().replace("&", "AND"), title


def test_pride_and_prejudice_opening(austen):
  text = corpus.load_austen("pride")
  assert text == austen["Pride & Prejudice"]
  assert text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n")
  assert text.index("It is a truth universally acknowledged, that a single man in possession\n"
                    "of a good fortune, must be in want of a wife.") < 100
  assert "Elizabeth" in text and "Darcy" in text


def test_eval_and_calibration_are_disjoint_novels(austen):
  ev, cal = corpus.eval_text(), corpus.calibration_text()
  assert ev == austen[corpus.EVAL_BOOK] and cal == austen[corpus.CALIBRATION_BOOK]
  assert corpus.EVAL_BOOK != corpus.CALIBRATION_BOOK
  assert cal.startswith("EMMA")
  # No paragraph of any length is shared.
  ev_paragraphs = {p for p in ev.split("\n\n") if len(p) > 200}
  assert not ev_paragraphs & {p for p in cal.split("\n\n") if len(p) > 200}


def test_cached_text_is_reused_without_apt(austen, monkeypatch):
  def no_apt(dest):
    raise AssertionError("apt-get must not run when the text is cached")

  monkeypatch.setattr(corpus, "_apt_download", no_apt)
  assert corpus.load_austen("Persuasion") == austen["Persuasion"]
  cached = user_cache.cache_dir() / "corpus" / "janeaustenr"
  assert sorted(p.name for p in cached.iterdir()) == sorted(f"{n}.txt" for n in corpus.BOOKS.values())


def test_extraction_into_a_fresh_cache(austen, tmp_path):
  """The whole path (apt-get download, dpkg-deb -x, R database) into an empty cache directory."""
  fresh = corpus.load_austen(cache_dir=tmp_path)
  assert fresh == austen
  leftovers = [p.name for p in (tmp_path / "corpus" / "janeaustenr").iterdir()
               if not p.name.endswith(".txt")]
  assert leftovers == []


def test_a_killed_extractions_temporaries_are_swept(tmp_path, monkeypatch):
  from kvjax import corpus
  folder = tmp_path / "corpus" / "janeaustenr"
  (folder / ".extract-dead" / "root").mkdir(parents=True)
  extracted = []

  def fake_extract(directory):
    extracted.append(sorted(p.name for p in directory.iterdir()))
    for name in corpus.BOOKS.values():
      (directory / f"{name}.txt").write_text(f"{name}\n")

  monkeypatch.setattr(corpus, "_extract_all", fake_extract)
  assert corpus.load_austen("emma", cache_dir=tmp_path) == "emma\n"
  assert extracted == [[]]                       # the stale directory was gone before extracting
