"""Tokenizers for the models kvjax runs, built from a GGUF file's metadata or a `tokenizer.json`.

    tok = load_tokenizer(fetch_checkpoint("gemma3-270m"))     # a .gguf file
    tok = load_tokenizer("path/to/hf_model_dir")              # tokenizer.json (+ configs)
    ids = tok.encode("It is a truth universally acknowledged")  # list[int], BOS as the model wants
    text = tok.decode(ids)

GGUF files carry the tokenizer as metadata (`tokenizer.ggml.*`):

* Gemma-3 (`tokenizer.ggml.model == "llama"`): tokens, scores and token types of a SentencePiece
  BPE model with byte fallback. They are turned into a SentencePiece `ModelProto` (unk 3, bos 2,
  eos 1, pad 0; no dummy prefix; BOS prepended) and loaded with `sentencepiece`.
* Qwen2, Llama 3 and other byte-level BPE models (`"gpt2"`): a byte-level BPE vocabulary and
  merge list, run by the `tokenizers` library behind the split that `tokenizer.ggml.pre` names
  (`BYTE_LEVEL_PRE_TOKENIZERS`: Qwen2's and Llama 3's regexes, GPT-2's, GPT-4o's, SmolLM's
  digits-then-GPT-2). BOS as the file says (`tokenizer.ggml.add_bos_token`; Qwen2 has none).

Both follow what `transformers` builds from the same GGUF file (tests compare ids on prose, code,
unicode and whitespace runs), including two details of Gemma files: tokens made only of spaces are
stored as real spaces, though the model matches them as runs of "▁", and the merge priority is
the token's position in the vocabulary. Control tokens written in the text (`<start_of_turn>`,
`<eos>`) encode to their ids, as the chat templates expect.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Tokenizer", "load_tokenizer", "read_gguf_metadata"]

# GGUF token types (llama.cpp's llama_token_type), the same numbering SentencePiece uses.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Qwen2's pre-tokenizer: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newlines, and whitespace that is not followed by a word.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3's: Qwen2's, with digits in runs of up to three.
LLAMA3_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                      r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-4o / Llama 4's: case-aware letter runs with a trailing contraction, digits in threes.
GPT4O_SPLIT_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's `tokenizer.ggml.pre` names (what its converter writes for each model family) ->
# how text is split before the byte-level BPE runs: a split regex, "gpt2" (GPT-2's own regex,
# the ByteLevel pre-tokenizer's), or "digits+gpt2" (every digit alone, then GPT-2's regex:
# SmolLM's tokenizer.json). Names with the same split share an entry.
BYTE_LEVEL_PRE_TOKENIZERS = {
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), QWEN2_SPLIT_REGEX),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"),
                    LLAMA3_SPLIT_REGEX),
    **dict.fromkeys(("gpt-4o", "llama4"), GPT4O_SPLIT_REGEX),
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "roberta-bpe", "jina-es", "jina-de",
                     "jina-v2-es", "jina-v2-de", "jina-v2-code"), "gpt2"),
    "smollm": "digits+gpt2",
}


class Tokenizer:
  """Text <-> token ids for one model.

  Attributes:
    bos_id: beginning-of-sequence id, or None when the model has none in use.
    eos_ids: ids that end generation (the first is the model's EOS).
    pad_id: padding id (may equal an EOS id).
    vocab_size: number of ids (the embedding table's rows).
    add_bos: whether `encode` prepends `bos_id` by default.
  """

  def __init__(self, backend, *, bos_id: int | None, eos_ids: Sequence[int], pad_id: int | None,
               vocab_size: int, add_bos: bool, name: str = ""):
    if add_bos and bos_id is None:
      raise ValueError("add_bos=True needs a bos_id")
    if not eos_ids:
      raise ValueError("eos_ids must name at least one token")
    self._backend = backend
    self.bos_id = bos_id
    self.eos_ids = tuple(int(i) for i in eos_ids)
    self.pad_id = pad_id
    self.vocab_size = int(vocab_size)
    self.add_bos = bool(add_bos)
    self.name = name

  @property
  def eos_id(self) -> int:
    """The model's own EOS (the first of `eos_ids`)."""
    return self.eos_ids[0]

  def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`; `add_bos` None means the model's default (`self.add_bos`)."""
    if not isinstance(text, str):
      raise TypeError(f"text must be a str, got {type(text).__name__}")
    add_bos = self.add_bos if add_bos is None else add_bos
    if add_bos and self.bos_id is None:
      raise ValueError(f"{self.name or 'this tokenizer'} has no BOS token; pass add_bos=False")
    ids = self._backend.encode(text)
    return [self.bos_id] + ids if add_bos else ids

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """Text of `ids` (a list, tuple or 1-D integer array). Control tokens (BOS, EOS, turn
    markers) are dropped unless `skip_special_tokens=False`."""
    ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids must lie in [0, {self.vocab_size}); got {bad[:5]}")
    return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    """The id of a vocabulary entry spelled as the model stores it, or None."""
    return self._backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> str:
    """The vocabulary entry of an id, spelled as the model stores it."""
    return self._backend.id_to_token(int(token_id))

  def __repr__(self) -> str:
    return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, pad_id={self.pad_id}, add_bos={self.add_bos})")


# --------------------------------------------------------------------------------------------
# Backends.

class _SentencePieceBackend:
  """A SentencePiece processor, plus control tokens written in the text matched as whole ids
  (SentencePiece itself never matches control pieces in input)."""

  def __init__(self, processor, control_tokens: dict[str, int]):
    self._sp = processor
    self._control = control_tokens
    self._control_ids = set(control_tokens.values())
    # Longest first, so a token that prefixes another never wins.
    alternatives = sorted(control_tokens, key=len, reverse=True)
    self._split = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

  def encode(self, text: str) -> list[int]:
    if self._split is None:
      return list(self._sp.encode(text))
    ids: list[int] = []
    start = 0
    for match in self._split.finditer(text):
      if match.start() > start:
        ids.extend(self._sp.encode(text[start:match.start()]))
      ids.append(self._control[match.group()])
      start = match.end()
    if start < len(text):
      ids.extend(self._sp.encode(text[start:]))
    return ids

  def decode(self, ids: list[int], *, skip_special_tokens: bool) -> str:
    if skip_special_tokens:
      return self._sp.decode([i for i in ids if i not in self._control_ids])
    parts, run = [], []
    for i in ids:
      if i in self._control_ids:
        parts.append(self._sp.decode(run))
        parts.append(self._sp.id_to_piece(i))
        run = []
      else:
        run.append(i)
    parts.append(self._sp.decode(run))
    return "".join(parts)

  def token_to_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

  def id_to_token(self, token_id: int) -> str:
    return self._sp.id_to_piece(token_id)


class _HFTokenizersBackend:
  """A `tokenizers.Tokenizer`, used without its post-processor (BOS is added by `Tokenizer`)."""

  def __init__(self, tokenizer):
    self._tok = tokenizer

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int], *, skip_special_tokens: bool) -> str:
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id: int) -> str:
    return self._tok.id_to_token(token_id)


# --------------------------------------------------------------------------------------------
# Loading.

def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """A `Tokenizer` from a `.gguf` file, a `tokenizer.json` file, or a directory holding one.

  For `tokenizer.json`, BOS/EOS/pad come from `tokenizer_config.json`, `config.json` and
  `generation_config.json` beside it.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    if (path / "tokenizer.json").is_file():
      return tokenizer_from_hf(path / "tokenizer.json")
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
      return tokenizer_from_gguf(ggufs[0])
    raise ValueError(f"{path} has no tokenizer.json and {len(ggufs)} .gguf files; pass a file")
  if not path.is_file():
    raise ValueError(f"tokenizer path {str(path)!r} does not exist")
  with path.open("rb") as f:
    magic = f.read(4)
  if magic == b"GGUF":
    return tokenizer_from_gguf(path)
  if path.suffix == ".json":
    return tokenizer_from_hf(path)
  raise ValueError(f"{path} is neither a GGUF file nor a tokenizer.json")


def tokenizer_from_gguf(path: str | os.PathLike) -> Tokenizer:
  """The tokenizer stored in a GGUF file's metadata (SentencePiece "llama" or byte-level "gpt2")."""
  meta = read_gguf_metadata(path, prefix="tokenizer.")
  kind = meta.get("tokenizer.ggml.model")
  name = pathlib.Path(path).name
  if kind == "llama":
    return _sentencepiece_from_gguf(meta, name)
  if kind == "gpt2":
    return _byte_level_bpe_from_gguf(meta, name)
  raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported ('llama', 'gpt2')")


def _sentencepiece_from_gguf(meta: dict, name: str) -> Tokenizer:
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2

  tokens = meta["tokenizer.ggml.tokens"]
  types = np.asarray(meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
  unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 3))
  bos_id = int(meta.get("tokenizer.ggml.bos_token_id", 2))
  eos_id = int(meta.get("tokenizer.ggml.eos_token_id", 1))
  pad_id = int(meta.get("tokenizer.ggml.padding_token_id", 0))

  proto = sp_pb2.ModelProto()
  spec = proto.trainer_spec
  spec.model_type = sp_pb2.TrainerSpec.BPE
  spec.vocab_size = len(tokens)
  spec.byte_fallback = True
  spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = unk_id, bos_id, eos_id, pad_id
  norm = proto.normalizer_spec
  norm.name = "identity"
  norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True

  piece_type = sp_pb2.ModelProto.SentencePiece
  control = {}
  for index, (token, token_type) in enumerate(zip(tokens, types)):
    piece = proto.pieces.add()
    token_type = int(token_type)
    if token and not token.strip(" ") and " " in token:
      # Runs of spaces are stored with real spaces, but the text is matched after spaces became
      # "▁"; as ordinary pieces they merge like any other ("  it" -> "▁▁" + "it").
      token, token_type = "\u2581" * len(token), _NORMAL
    piece.piece = token
    # SentencePiece BPE merges the pair whose result scores highest. The file's order is the
    # merge order (its scores agree for ordinary tokens, but not for the special ones).
    piece.score = -float(index)
    if index == unk_id:
      piece.type = piece_type.UNKNOWN
    elif token_type in (_CONTROL, _UNUSED, _UNKNOWN):
      piece.type = piece_type.CONTROL
      control[token] = index
    elif token_type == _USER_DEFINED:
      piece.type = piece_type.USER_DEFINED
    elif token_type == _BYTE:
      piece.type = piece_type.BYTE
    else:
      piece.type = piece_type.NORMAL
  processor = spm.SentencePieceProcessor()
  processor.LoadFromSerializedProto(proto.SerializeToString())
  # Chat models end a turn with <end_of_turn>; generation stops on it as on <eos>.
  eos_ids = [eos_id] + [control[t] for t in ("<end_of_turn>",) if t in control and control[t] != eos_id]
  return Tokenizer(_SentencePieceBackend(processor, control), bos_id=bos_id, eos_ids=eos_ids,
                   pad_id=pad_id, vocab_size=len(tokens),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)), name=name)


def _byte_level_bpe_from_gguf(meta: dict, name: str) -> Tokenizer:
  from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
  from tokenizers import Tokenizer as HFTokenizer

  tokens = meta["tokenizer.ggml.tokens"]
  types = np.asarray(meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                     byte_fallback=False)
  tok = HFTokenizer(model)
  pre = meta.get("tokenizer.ggml.pre")
  split = BYTE_LEVEL_PRE_TOKENIZERS.get(pre)
  if split is None:
    raise ValueError(f"{name}: byte-level pre-tokenizer {pre!r} is not supported; supported: "
                     f"{sorted(BYTE_LEVEL_PRE_TOKENIZERS)}")
  if split == "gpt2":
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  elif split == "digits+gpt2":
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
  tok.decoder = decoders.ByteLevel()
  # Every ordinary token is spelled in the 256-character byte alphabet; a token marked control
  # that uses other characters is a mislabel and must not be matched in text.
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                          for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet])
  tok.add_tokens([AddedToken(t, normalized=False, special=False)
                  for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
  eos_id = int(meta["tokenizer.ggml.eos_token_id"])
  pad = meta.get("tokenizer.ggml.padding_token_id")
  # Instruct models end a reply with <|im_end|> (the file's EOS) but may also emit the base
  # model's <|endoftext|>; generation stops on either.
  eot = meta.get("tokenizer.ggml.eot_token_id")  # Llama 3 instruct: <|eot_id|> ends a turn
  eos_ids = [eos_id] + [i for i in dict.fromkeys((tok.token_to_id("<|endoftext|>"),
                                                  None if eot is None else int(eot)))
                        if i is not None and i != eos_id]
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
  bos = meta.get("tokenizer.ggml.bos_token_id")
  return Tokenizer(_HFTokenizersBackend(tok), bos_id=None if bos is None else int(bos),
                   eos_ids=eos_ids, pad_id=None if pad is None else int(pad),
                   vocab_size=len(tokens), add_bos=add_bos, name=name)


def tokenizer_from_hf(tokenizer_json: str | os.PathLike) -> Tokenizer:
  """A Hugging Face `tokenizer.json`, with special ids from the JSON configs beside it.

  BOS/EOS come from `tokenizer_config.json` (`bos_token`, `eos_token`, `add_bos_token`), else
  `generation_config.json` / `config.json` (`bos_token_id`, `eos_token_id`, which may be a list).
  Without an explicit `add_bos_token`, BOS is added when the file's post-processor adds it.
  """
  from tokenizers import Tokenizer as HFTokenizer

  path = pathlib.Path(tokenizer_json)
  tok = HFTokenizer.from_file(str(path))

  def load(name):
    f = path.parent / name
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

  tok_cfg, gen_cfg, model_cfg = load("tokenizer_config.json"), load("generation_config.json"), \
      load("config.json")

  def token_id(value):
    if isinstance(value, dict):
      value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None

  def ids(value):
    if value is None:
      return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]

  bos_id = token_id(tok_cfg.get("bos_token"))
  if bos_id is None:
    bos_id = next(iter(ids(gen_cfg.get("bos_token_id")) or ids(model_cfg.get("bos_token_id"))), None)
  eos_ids = []
  for candidate in ([token_id(tok_cfg.get("eos_token"))] + ids(gen_cfg.get("eos_token_id"))
                    + ids(model_cfg.get("eos_token_id"))):
    if candidate is not None and candidate not in eos_ids:
      eos_ids.append(candidate)
  if not eos_ids:
    raise ValueError(f"{path.parent}: no EOS token in tokenizer_config.json, "
                     "generation_config.json or config.json")
  pad_id = token_id(tok_cfg.get("pad_token"))
  if pad_id is None:
    pad_id = next(iter(ids(gen_cfg.get("pad_token_id")) or ids(model_cfg.get("pad_token_id"))), None)
  if "add_bos_token" in tok_cfg:
    add_bos = bool(tok_cfg["add_bos_token"]) and bos_id is not None
  else:
    probe = tok.encode("a", add_special_tokens=True).ids
    add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
  return Tokenizer(_HFTokenizersBackend(tok), bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id,
                   vocab_size=tok.get_vocab_size(with_added_tokens=True), add_bos=add_bos,
                   name=path.parent.name)


# --------------------------------------------------------------------------------------------
# GGUF metadata.

# GGUF value types: numpy dtypes of the fixed-size ones; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | os.PathLike, *, prefix: str = "") -> dict[str, object]:
  """The key-value metadata of a GGUF file (little-endian, version 2 or 3), without reading the
  tensor table: a fraction of a second for a 262K-token vocabulary.

  Args:
    path: the .gguf file.
    prefix: keep only keys starting with it ("tokenizer."); others are skipped, not decoded.

  Returns:
    {key: value}: Python scalars, str, list[str] for string arrays and lists for numeric arrays.
  """
  with open(path, "rb") as f:
    data = f.read(16 << 20)
    if data[:4] != b"GGUF":
      raise ValueError(f"{path} is not a GGUF file")
    version, _, kv_count = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
      raise ValueError(f"{path}: unsupported GGUF version {version}")
    reader = _GGUFBuffer(f, data, 24)
    meta = {}
    for _ in range(kv_count):
      key = reader.string()
      value_type = reader.u32()
      keep = key.startswith(prefix)
      meta_value = reader.value(value_type, decode=keep)
      if keep:
        meta[key] = meta_value
  return meta


class _GGUFBuffer:
  """Sequential reads over a file, refilling a window as it goes."""

  def __init__(self, f, data: bytes, pos: int):
    self._f, self._data, self._pos = f, data, pos

  def _need(self, n: int) -> None:
    if self._pos + n > len(self._data):
      self._data = self._data[self._pos:] + self._f.read(max(n, 16 << 20))
      self._pos = 0
      if n > len(self._data):
        raise ValueError("truncated GGUF metadata")

  def take(self, n: int) -> bytes:
    self._need(n)
    out = self._data[self._pos:self._pos + n]
    self._pos += n
    return out

  def u32(self) -> int:
    return struct.unpack("<I", self.take(4))[0]

  def u64(self) -> int:
    return struct.unpack("<Q", self.take(8))[0]

  def string(self) -> str:
    return self.take(self.u64()).decode("utf-8", errors="replace")

  def value(self, value_type: int, *, decode: bool):
    if value_type in _GGUF_SCALARS:
      dtype = np.dtype(_GGUF_SCALARS[value_type])
      return np.frombuffer(self.take(dtype.itemsize), dtype)[0].item()
    if value_type == _GGUF_STRING:
      return self.string()
    if value_type == _GGUF_ARRAY:
      elem_type, count = self.u32(), self.u64()
      if elem_type in _GGUF_SCALARS:
        dtype = np.dtype(_GGUF_SCALARS[elem_type])
        raw = self.take(dtype.itemsize * count)
        return np.frombuffer(raw, dtype).tolist() if decode else None
      return [self.value(elem_type, decode=decode) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {value_type}")
