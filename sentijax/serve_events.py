"""What travels between `sentijax.serve` and its engine: a request, the events answering it
(text deltas, finishes, prompt scores, failures), the refusals (queue full, draining) and the
host-side text of a row (`TextTracker`: stop strings, held-back tails)."""
from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Sequence

from sentijax.sampling import SamplingSettings
from sentijax.teacher.common import cut_at_stop

TOP_N = 20  # logprob alternatives computed when a row asks for any (the OpenAI API's maximum)


class QueueFull(RuntimeError):
  """The waiting queue is full (HTTP 429)."""


class Draining(RuntimeError):
  """The server is shutting down and takes no new requests (HTTP 503)."""


@dataclasses.dataclass
class Request:
  """One API request: `n` choices continuing `prompt_ids`; results arrive in `events`."""
  prompt_ids: list[int]
  sampling: SamplingSettings
  n: int = 1
  logprobs: bool = False  # per generated token: its logprob and the TOP_N alternatives
  score_prompt: bool = False  # the prompt's token logprobs (echo)
  generate: bool = True  # False: score the prompt only (echo with max_tokens 0)
  events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class Delta:
  """New text of choice `index` and the tokens of this step (ids, logprobs when asked)."""
  index: int
  text: str
  token_ids: list[int]
  token_logprobs: list[float] | None = None
  top_logprobs: list[dict[int, float]] | None = None


@dataclasses.dataclass
class Finished:
  index: int
  reason: str  # stop | length
  completion_tokens: int


@dataclasses.dataclass
class PromptScores:
  """Per prompt token: its logprob and top alternatives (None for the first token)."""
  token_logprobs: list[float | None]
  top_logprobs: list[dict[int, float] | None]


@dataclasses.dataclass
class Failed:
  error: Exception


class TextTracker:
  """A row's text as tokens arrive: `add` returns the piece that is safe to send (not claimable
  by a stop string, no half-decoded character) and whether a stop string ended the text."""

  def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]):
    self.decode, self.stop = decode, tuple(s for s in stop if s)
    self.hold = max((len(s) for s in self.stop), default=1) - 1
    self.ids: list[int] = []
    self.sent = ""

  def _emit(self, text: str, end: int) -> str:
    piece = text[len(self.sent):end] if end > len(self.sent) else ""
    self.sent += piece
    return piece

  def add(self, token_id: int) -> tuple[str, bool]:
    self.ids.append(token_id)
    text, cut = cut_at_stop(self.decode(self.ids), self.stop)
    if cut:
      return self._emit(text, len(text)), True
    end = len(text) - self.hold
    while end > 0 and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence so far
      end -= 1
    return self._emit(text, end), False

  def flush(self) -> str:
    text = cut_at_stop(self.decode(self.ids), self.stop)[0]
    return self._emit(text, len(text))
