"""Parity of the Flax decoders with Hugging Face transformers on tiny random checkpoints.

Each test builds a random transformers model, saves it with `save_pretrained` (safetensors),
loads it with `kvjax.models.load`, prefills 44 tokens and decodes 8 more one at a time through
the dense float32 cache, and compares every position's logits with transformers' forward pass
over all 52 tokens. Error is measured per row (batch, position): max|a - b| / max|b|. The bound
1e-4 is float32 round-off accumulated over a few layers (about 1e-6 per op) with margin, and far
below what any layout or formula mistake gives (those show up as O(1) relative errors).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import kvjax  # noqa: E402
from kvjax.models import load  # noqa: E402

PREFILL, DECODE, BATCH = 44, 8, 2
TOLERANCE = 1e-4


def _randomize(model, seed):
  """Random weights everywhere, norms and biases included (HF inits norms to 0 or 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      std = 0.3 if p.ndim == 1 else 1.5 / np.sqrt(p.shape[-1])
      p.copy_(torch.randn(p.shape, generator=gen) * std)
  return model


def _save(model, tmp_path):
  path = os.fspath(tmp_path / "ckpt")
  model.save_pretrained(path, safe_serialization=True)
  return path


def _worst_row_error(ours: np.ndarray, ref: np.ndarray) -> float:
  """max over (batch, position) of max|a-b| / max|b| along the vocabulary."""
  num = np.abs(ours - ref).max(-1)
  den = np.abs(ref).max(-1)
  return float((num / den).max())


def _run_ours(model, tokens):
  caches = model.init_cache(BATCH, PREFILL + DECODE + 4, dtype=jnp.float32)
  step = jax.jit(lambda m, t, c: m(t, c))
  logits, caches = model(jnp.asarray(tokens[:, :PREFILL]), caches)
  outs = [np.asarray(logits)]
  for t in range(PREFILL, PREFILL + DECODE):
    logits, caches = step(model, jnp.asarray(tokens[:, t:t + 1]), caches)
    outs.append(np.asarray(logits))
  lengths = np.asarray(kvjax.models.cache_lengths(caches))
  assert lengths.tolist() == [PREFILL + DECODE] * BATCH
  return np.concatenate(outs, axis=1)


def _run_hf(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


def _tokens(vocab, seed):
  return np.random.default_rng(seed).integers(0, vocab, (BATCH, PREFILL + DECODE), dtype=np.int32)


def _check(hf_model, tmp_path, seed):
  hf_model = _randomize(hf_model.eval(), seed)
  path = _save(hf_model, tmp_path)
  model, tokenizer = load(path, dtype=jnp.float32)
  assert tokenizer is None
  tokens = _tokens(hf_model.config.vocab_size, seed)
  ref = _run_hf(hf_model, tokens)
  ours = _run_ours(model, tokens)
  assert ours.shape == ref.shape
  err = _worst_row_error(ours, ref)
  assert err < TOLERANCE, f"worst row relative error {err:.3g}"
  return model, err


def test_gemma3_matches_transformers(tmp_path):
  cfg = transformers.Gemma3TextConfig(
      vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
      num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=16,
      query_pre_attn_scalar=24, final_logit_softcapping=30.0,
      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                       "full_attention": {"rope_type": "linear", "factor": 8.0,
                                          "rope_theta": 1_000_000.0}},
      attn_implementation="eager")
  hf_model = transformers.Gemma3ForCausalLM(cfg)
  model, _ = _check(hf_model, tmp_path, seed=0)
  # layer_index maps stacked slots back to checkpoint layers (used by calibration)
  from kvjax.models.decoder import layer_index
  for part, run, index, stacked in (("groups", 0, (0, 3), model.group_runs[0]),
                                    ("groups", 1, (0, 0), model.group_runs[1]),
                                    ("tail", 0, (1,), model.tail_runs[0])):
    layer = hf_model.model.layers[layer_index(model.config, part, run, *index)]
    np.testing.assert_allclose(np.asarray(stacked.attention.q_norm.scale[...][index]),
                               1.0 + layer.self_attn.q_norm.weight.detach().numpy(), rtol=1e-6)
  # 8 layers = one scanned group of (5 local, 1 global) plus a tail of 2 local layers; the
  # window (16) is shorter than the prefill, so local caches are rings of 16 slots.
  caches = model.init_cache(1, 64)
  local, glob = caches["groups"]
  assert local.k.shape == (1, 5, 1, 2, 16, 32) and local.ring
  assert glob.k.shape == (1, 1, 1, 2, 64, 32) and not glob.ring
  assert caches["tail"][0].k.shape == (2, 1, 2, 16, 32)


def test_qwen2_matches_transformers(tmp_path):
  cfg = transformers.Qwen2Config(
      vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=1_000_000.0,
      tie_word_embeddings=True, attn_implementation="eager")
  model, _ = _check(transformers.Qwen2ForCausalLM(cfg), tmp_path, seed=1)
  assert model.config.qkv_bias and model.config.tie_word_embeddings


def test_llama_matches_transformers(tmp_path):
  cfg = transformers.LlamaConfig(
      vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
      rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32},
      attn_implementation="eager")
  model, _ = _check(transformers.LlamaForCausalLM(cfg), tmp_path, seed=2)
  assert model.config.rope_scaling.kind == "llama3" and not model.config.tie_word_embeddings


