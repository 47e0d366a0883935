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
from jax.sharding import NamedSharding, PartitionSpec as P

from sentijax import sharding
from sentijax.models import hf, presets
from sentijax.models.decoder import (ModelConfig, RopeScaling, default_positions, forward,
                                     forward_hidden, init_params, logical_axes, output_kernel,
                                     param_shapes, project_logits)
from sentijax.models.kv_cache import (KVCache, forward_with_cache, init_cache, unstack_cache,
                                      unstack_layers)
from sentijax.models.hf import CheckpointError

__all__ = [
    "CheckpointError", "KVCache", "ModelConfig", "RopeScaling", "apply", "check_tokenizer",
    "default_positions", "forward", "forward_hidden", "forward_with_cache", "init", "init_cache",
    "init_params", "load_hf", "logical_axes", "output_kernel", "param_shapes", "presets",
    "project_logits",
    "resolve_dtype", "save_hf", "shardings_for", "unstack_cache", "unstack_layers",
]


def resolve_dtype(name: str) -> str:
  """"auto" -> bfloat16 on accelerators, float32 on CPU (where XLA has no fast bf16 matmuls)."""
  if name in ("", "auto"):
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return str(jnp.dtype(name))


def shardings_for(cfg: ModelConfig, mesh, rules) -> Any:
  """NamedShardings for the params of `cfg` on `mesh` under logical `rules` (MeshError when a
  rule splits a dimension its mesh axes do not divide)."""
  return sharding.named_shardings(logical_axes(cfg), param_shapes(cfg), mesh, rules)


def init(cfg: ModelConfig, rng: jax.Array | int = 0, mesh=None, rules=None) -> Any:
  """Random params; sharded on `mesh` (initialised in place, never whole on one device)."""
  rng = jax.random.key(rng) if isinstance(rng, int) else rng
  if mesh is None:
    return jax.jit(init_params, static_argnums=0)(cfg, rng)
  out_shardings = shardings_for(cfg, mesh, rules)
  return jax.jit(init_params, static_argnums=0, out_shardings=out_shardings)(cfg, rng)


def load_hf(path: str | os.PathLike, dtype: Any = None, *, compute_dtype: str | None = None,
            mesh=None, rules=None, layers=None) -> tuple[ModelConfig, Any]:
  """Loads a local HF directory. Returns (config, params).

  `dtype`: param dtype (default float32). `compute_dtype`: activations (default = param dtype).
  With `mesh` and `rules`, each tensor is streamed straight into its sharding. `layers`: only
  these decoder layers (ascending indices; embeddings, final norm and head kept), the others
  never read; None = all.
  """
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: model directory not found")
  cfg = hf.read_config(path)
  if layers is not None:
    cfg = hf.select_layers(cfg, layers, source=path / "config.json")
  param_dtype = str(jnp.dtype(dtype or "float32"))
  cfg = cfg.replace(param_dtype=param_dtype, dtype=compute_dtype or param_dtype)
  shardings = shardings_for(cfg, mesh, rules) if mesh is not None else None
  return cfg, hf.load_params(cfg, path, shardings, dtype=param_dtype, layers=layers)


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


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(cfg, logits_sharding, params, input_ids, segment_ids, positions):
  input_ids = input_ids.astype(jnp.int32)
  segment_ids = (jnp.ones_like(input_ids) if segment_ids is None
                 else segment_ids.astype(jnp.int32))
  positions = default_positions(segment_ids) if positions is None else positions.astype(jnp.int32)
  logits = forward(cfg, params, input_ids, segment_ids_BxT=segment_ids, positions_BxT=positions)
  if logits_sharding is not None:
    logits = jax.lax.with_sharding_constraint(logits, logits_sharding)
  return logits


def _device_ready(x):
  """jax Arrays pass through untouched (their sharding, possibly over several hosts, is kept);
  anything else (lists, numpy, torch-on-CPU) becomes an int32 numpy array."""
  if x is None or isinstance(x, jax.Array):
    return x
  return np.asarray(x, np.int32)


def _logits_sharding(input_ids) -> NamedSharding | None:
  """Logits rows split like the rows of a batch-sharded `input_ids` (the rest left to XLA)."""
  s = getattr(input_ids, "sharding", None)
  if not isinstance(input_ids, jax.Array) or not isinstance(s, NamedSharding):
    return None
  if not s.spec or s.spec[0] is None:
    return None
  return NamedSharding(s.mesh, P(s.spec[0], P.UNCONSTRAINED, P.UNCONSTRAINED))


def apply(cfg: ModelConfig, params: Any, input_ids, attention_mask=None, position_ids=None,
          segment_ids=None) -> jax.Array:
  """Float32 logits [batch, length, vocab].

  `attention_mask` (1 = token, 0 = padding; left or right padding) or `segment_ids` (packed rows:
  1..k per sequence, 0 = padding). Positions default to counting non-padding tokens. jax Array
  inputs are used where they are (sharded, even over several hosts); the logits keep the row
  sharding of `input_ids`.
  """
  if segment_ids is None:
    segment_ids = attention_mask
  return _apply(cfg, _logits_sharding(input_ids), params, _device_ready(input_ids),
                _device_ready(segment_ids), _device_ready(position_ids))
