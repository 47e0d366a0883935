"""Published models by name: the values of each -Instruct release's config.json on the hub.

Shapes, RoPE, norm eps and tie flag are those of the base releases too; bos/eos are the Instruct
ones (Llama: <|end_of_text|>, <|eom_id|>, <|eot_id|>; Qwen2.5: <|im_end|>).
"""
from sentijax.models.decoder import ModelConfig, RopeScaling

_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
_LLAMA32_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
_LLAMA_TOKENS = dict(bos_token_id=128000, eos_token_id=(128001, 128008, 128009))
_QWEN_TOKENS = dict(bos_token_id=151643, eos_token_id=151645)


def _llama(**kw) -> ModelConfig:
  kw.setdefault("head_dim", 128)
  return ModelConfig(architecture="llama", vocab_size=128256, rope_theta=500000.0,
                     rms_norm_eps=1e-5, max_position_embeddings=131072, **_LLAMA_TOKENS, **kw)


def _qwen(**kw) -> ModelConfig:
  kw.setdefault("head_dim", 128)
  kw.setdefault("vocab_size", 152064)
  return ModelConfig(architecture="qwen2", rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True,
                     max_position_embeddings=32768, **_QWEN_TOKENS, **kw)


PRESETS: dict[str, ModelConfig] = {
    # <1M params: unit tests and the offline demo job. Vocab fits the demo tokenizer.
    "tiny": ModelConfig(architecture="llama", vocab_size=1024, hidden_size=64,
                        intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=True,
                        max_position_embeddings=2048),
    "llama-3.2-1b": _llama(hidden_size=2048, intermediate_size=8192, num_layers=16,
                           num_heads=32, num_kv_heads=8, head_dim=64, rope_scaling=_LLAMA32_ROPE,
                           tie_embeddings=True),
    "llama-3.2-3b": _llama(hidden_size=3072, intermediate_size=8192, num_layers=28,
                           num_heads=24, num_kv_heads=8, rope_scaling=_LLAMA32_ROPE,
                           tie_embeddings=True),
    "llama-3.1-8b": _llama(hidden_size=4096, intermediate_size=14336, num_layers=32,
                           num_heads=32, num_kv_heads=8, rope_scaling=_LLAMA31_ROPE),
    "llama-3.1-70b": _llama(hidden_size=8192, intermediate_size=28672, num_layers=80,
                            num_heads=64, num_kv_heads=8, rope_scaling=_LLAMA31_ROPE),
    "qwen2.5-0.5b": _qwen(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                          num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                          tie_embeddings=True),
    "qwen2.5-1.5b": _qwen(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                          num_layers=28, num_heads=12, num_kv_heads=2, tie_embeddings=True),
    "qwen2.5-7b": _qwen(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                        num_kv_heads=4),
    "qwen2.5-72b": _qwen(hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64,
                         num_kv_heads=8),
}


def get(name: str, **overrides) -> ModelConfig:
  """The preset `name` with field overrides (e.g. dtype="bfloat16", remat=True)."""
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
  return PRESETS[name].replace(**overrides)
