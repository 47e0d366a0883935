"""Tiny random transformers models saved with save_pretrained: the parity references."""
from __future__ import annotations

import pathlib

import numpy as np

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def make_llama(path: pathlib.Path, seed: int = 0, vocab_size: int = 256, weight_std: float = 0.05,
               num_layers: int = 2):
  """LlamaForCausalLM with llama3 rope scaling and tied embeddings.

  weight_std=0.3 makes predictions vary between prompts (greedy outputs that are not constant),
  which scoring and decoding parity tests need to be meaningful.
  """
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(seed)
  cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, rope_parameters=dict(LLAMA3_ROPE),
                    tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1,
                    eos_token_id=2)
  model = LlamaForCausalLM(cfg).eval()
  _randomize(model, seed, weight_std)
  model.save_pretrained(path)
  return model


def make_qwen2(path: pathlib.Path, seed: int = 0, vocab_size: int = 256, num_layers: int = 2):
  """Qwen2ForCausalLM with untied embeddings and q/k/v bias (randomised, not zero)."""
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  torch.manual_seed(seed)
  cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, rope_parameters={"rope_type": "default",
                                                                  "rope_theta": 1e6},
                    tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=1,
                    eos_token_id=2)
  model = Qwen2ForCausalLM(cfg).eval()
  _randomize(model, seed)
  model.save_pretrained(path)
  return model


def make_mistral(path: pathlib.Path, seed: int = 0, vocab_size: int = 256, num_layers: int = 2):
  """MistralForCausalLM: untied embeddings, no biases, plain RoPE, full attention (no window)."""
  import torch
  from transformers import MistralConfig, MistralForCausalLM
  torch.manual_seed(seed)
  cfg = MistralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rope_parameters={"rope_type": "default",
                                                                    "rope_theta": 1e6},
                      sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2)
  model = MistralForCausalLM(cfg).eval()
  _randomize(model, seed)
  model.save_pretrained(path)
  return model


def _randomize(model, seed: int, std: float = 0.05):
  """Every weight (norm scales and biases too) random, so no mapping error can hide.

  The embedding keeps std 0.05; other matrices get `std`.
  """
  import torch
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      elif "embed" in name:
        p.copy_(0.05 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(std * torch.randn(p.shape, generator=gen))


def torch_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
  """Reference logits with positions counted over real tokens (as generate() does)."""
  import torch
  mask = torch.tensor(attention_mask, dtype=torch.long)
  position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(input_ids, dtype=torch.long), attention_mask=mask,
                position_ids=position_ids)
  return out.logits.float().numpy()


def padded_batch(rng: np.random.Generator, vocab_size: int, lengths: list[int], side: str):
  """Random ids with `side` ("left" | "right") padding (pad id 0) and the matching mask."""
  width = max(lengths)
  ids = np.zeros((len(lengths), width), np.int64)
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    toks = rng.integers(3, vocab_size, size=n)
    sl = slice(width - n, width) if side == "left" else slice(0, n)
    ids[i, sl], mask[i, sl] = toks, 1
  return ids, mask


def make_sentibench_tokenizer(sentibench_dir: pathlib.Path, out_dir: pathlib.Path):
  """Byte-level BPE (vocab 512, adds BOS) on SentiBench train text; verbalizers are words."""
  import json
  from sentijax.data import tokenizer as tok_lib
  protocol = json.loads((sentibench_dir / "protocol.json").read_text(encoding="utf-8-sig"))
  texts = []
  for name in ("sc/sst2", "multifaced/tweeteval", "absa/asqp_rest16"):
    rows = json.loads((sentibench_dir / name / "train.json").read_text(encoding="utf-8-sig"))
    texts += [r["sentence"] for r in rows[:1000]]
  texts += list(protocol["instructions"].values()) * 20
  verbs = [v for vs in protocol["classification"]["verbalizers"].values() for v in vs]
  texts += [" ".join(verbs)] * 200 + ["Sentence: x\nLabel: y\n"] * 200
  tok_lib.train_tokenizer(texts, 512, out_dir)
  return tok_lib.load_tokenizer(out_dir)


def make_sentibench_model(sentibench_dir: pathlib.Path, root: pathlib.Path):
  """(tokenizer, torch model, sentijax cfg, params): a tiny Llama whose predictions vary."""
  from sentijax import models
  tok = make_sentibench_tokenizer(sentibench_dir, root)
  model = make_llama(root, vocab_size=512, weight_std=0.3)
  cfg, params = models.load_hf(root, dtype="float32")
  return tok, model, cfg, params
