"""KV-cache forward passes: prefill and decode steps over a cache of past keys and values.

The cache holds k/v per layer [L, B, S, K, D], each slot's segment id and the next write index;
new tokens attend to every filled slot of their segment (`attention.attention_mask` with the
cache index as the queries' first slot). A decode loop may hold the cache per layer
(`unstack_cache`) and run the layers one after another on `unstack_layers` params.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sentijax.models import attention, decoder

Array = jax.Array
PyTree = Any


@dataclasses.dataclass
class KVCache:
  """Decoding cache: k/v per layer [L, B, S, K, D] (or `unstack_cache`'s tuples of [B, S, K, D]),
  segment id per slot [B, S], write index."""
  k: Array
  v: Array
  segment_ids: Array
  index: Array


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "segment_ids", "index"],
                                 meta_fields=[])


def unstack_layers(params: PyTree) -> tuple[PyTree, ...]:
  """(Inside jit, outside a decode loop) the params of each layer as its own arrays."""
  layers = params["layers"]
  num_layers = jax.tree.leaves(layers)[0].shape[0]
  return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num_layers))


def unstack_cache(cache: KVCache) -> KVCache:
  """The cache with k/v as tuples of per-layer [B, S, K, D] arrays (`forward_with_cache`'s
  `layers` mode)."""
  return KVCache(tuple(cache.k), tuple(cache.v), cache.segment_ids, cache.index)


def init_cache(cfg: decoder.ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache of `max_len` slots per row (segment 0 everywhere: nothing to attend to)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def forward_with_cache(cfg: decoder.ModelConfig, params: PyTree, tokens_BxT: Array,
                       positions_BxT: Array, segment_ids_BxT: Array, cache: KVCache,
                       last_only: bool = False,
                       layers: tuple[PyTree, ...] | None = None) -> tuple[Array, KVCache]:
  """Runs T new tokens at slots cache.index.. ; returns (logits [B, T or 1, V], new cache).

  Decoding: prefill with the (left-padded) prompt and its 0/1 mask as segment ids, then feed
  one token at a time with segment id 1 and the next position of each row.

  `layers` (`unstack_layers(params)`, with an `unstack_cache` cache): the layers run one after
  another instead of as a scan. For the decode step: a scan slices every layer's weights and
  cache out of the stacked arrays at each token (copies as large as the model and the cache);
  here the weights are sliced once per decode and each layer's cache is updated in place
  (a SmolLM2 step at 16 rows: 2x faster on a CPU), at the price of a longer compile.
  """
  kv_segment_ids = jax.lax.dynamic_update_slice(cache.segment_ids,
                                                segment_ids_BxT.astype(jnp.int32),
                                                (0, cache.index))
  mask_BxTxS = attention.attention_mask(segment_ids_BxT, kv_segment_ids, cache.index)
  if layers is None:
    logits, (k, v) = decoder.Decoder(cfg).apply({"params": params}, tokens_BxT, positions_BxT,
                                                mask_BxTxS, cache.index, (cache.k, cache.v),
                                                last_only)
  else:
    logits, k, v = _forward_layers(cfg, params, layers, tokens_BxT, positions_BxT, mask_BxTxS,
                                   cache, last_only)
  return logits, KVCache(k, v, kv_segment_ids, cache.index + tokens_BxT.shape[1])


def _forward_layers(cfg, params, layers, tokens_BxT, positions_BxT, mask_BxTxS, cache,
                    last_only):
  """`Decoder` with the layers as a loop over per-layer params and caches."""
  dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  if len(layers) != cfg.num_layers or len(cache.k) != cfg.num_layers:
    raise ValueError(f"{len(layers)} layer params and {len(cache.k)} layer caches for a "
                     f"{cfg.num_layers}-layer model: use unstack_layers / unstack_cache")
  x_BxTxE = decoder.embed_tokens(params["embedding"], tokens_BxT, dt)
  new_k, new_v = [], []
  for layer_params, k, v in zip(layers, cache.k, cache.v):
    x_BxTxE, (k, v) = decoder.Block(cfg).apply({"params": layer_params}, x_BxTxE,
                                               positions_BxT, mask_BxTxS, cache.index, (k, v))
    new_k.append(k)
    new_v.append(v)
  if last_only:
    x_BxTxE = x_BxTxE[:, -1:]
  x_BxTxE = decoder.RMSNorm(cfg.rms_norm_eps, pdt).apply({"params": params["final_norm"]},
                                                         x_BxTxE)
  logits_BxTxV = decoder.project_logits(x_BxTxE, decoder.output_kernel(cfg, params), dt,
                                        cfg.logit_softcap)
  return logits_BxTxV, tuple(new_k), tuple(new_v)
