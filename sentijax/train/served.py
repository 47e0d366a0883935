"""A served teacher for on-policy distillation (`kd.mode=on_policy`, `teacher.backend=openai`).

After the rollout writes the student's responses (train/onpolicy.py), `Scorer` sends each packed
segment holding sampled tokens (its prompt + the student's response, as token ids) to the
teacher's OpenAI-compatible server (echo + logprobs with max_tokens `teacher.echo_max_tokens`:
vLLM, `sentijax.serve`) and writes the teacher's log-prob of every sampled token, teacher-forced,
into the batch field "teacher_logp" [B, T] (0 elsewhere). The step's term,
`losses.Distill(support="served")`, is the sampled-token reverse-KL estimator there and CE on the
corpus rows (kd.lmbda < 1). `teacher.top_logprobs` = N > 0: the same request asks for the teacher's top-N
log-probs at each position too (vLLM's completions `top_logprobs`, keys "token_id:<id>"), and at
each sampled target the N ids, their probabilities and the tail 1 - sum go into the batch as the
listed store's soft fields ("soft_ids" [B, T, N], "soft_probs", "soft_tail"; zero elsewhere): the
step adds the tail-aware bucketed reverse KL over those N + 1 buckets to the estimator there
(losses.distill_terms). A position with fewer than N entries stops the run (ScoringError naming
teacher.top_logprobs): a short list would silently move mass into the tail. Requests go `teacher.concurrency` at once through the client, which
retries (backoff, Retry-After); a segment that still fails stops the run (`ScoringError`): no
step trains without its teacher signal. Scores are a function of the tokens, and the tokens of
(seed, step, row): a resumed run recomputes them.

`connect` (before training): the backend's `prompt_logprobs` capability, then one probe request,
so a server answering without prompt logprobs (llama.cpp's) fails with MissingCapability before
anything compiles.
"""
from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from sentijax.teacher import backend

NEEDED_FOR = "kd.mode=on_policy with a served teacher (its log-prob of each sampled token)"
# A log-probability above this is no log-probability (fp32 rounding of log 1 is far smaller).
MAX_LOGP = 1e-3


class ScoringError(RuntimeError):
  """The served teacher could not score a step's samples (after the client's retries)."""


def connect(config, probe_ids: Sequence[int]) -> Any:
  """The client of `config.teacher` (backend.make), checked: the `prompt_logprobs` capability,
  then `probe_ids` scored once (MissingCapability when the answer has no prompt logprobs;
  ScoringError when `teacher.top_logprobs` > 0 and it has fewer top log-probs)."""
  top_n = top_logprobs_setting(config)
  client = backend.make(config)
  try:
    backend.require(client, backend.PROMPT_LOGPROBS, NEEDED_FOR)
    Scorer(client, int(config.teacher.echo_max_tokens), top_n).score(
        [int(i) for i in probe_ids], "the probe request (before training)")
  except BaseException:
    client.close()
    raise
  return client


def top_logprobs_setting(config) -> int:
  """`teacher.top_logprobs` (0 = off), checked."""
  n = config.teacher.get("top_logprobs", 0)
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    raise ValueError(f"teacher.top_logprobs={n!r}: expected an int >= 0 (0 = the sampled-token "
                     "estimator only; N = also the bucketed KL over the teacher's top-N + tail)")
  return n


def segments(local: dict[str, np.ndarray]) -> list[tuple[int, np.ndarray, np.ndarray]]:
  """(row, positions [n], token ids [n + 1]) per packed segment with sampled targets: its inputs
  up to its last sampled position, then that position's target. The teacher's log-prob of
  ids[i + 1] (given ids[:i + 1]) scores the target at positions[i]. The teacher's own view of
  the rows when the batch has one ("teacher_inputs" / "teacher_segment_ids": context
  distillation, train/icl_onpolicy.py: its prompt, the student's answer at the same positions)."""
  out = []
  inputs_BxT = local.get("teacher_inputs", local["inputs"])
  seg_BxT = local.get("teacher_segment_ids", local["segment_ids"])
  sampled_BxT = local["sampled"] > 0
  for r in np.flatnonzero(sampled_BxT.any(-1)):
    for seg in np.unique(seg_BxT[r][sampled_BxT[r]]):
      where = np.flatnonzero(seg_BxT[r] == seg)
      last = where[sampled_BxT[r, where]].max()
      where = where[where <= last]
      ids = np.append(inputs_BxT[r, where], local["targets"][r, last]).astype(np.int32)
      out.append((int(r), where, ids))
  return out


def _checked(chosen: Sequence[float | None], n: int, what: str) -> np.ndarray:
  """[n - 1] float32 log-probs of tokens 1..n-1 from a server's answer; ScoringError unless each
  is a finite log-probability."""
  if len(chosen) != n or any(c is None for c in chosen[1:]):
    raise ScoringError(f"{what}: the server returned {len(chosen)} prompt log-probs for {n} "
                       "tokens (or None after the first)")
  values = np.asarray(chosen[1:], np.float64)
  bad = np.flatnonzero(~np.isfinite(values) | (values > MAX_LOGP))
  if len(bad):
    raise ScoringError(f"{what}: token {int(bad[0]) + 1} got log-prob {values[bad[0]]!r} from the "
                       "teacher (not a finite log-probability): no step trains on it")
  return values.astype(np.float32)


