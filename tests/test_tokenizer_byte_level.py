"""Byte-level BPE tokenizers from GGUF files for every pre-tokenizer llama.cpp names that kvjax
supports (`BYTE_LEVEL_PRE_TOKENIZERS`), against transformers' own GGUF tokenizer conversion.

No model hub here, so the vocabulary is built in the test: a byte-level BPE of ~600 tokens
trained (with the `tokenizers` library) on text full of what the splits disagree on (digit runs, contractions, case changes, punctuation runs, newlines,
whitespace runs, accents, CJK, emoji), written for each pre-tokenizer to a GGUF file the way llama.cpp's converter writes
one (`tokenizer.ggml.model = "gpt2"`, `.pre`, tokens, token types, merges, BOS/EOS), then read by
`kvjax.models.tokenizer.load_tokenizer` and by `transformers`' `convert_gguf_tokenizer`. The ids
must be equal on held-out text. SmolLM ("smollm") is checked against the pre-tokenizer of its
tokenizer.json (every digit alone, then GPT-2's regex), because transformers' GGUF path gives it
GPT-2's split alone and so disagrees with the model on digits.
"""

import functools
import json

import pytest

from kvjax.models.tokenizer import BYTE_LEVEL_PRE_TOKENIZERS, load_tokenizer

TRAIN = """It's 2024: they'd paid $1,234,567.89 for 42 GPUs -- can't you SEE?! I'll re-run it.
  Indented   lines\tand\ttabs.\r\nWindows line\r\n\nUnix line\n\n\nthree blank lines
HTTPServerError camelCaseWords snake_case_words ALLCAPS MixedCASEword O'Neil's dog's
Café naïve résumé façade Übermäßig  東京都 日本語のテキスト 😀🚀 emoji!! ...and so on...
def f(x): return x**2 + 3.14159 * y // 7 # comment {braces} [brackets] <tags/>
Numbers 1 12 123 1234 12345 123456 0.5 -17 3e10 2,048 tokens; 100% sure.
""" * 3

HELD_OUT = [
    "We'll see 31415926535 digits, won't we? I'VE SAID IT'S 2025!",
    "  leading spaces and trailing   \n\n\tmixed\r\n whitespace  ",
    "CamelCaseHTTPRequest vs snake_case_var: x = 12.5e-3 + 1000000",
    "Ünïcödé façade — em dash… 東京 😀 mixed🚀text",
    "code:\n    for i in range(10):\n        print(i ** 2)\n",
]


@functools.lru_cache(maxsize=None)
def _train():
  """(tokens, merges) of a small byte-level BPE trained under GPT-2's split, the coarsest of the
  splits on digits (runs) and whitespace: its merges span pieces the finer splits cut apart, so a
  wrong split gives other ids."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=1, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=["<|begin_of_text|>", "<|end_of_text|>"])
  tok.train_from_iterator([TRAIN], trainer)
  vocab = tok.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  merges = json.loads(tok.to_str())["model"]["merges"]
  return tokens, [m if isinstance(m, str) else " ".join(m) for m in merges]


def _write_gguf(path, pre, tokens, merges):
  import gguf
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
  writer.add_token_merges(merges)
  writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
  writer.add_eos_token_id(tokens.index("<|end_of_text|>"))
  writer.add_add_bos_token(True)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _transformers_ids(pre, tokens, merges, texts):
  from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
  backend, _ = convert_gguf_tokenizer("llama", {
      "tokenizer_type": "gpt2", "pre_tokenizer_type": pre, "tokens": tokens, "merges": merges,
      "token_type": [3 if t.startswith("<|") else 1 for t in tokens],
      "bos_token_id": tokens.index("<|begin_of_text|>"),
      "eos_token_id": tokens.index("<|end_of_text|>")})
  return [backend.encode(t, add_special_tokens=False).ids for t in texts]


# One name per distinct split (the others in a family share its regex).
PRES = ["qwen2", "llama-bpe", "gpt-4o", "gpt2", "smollm"]


@pytest.mark.parametrize("pre", PRES)
def test_byte_level_gguf_tokenizer_matches_transformers(pre, tmp_path):
  tokens, merges = _train()
  path = tmp_path / f"{pre}.gguf"
  _write_gguf(path, pre, tokens, merges)
  ours = load_tokenizer(path)
  assert ours.bos_id == tokens.index("<|begin_of_text|>") and ours.add_bos
  texts = HELD_OUT + [TRAIN[:400]]
  got = [ours.encode(t, add_bos=False) for t in texts]
  for t, ids in zip(texts, got):
    assert ours.decode(ids) == t  # byte-level: lossless
  if pre == "smollm":
    want = [_smollm_reference(tokens, merges).encode(t).ids for t in texts]
  else:
    want = _transformers_ids(pre, tokens, merges, texts)
  assert got == want
  # The splits differ from each other on this text: a wrong table entry could not pass.
  assert ours.encode(HELD_OUT[0] + HELD_OUT[2], add_bos=False) != []


def _smollm_reference(tokens, merges):
  """SmolLM's tokenizer.json pre-tokenizer over this vocabulary."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                             merges=[tuple(m.split(" ", 1)) for m in merges]))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  return tok


def test_the_splits_are_different_tokenizers():
  """Each supported split tokenizes the held-out text differently from the others (so the test
  above checks the right one, not any one)."""
  from tokenizers import Regex, pre_tokenizers
  seen = {}
  for pre in PRES:
    split = BYTE_LEVEL_PRE_TOKENIZERS[pre]
    if split == "gpt2":
      p = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits+gpt2":
      p = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
      p = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                            use_regex=False)])
    pieces = tuple(tuple(w for w, _ in p.pre_tokenize_str(t)) for t in HELD_OUT)
    assert pieces not in seen.values(), (pre, [k for k, v in seen.items() if v == pieces])
    seen[pre] = pieces


def test_an_unknown_pre_tokenizer_is_refused_with_the_supported_names(tmp_path):
  tokens, merges = _train()
  path = tmp_path / "odd.gguf"
  _write_gguf(path, "no-such-pre", tokens, merges)
  with pytest.raises(ValueError, match="'no-such-pre' is not supported; supported: .*llama-bpe"):
    load_tokenizer(path)
