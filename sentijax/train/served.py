"""A served teacher for on-policy distillation (`kd.mode=on_policy`, `teacher.backend=openai`).

After the rollout writes the student's responses (train/onpolicy.py), `Scorer` sends each packed
segment holding sampled tokens (its prompt + the student's response, as token ids) to the
teacher's OpenAI-compatible server (echo + logprobs with max_tokens `teacher.echo_max_tokens`:
vLLM, `sentijax.serve`) and writes the teacher's log-prob of every sampled token, teacher-forced,
into the batch field "teacher_logp" [B, T] (0 elsewhere). The step's term,
`losses.Distill(support="served")`, is the sampled-token reverse-KL estimator there and CE on the
corpus rows (kd.lmbda < 1). Requests go `teacher.concurrency` at once through the client, which
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
  then `probe_ids` scored once (MissingCapability when the answer has no prompt logprobs)."""
  client = backend.make(config)
  try:
    backend.require(client, backend.PROMPT_LOGPROBS, NEEDED_FOR)
    chosen = client.prompt_token_logprobs([int(i) for i in probe_ids],
                                           int(config.teacher.echo_max_tokens))
    _checked(chosen, len(probe_ids), "the probe request (before training)")
  except BaseException:
    client.close()
    raise
  return client


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


class Scorer:
  """`(host batch, step) -> (teacher_logp [B, T], metrics)` for `onpolicy.Rollout`'s `scorer`:
  `client.prompt_token_logprobs` per sampled segment, the client's `concurrency` at a time.
  Metrics: teacher_score_s (wall seconds), teacher_requests, teacher_retries (this step's)."""

  def __init__(self, client: Any, echo_max_tokens: int = 0):
    self.client, self.echo_max_tokens = client, int(echo_max_tokens)

  def __call__(self, local: dict[str, np.ndarray], step: int) -> tuple[np.ndarray, dict]:
    start, retries = time.perf_counter(), getattr(self.client, "retries", 0)
    todo = segments(local)
    logp_BxT = np.zeros(local["targets"].shape, np.float32)
    workers = max(1, int(getattr(self.client, "concurrency", 1)))
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
      futures = [pool.submit(self.client.prompt_token_logprobs, ids.tolist(),
                             self.echo_max_tokens) for _, _, ids in todo]
      for (r, where, ids), future in zip(todo, futures):
        what = f"step {step}, row {r}, a segment of {len(ids)} tokens"
        try:
          values = _checked(future.result(), len(ids), what)
        except (backend.MissingCapability, ScoringError):
          raise
        except Exception as e:
          raise ScoringError(
              f"the served teacher failed to score {what} ({type(e).__name__}: {e}); no step "
              "trains without its teacher signal: check the server, then rerun the same command "
              "(it resumes from the last checkpoint)") from e
        on = local["sampled"][r, where] > 0
        logp_BxT[r, where[on]] = values[on]
    finally:
      pool.shutdown(wait=False, cancel_futures=True)
    return logp_BxT, {"teacher_score_s": time.perf_counter() - start,
                      "teacher_requests": len(todo),
                      "teacher_retries": getattr(self.client, "retries", 0) - retries}
