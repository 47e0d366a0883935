"""KV-cache decoding: the one sampler of the SentiBench scorer, the local teacher and the server.

One jitted function per (model config, bucketed batch, bucketed prompt length, max_new_tokens):
prefill the left-padded prompts with `models.forward_with_cache(..., last_only=True)`, then a
`jax.lax.while_loop` feeds one token per step and exits as soon as every row has stopped. Each
row's positions continue from its own real length, so left padding is invisible to the model
(the same positions transformers' `generate` uses).

    out = sampling.greedy_decode(cfg, params, ids_BxT, mask_BxT, max_new_tokens=150,
                                 stop_ids=[eos_id, newline_id], pad_id=eos_id)
    out.tokens_BxN, out.lengths_B   # numpy; tokens after a row's stop token are pad_id

Stop rules: a row ends at the first token in `stop_ids` (the stop token is kept and counted in
`lengths_B`). `soft_stop_ids` end a row only once it has produced some text, i.e. a token that is
not in `blank_ids` (the scorer uses this for newlines: SentiBench's answer regex skips leading
whitespace after `Label:`, so a newline before any answer text must not end the answer).

`repetition_penalty` (transformers' processor: logits of ids already in the row, prompt without
padding and generated tokens, divided by it when positive, multiplied when negative) is applied
before each choice; at 1.0 the penalty code is not even compiled.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from sentijax import models, sharding
from sentijax import prefix as prefix_lib

Array = jax.Array
PyTree = Any

_NOT_STOP, _STOP, _SOFT_STOP, _END = 0, 1, 2, 3  # _END: ends a row, never blocked


class DecodeOutput(NamedTuple):
  """Host results of a decode: new tokens [B, N] (pad_id after each row's end) and lengths [B]."""
  tokens_BxN: np.ndarray
  lengths_B: np.ndarray


# --------------------------------------------------------------------------------------------
# Shape bucketing (one compile per bucket, not per batch).


def bucket_length(n: int, min_multiple: int = 64) -> int:
  """Rounds a length up to a coarse grid: multiples of 64 up to 512, then ~1/8 of its octave.

  300 -> 320, 700 -> 768, 4500 -> 5120: at most ~25% padding and a handful of distinct shapes.
  """
  n = max(int(n), 1)
  step = max(min_multiple, 1 << max(0, (n - 1).bit_length() - 3))
  return -(-n // step) * step


def bucket_batch(n: int, divisor: int = 1) -> int:
  """Rounds a row count up to divisor * a power of two (shardable, few distinct shapes)."""
  per_shard = -(-max(int(n), 1) // divisor)
  return divisor * (1 << (per_shard - 1).bit_length())


def left_pad(seqs: Sequence[Sequence[int]], length: int, rows: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded ids and 0/1 mask [rows, length]; filler rows hold one pad token (mask 1)."""
  ids_BxT = np.full((rows, length), pad_id, np.int32)
  mask_BxT = np.zeros((rows, length), np.int32)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"sequence {i} has {len(s)} tokens, more than the padded length {length}")
    if len(s):
      ids_BxT[i, length - len(s):] = s
      mask_BxT[i, length - len(s):] = 1
  mask_BxT[len(seqs):, -1] = 1  # filler rows: a real (pad) token keeps every softmax well-posed
  return ids_BxT, mask_BxT


# --------------------------------------------------------------------------------------------
# The jitted decode loop.


def filter_logits(logits_BxV: Array, top_k: int, top_p: Array) -> Array:
  """Top-k (0 = off), then nucleus: the smallest set whose mass reaches top_p (the argmax always
  stays); the rest get -inf."""
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass strictly above each entry
  kept_BxV = (before_BxV < top_p).at[:, 0].set(True)
  cutoff_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)


def row_keys(key: Array, rows: int) -> Array:
  """Per-row PRNG keys [rows]: row r gets fold_in(key, r), whatever the batch size."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(rows, dtype=jnp.uint32))


def seen_tokens(ids_BxT: Array, mask_BxT: Array, vocab_size: int) -> Array:
  """Bool [B, V]: which ids occur among each row's real (mask 1) tokens."""
  b = ids_BxT.shape[0]
  counts_BxV = jnp.zeros((b, vocab_size), jnp.int32).at[
      jnp.arange(b)[:, None], ids_BxT].add(mask_BxT.astype(jnp.int32))
  return counts_BxV > 0


def repetition_penalty(logits_BxV: Array, seen_BxV: Array, penalty: Array) -> Array:
  """transformers' RepetitionPenaltyLogitsProcessor: seen logits < 0 times the penalty, others
  divided by it (penalty 1 leaves them bit-identical)."""
  penalized_BxV = jnp.where(logits_BxV < 0, logits_BxV * penalty, logits_BxV / penalty)
  return jnp.where(seen_BxV, penalized_BxV, logits_BxV)


def init_decode_cache(cfg: models.ModelConfig, rows: int, length: int,
                      cache_sharding: NamedSharding | None) -> models.KVCache:
  """An empty KV cache for `rows` x `length` tokens, rows placed like the batch (inside jit)."""
  cache = models.init_cache(cfg, rows, length)
  if cache_sharding is None:
    return cache
  return dataclasses.replace(cache, k=jax.lax.with_sharding_constraint(cache.k, cache_sharding),
                             v=jax.lax.with_sharding_constraint(cache.v, cache_sharding))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sample", "top_k",
                                             "cache_sharding", "penalize", "per_layer"))
def _decode(cfg: models.ModelConfig, params: PyTree, ids_BxT: Array, mask_BxT: Array,
            stop_kind_V: Array, blank_V: Array, pad_id: Array, keys_B: Array, temperature: Array,
            top_p: Array, penalty: Array, min_new: Array, shared: prefix_lib.Prefix | None, *,
            max_new_tokens: int, sample: bool, top_k: int,
            cache_sharding: NamedSharding | None, penalize: bool,
            per_layer: bool) -> tuple[Array, Array]:
  b, t = ids_BxT.shape
  if shared is None:
    cache = init_decode_cache(cfg, b, t + max_new_tokens, cache_sharding)
    positions_BxT = models.default_positions(mask_BxT)
  else:  # the rows are suffixes of a prompt prefix already in the cache
    cache = prefix_lib.batch_cache(cfg, shared, b, t + max_new_tokens, cache_sharding)
    positions_BxT = prefix_lib.suffix_positions(shared, mask_BxT)
  logits_Bx1xV, cache = models.forward_with_cache(cfg, params, ids_BxT, positions_BxT, mask_BxT,
                                                  cache, last_only=True)
  next_pos_B = jnp.max(positions_BxT, axis=1).astype(jnp.int32) + 1
  rows_B = jnp.arange(b)
  # Tokens in each row so far (prompt without padding, then generated): repetition penalty.
  seen_BxV = jnp.zeros((b, 1), bool)
  if penalize:
    seen_BxV = seen_tokens(ids_BxT, mask_BxT, logits_Bx1xV.shape[-1])
    if shared is not None:
      seen_BxV = seen_BxV | seen_tokens(shared.ids_S[None], shared.segment_ids_S[None],
                                        logits_Bx1xV.shape[-1])
  blockable_V = (stop_kind_V == _STOP) | (stop_kind_V == _SOFT_STOP)

  def choose(logits_Bx1xV, seen_BxV, step):
    logits_BxV = logits_Bx1xV[:, 0].astype(jnp.float32)
    if penalize:
      logits_BxV = repetition_penalty(logits_BxV, seen_BxV, penalty)
    logits_BxV = jnp.where(blockable_V[None] & (step < min_new), -jnp.inf, logits_BxV)
    if not sample:
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = filter_logits(logits_BxV / temperature, top_k, top_p)
    step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, step)
    return jax.vmap(jax.random.categorical)(step_keys_B, logits_BxV).astype(jnp.int32)

  def write(state, tok_B, step):
    out_BxN, done_B, text_B, len_B, seen_BxV = state
    live_B = ~done_B
    out_BxN = out_BxN.at[:, step].set(jnp.where(live_B, tok_B, pad_id))
    kind_B = stop_kind_V[tok_B]
    stop_B = (kind_B == _STOP) | (kind_B == _END) | ((kind_B == _SOFT_STOP) & text_B)
    if penalize:
      seen_BxV = seen_BxV.at[rows_B, tok_B].set(True)
    return (out_BxN, done_B | stop_B, text_B | ~blank_V[tok_B], len_B + live_B.astype(jnp.int32),
            seen_BxV)

  tok_B = choose(logits_Bx1xV, seen_BxV, 0)
  init = (jnp.full((b, max_new_tokens), pad_id, jnp.int32), jnp.zeros((b,), bool),
          jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), seen_BxV)
  state = write(init, tok_B, 0)

  def cond(carry):
    step, _, _, _, state = carry
    return (step < max_new_tokens) & ~jnp.all(state[1])

  # Per-layer mode: weights sliced once, not at every step (see forward_with_cache).
  layers = models.unstack_layers(params) if per_layer else None

  def body(carry):
    step, tok_B, pos_B, cache, state = carry
    seg_Bx1 = jnp.ones((b, 1), jnp.int32)
    logits_Bx1xV, cache = models.forward_with_cache(cfg, params, tok_B[:, None], pos_B[:, None],
                                                    seg_Bx1, cache, last_only=True,
                                                    layers=layers)
    tok_B = choose(logits_Bx1xV, state[4], step)
    return step + 1, tok_B, pos_B + 1, cache, write(state, tok_B, step)

  if per_layer:
    cache = models.unstack_cache(cache)
  carry = (jnp.asarray(1, jnp.int32), tok_B, next_pos_B, cache, state)
  _, _, _, _, (out_BxN, _, _, len_B, _) = jax.lax.while_loop(cond, body, carry)
  return out_BxN, len_B


