"""Public model API: presets, HF import/export, and a jitted forward.

    from sentijax import models
    cfg, params = models.load_hf("/path/to/Llama-3.2-1B-Instruct", dtype="bfloat16")
    logits = models.apply(cfg, params, input_ids, attention_mask=mask)   # float32 [B, L, V]
    models.save_hf(cfg, params, "/tmp/out", tokenizer=tokenizer)
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sentijax.models import hf, presets
from sentijax.models.decoder import (KVCache, ModelConfig, RopeScaling, default_positions,
                                     forward, forward_hidden, forward_with_cache, init_cache,
                                     init_params, logical_axes, output_kernel, param_shapes)
from sentijax.models.hf import CheckpointError

__all__ = [
    "CheckpointError", "KVCache", "ModelConfig", "RopeScaling", "apply", "check_tokenizer",
    "default_positions", "forward", "forward_hidden", "forward_with_cache", "init", "init_cache",
    "init_params", "load_hf", "logical_axes", "output_kernel", "param_shapes", "presets",
    "resolve_dtype", "save_hf", "shardings_for",
]


def resolve_dtype(name: str) -> str:
  """"auto" -> bfloat16 on accelerators, float32 on CPU (where XLA has no fast bf16 matmuls)."""
  if name in ("", "auto"):
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return str(jnp.dtype(name))


def shardings_for(cfg: ModelConfig, mesh, rules) -> Any:
  """NamedShardings for the params of `cfg` on `mesh` under logical `rules`."""
  from sentijax import sharding
  return sharding.param_shardings(cfg, mesh, rules)


def init(cfg: ModelConfig, rng: jax.Array | int = 0, mesh=None, rules=None) -> Any:
  """Random params; sharded on `mesh` (initialised in place, never whole on one device)."""
  rng = jax.random.key(rng) if isinstance(rng, int) else rng
  if mesh is None:
    return jax.jit(init_params, static_argnums=0)(cfg, rng)
  out_shardings = shardings_for(cfg, mesh, rules)
  return jax.jit(init_params, static_argnums=0, out_shardings=out_shardings)(cfg, rng)


def load_hf(path: str | os.PathLike, dtype: Any = None, *, compute_dtype: str | None = None,
            mesh=None, rules=None) -> tuple[ModelConfig, Any]:
  """Loads a local HF directory. Returns (config, params).

  `dtype`: param dtype (default float32). `compute_dtype`: activations (default = param dtype).
  With `mesh` and `rules`, each tensor is streamed straight into its sharding.
  """
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: model directory not found")
  cfg = hf.read_config(path)
  param_dtype = str(jnp.dtype(dtype or "float32"))
  cfg = cfg.replace(param_dtype=param_dtype, dtype=compute_dtype or param_dtype)
  shardings = shardings_for(cfg, mesh, rules) if mesh is not None else None
  return cfg, hf.load_params(cfg, path, shardings, dtype=param_dtype)


def save_hf(cfg: ModelConfig, params: Any, path: str | os.PathLike, tokenizer=None,
            dtype: str | None = None, max_shard_bytes: int = 4 << 30) -> Path:
  """Exports an HF directory (config.json, safetensors, tokenizer) loadable by transformers."""
  path = Path(path)
  dtype = dtype or cfg.param_dtype
  if tokenizer is not None:
    check_tokenizer(cfg, tokenizer, where=str(path))
  hf.save_params(cfg, params, path, dtype=dtype, max_shard_bytes=max_shard_bytes)
  if jax.process_index() == 0:
    hf.save_config(cfg, path, dtype=dtype)
    if tokenizer is not None:
      tokenizer.save_pretrained(str(path))
  return path


def check_tokenizer(cfg: ModelConfig, tokenizer, where: str = "") -> None:
  """Raises if the tokenizer can produce ids outside the model's embedding table."""
  n = len(tokenizer)
  if n > cfg.vocab_size:
    raise CheckpointError(
        f"{where + ': ' if where else ''}tokenizer has {n} tokens but the model's vocab_size is "
        f"{cfg.vocab_size}: ids >= {cfg.vocab_size} would index past the embedding table; "
        f"use the tokenizer that belongs to this model")


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, input_ids, segment_ids, positions):
  return forward(cfg, params, input_ids, segment_ids_BxT=segment_ids, positions_BxT=positions)


def apply(cfg: ModelConfig, params: Any, input_ids, attention_mask=None, position_ids=None,
          segment_ids=None) -> jax.Array:
  """Float32 logits [batch, length, vocab].

  `attention_mask` (1 = token, 0 = padding; left or right padding) or `segment_ids` (packed rows:
  1..k per sequence, 0 = padding). Positions default to counting non-padding tokens.
  """
  input_ids = jnp.asarray(np.asarray(input_ids), jnp.int32)
  if segment_ids is None:
    segment_ids = (jnp.ones_like(input_ids) if attention_mask is None
                   else jnp.asarray(np.asarray(attention_mask), jnp.int32))
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  if position_ids is None:
    position_ids = default_positions(segment_ids)
  return _apply(cfg, params, input_ids, segment_ids, jnp.asarray(position_ids, jnp.int32))
