"""Model families: what differs between the decoder architectures sentijax runs, one row each.

Every family is the same pre-norm decoder (decoder.py): RMSNorm, rotary position embeddings,
grouped-query attention, a SwiGLU MLP and the one LM head `project_logits` (which applies an
optional final-logit soft-cap). A row names the family's Hugging Face names, transformers'
defaults for config.json keys that may be omitted, q/k/v biases, the RoPE types it accepts, the
config.json key of its logit soft-cap (Gemma-2's `final_logit_softcapping`), what it refuses on
import, and the keys it writes on export. Adding a family is adding a row here (and a logit
parity test against transformers in tests/models/test_hf.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

NORM = "rmsnorm"  # every family: decoder.RMSNorm (a LayerNorm family would add a switch there)


@dataclasses.dataclass(frozen=True)
class Family:
  """One decoder architecture: `model_type` is config.json's and ModelConfig.architecture."""
  model_type: str
  hf_class: str  # config.json "architectures" (transformers' *ForCausalLM)
  defaults: Mapping[str, Any]  # transformers' values for keys a config.json may omit
  qkv_bias: bool = False
  rope_types: tuple[str, ...] = ("default", "llama3")
  softcap_key: str | None = None  # config.json key of the final-logit soft-cap, if any
  refuse: Callable[[dict], str | None] = lambda hf: None  # why a config.json is not supported
  export_keys: Callable[[Any], dict] = lambda cfg: {}  # family keys written into config.json


def _no_biases(hf: dict) -> str | None:
  if hf.get("mlp_bias") or hf.get("attention_bias"):
    return "mlp_bias / attention_bias are not supported"
  return None


def _mistral_refuse(hf: dict) -> str | None:
  window = hf.get("sliding_window", 4096)  # MistralConfig's default when omitted
  if window is not None and window < hf.get("max_position_embeddings", 131072):
    return (f"sliding_window={window} (< max_position_embeddings) is sliding-window attention, "
            "which is not supported; every layer must use full attention (sliding_window null)")
  return _no_biases(hf)


_LLAMA = Family(
    model_type="llama", hf_class="LlamaForCausalLM",
    defaults=dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2, num_key_value_heads=None),
    refuse=_no_biases,
    export_keys=lambda cfg: dict(attention_bias=False, mlp_bias=False, pretraining_tp=1))

_QWEN2 = Family(
    model_type="qwen2", hf_class="Qwen2ForCausalLM",
    defaults=dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768,
                  rope_theta=10000.0, bos_token_id=None, eos_token_id=None,
                  num_key_value_heads=32),
    qkv_bias=True,  # q/k/v biases are implied by the architecture
    refuse=lambda hf: "mlp_bias is not supported" if hf.get("mlp_bias") else None,
    export_keys=lambda cfg: dict(use_sliding_window=False, sliding_window=None,
                                 max_window_layers=cfg.num_layers,
                                 layer_types=["full_attention"] * cfg.num_layers))

_MISTRAL = Family(
    model_type="mistral", hf_class="MistralForCausalLM",
    defaults=dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=131072,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2, num_key_value_heads=8),
    rope_types=("default",),
    refuse=_mistral_refuse,
    export_keys=lambda cfg: dict(sliding_window=None))

FAMILIES: Mapping[str, Family] = {f.model_type: f for f in (_LLAMA, _QWEN2, _MISTRAL)}


def get(model_type: str | None, where: str = "") -> Family:
  """The family of `model_type`; ValueError naming the supported ones."""
  if model_type not in FAMILIES:
    raise ValueError(f"{where + ': ' if where else ''}unsupported architecture {model_type!r}; "
                     f"supported model_type: {', '.join(sorted(FAMILIES))}")
  return FAMILIES[model_type]
