"""config.json <-> ModelConfig for Hugging Face checkpoints of the families in families.py.

Reading follows transformers: its defaults per family for omitted keys, and its precedence
of the 4.x `rope_scaling` over the 5.x `rope_parameters`. Writing serves every stack at once
(transformers 4.x and 5.x, vLLM): see `config_to_hf`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sentijax import atomic
from sentijax.models import families
from sentijax.models.decoder import ModelConfig, RopeScaling


class CheckpointError(ValueError):
  """A problem with an HF checkpoint directory; the message names the file/tensor/key."""


def _get(hf: dict, key: str, path: Path, default: Any = KeyError) -> Any:
  if key in hf:
    return hf[key]
  if default is KeyError:
    raise CheckpointError(f"{path}: missing required key {key!r}")
  return default


def _rope_from_hf(hf: dict, path: Path, family: families.Family
                  ) -> tuple[float, RopeScaling | None]:
  """(rope_theta, llama3 scaling or None) from `rope_scaling` (4.x) or `rope_parameters` (5.x).

  A non-null `rope_scaling` wins, as in transformers 4 (which knows no other key) and 5.
  """
  for key in ("rope_scaling", "rope_parameters"):
    if not isinstance(hf.get(key) or {}, dict):
      raise CheckpointError(f"{path}: {key} must be a JSON object or null")
  src = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  rope_theta = src.get("rope_theta", hf.get("rope_theta", family.defaults["rope_theta"]))
  rope_type = src.get("rope_type", src.get("type", "default"))
  if rope_type not in family.rope_types + (None,):
    raise CheckpointError(f"{path}: rope_type {rope_type!r} is not supported for "
                          f"{family.model_type} (supported: {', '.join(family.rope_types)})")
  if rope_type in ("default", None):
    return float(rope_theta), None
  try:
    return float(rope_theta), RopeScaling(float(src["factor"]), float(src["low_freq_factor"]),
                                          float(src["high_freq_factor"]),
                                          int(src["original_max_position_embeddings"]))
  except KeyError as e:
    raise CheckpointError(f"{path}: llama3 rope scaling lacks key {e.args[0]!r}") from None


def config_from_hf(hf: dict, path: Path | str = "config.json") -> ModelConfig:
  """ModelConfig from a parsed config.json (transformers 4 or 5 layout, transformers' defaults)."""
  path = Path(path)
  model_type = hf.get("model_type")
  if model_type not in families.FAMILIES:
    raise CheckpointError(
        f"{path}: unsupported architecture (model_type={model_type!r}, "
        f"architectures={hf.get('architectures')}); sentijax supports model_type "
        f"{', '.join(repr(m) for m in sorted(families.FAMILIES))} (sentijax/models/families.py)")
  family = families.FAMILIES[model_type]
  defaults = family.defaults
  why = family.refuse(hf)
  if why:
    raise CheckpointError(f"{path}: {why} ({model_type})")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{path}: hidden_act={hf['hidden_act']!r} is not supported (silu only)")
  if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
    raise CheckpointError(f"{path}: sliding-window attention (use_sliding_window / layer_types) "
                          f"is not supported; every layer must use full attention")
  rope_theta, scaling = _rope_from_hf(hf, path, family)
  num_heads = int(_get(hf, "num_attention_heads", path))
  hidden = int(_get(hf, "hidden_size", path))
  eos = hf.get("eos_token_id", defaults["eos_token_id"])
  fields = dict(
      architecture=model_type,
      vocab_size=int(_get(hf, "vocab_size", path)),
      hidden_size=hidden,
      intermediate_size=int(_get(hf, "intermediate_size", path)),
      num_layers=int(_get(hf, "num_hidden_layers", path)),
      num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads", defaults["num_key_value_heads"])
                       or num_heads),
      head_dim=int(hf.get("head_dim") or hidden // num_heads),
      rope_theta=rope_theta,
      rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
      tie_embeddings=bool(hf.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
      qkv_bias=family.qkv_bias,
      logit_softcap=float(hf.get(family.softcap_key) or 0.0) if family.softcap_key else 0.0,
      max_position_embeddings=int(hf.get("max_position_embeddings",
                                         defaults["max_position_embeddings"])),
      bos_token_id=hf.get("bos_token_id", defaults["bos_token_id"]),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
  )
  try:
    return ModelConfig(**fields)
  except ValueError as e:  # e.g. heads not a multiple of kv heads
    raise CheckpointError(f"{path}: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
  """config.json that transformers 4.x and 5.x and vLLM all read.

  RoPE is written twice: transformers 5's `rope_parameters`, and the `rope_theta` +
  `rope_scaling` pair (null for plain RoPE) of the published Llama-3.1/Qwen2.5 configs, which
  transformers 4.x and vLLM read. `dtype` (5.x) and `torch_dtype` (4.x) likewise.
  """
  rope_scaling = None
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope_scaling = {"rope_type": "llama3", "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings}
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  family = families.get(cfg.architecture)
  hf = {
      "architectures": [family.hf_class],
      "model_type": cfg.architecture,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_parameters": {"rope_theta": cfg.rope_theta, **(rope_scaling or {"rope_type": "default"})},
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope_scaling,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos,
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "dtype": dtype,
      "torch_dtype": dtype,
  }
  if family.softcap_key:
    hf[family.softcap_key] = cfg.logit_softcap or None
  elif cfg.logit_softcap:
    raise CheckpointError(f"logit_softcap={cfg.logit_softcap}: the {cfg.architecture} family has "
                          "no config.json key for it (families.py softcap_key)")
  hf.update(family.export_keys(cfg))
  return hf


def read_config(path: str | os.PathLike) -> ModelConfig:
  """ModelConfig from `path`/config.json; CheckpointError names the file and key."""
  cfg_path = Path(path) / "config.json"
  if not cfg_path.is_file():
    raise CheckpointError(f"{cfg_path}: not found; an HF model directory needs config.json")
  try:
    hf = json.loads(cfg_path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{cfg_path}: corrupt JSON ({e})") from None
  if not isinstance(hf, dict):
    raise CheckpointError(f"{cfg_path}: expected a JSON object")
  return config_from_hf(hf, cfg_path)


def save_config(cfg: ModelConfig, directory: str | os.PathLike, dtype: str = "float32"):
  """Writes `directory`/config.json atomically."""
  atomic.write_json(Path(directory) / "config.json", config_to_hf(cfg, dtype), indent=2)
