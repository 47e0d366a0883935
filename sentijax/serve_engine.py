"""Continuous batching for `sentijax.serve`: a fixed set of decode rows sharing one KV cache.

Each row holds one choice of one request with its own `SamplingSettings` (as
`sampling.RowSampling`: the temperature, top_p, top_k, min_tokens and seed of every row differ
freely inside one jitted step; max_tokens and stop strings are checked per row on the host). At
every step boundary waiting requests join and finished rows leave: the joiners' prompts are
prefilled together (left-padded to one bucketed length) and written into the cache just before
the shared write index, so each row's prompt ends where its next token goes; positions are per
row, so a row decodes exactly as alone. The cache length is a power of two that grows as the live
rows fill it (`_relayout` rolls the oldest live row to slot 0 and doubles the length if that frees
too little; nothing is reserved for max_tokens up front) and starts small again once the engine
is idle. Prompt scoring (echo + logprobs) comes
from the same batched prefill. A row's text is tracked on the host: a stop string ends the row,
and the tail a stop string could still claim is held back, so the streamed pieces add up to the
final text.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sentijax import models, sampling
from sentijax.sampling import SamplingSettings
from sentijax.serve_events import (TOP_N, Delta, Draining, Failed, Finished, PromptScores,
                                   QueueFull, Request, TextTracker)
from sentijax.teacher import local as local_teacher
from sentijax.teacher.common import row_seed

log = logging.getLogger("sentijax")

_FILLER = SamplingSettings(max_tokens=1)  # the settings of a row no request holds (greedy)
MIN_CONTEXT = 128  # smallest cache length (slots per row)


@dataclasses.dataclass
class _Row:
  request: Request
  index: int  # choice index
  seed: int
  start: int  # first cache slot of the row (its padded prompt)
  position: int  # position of the token fed next
  text: TextTracker
  last: int = 0  # token fed next
  count: int = 0  # tokens generated (the end-of-text token included)


# --------------------------------------------------------------------------------------------
# Jitted pieces: prefill of joining rows, one decode step of all rows, cache moves.


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill(cfg, params, ids_KxP, mask_KxP, rows: sampling.RowSampling,
             blockable_V) -> dict[str, Any]:
  """Caches, first tokens and their logprobs (TOP_N alternatives) of K left-padded prompts."""
  k, p = ids_KxP.shape
  cache = models.init_cache(cfg, k, p)
  logits_Kx1xV, cache = models.forward_with_cache(cfg, params, ids_KxP,
                                                  models.default_positions(mask_KxP), mask_KxP,
                                                  cache, last_only=True)
  tok_K = sampling.sample_rows(logits_Kx1xV[:, 0], rows, jnp.zeros((k,), jnp.int32), blockable_V)
  out = {"k": cache.k, "v": cache.v, "tok": tok_K}
  out["chosen"], out["top_lp"], out["top_id"] = sampling.token_logprobs(logits_Kx1xV[:, 0], tok_K,
                                                                         TOP_N)
  return out


@functools.partial(jax.jit, static_argnames=("cfg", "top_n"), donate_argnames=("cache",))
def _step(cfg, params, layers, cache, tok_S, pos_S, rows: sampling.RowSampling, step_S,
          blockable_V, *, top_n: int):
  """One token for every row (dead rows compute filler)."""
  seg_Sx1 = jnp.ones((tok_S.shape[0], 1), jnp.int32)
  logits_Sx1xV, cache = models.forward_with_cache(cfg, params, tok_S[:, None], pos_S[:, None],
                                                  seg_Sx1, cache, last_only=True, layers=layers)
  next_S = sampling.sample_rows(logits_Sx1xV[:, 0], rows, step_S, blockable_V)
  lp = sampling.token_logprobs(logits_Sx1xV[:, 0], next_S, top_n) if top_n else ()
  return cache, next_S, lp


def _slot_axis(x) -> int:
  return x.ndim - 3  # [..., B, S, K, D]


@functools.partial(jax.jit, donate_argnames=("cache",))
def _insert(cache: models.KVCache, k_new, v_new, mask_KxP, slots_K, index) -> models.KVCache:
  """Writes K prefilled rows (stacked [L, K, P, ...] caches) into cache rows `slots_K` at slots
  index-P..index-1; slot ids past the batch are dropped (filler rows)."""
  p = mask_KxP.shape[1]
  rows_Kx1, cols_1xP = slots_K[:, None], (index - p + jnp.arange(p))[None, :]

  def put(dst, src):
    if dst.ndim == 5:
      return dst.at[:, rows_Kx1, cols_1xP].set(src.astype(dst.dtype), mode="drop")
    return dst.at[rows_Kx1, cols_1xP].set(src.astype(dst.dtype), mode="drop")

  if isinstance(cache.k, tuple):
    k = tuple(put(d, k_new[i]) for i, d in enumerate(cache.k))
    v = tuple(put(d, v_new[i]) for i, d in enumerate(cache.v))
  else:
    k, v = put(cache.k, k_new), put(cache.v, v_new)
  seg = cache.segment_ids.at[slots_K].set(0, mode="drop")
  seg = seg.at[rows_Kx1, cols_1xP].set(mask_KxP, mode="drop")
  return models.KVCache(k, v, seg, cache.index)


@functools.partial(jax.jit, static_argnames=("new_len",))
def _relayout(cache: models.KVCache, shift, old_index, *, new_len: int) -> models.KVCache:
  """Slot j moves to j - shift and the length becomes new_len; only slots that held
  [0, old_index) keep their segment ids."""

  def move(x, axis):
    size = max(x.shape[axis], new_len)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    x = jnp.roll(jnp.pad(x, pad), -shift, axis=axis)
    return jax.lax.slice_in_dim(x, 0, new_len, axis=axis)

  k = jax.tree.map(lambda x: move(x, _slot_axis(x)), cache.k)
  v = jax.tree.map(lambda x: move(x, _slot_axis(x)), cache.v)
  src_S = jnp.arange(new_len) + shift
  valid_S = (src_S >= 0) & (src_S < old_index)
  seg = jnp.where(valid_S[None], move(cache.segment_ids, 1), 0)
  return models.KVCache(k, v, seg, cache.index)


def _pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


# --------------------------------------------------------------------------------------------
# The engine: a worker thread that admits, prefills and steps.


class Engine:
  """Decodes every admitted request in `slots` shared rows; `submit` queues a request."""

  def __init__(self, cfg: models.ModelConfig, params: Any, *, decode: Callable[[list[int]], str],
               stop_ids: Sequence[int], pad_id: int, slots: int = 16, max_queue: int = 64,
               max_wait_s: float = 0.0, per_layer: bool | None = None):
    self.cfg, self.params, self.decode = cfg, params, decode
    self.stop_ids, self.pad_id = set(int(i) for i in stop_ids), int(pad_id)
    self.slots, self.max_queue, self.max_wait_s = int(slots), int(max_queue), float(max_wait_s)
    per_layer = jax.default_backend() == "cpu" if per_layer is None else per_layer
    self.layers = jax.jit(models.unstack_layers)(params) if per_layer else None
    # Room for a lone request of up to the model's positions (its prompt bucketed up).
    self.max_context = _pow2(2 * cfg.max_position_embeddings + 64)
    blockable = np.zeros((cfg.vocab_size,), bool)
    blockable[[i for i in self.stop_ids if i < cfg.vocab_size]] = True
    self.blockable_V = jnp.asarray(blockable)
    self.rows: list[_Row | None] = [None] * self.slots
    self.waiting: collections.deque[Request] = collections.deque()
    self.cv = threading.Condition()
    self.draining = False
    self.cache: models.KVCache | None = None
    self.capacity = self.index = 0
    self._row_sampling: sampling.RowSampling | None = None
    self._joining: list[Request] = []
    self.stats: collections.Counter = collections.Counter()
    self._thread = threading.Thread(target=self._loop, daemon=True, name="sentijax-engine")
    self._thread.start()

  # ---- public

  def submit(self, req: Request) -> None:
    with self.cv:
      if self.draining:
        raise Draining("the server is shutting down")
      held = sum(r is not None for r in self.rows) + sum(q.n for q in self.waiting)
      if held + req.n > self.slots + self.max_queue:
        raise QueueFull(f"{self.slots} rows busy and {len(self.waiting)} requests waiting "
                        f"(serve.max_queue={self.max_queue})")
      self.waiting.append(req)
      self.stats["requests"] += 1
      self.cv.notify_all()

  def busy(self) -> bool:
    with self.cv:
      return bool(self.waiting) or any(self.rows)

  def drain(self) -> None:
    """Takes no new requests from now on (those in flight finish)."""
    with self.cv:
      self.draining = True

  # ---- loop

  def _live(self) -> list[tuple[int, _Row]]:
    return [(s, r) for s, r in enumerate(self.rows) if r is not None]

  def _loop(self) -> None:
    while True:
      with self.cv:
        while not self.waiting and not any(self.rows):
          self.cv.wait()
        if not any(self.rows):  # idle: gather concurrent arrivals into one prefill
          deadline = time.monotonic() + self.max_wait_s
          while (sum(q.n for q in self.waiting) < self.slots
                 and deadline - time.monotonic() > 0):
            self.cv.wait(deadline - time.monotonic())
      try:
        self._admit()
        if any(self.rows):
          self._step()
      except Exception as e:  # pylint: disable=broad-except
        log.exception("decoding failed")
        failed = ({id(r.request): r.request for _, r in self._live()}
                  | {id(q): q for q in self._joining})
        for req in failed.values():
          req.events.put(Failed(e))
        self.rows, self._joining = [None] * self.slots, []
        self._row_sampling, self.cache, self.capacity = None, None, 0  # the cache may be donated

  def _drop_cancelled(self) -> None:
    for s, r in self._live():
      if r.request.cancelled.is_set():
        self.rows[s] = None
        self._row_sampling = None

  def _layout(self, live: list[_Row], p: int) -> tuple[int, int, int]:
    """(shift left, new write index, cache length) for joiners whose prompts take p slots
    ending at the write index: kept as it is when they fit before it, else the oldest live row
    moves to slot 0. The cache grows with the live rows (no slots reserved for max_tokens) and
    shrinks only when none is live."""
    if live and p <= self.index < self.capacity:
      return 0, self.index, self.capacity
    lo = min((r.start for r in live), default=self.index)
    i0 = self.index - lo
    i1 = max(i0, p)
    length = max(MIN_CONTEXT, _pow2(i1 + 1), self.capacity if live else 0)
    return lo - (i1 - i0), i1, length

  def _admit(self) -> None:
    """Moves the waiting requests that fit (FIFO) into free rows and prefills them together."""
    with self.cv:
      self._drop_cancelled()
      live = [r for _, r in self._live()]
      free = self.slots - len(live)
      take: list[Request] = []
      while self.waiting:
        req = self.waiting[0]
        if req.cancelled.is_set():
          self.waiting.popleft()
          continue
        need = req.n if req.generate else 0
        if need > free:
          break
        take.append(self.waiting.popleft())
        free -= need
    if take:
      self._joining = take
      p = sampling.bucket_length(max(len(q.prompt_ids) for q in take))
      self._prefill(take, self._layout(live, p))
      self._joining = []

  def _move_cache(self, shift: int, index: int, length: int) -> None:
    live = [r for _, r in self._live()]
    if self.cache is None or (not live and length != self.capacity):
      cache = models.init_cache(self.cfg, self.slots, length)
      self.cache = models.unstack_cache(cache) if self.layers is not None else cache
    elif live and (shift or length != self.capacity):
      self.cache = _relayout(self.cache, jnp.int32(shift), jnp.int32(self.index), new_len=length)
      for r in live:
        r.start -= shift
    self.index, self.capacity = index, length

  def _prefill(self, take: list[Request], layout: tuple[int, int, int]) -> None:
    specs = [(q, c) for q in take for c in (range(q.n) if q.generate else [None])]
    p = sampling.bucket_length(max(len(q.prompt_ids) for q in take))
    k = sampling.bucket_batch(len(specs))
    ids_KxP, mask_KxP = sampling.left_pad([q.prompt_ids for q, _ in specs], p, k, self.pad_id)
    seeds = [row_seed(str(c or 0), q.sampling.seed) for q, c in specs]
    rows = self._settings([q.sampling for q, _ in specs], seeds, k)
    # Logprobs always (once per join, cheap next to the forward): one compile fewer.
    out = _prefill(self.cfg, self.params, jnp.asarray(ids_KxP), jnp.asarray(mask_KxP), rows,
                   self.blockable_V)
    self._move_cache(*layout)
    free = iter(s for s, r in enumerate(self.rows) if r is None)
    slots = [next(free) if c is not None else self.slots for _, c in specs]
    self.cache = _insert(self.cache, out["k"], out["v"], jnp.asarray(mask_KxP),
                         jnp.asarray(slots + [self.slots] * (k - len(specs)), jnp.int32),
                         jnp.int32(self.index))
    host = {name: np.asarray(x) for name, x in out.items() if name not in ("k", "v")}
    self.stats["prefills"] += 1
    self.stats["prefill_rows"] += len(specs)
    self._score([q for q in take if q.score_prompt])
    for j, (q, c) in enumerate(specs):
      if c is None:
        continue
      n = len(q.prompt_ids)
      self.rows[slots[j]] = _Row(q, c, seeds[j], start=self.index - p, position=n,
                                 text=TextTracker(self.decode, q.sampling.stop))
      self._advance(slots[j], host, j)
    self._row_sampling = None

  def _score(self, reqs: list[Request]) -> None:
    """The prompts' token logprobs in one right-padded forward (the local teacher's)."""
    if not reqs:
      return
    p = sampling.bucket_length(max(len(q.prompt_ids) for q in reqs))
    ids_KxP = np.full((sampling.bucket_batch(len(reqs)), p), self.pad_id, np.int32)
    mask_KxP = np.zeros_like(ids_KxP)
    for j, q in enumerate(reqs):
      ids_KxP[j, :len(q.prompt_ids)], mask_KxP[j, :len(q.prompt_ids)] = q.prompt_ids, 1
    # The local teacher's scoring forward: a lone prompt scores exactly as LocalTeacher.logprobs.
    chosen, top_lp, top_id = (np.asarray(x) for x in local_teacher.token_logprobs(
        self.cfg, self.params, jnp.asarray(ids_KxP), jnp.asarray(mask_KxP), top_n=TOP_N))
    for j, q in enumerate(reqs):
      span = range(len(q.prompt_ids) - 1)  # logits at t score token t + 1
      q.events.put(PromptScores(
          [None] + [float(chosen[j, t]) for t in span],
          [None] + [{int(i): float(lp) for i, lp in zip(top_id[j, t], top_lp[j, t])}
                    for t in span]))

  def _settings(self, sps: Sequence[SamplingSettings], seeds: Sequence[int], rows: int
                ) -> sampling.RowSampling:
    """Per-row arrays of `sps` (seeded by `seeds`), filler rows greedy up to `rows`."""
    filler = rows - len(sps)
    return sampling.RowSampling.build(list(sps) + [_FILLER] * filler,
                                      sampling.keys_from_seeds(list(seeds) + [0] * filler))

  def _advance(self, slot: int, host: dict, j: int) -> None:
    """Takes row `slot`'s new token (entry j of the host arrays): text, events, finish."""
    r = self.rows[slot]
    q, tok = r.request, int(host["tok"][j])
    r.count += 1
    ended = tok in self.stop_ids
    piece, cut = ("", False) if ended else r.text.add(tok)
    done = ended or cut or r.count >= q.sampling.max_tokens
    if done:
      piece += r.text.flush()
    delta = Delta(r.index, piece, [] if ended else [tok])
    if q.logprobs and not ended:
      delta.token_logprobs = [float(host["chosen"][j])]
      delta.top_logprobs = [{int(i): float(lp) for i, lp in zip(host["top_id"][j],
                                                                host["top_lp"][j])}]
    if delta.text or delta.token_ids:
      q.events.put(delta)
    if done:
      q.events.put(Finished(r.index, "stop" if ended or cut else "length", r.count))
      self.rows[slot] = None
      self._row_sampling = None
    else:
      r.last = tok

  def _step(self) -> None:
    with self.cv:
      self._drop_cancelled()
    live = self._live()
    if not live:
      return
    if self._row_sampling is None:
      by_slot = {s: r for s, r in live}
      sps = [by_slot[s].request.sampling if s in by_slot else _FILLER for s in range(self.slots)]
      seeds = [by_slot[s].seed if s in by_slot else 0 for s in range(self.slots)]
      self._row_sampling = self._settings(sps, seeds, self.slots)
    tok_S = np.full((self.slots,), self.pad_id, np.int32)
    pos_S, step_S = np.zeros((self.slots,), np.int32), np.zeros((self.slots,), np.int32)
    for s, r in live:
      tok_S[s], pos_S[s], step_S[s] = r.last, r.position, r.count
    if self.index >= self.capacity:  # full: the oldest row to slot 0, twice the length if need be
      lo = min(r.start for _, r in live)
      length = self.capacity if lo >= self.capacity // 4 else 2 * self.capacity
      self._move_cache(lo, self.index - lo, min(length, self.max_context))
    top_n = TOP_N if any(r.request.logprobs for _, r in live) else 0
    cache = dataclasses.replace(self.cache, index=jnp.int32(self.index))
    self.cache, next_S, lp = _step(self.cfg, self.params, self.layers, cache, jnp.asarray(tok_S),
                                   jnp.asarray(pos_S), self._row_sampling, jnp.asarray(step_S),
                                   self.blockable_V, top_n=top_n)
    self.index += 1
    host = {"tok": np.asarray(next_S)}
    if top_n:
      host["chosen"], host["top_lp"], host["top_id"] = (np.asarray(x) for x in lp)
    self.stats["decode_steps"] += 1
    self.stats["row_steps"] += len(live)
    self.stats["max_live_rows"] = max(self.stats["max_live_rows"], len(live))
    if len({id(r.request) for _, r in live}) > 1:
      self.stats["shared_steps"] += 1
    for s, r in live:
      r.position += 1
      self._advance(s, host, s)