def _top_n(tops: Sequence[dict[int, float] | None], n: int, what: str
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids [m - 1, n] int32, probs [m - 1, n], tail [m - 1]) of positions 1..m-1 of a server's
  top log-probs: each position's n most likely ids (a server may add the chosen token as an
  n+1-th), their probabilities and 1 - their sum (>= 0); ScoringError when one has fewer."""
  ids = np.zeros((len(tops) - 1, n), np.int32)
  probs = np.zeros((len(tops) - 1, n), np.float64)
  for i, top in enumerate(tops[1:]):
    if top is None or len(top) < n:
      raise ScoringError(
          f"{what}: the server returned {0 if top is None else len(top)} top log-probs at token "
          f"{i + 1}, teacher.top_logprobs={n} asked for {n}: serve the teacher with max logprobs "
          f">= {n} (vLLM --max-logprobs), or lower teacher.top_logprobs (0 = the sampled-token "
          "estimator only)")
    best = sorted(top.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    ids[i] = [k for k, _ in best]
    probs[i] = np.exp(np.asarray([v for _, v in best], np.float64))
  bad = ~np.isfinite(probs) | (probs > 1 + MAX_LOGP)
  if bad.any():
    raise ScoringError(f"{what}: a top log-prob is no log-probability (probability "
                       f"{probs[bad][0]!r}): no step trains on it")
  over = np.flatnonzero(probs.sum(-1) > 1 + MAX_LOGP)
  if len(over):
    raise ScoringError(f"{what}: the top-{n} probabilities at token {int(over[0]) + 1} sum to "
                       f"{probs[over[0]].sum()!r} > 1 (teacher.top_logprobs={n}): not a "
                       "distribution; no step trains on it")
  tail = np.maximum(1.0 - probs.sum(-1), 0.0)  # >= -1e-3 here: fp32 rounding of a tiny tail
  return ids, probs.astype(np.float32), tail.astype(np.float32)


class Scorer:
  """`(host batch, step) -> (teacher_logp [B, T], metrics)` for `onpolicy.Rollout`'s `scorer`:
  `client.prompt_token_logprobs` per sampled segment, the client's `concurrency` at a time.
  Metrics: teacher_score_s (wall seconds), teacher_requests, teacher_retries (this step's).
  `top_logprobs` > 0: also writes the soft fields "soft_ids" / "soft_probs" / "soft_tail" of the
  teacher's top-N into `local` (module docstring)."""

  def __init__(self, client: Any, echo_max_tokens: int = 0, top_logprobs: int = 0):
    self.client, self.echo_max_tokens = client, int(echo_max_tokens)
    self.top_logprobs = int(top_logprobs)

  def score(self, ids: Sequence[int], what: str) -> tuple[np.ndarray, tuple | None]:
    """(log-probs of ids[1:], checked; (ids, probs, tail) of the top-N there or None)."""
    if not self.top_logprobs:
      return _checked(self.client.prompt_token_logprobs(list(ids), self.echo_max_tokens),
                      len(ids), what), None
    try:
      chosen, tops = self.client.prompt_token_scores(list(ids), self.top_logprobs,
                                                     self.echo_max_tokens)
    except backend.MissingCapability as e:
      raise backend.MissingCapability(
          f"{e}. teacher.top_logprobs={self.top_logprobs} asks for the top-{self.top_logprobs} "
          "log-probs at every prompt token too: serve the teacher where echo returns "
          "top_logprobs, or set teacher.top_logprobs=0 (the sampled-token estimator only)"
      ) from None
    values = _checked(chosen, len(ids), what)
    if len(tops) != len(ids):
      raise ScoringError(f"{what}: the server returned top log-probs at {len(tops)} positions "
                         f"for {len(ids)} tokens (teacher.top_logprobs={self.top_logprobs})")
    return values, _top_n(tops, self.top_logprobs, what)

  def __call__(self, local: dict[str, np.ndarray], step: int) -> tuple[np.ndarray, dict]:
    start, retries = time.perf_counter(), getattr(self.client, "retries", 0)
    todo = segments(local)
    logp_BxT = np.zeros(local["targets"].shape, np.float32)
    n = self.top_logprobs
    if n:
      local["soft_ids"] = np.zeros(logp_BxT.shape + (n,), np.int32)
      local["soft_probs"] = np.zeros(logp_BxT.shape + (n,), np.float32)
      local["soft_tail"] = np.zeros(logp_BxT.shape, np.float32)
    workers = max(1, int(getattr(self.client, "concurrency", 1)))
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
      whats = [f"step {step}, row {r}, a segment of {len(ids)} tokens" for r, _, ids in todo]
      futures = [pool.submit(self.score, ids.tolist(), what)
                 for (_, _, ids), what in zip(todo, whats)]
      for (r, where, ids), what, future in zip(todo, whats, futures):
        try:
          values, top = future.result()
        except (backend.MissingCapability, ScoringError):
          raise
        except Exception as e:
          raise ScoringError(
              f"the served teacher failed to score {what} ({type(e).__name__}: {e}); no step "
              "trains without its teacher signal: check the server, then rerun the same command "
              "(it resumes from the last checkpoint)") from e
        on = local["sampled"][r, where] > 0
        logp_BxT[r, where[on]] = values[on]
        if top is not None:
          for k, v in zip(("soft_ids", "soft_probs", "soft_tail"), top):
            local[k][r, where[on]] = v[on]
    finally:
      pool.shutdown(wait=False, cancel_futures=True)
    return logp_BxT, {"teacher_score_s": time.perf_counter() - start,
                      "teacher_requests": len(todo),
                      "teacher_retries": getattr(self.client, "retries", 0) - retries}