def stop_table(vocab_size: int, stop_ids: Sequence[int], soft_stop_ids: Sequence[int] = (),
               end_ids: Sequence[int] = ()) -> np.ndarray:
  """int32 [V]: 0 = continue, 1 = stop, 2 = stop once the row has produced text, 3 = end (a
  stop that `min_new_tokens` does not block)."""
  table_V = np.zeros((vocab_size,), np.int32)
  for ids, kind in ((end_ids, _END), (soft_stop_ids, _SOFT_STOP), (stop_ids, _STOP)):
    ids = np.asarray([i for i in ids if i is not None], np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      raise ValueError(f"stop ids {ids.tolist()} outside the vocabulary [0, {vocab_size})")
    table_V[ids] = kind
  return table_V


def decode(cfg: models.ModelConfig, params: PyTree, prompt_ids_BxT: np.ndarray,
           prompt_mask_BxT: np.ndarray, max_new_tokens: int, stop_ids: Sequence[int],
           pad_id: int, *, soft_stop_ids: Sequence[int] = (), blank_ids: Sequence[int] = (),
           end_ids: Sequence[int] = (),
           rng: Array | int | None = None, temperature: float = 1.0, top_p: float = 1.0,
           top_k: int = 0, min_new_tokens: int = 0, row_rngs: Array | None = None,
           mesh: Mesh | None = None, bucket: bool = True, min_rows: int = 1, rules=None,
           repetition_penalty: float = 1.0, shared: prefix_lib.Prefix | None = None,
           per_layer: bool | None = None) -> DecodeOutput:
  """Decodes up to `max_new_tokens` per left-padded prompt row: greedy, or sampled with `rng`.

  Args:
    prompt_ids_BxT / prompt_mask_BxT: left-padded prompts and their 0/1 mask.
    stop_ids: tokens that end a row (e.g. eos ids); kept in the output and counted in lengths.
    pad_id: written after a row's end.
    soft_stop_ids / blank_ids: see the module docstring.
    rng: PRNG key (or int seed) for temperature / top-k / top-p sampling (row r uses
      `row_keys(rng)[r]`); None = greedy.
    row_rngs: instead of `rng`, one key per prompt row [B] (a row then samples the same text in
      any batch: the local teacher keys rows by record).
    min_new_tokens: `stop_ids` and `soft_stop_ids` are blocked until a row has this many new
      tokens; `end_ids` (e.g. tokens containing a stop string) end a row at any step.
    mesh: shard the batch over this mesh (params already placed on it) by the `batch` rule of
      `rules` (sharding rules; None = the base config's, ('data', 'fsdp')).
    bucket: pad T and B up to `bucket_length` / `bucket_batch` to share compilations;
      `min_rows`: pad B to at least this (a server keeps one shape per length bucket).
    repetition_penalty: transformers' repetition penalty over each row's prompt (padding
      excluded) and the tokens generated so far; 1.0 = none.
    shared: a prefix every row continues (`prefix.compute`): the rows hold only what follows it.
    per_layer: decode steps run the layers one by one on per-layer weights and caches (CPU: a
      2x faster step, a ~4x longer compile, a second copy of the layer weights while decoding)
      instead of a scan over the stacked ones (on a GPU the scan's per-step slices cost little
      and compiles stay short). None = on CPU only.
  Returns:
    DecodeOutput(tokens_BxN [B, max_new_tokens] int32, lengths_B int32) as numpy.
  """
  ids_BxT = np.asarray(prompt_ids_BxT, np.int32)
  mask_BxT = np.asarray(prompt_mask_BxT, np.int32)
  if ids_BxT.ndim != 2 or ids_BxT.shape != mask_BxT.shape:
    raise ValueError(f"prompt ids {ids_BxT.shape} and mask {mask_BxT.shape} must be equal [B, T]")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if (mask_BxT[:, 1:] < mask_BxT[:, :-1]).any():
    raise ValueError("prompts must be left-padded (mask 0...0 1...1 per row)")
  b, t = ids_BxT.shape
  divisor = sharding.batch_divisor(mesh, rules)
  wanted = max(b, int(min_rows))
  rows = bucket_batch(wanted, divisor) if bucket else -(-wanted // divisor) * divisor
  length = bucket_length(t) if bucket else t
  if (rows, length) != (b, t):
    seqs = [row[m.astype(bool)] for row, m in zip(ids_BxT, mask_BxT)]
    ids_BxT, mask_BxT = left_pad(seqs, length, rows, pad_id)
  stop_kind_V = stop_table(cfg.vocab_size, stop_ids, soft_stop_ids, end_ids)
  blank_V = np.zeros((cfg.vocab_size,), bool)
  blank_V[np.asarray(list(blank_ids), np.int64)] = True

  sample = rng is not None or row_rngs is not None
  if row_rngs is not None:
    if len(row_rngs) != b:
      raise ValueError(f"row_rngs has {len(row_rngs)} keys for {b} prompt rows")
    keys_B = jnp.concatenate([row_rngs, row_keys(jax.random.key(0), rows - b)])
  else:
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    keys_B = row_keys(jax.random.key(0) if key is None else key, rows)
  cache_sharding = None
  ids, mask = jnp.asarray(ids_BxT), jnp.asarray(mask_BxT)
  if mesh is not None:
    ids = jax.device_put(ids_BxT, sharding.batch_sharding(mesh, rules))
    mask = jax.device_put(mask_BxT, sharding.batch_sharding(mesh, rules))
    cache_sharding = sharding.batch_sharding(mesh, rules, batch_dim=1)
  out_BxN, len_B = _decode(cfg, params, ids, mask, jnp.asarray(stop_kind_V),
                           jnp.asarray(blank_V), jnp.asarray(pad_id, jnp.int32), keys_B,
                           jnp.asarray(max(temperature, 1e-6), jnp.float32),
                           jnp.asarray(top_p, jnp.float32),
                           jnp.asarray(repetition_penalty, jnp.float32),
                           jnp.asarray(min_new_tokens, jnp.int32), shared,
                           max_new_tokens=int(max_new_tokens), sample=sample,
                           top_k=min(int(top_k), cfg.vocab_size), cache_sharding=cache_sharding,
                           penalize=float(repetition_penalty) != 1.0,
                           per_layer=(jax.default_backend() == "cpu" if per_layer is None
                                      else bool(per_layer)))
  return DecodeOutput(sharding.to_host(out_BxN)[:b], sharding.to_host(len_B)[:b])


def greedy_decode(cfg: models.ModelConfig, params: PyTree, prompt_ids_BxT: np.ndarray,
                  prompt_mask_BxT: np.ndarray, max_new_tokens: int, stop_ids: Sequence[int],
                  pad_id: int, **kw) -> DecodeOutput:
  """Greedy KV-cache decoding (argmax each step); see `decode` for the arguments."""
  kw.pop("rng", None)
  return decode(cfg, params, prompt_ids_BxT, prompt_mask_BxT, max_new_tokens, stop_ids, pad_id,
                **kw)


# --------------------------------------------------------------------------------------------
# Per-row sampling: rows with different settings in one jitted step (the server's batches).


@dataclasses.dataclass(frozen=True)
class RowSampling:
  """Sampler settings per row, arrays [B]: temperature (0 = greedy), top_p (1 = off), top_k
  (0 = off), min_new (end-of-text blocked before this many new tokens), keys (PRNG keys; a row's
  token n uses fold_in(key, n), so a row samples the same text in any batch)."""
  temperature_B: Array
  top_p_B: Array
  top_k_B: Array
  min_new_B: Array
  keys_B: Array

  @classmethod
  def build(cls, temperature: Sequence[float], top_p: Sequence[float], top_k: Sequence[int],
            min_new: Sequence[int], seeds: Sequence[int]) -> "RowSampling":
    """From host lists (one entry per row); `seeds` are 32-bit PRNG seeds."""
    return cls(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32),
               jnp.asarray(top_k, jnp.int32), jnp.asarray(min_new, jnp.int32),
               jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32)))


