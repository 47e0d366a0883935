"""A prompt prefix shared by every row of a scoring run, computed once.

SentiBench prompts of one dataset start with the same instruction (36-192 tokens: 2-51% of a
prompt). Its keys and values do not depend on what follows, so they are computed once per run
(`compute`) and every batch starts from a KV cache that already holds them (`batch_cache`): the
rows feed only their own suffix. The cache then reads

    slots [0, P)       the prefix (segment 1)
    slots [P, S)       filler up to `slots` (segment 0: masked)
    slots [S, S + T)   each row's left-padded suffix, positions P, P+1, ... (as in the whole prompt)

so attention, positions and the repetition penalty see exactly the whole prompt; only fp32
rounding differs (other matmul shapes). `slots` is the prefix length rounded up to a multiple
of 64, so datasets whose instructions differ by a few tokens share one compiled program.

    n = prefix.shared_length(seqs)                         # host
    p = prefix.compute(cfg, params, seqs[0][:n])           # once per run
    cache = prefix.batch_cache(cfg, p, rows, suffix_len + max_new_tokens)   # inside jit
    positions_BxT = prefix.suffix_positions(p, suffix_mask_BxT)
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from sentijax import models

Array = jax.Array
PyTree = Any

MIN_TOKENS = 16  # shorter shared prefixes are not worth a program of their own
SLOT_MULTIPLE = 64  # instructions a few tokens apart share one compiled program


def shared_length(seqs: Sequence[Sequence[int]], min_tokens: int = MIN_TOKENS) -> int:
  """Tokens every sequence starts with, leaving each at least one token of its own (the last
  position is the one scored); 0 when fewer than `min_tokens` (or fewer than 2 sequences)."""
  if len(seqs) < 2:
    return 0
  first = np.asarray(seqs[0])
  n = min(len(s) for s in seqs) - 1
  for s in seqs[1:]:
    if n <= 0:
      break
    diff = np.flatnonzero(np.asarray(s[:n]) != first[:n])
    n = int(diff[0]) if diff.size else n
  return n if n >= min_tokens else 0


def slots_for(length: int) -> int:
  """Cache slots reserved for a prefix of `length` tokens: a multiple of SLOT_MULTIPLE."""
  return -(-max(int(length), 0) // SLOT_MULTIPLE) * SLOT_MULTIPLE


@dataclasses.dataclass(frozen=True)
class Prefix:
  """The prefix's keys/values [layers, 1, slots, kv_heads, head_dim], its token ids and segment
  ids [slots] (filler: id 0, segment 0). A pytree of arrays only: one compiled program per
  number of slots, whatever the prefix length."""
  k: Array
  v: Array
  ids_S: Array
  segment_ids_S: Array

  @property
  def length(self) -> Array:
    return jnp.sum(self.segment_ids_S)

  @property
  def slots(self) -> int:
    return int(self.k.shape[2])

  def seen(self, ids_C: Array) -> Array:
    """(Inside jit) bool [C]: which of `ids_C` occur in the prefix (the repetition penalty)."""
    return jnp.any((self.ids_S[:, None] == ids_C[None, :]) & (self.segment_ids_S[:, None] > 0),
                   axis=0)


jax.tree_util.register_dataclass(Prefix, data_fields=["k", "v", "ids_S", "segment_ids_S"],
                                 meta_fields=[])


@functools.partial(jax.jit, static_argnums=0)
def _prefix_kv(cfg: models.ModelConfig, params: PyTree, ids_1xS: Array,
               segment_ids_1xS: Array) -> tuple[Array, Array]:
  positions_1xS = models.default_positions(segment_ids_1xS)
  cache = models.init_cache(cfg, 1, ids_1xS.shape[1])
  _, cache = models.forward_with_cache(cfg, params, ids_1xS, positions_1xS, segment_ids_1xS,
                                       cache, last_only=True)
  return cache.k, cache.v


def compute(cfg: models.ModelConfig, params: PyTree, ids: Sequence[int]) -> Prefix:
  """Runs the prefix tokens once (one row, right-filled to `slots_for(len(ids))`)."""
  ids = tuple(int(i) for i in ids)
  if not ids:
    raise ValueError("a shared prefix needs at least one token")
  slots = slots_for(len(ids))
  ids_1xS = np.zeros((1, slots), np.int32)
  ids_1xS[0, :len(ids)] = ids
  seg_1xS = np.zeros((1, slots), np.int32)
  seg_1xS[0, :len(ids)] = 1
  k, v = _prefix_kv(cfg, params, jnp.asarray(ids_1xS), jnp.asarray(seg_1xS))
  return Prefix(k, v, jnp.asarray(ids_1xS[0]), jnp.asarray(seg_1xS[0]))


def batch_cache(cfg: models.ModelConfig, p: Prefix, rows: int, new_slots: int,
                cache_sharding: NamedSharding | None = None) -> models.KVCache:
  """(Inside jit) a KV cache for `rows` rows: the prefix in front of `new_slots` empty slots;
  the write index is the first empty slot. `cache_sharding`: of the [L, B, S, K, D] k/v."""
  layers, _, slots, kv_heads, head_dim = p.k.shape
  dt = jnp.dtype(cfg.dtype)

  def rows_of(x):
    empty = jnp.zeros((layers, rows, new_slots, kv_heads, head_dim), dt)
    full = jnp.concatenate([jnp.broadcast_to(x.astype(dt), (layers, rows) + x.shape[2:]), empty],
                           axis=2)
    return full if cache_sharding is None else jax.lax.with_sharding_constraint(full,
                                                                                 cache_sharding)

  seg_BxS = jnp.concatenate([jnp.broadcast_to(p.segment_ids_S, (rows, slots)),
                             jnp.zeros((rows, new_slots), jnp.int32)], axis=1)
  return models.KVCache(rows_of(p.k), rows_of(p.v), seg_BxS, jnp.asarray(slots, jnp.int32))


def suffix_positions(p: Prefix, mask_BxT: Array) -> Array:
  """Positions of left-padded suffix tokens that follow the prefix (as in the whole prompt)."""
  return models.default_positions(mask_BxT) + p.length * (mask_BxT > 0)
