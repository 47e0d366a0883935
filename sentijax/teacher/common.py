"""What every teacher backend shares: completions, errors, record keys and seeds (the sampling
settings are `sampling.SamplingSettings`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from sentijax.sampling import SamplingSettings


class TeacherError(RuntimeError):
  """A request failed for good (after retries, or with a non-retryable error)."""


class TeacherConfigError(TeacherError):
  """The server refuses every request alike (HTTP 401/403/404: key, model name or URL): the job
  stops at once instead of rejecting each prompt in turn."""


@dataclasses.dataclass
class Completion:
  """One generated answer. `top_logprobs`: per generated token, {token id: logprob} of the most
  likely tokens (when asked for); `unmapped` counts token strings that were not one token."""
  text: str
  finish_reason: str
  completion_tokens: int
  token_ids: list[int] | None = None
  token_logprobs: list[float] | None = None
  top_logprobs: list[dict[int, float]] | None = None
  unmapped: int = 0


def record_key(prompt: str, sampling: SamplingSettings,
               settings: Mapping[str, Any] | None = None) -> str:
  """The id of a generated record: a hash of the prompt, the sampling settings and `settings`
  (everything else that changes an answer: backend, model, endpoint, system prompt, logprobs;
  `backend.answer_settings`). None hashes prompt + sampling only (callers that key by hand)."""
  payload = {"prompt": prompt, "sampling": sampling.to_json()}
  if settings is not None:
    payload["settings"] = dict(settings)
  blob = json.dumps(payload, sort_keys=True)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def row_seed(key: str, seed: int) -> int:
  """A 32-bit seed from a record key: its random stream does not depend on its batch."""
  digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
  return int.from_bytes(digest[:4], "little")


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """`text` up to the first stop string (excluded) and whether one was found."""
  cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
  return (text[:min(cuts)], True) if cuts else (text, False)