jax.tree_util.register_dataclass(
    RowSampling, data_fields=["temperature_B", "top_p_B", "top_k_B", "min_new_B", "keys_B"],
    meta_fields=[])


def filter_logits_rows(logits_BxV: Array, top_k_B: Array, top_p_B: Array) -> Array:
  """`filter_logits` with each row's own top_k (0 = off) and top_p: one sort for both."""
  v = logits_BxV.shape[-1]
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  kth_Bx1 = jnp.take_along_axis(sorted_BxV, jnp.clip(top_k_B - 1, 0, v - 1)[:, None], axis=-1)
  kth_Bx1 = jnp.where(top_k_B[:, None] > 0, kth_Bx1, -jnp.inf)
  sorted_BxV = jnp.where(sorted_BxV >= kth_Bx1, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass strictly above each entry
  kept_BxV = (before_BxV < top_p_B[:, None]).at[:, 0].set(True)
  cutoff_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BxV >= jnp.maximum(cutoff_Bx1, kth_Bx1), logits_BxV, -jnp.inf)


def sample_rows(logits_BxV: Array, rows: RowSampling, step_B: Array, blockable_V: Array) -> Array:
  """Next token per row [B] int32: argmax where temperature is 0, else drawn from the tempered,
  top-k / top-p filtered logits; `blockable_V` tokens are barred while step < min_new. The sort
  and the draw run only when some row needs them."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  logits_BxV = jnp.where(blockable_V[None] & (step_B < rows.min_new_B)[:, None], -jnp.inf,
                         logits_BxV)
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  sampled_B = rows.temperature_B > 0

  def draw(logits_BxV):
    scaled_BxV = logits_BxV / jnp.maximum(rows.temperature_B, 1e-6)[:, None]
    scaled_BxV = jax.lax.cond(jnp.any((rows.top_k_B > 0) | (rows.top_p_B < 1)),
                              lambda x: filter_logits_rows(x, rows.top_k_B, rows.top_p_B),
                              lambda x: x, scaled_BxV)
    step_keys_B = jax.vmap(jax.random.fold_in)(rows.keys_B, step_B)
    return jax.vmap(jax.random.categorical)(step_keys_B, scaled_BxV).astype(jnp.int32)

  drawn_B = jax.lax.cond(jnp.any(sampled_B), draw, lambda _: greedy_B, logits_BxV)
  return jnp.where(sampled_B, drawn_B, greedy_B)


def token_logprobs(logits_BxV: Array, tok_B: Array, top_n: int) -> tuple[Array, Array, Array]:
  """The model's (untempered) logprob of each row's token [B] and its top_n (logprobs, ids)."""
  logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  chosen_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
  top_lp_BxN, top_id_BxN = jax.lax.top_k(logp_BxV, top_n)
  return chosen_B, top_lp_BxN, top_id_BxN
