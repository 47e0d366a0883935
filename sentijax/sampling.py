"""KV-cache decoding: the one sampler of the SentiBench scorer, the local teacher, on-policy
rollouts and the server.

What to sample is one value, `SamplingSettings` (temperature, top_p, top_k, max / min new tokens,
stop strings, seed, repetition penalty: tokenizer-free, so a teacher corpus records and hashes
it); which token ids end a row is `Stops` (the tokenizer's side). Inside jit, rows carry their
settings as arrays (`RowSampling.build(settings, keys)`): rows with different settings share a
step (the server's continuous batches).

One jitted function per (model config, bucketed batch, bucketed prompt length, max_tokens):
prefill the left-padded prompts with `models.forward_with_cache(..., last_only=True)`, then a
`jax.lax.while_loop` feeds one token per step and exits as soon as every row has stopped. Each
row's positions continue from its own real length, so left padding is invisible to the model
(the same positions transformers' `generate` uses).

    out = sampling.decode(cfg, params, ids_BxT, mask_BxT, SamplingSettings(max_tokens=150),
                          Stops([eos_id, newline_id], pad_id=eos_id))
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
from jax.sharding import NamedSharding

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
# What to sample, and which token ids end a row.


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Decoding settings; temperature 0 = greedy. `min_tokens` blocks end-of-text until that many
  new tokens exist (a tiny random teacher otherwise often stops at once); `stop` strings cut the
  text (the caller maps them to token ids: `Stops.end_ids`); `seed` keys the rows' draws when
  no per-row keys are given."""
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  max_tokens: int = 256
  min_tokens: int = 0
  stop: tuple[str, ...] = ()
  seed: int = 0
  repetition_penalty: float = 1.0

  def __post_init__(self):
    if self.max_tokens < 1 or self.min_tokens < 0 or self.min_tokens > self.max_tokens:
      raise ValueError(f"sampling: need 1 <= max_tokens and 0 <= min_tokens <= max_tokens, got "
                       f"max_tokens={self.max_tokens}, min_tokens={self.min_tokens}")
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f"sampling: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                       f"{self.temperature}, {self.top_p}, {self.top_k}")
    if self.repetition_penalty <= 0:
      raise ValueError(f"sampling: need repetition_penalty > 0, got {self.repetition_penalty}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def to_json(self) -> dict:
    """As recorded in a teacher corpus and hashed into its record ids; the repetition penalty
    only when set (ids of corpora written before it existed stay the same)."""
    out = dataclasses.asdict(self) | {"stop": list(self.stop)}
    if self.repetition_penalty == 1.0:
      del out["repetition_penalty"]
    return out

  @classmethod
  def from_config(cls, c) -> "SamplingSettings":
    """A `sampling` config section (teacher/config.py; `stop`: strings separated by "|")."""
    stop = c.stop
    stop = tuple(s for s in stop.split("|") if s) if isinstance(stop, str) else tuple(stop)
    return cls(temperature=float(c.temperature), top_p=float(c.top_p), top_k=int(c.top_k),
               max_tokens=int(c.max_tokens), min_tokens=int(c.min_tokens), stop=stop,
               seed=int(c.seed), repetition_penalty=float(c.repetition_penalty))


@dataclasses.dataclass(frozen=True)
class Stops:
  """Token ids that end rows (see the module docstring): `stop_ids` end a row (blocked before
  `min_tokens`), `soft_stop_ids` once it has text (tokens not in `blank_ids`), `end_ids` at any
  step (e.g. tokens containing a stop string); `pad_id` fills a row after its end."""
  stop_ids: Sequence[int]
  pad_id: int
  soft_stop_ids: Sequence[int] = ()
  blank_ids: Sequence[int] = ()
  end_ids: Sequence[int] = ()


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
# Per-row sampling: rows with different settings in one jitted step.


@dataclasses.dataclass(frozen=True)
class RowSampling:
  """`SamplingSettings` per row as arrays [B]: temperature (0 = greedy), top_p (1 = off), top_k
  (0 = off), min_new (stop tokens blocked before this many new tokens), keys (PRNG keys; a row's
  token n uses fold_in(key, n), so a row samples the same text in any batch)."""
  temperature_B: Array
  top_p_B: Array
  top_k_B: Array
  min_new_B: Array
  keys_B: Array

  @classmethod
  def build(cls, settings: Sequence[SamplingSettings], keys_B: Array) -> "RowSampling":
    """One row per entry of `settings`, with its PRNG key (`keys_from_seeds`, `row_keys`)."""
    return cls(jnp.asarray([s.temperature for s in settings], jnp.float32),
               jnp.asarray([s.top_p for s in settings], jnp.float32),
               jnp.asarray([s.top_k for s in settings], jnp.int32),
               jnp.asarray([s.min_tokens for s in settings], jnp.int32), keys_B)


jax.tree_util.register_dataclass(
    RowSampling, data_fields=["temperature_B", "top_p_B", "top_k_B", "min_new_B", "keys_B"],
    meta_fields=[])


def keys_from_seeds(seeds: Sequence[int]) -> Array:
  """PRNG keys [B] from 32-bit seeds."""
  return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def row_keys(key: Array, rows: int) -> Array:
  """Per-row PRNG keys [rows]: row r gets fold_in(key, r), whatever the batch size."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(rows, dtype=jnp.uint32))


def filter_logits_rows(logits_BxV: Array, top_k_B: Array, top_p_B: Array) -> Array:
  """Per row: top-k (0 = off), then nucleus: the smallest set whose mass reaches top_p (the
  argmax always stays); the rest get -inf. One sort for both."""
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


def block_early_stops(logits_BxV: Array, rows: RowSampling, step_B: Array,
                      blockable_V: Array) -> Array:
  """`blockable_V` tokens get -inf in rows still before their min_new."""
  return jnp.where(blockable_V[None] & (step_B < rows.min_new_B)[:, None], -jnp.inf, logits_BxV)


def sample_rows(logits_BxV: Array, rows: RowSampling, step_B: Array, blockable_V: Array) -> Array:
  """Next token per row [B] int32: argmax where temperature is 0, else drawn from the tempered,
  top-k / top-p filtered logits; `blockable_V` tokens are barred while step < min_new. The sort
  and the draw run only when some row needs them."""
  logits_BxV = block_early_stops(logits_BxV.astype(jnp.float32), rows, step_B, blockable_V)
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


# --------------------------------------------------------------------------------------------
# The jitted decode loop.


class _Tables(NamedTuple):
  """Per-vocabulary stop classes (`stop_table`), blank tokens and the pad id, on the device."""
  stop_kind_V: Array
  blank_V: Array
  pad_id: Array


@dataclasses.dataclass(frozen=True)
class _Program:
  """What one compiled decode is specialised for (static)."""
  max_new_tokens: int
  sample: bool  # False: argmax, no sampling code compiled
  penalize: bool  # repetition penalty != 1
  per_layer: bool
  cache_sharding: NamedSharding | None


def init_decode_cache(cfg: models.ModelConfig, rows: int, length: int,
                      cache_sharding: NamedSharding | None) -> models.KVCache:
  """An empty KV cache for `rows` x `length` tokens, rows placed like the batch (inside jit)."""
  cache = models.init_cache(cfg, rows, length)
  if cache_sharding is None:
    return cache
  return dataclasses.replace(cache, k=jax.lax.with_sharding_constraint(cache.k, cache_sharding),
                             v=jax.lax.with_sharding_constraint(cache.v, cache_sharding))


@functools.partial(jax.jit, static_argnames=("cfg", "program"))
def _decode(cfg: models.ModelConfig, params: PyTree, ids_BxT: Array, mask_BxT: Array,
            rows: RowSampling, penalty: Array, tables: _Tables,
            shared: prefix_lib.Prefix | None, program: _Program) -> tuple[Array, Array]:
  b, t = ids_BxT.shape
  n_max = program.max_new_tokens
  if shared is None:
    cache = init_decode_cache(cfg, b, t + n_max, program.cache_sharding)
    positions_BxT = models.default_positions(mask_BxT)
  else:  # the rows are suffixes of a prompt prefix already in the cache
    cache = prefix_lib.batch_cache(cfg, shared, b, t + n_max, program.cache_sharding)
    positions_BxT = prefix_lib.suffix_positions(shared, mask_BxT)
  logits_Bx1xV, cache = models.forward_with_cache(cfg, params, ids_BxT, positions_BxT, mask_BxT,
                                                  cache, last_only=True)
  next_pos_B = jnp.max(positions_BxT, axis=1).astype(jnp.int32) + 1
  rows_B = jnp.arange(b)
  # Tokens in each row so far (prompt without padding, then generated): repetition penalty.
  seen_BxV = jnp.zeros((b, 1), bool)
  if program.penalize:
    seen_BxV = seen_tokens(ids_BxT, mask_BxT, logits_Bx1xV.shape[-1])
    if shared is not None:
      seen_BxV = seen_BxV | seen_tokens(shared.ids_S[None], shared.segment_ids_S[None],
                                        logits_Bx1xV.shape[-1])
  stop_kind_V, blank_V, pad_id = tables
  blockable_V = (stop_kind_V == _STOP) | (stop_kind_V == _SOFT_STOP)

  def choose(logits_Bx1xV, seen_BxV, step):
    logits_BxV = logits_Bx1xV[:, 0].astype(jnp.float32)
    if program.penalize:
      logits_BxV = repetition_penalty(logits_BxV, seen_BxV, penalty)
    step_B = jnp.full((b,), step, jnp.int32)
    if program.sample:
      return sample_rows(logits_BxV, rows, step_B, blockable_V)
    return jnp.argmax(block_early_stops(logits_BxV, rows, step_B, blockable_V),
                      axis=-1).astype(jnp.int32)

  def write(state, tok_B, step):
    out_BxN, done_B, text_B, len_B, seen_BxV = state
    live_B = ~done_B
    out_BxN = out_BxN.at[:, step].set(jnp.where(live_B, tok_B, pad_id))
    kind_B = stop_kind_V[tok_B]
    stop_B = (kind_B == _STOP) | (kind_B == _END) | ((kind_B == _SOFT_STOP) & text_B)
    if program.penalize:
      seen_BxV = seen_BxV.at[rows_B, tok_B].set(True)
    return (out_BxN, done_B | stop_B, text_B | ~blank_V[tok_B], len_B + live_B.astype(jnp.int32),
            seen_BxV)

  tok_B = choose(logits_Bx1xV, seen_BxV, 0)
  init = (jnp.full((b, n_max), pad_id, jnp.int32), jnp.zeros((b,), bool),
          jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), seen_BxV)
  state = write(init, tok_B, 0)

  def cond(carry):
    step, _, _, _, state = carry
    return (step < n_max) & ~jnp.all(state[1])

  # Per-layer mode: weights sliced once, not at every step (see forward_with_cache).
  layers = models.unstack_layers(params) if program.per_layer else None

  def body(carry):
    step, tok_B, pos_B, cache, state = carry
    seg_Bx1 = jnp.ones((b, 1), jnp.int32)
    logits_Bx1xV, cache = models.forward_with_cache(cfg, params, tok_B[:, None], pos_B[:, None],
                                                    seg_Bx1, cache, last_only=True,
                                                    layers=layers)
    tok_B = choose(logits_Bx1xV, state[4], step)
    return step + 1, tok_B, pos_B + 1, cache, write(state, tok_B, step)

  if program.per_layer:
    cache = models.unstack_cache(cache)
  carry = (jnp.asarray(1, jnp.int32), tok_B, next_pos_B, cache, state)
  _, _, _, _, (out_BxN, _, _, len_B, _) = jax.lax.while_loop(cond, body, carry)
  return out_BxN, len_B


def stop_table(vocab_size: int, stop_ids: Sequence[int], soft_stop_ids: Sequence[int] = (),
               end_ids: Sequence[int] = ()) -> np.ndarray:
  """int32 [V]: 0 = continue, 1 = stop, 2 = stop once the row has produced text, 3 = end (a
  stop that `min_tokens` does not block)."""
  table_V = np.zeros((vocab_size,), np.int32)
  for ids, kind in ((end_ids, _END), (soft_stop_ids, _SOFT_STOP), (stop_ids, _STOP)):
    ids = np.asarray([i for i in ids if i is not None], np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      raise ValueError(f"stop ids {ids.tolist()} outside the vocabulary [0, {vocab_size})")
    table_V[ids] = kind
  return table_V


def _tables(vocab_size: int, stops: Stops) -> _Tables:
  blank_V = np.zeros((vocab_size,), bool)
  blank_V[np.asarray(list(stops.blank_ids), np.int64)] = True
  return _Tables(jnp.asarray(stop_table(vocab_size, stops.stop_ids, stops.soft_stop_ids,
                                        stops.end_ids)),
                 jnp.asarray(blank_V), jnp.asarray(stops.pad_id, jnp.int32))


def decode(cfg: models.ModelConfig, params: PyTree, prompt_ids_BxT: np.ndarray,
           prompt_mask_BxT: np.ndarray, settings: SamplingSettings, stops: Stops, *,
           keys_B: Array | None = None, placement: sharding.Placement | None = None,
           shared: prefix_lib.Prefix | None = None,
           per_layer: bool | None = None) -> DecodeOutput:
  """Decodes up to `settings.max_tokens` per left-padded prompt row: greedy (temperature 0) or
  sampled.

  Args:
    prompt_ids_BxT / prompt_mask_BxT: left-padded prompts and their 0/1 mask.
    settings: temperature, top_p, top_k, max_tokens, min_tokens (stop ids blocked until a row
      has that many new tokens), repetition_penalty (transformers' processor over each row's
      prompt, padding excluded, and its tokens so far; 1.0 = none) and seed (row r draws with
      `row_keys(key(seed))[r]`). `settings.stop` strings are the caller's (`stops.end_ids`).
    stops: the token ids that end rows and the pad id written after a row's end.
    keys_B: instead of the seed, one PRNG key per prompt row [B] (a row then samples the same
      text in any batch: the local teacher keys rows by record, rollouts by step and row).
    placement: shard the batch over its mesh (params already placed there) by its `batch` rule.
    shared: a prefix every row continues (`prefix.compute`): the rows hold only what follows it.
    per_layer: decode steps run the layers one by one on per-layer weights and caches (CPU: a
      2x faster step, a ~4x longer compile, a second copy of the layer weights while decoding)
      instead of a scan over the stacked ones (on a GPU the scan's per-step slices cost little
      and compiles stay short). None = on CPU only.
  Returns:
    DecodeOutput(tokens_BxN [B, max_tokens] int32, lengths_B int32) as numpy. T and B are padded
    up to `bucket_length` / `bucket_batch` inside, to share compilations.
  """
  ids_BxT = np.asarray(prompt_ids_BxT, np.int32)
  mask_BxT = np.asarray(prompt_mask_BxT, np.int32)
  if ids_BxT.ndim != 2 or ids_BxT.shape != mask_BxT.shape:
    raise ValueError(f"prompt ids {ids_BxT.shape} and mask {mask_BxT.shape} must be equal [B, T]")
  if (mask_BxT[:, 1:] < mask_BxT[:, :-1]).any():
    raise ValueError("prompts must be left-padded (mask 0...0 1...1 per row)")
  placement = placement or sharding.Placement()
  b, t = ids_BxT.shape
  rows, length = bucket_batch(b, placement.batch_divisor), bucket_length(t)
  if (rows, length) != (b, t):
    seqs = [row[m.astype(bool)] for row, m in zip(ids_BxT, mask_BxT)]
    ids_BxT, mask_BxT = left_pad(seqs, length, rows, stops.pad_id)
  if keys_B is not None:
    if len(keys_B) != b:
      raise ValueError(f"keys_B has {len(keys_B)} keys for {b} prompt rows")
    keys_B = jnp.concatenate([keys_B, row_keys(jax.random.key(0), rows - b)])
  else:
    keys_B = row_keys(jax.random.key(settings.seed), rows)
  settings = dataclasses.replace(settings, top_k=min(settings.top_k, cfg.vocab_size))
  ids, mask = jnp.asarray(ids_BxT), jnp.asarray(mask_BxT)
  if placement.mesh is not None:
    ids, mask = (jax.device_put(x, placement.batch()) for x in (ids_BxT, mask_BxT))
  program = _Program(max_new_tokens=int(settings.max_tokens), sample=not settings.greedy,
                     penalize=float(settings.repetition_penalty) != 1.0,
                     per_layer=(jax.default_backend() == "cpu" if per_layer is None
                                else bool(per_layer)),
                     cache_sharding=placement.batch(batch_dim=1))
  out_BxN, len_B = _decode(cfg, params, ids, mask, RowSampling.build([settings] * rows, keys_B),
                           jnp.asarray(settings.repetition_penalty, jnp.float32),
                           _tables(cfg.vocab_size, stops), shared, program)
  return DecodeOutput(sharding.to_host(out_BxN)[:b], sharding.to_host(len_B)[:b])
