"""Local teacher: a sentijax model sampled in jitted, batched KV-cache decoding.

Each row carries its own PRNG key, derived from its record key (`common.row_seed`), and every
sampling step folds the step index into it: a row samples the same text whatever batch it lands
in, so resumed and re-batched runs agree. Shapes are bucketed with `sampling.bucket_*` and
prompts left-padded with `sampling.left_pad` (one compile per bucket), as the scorer's greedy
decoder does; greedy rows match transformers `generate`.

    teacher = LocalTeacher(cfg, params, tokenizer, batch_size=8)
    [c.text for c in teacher.generate(["Hello"], ["key-0"], Sampling(max_tokens=32))]
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sentijax import models, sampling, sharding
from sentijax.teacher.common import Completion, Sampling, cut_at_stop, row_seed

Array = jax.Array


def _filter_logits(logits_BxV: Array, top_k: int, top_p: Array) -> Array:
  """Top-k then nucleus (smallest set whose mass reaches top_p; the argmax always stays)."""
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
  sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  kept_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < top_p
  kept_BxV = kept_BxV.at[:, 0].set(True)
  cutoff_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "top_k",
                                             "cache_sharding"))
def _generate(cfg, params, ids_BxT, mask_BxT, stop_V, keys_B, temperature, top_p, min_new,
              pad_id, *, max_new_tokens: int, greedy: bool, top_k: int, cache_sharding):
  b, t = ids_BxT.shape
  cache = sampling.init_decode_cache(cfg, b, t + max_new_tokens, cache_sharding)
  logits_Bx1xV, cache = models.forward_with_cache(
      cfg, params, ids_BxT, models.default_positions(mask_BxT), mask_BxT, cache, last_only=True)

  def choose(logits_Bx1xV, step):
    logits_BxV = logits_Bx1xV[:, 0].astype(jnp.float32)
    logits_BxV = jnp.where(stop_V[None] & (step < min_new), -jnp.inf, logits_BxV)
    if greedy:
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = _filter_logits(logits_BxV / temperature, top_k, top_p)
    step_keys_B = jax.vmap(jax.random.fold_in, (0, None))(keys_B, step)
    return jax.vmap(jax.random.categorical)(step_keys_B, logits_BxV).astype(jnp.int32)

  def write(out_BxN, done_B, len_B, tok_B, step):
    out_BxN = out_BxN.at[:, step].set(jnp.where(done_B, pad_id, tok_B))
    len_B = len_B + (~done_B).astype(jnp.int32)
    return out_BxN, done_B | stop_V[tok_B], len_B

  tok_B = choose(logits_Bx1xV, 0)
  out_BxN, done_B, len_B = write(jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                                 jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), tok_B, 0)

  def cond(carry):
    return (carry[0] < max_new_tokens) & ~jnp.all(carry[5])

  def body(carry):
    step, tok_B, pos_B, cache, out_BxN, done_B, len_B = carry
    logits_Bx1xV, cache = models.forward_with_cache(
        cfg, params, tok_B[:, None], pos_B[:, None], jnp.ones((b, 1), jnp.int32), cache,
        last_only=True)
    tok_B = choose(logits_Bx1xV, step)
    out_BxN, done_B, len_B = write(out_BxN, done_B, len_B, tok_B, step)
    return step + 1, tok_B, pos_B + 1, cache, out_BxN, done_B, len_B

  pos_B = jnp.sum(mask_BxT, axis=1).astype(jnp.int32)
  carry = (jnp.asarray(1, jnp.int32), tok_B, pos_B, cache, out_BxN, done_B, len_B)
  carry = jax.lax.while_loop(cond, body, carry)
  return carry[4], carry[6]


@functools.partial(jax.jit, static_argnames=("cfg", "top_n"))
def _token_logprobs(cfg, params, ids_BxT, mask_BxT, *, top_n: int):
  """log p(token t+1 | ...t) and the top_n (logprob, id) at every position."""
  logits_BxTxV = models.forward(cfg, params, ids_BxT, segment_ids_BxT=mask_BxT,
                                positions_BxT=models.default_positions(mask_BxT))
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  chosen_BxT = jnp.take_along_axis(logp_BxTxV[:, :-1], ids_BxT[:, 1:, None], axis=-1)[..., 0]
  top_lp, top_id = jax.lax.top_k(logp_BxTxV[:, :-1], max(top_n, 1))
  return chosen_BxT, top_lp, top_id


@functools.partial(jax.jit, static_argnames=("cfg",))
def _last_logprobs(cfg, params, ids_BxT, mask_BxT):
  """log-softmax of the next-token logits after each left-padded row: [B, V]."""
  logits_Bx1xV, _ = models.forward_with_cache(
      cfg, params, ids_BxT, models.default_positions(mask_BxT), mask_BxT,
      models.init_cache(cfg, ids_BxT.shape[0], ids_BxT.shape[1]), last_only=True)
  return jax.nn.log_softmax(logits_Bx1xV[:, 0].astype(jnp.float32), axis=-1)


class LocalTeacher:
  """Batched sampling from a sentijax model (params placed on `mesh` when given)."""

  def __init__(self, cfg: models.ModelConfig, params: Any, tokenizer: Any, *,
               batch_size: int = 8, mesh=None, rules=None, chat_template: bool = False,
               stop_ids: Sequence[int] = (), name: str = "local"):
    self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
    self.batch_size, self.mesh, self.rules = int(batch_size), mesh, rules
    self.chat_template, self.name = chat_template, name
    ids = set(stop_ids) | {tokenizer.eos_token_id}
    self.stop_ids = sorted(i for i in ids if i is not None)
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

  def encode(self, prompt: str | list[dict] | list[int], chat: bool | None = None) -> list[int]:
    """Prompt ids: a chat message list (or a string with chat=True) through the chat template;
    token ids pass as they are."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
      return list(prompt)
    chat = self.chat_template if chat is None else chat
    if isinstance(prompt, list) or chat:
      messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
      text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
      return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(self.tokenizer(prompt)["input_ids"])

  def generate_ids(self, seqs: Sequence[Sequence[int]], keys: Sequence[str], s: Sampling,
                   min_rows: int = 1) -> list[tuple[list[int], bool]]:
    """Per prompt: (new token ids up to and including a stop token, whether it stopped).

    `min_rows`: pad every batch to at least this many rows (a server keeps one shape per
    prompt-length bucket instead of compiling again for each number of waiting requests).
    """
    out = []
    divisor = sharding.batch_divisor(self.mesh, self.rules)
    for start in range(0, len(seqs), self.batch_size):
      chunk, chunk_keys = seqs[start:start + self.batch_size], keys[start:start + self.batch_size]
      rows = sampling.bucket_batch(max(len(chunk), min_rows), divisor)
      length = sampling.bucket_length(max(len(q) for q in chunk))
      ids_BxT, mask_BxT = sampling.left_pad(chunk, length, rows, self.pad_id)
      seeds = [row_seed(k, s.seed) for k in chunk_keys] + [0] * (rows - len(chunk))
      keys_B = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
      stop_V = np.zeros((self.cfg.vocab_size,), bool)
      stop_V[self.stop_ids] = True
      ids, mask, cache_sharding = jnp.asarray(ids_BxT), jnp.asarray(mask_BxT), None
      if self.mesh is not None:
        ids = jax.device_put(ids_BxT, sharding.batch_sharding(self.mesh, self.rules))
        mask = jax.device_put(mask_BxT, sharding.batch_sharding(self.mesh, self.rules))
        cache_sharding = sharding.batch_sharding(self.mesh, self.rules, batch_dim=1)
      toks_BxN, lens_B = _generate(
          self.cfg, self.params, ids, mask, jnp.asarray(stop_V), keys_B,
          jnp.asarray(max(s.temperature, 1e-6), jnp.float32), jnp.asarray(s.top_p, jnp.float32),
          jnp.asarray(s.min_tokens, jnp.int32), jnp.asarray(self.pad_id, jnp.int32),
          max_new_tokens=s.max_tokens, greedy=s.greedy,
          top_k=min(s.top_k, self.cfg.vocab_size), cache_sharding=cache_sharding)
      toks_BxN, lens_B = sharding.to_host(toks_BxN), sharding.to_host(lens_B)
      for r in range(len(chunk)):
        new = [int(x) for x in toks_BxN[r, :lens_B[r]]]
        out.append((new, bool(new) and new[-1] in self.stop_ids))
    return out

  def logprobs(self, prompt_ids: Sequence[int], new_ids: Sequence[int], top_n: int
               ) -> tuple[list[float], list[dict[int, float]]]:
    """The model's (untempered) logprob of each new token and the top_n alternatives."""
    seq = list(prompt_ids) + list(new_ids)
    length = sampling.bucket_length(len(seq))
    ids_BxT = np.full((1, length), self.pad_id, np.int32)
    mask_BxT = np.zeros((1, length), np.int32)
    ids_BxT[0, :len(seq)], mask_BxT[0, :len(seq)] = seq, 1
    chosen, top_lp, top_id = (sharding.to_host(x) for x in _token_logprobs(
        self.cfg, self.params, jnp.asarray(ids_BxT), jnp.asarray(mask_BxT), top_n=top_n))
    span = range(len(prompt_ids) - 1, len(seq) - 1)
    return ([float(chosen[0, i]) for i in span],
            [{int(t): float(lp) for t, lp in zip(top_id[0, i, :top_n], top_lp[0, i, :top_n])}
             for i in span])

  def next_logprobs(self, prompt: str | list) -> np.ndarray:
    """The full next-token log-distribution [V] after `prompt` (exact verbalizer scores)."""
    seq = self.encode(prompt)
    ids_BxT, mask_BxT = sampling.left_pad([seq], sampling.bucket_length(len(seq)), 1, self.pad_id)
    return sharding.to_host(_last_logprobs(self.cfg, self.params, jnp.asarray(ids_BxT),
                                           jnp.asarray(mask_BxT)))[0]

  def generate(self, prompts: Sequence[str | list], keys: Sequence[str], s: Sampling,
               logprobs: int = 0, min_rows: int = 1) -> list[Completion]:
    """Completions of `prompts` (text, finish_reason 'stop' | 'length', token ids)."""
    seqs = [self.encode(p) for p in prompts]
    results = []
    for seq, (new, stopped) in zip(seqs, self.generate_ids(seqs, keys, s, min_rows)):
      body = new[:-1] if stopped else new
      text, cut = cut_at_stop(self.tokenizer.decode(body, skip_special_tokens=True), s.stop)
      chosen, top = self.logprobs(seq, body, logprobs) if logprobs and body else (None, None)
      results.append(Completion(text=text, finish_reason="stop" if stopped or cut else "length",
                                completion_tokens=len(new), token_ids=body,
                                token_logprobs=chosen, top_logprobs=top))
    return results

  def stream(self, items: Sequence[Any], s: Sampling, logprobs: int = 0
             ) -> Iterator[tuple[Any, Completion | Exception]]:
    """(item, completion) per item with `.prompt` and `.id`, one batch at a time."""
    for start in range(0, len(items), self.batch_size):
      chunk = items[start:start + self.batch_size]
      for item, c in zip(chunk, self.generate([i.prompt for i in chunk], [i.id for i in chunk],
                                              s, logprobs)):
        yield item, c

  def close(self) -> None:
    pass
