"""Presets equal the published config.json of each release, field by field."""
import jax
import numpy as np
import pytest

from sentijax import models
from sentijax.models import hf_config

_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
          "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
          "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False}
_LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
_LLAMA32_ROPE = dict(_LLAMA31_ROPE, factor=32.0)
_QWEN = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "rms_norm_eps": 1e-06,
         "rope_theta": 1000000.0, "max_position_embeddings": 32768, "bos_token_id": 151643,
         "eos_token_id": 151645, "hidden_act": "silu", "use_sliding_window": False}

# The config.json of each -Instruct release on the Hugging Face hub (transformers 4.x layout, as
# published; keys irrelevant to the forward pass left out). Head dims are hidden / heads unless the
# file states `head_dim` (Llama-3.2).
PUBLISHED_CONFIGS = {
    "llama-3.2-1b": dict(_LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True),
    "llama-3.2-3b": dict(_LLAMA, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                         rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True),
    "llama-3.1-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8,
                         rope_scaling=_LLAMA31_ROPE, tie_word_embeddings=False),
    "llama-3.1-70b": dict(_LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8,
                          rope_scaling=_LLAMA31_ROPE, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(_QWEN, vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         rope_scaling=None, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN, vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         rope_scaling=None, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       rope_scaling=None, tie_word_embeddings=False),
    "qwen2.5-72b": dict(_QWEN, vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        rope_scaling=None, tie_word_embeddings=False),
}

# Parameter counts of the published checkpoints (billions, 3 decimals).
PUBLISHED_SIZES = {"llama-3.2-1b": 1.236, "llama-3.2-3b": 3.213, "llama-3.1-8b": 8.030,
                   "llama-3.1-70b": 70.554, "qwen2.5-0.5b": 0.494, "qwen2.5-1.5b": 1.544,
                   "qwen2.5-7b": 7.616, "qwen2.5-72b": 72.706}


def test_every_release_preset_is_checked():
  assert set(models.presets.PRESETS) - {"tiny"} == set(PUBLISHED_CONFIGS) == set(PUBLISHED_SIZES)


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_preset_equals_published_config(name):
  published = PUBLISHED_CONFIGS[name]
  cfg = models.presets.get(name)
  # Importing the published file gives the preset (every ModelConfig field: rope theta and llama3
  # factors, norm eps, bos/eos, tie flag, head dim, intermediate size, q/k/v bias, ...).
  assert hf_config.config_from_hf(published, f"{name}/config.json") == cfg
  # Exporting the preset writes the published values, key by key.
  exported = hf_config.config_to_hf(cfg)
  for key, want in published.items():
    assert exported[key] == want, (key, exported[key], want)
  heads = published["num_attention_heads"]
  assert cfg.head_dim == published.get("head_dim", published["hidden_size"] // heads)
  assert cfg.qkv_bias == (published["model_type"] == "qwen2")


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_presets_match_published_sizes(name):
  cfg = models.presets.get(name)
  assert round(cfg.num_params / 1e9, 3) == PUBLISHED_SIZES[name]
  shapes = models.param_shapes(cfg)  # abstract: no memory
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n == cfg.num_params


def test_unknown_preset_and_bad_config():
  with pytest.raises(KeyError, match="unknown model preset 'gpt-5'"):
    models.presets.get("gpt-5")
  with pytest.raises(ValueError, match="num_kv_heads"):
    models.presets.get("tiny").replace(num_kv_heads=3)
