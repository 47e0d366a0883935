"""What every teacher backend shares: sampling settings, completions, record keys and seeds."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any


class TeacherError(RuntimeError):
  """A request failed for good (after retries, or with a non-retryable error)."""


class TeacherConfigError(TeacherError):
  """The server refuses every request alike (HTTP 401/403/404: key, model name or URL): the job
  stops at once instead of rejecting each prompt in turn."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Decoding settings; temperature 0 = greedy. `min_tokens` blocks end-of-text until that many
  new tokens exist (a tiny random teacher otherwise often stops at once)."""
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  max_tokens: int = 256
  min_tokens: int = 0
  stop: tuple[str, ...] = ()
  seed: int = 0

  def __post_init__(self):
    if self.max_tokens < 1 or self.min_tokens < 0 or self.min_tokens > self.max_tokens:
      raise ValueError(f"sampling: need 1 <= max_tokens and 0 <= min_tokens <= max_tokens, got "
                       f"max_tokens={self.max_tokens}, min_tokens={self.min_tokens}")
    if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f"sampling: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                       f"{self.temperature}, {self.top_p}, {self.top_k}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def to_json(self) -> dict:
    return dataclasses.asdict(self) | {"stop": list(self.stop)}

  @classmethod
  def from_config(cls, c) -> "Sampling":
    stop = c.stop
    stop = tuple(s for s in stop.split("|") if s) if isinstance(stop, str) else tuple(stop)
    return cls(temperature=float(c.temperature), top_p=float(c.top_p), top_k=int(c.top_k),
               max_tokens=int(c.max_tokens), min_tokens=int(c.min_tokens), stop=stop,
               seed=int(c.seed))


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


def record_key(prompt: str, sampling: Sampling, settings: Mapping[str, Any] | None = None) -> str:
  """The id of a generated record: a hash of the prompt, the sampling settings and `settings`
  (everything else that changes an answer: backend, model, endpoint, system prompt, logprobs;
  `generate.answer_settings`). None hashes prompt + sampling only (callers that key by hand)."""
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