# ------------------------------------------------------------------------------------------------
# GGUF: the same random checkpoints written with gguf.GGUFWriter under llama.cpp's conventions.

gguf = pytest.importorskip("gguf")


def _llama_cpp_permute(w, heads):
  """llama.cpp's converter permutation of Q/K rows ([out, in] weights or [out] biases)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(hf_model, arch, path):
  cfg = hf_model.config
  sd = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
  w = gguf.GGUFWriter(path, arch)
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(1024)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  rope = cfg.rope_parameters
  w.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])
  w.add_vocab_size(cfg.vocab_size)
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  if arch == "gemma3":
    w.add_sliding_window(cfg.sliding_window)
  names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
           "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "post_feedforward_layernorm": "post_ffw_norm",
           "pre_feedforward_layernorm": "ffn_norm",
           "post_attention_layernorm": "post_attention_norm" if arch == "gemma3" else "ffn_norm"}
  for key, value in sd.items():
    if key == "model.embed_tokens.weight":
      name = "token_embd.weight"
    elif key == "model.norm.weight":
      name = "output_norm.weight"
    elif key == "lm_head.weight":
      if cfg.tie_word_embeddings:
        continue
      name = "output.weight"
    else:
      _, _, layer, rest = key.split(".", 3)
      module, kind = rest.rsplit(".", 1)
      name = f"blk.{layer}.{names[module]}.{kind}"
      if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
        heads = cfg.num_attention_heads if "q_proj" in module else cfg.num_key_value_heads
        value = _llama_cpp_permute(value, heads)
    if arch == "gemma3" and key.endswith("norm.weight"):
      value = value + 1.0  # llama.cpp's Gemma converter folds the +1 into the stored weight
    w.add_tensor(name, np.ascontiguousarray(value, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "llama"])
def test_gguf_matches_transformers(tmp_path, arch):
  if arch == "gemma3":
    hf_model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=16,
        query_pre_attn_scalar=32, attn_implementation="eager"))
  elif arch == "qwen2":
    hf_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1_000_000.0,
        tie_word_embeddings=False, attn_implementation="eager"))
  else:
    # 8 query heads over 2 KV heads: the Q and K permutations differ (heads vs kv heads).
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
        rope_theta=10_000.0, attn_implementation="eager"))
  hf_model = _randomize(hf_model.eval(), seed=4)
  path = os.fspath(tmp_path / f"{arch}.gguf")
  _write_gguf(hf_model, arch, path)
  cfg, pure = kvjax.models.params_from_gguf(path)
  assert cfg.arch == arch
  model = kvjax.models.build_model(cfg, pure)
  tokens = _tokens(hf_model.config.vocab_size, seed=4)
  err = _worst_row_error(_run_ours(model, tokens), _run_hf(hf_model, tokens))
  assert err < TOLERANCE, f"worst row relative error {err:.3g}"


def test_missing_and_misshaped_tensors_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)
  path = _save(transformers.Qwen2ForCausalLM(cfg), tmp_path)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  name = "model.layers.1.self_attn.k_proj.bias"
  missing = dict(tensors)
  del missing[name]
  save_file(missing, os.path.join(path, "model.safetensors"))
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
    load(path)
  bad = dict(tensors)
  bad[name] = np.zeros((7,), np.float32)
  save_file(bad, os.path.join(path, "model.safetensors"))
  with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.bias' has shape \(7,\), expected \(16,\)"):
    load(path)


def test_unknown_architecture_is_rejected(tmp_path):
  import json
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
  with pytest.raises(ValueError, match="unsupported architecture.*mamba"):
    load(os.fspath(tmp_path))
  w = gguf.GGUFWriter(os.fspath(tmp_path / "x.gguf"), "rwkv6")
  w.add_block_count(1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="unsupported architecture.*rwkv6"):
    load(os.fspath(tmp_path / "x.gguf"))


def test_sharded_safetensors_directory(tmp_path):
  cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, attn_implementation="eager")
  hf_model = _randomize(transformers.LlamaForCausalLM(cfg).eval(), seed=5)
  path = os.fspath(tmp_path / "sharded")
  hf_model.save_pretrained(path, max_shard_size="40KB")
  assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
  model, _ = load(path)
  tokens = _tokens(cfg.vocab_size, seed=5)
  err = _worst_row_error(_run_ours(model, tokens), _run_hf(hf_model, tokens))
  assert err < TOLERANCE, f"worst row relative error {err:.3g}"
