"""`sentijax.serve` requests: an OpenAI request body validated into a `Call` (prompt ids,
sampling settings, logprobs, echo, streaming) before anything is queued; errors in the OpenAI
shape (`APIError`, `BadRequest` naming the key)."""
from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from typing import Any

from sentijax.sampling import SamplingSettings
from sentijax.serve_events import TOP_N, Request


class APIError(Exception):
  """An error answered in the OpenAI shape with HTTP `status`."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, kind: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": self.code}}


class BadRequest(APIError):
  """The request body is invalid (HTTP 400)."""

  def __init__(self, message: str, param: str | None = None, code: str | None = None):
    super().__init__(400, message, param, code)


def _number(body: dict, key: str, default, kind, lo=None, hi=None):
  value = body.get(key, default)
  if value is None:
    value = default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      kind is int and value != int(value)):
    raise BadRequest(f"'{key}' must be a {kind.__name__}, got {value!r}", key)
  value = kind(value)
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    raise BadRequest(f"'{key}' must be in [{lo}, {hi}], got {value}", key)
  return value


def parse_sampling(body: dict, max_tokens: int) -> SamplingSettings:
  """Sampling settings from an OpenAI request body (max_tokens already checked); unseeded
  requests get a fresh random seed. BadRequest names the key."""
  stop = body.get("stop") or []
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
    raise BadRequest("'stop' must be a string or a list of up to 4 strings", "stop")
  seed = body.get("seed")
  seed = secrets.randbits(63) if seed is None else _number(body, "seed", 0, int)
  try:
    return SamplingSettings(
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float), top_k=_number(body, "top_k", 0, int),
        max_tokens=max_tokens, min_tokens=_number(body, "min_tokens", 0, int), stop=tuple(stop),
        seed=seed)
  except ValueError as e:
    raise BadRequest(str(e)) from None


# Settings that would change the answer and are not implemented: refused unless off.
_UNSUPPORTED = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None,
                "best_of": 1, "suffix": None, "tools": None, "response_format": None}


@dataclasses.dataclass
class Call:
  """A validated request and how to answer it."""
  request: Request
  chat: bool
  stream: bool
  include_usage: bool
  echo_text: str | None  # completions with echo: the prompt text
  top_n: int  # logprob alternatives per token (logprobs asked when request.logprobs)
  as_ids: bool
  deadline: float = 0.0
  id: str = dataclasses.field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))


class RequestReader:
  """Validates request bodies for a LocalTeacher's model: its tokenizer and chat template, its
  positions, the engine's `slots` (the most choices one request may ask for)."""

  def __init__(self, teacher: Any, slots: int):
    self.teacher, self.slots = teacher, int(slots)
    self.positions = teacher.cfg.max_position_embeddings

  def _prompt(self, body: dict) -> str | list[int]:
    """A completions prompt: a string or token ids (also as a one-element list)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
      prompt = prompt[0]
    if isinstance(prompt, list):
      vocab = self.teacher.cfg.vocab_size
      if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                               for t in prompt):
        raise BadRequest(f"'prompt' token ids must be a non-empty list of ints in [0, {vocab})",
                         "prompt")
      return prompt
    if not isinstance(prompt, str) or not prompt:
      raise BadRequest("'prompt' must be a non-empty string or a list of token ids", "prompt")
    return prompt

  @staticmethod
  def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if (not isinstance(msgs, list) or not msgs or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs)):
      raise BadRequest("'messages' must be a non-empty list of {role, content} objects",
                       "messages")
    return [{"role": str(m.get("role", "user")), "content": m["content"]} for m in msgs]

  def _max_tokens(self, body: dict, chat: bool, n_prompt: int, score_only: bool) -> int:
    """max_tokens within the model's positions; 400 naming both numbers otherwise."""
    room = self.positions - n_prompt
    if score_only:
      if room < 0:
        raise BadRequest(f"the prompt has {n_prompt} tokens, more than the model's "
                         f"{self.positions} positions", "prompt", "context_length_exceeded")
      return 1
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    default = max(room, 1) if chat else 16
    max_tokens = _number(body, key, default, int, 1)
    if n_prompt + max_tokens > self.positions:
      raise BadRequest(
          f"the prompt has {n_prompt} tokens and {key} is {max_tokens}: {n_prompt + max_tokens} "
          f"> the model's {self.positions} positions; shorten the prompt or lower {key}",
          key, "context_length_exceeded")
    return max_tokens

  def prepare(self, path: str, body: dict) -> Call:
    """Validates a POST body into a call (nothing queued yet); BadRequest names the key."""
    chat = path == "/v1/chat/completions"
    for key, off in _UNSUPPORTED.items():
      if body.get(key) not in (None, off, {}, []):
        raise BadRequest(f"'{key}' is not supported by sentijax.serve (got {body[key]!r})", key)
    echo = body.get("echo", False)
    if not isinstance(echo, bool) or (echo and chat):
      raise BadRequest("'echo' must be a bool, and only on /v1/completions", "echo")
    n = _number(body, "n", 1, int, 1, self.slots)
    stream = body.get("stream") or False
    opts = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(opts, dict):
      raise BadRequest("'stream' must be a bool and 'stream_options' an object", "stream")
    if chat:
      prompt = self._messages(body)
      want = body.get("logprobs") or False
      top_n = _number(body, "top_logprobs", 0, int, 0, TOP_N) if want else 0
    else:
      prompt = self._prompt(body)
      top_n = _number(body, "logprobs", 0, int, 0, TOP_N)
      want = top_n > 0
    prompt_ids = self.teacher.encode(prompt)
    score_only = echo and body.get("max_tokens") == 0
    sampling = parse_sampling(body, self._max_tokens(body, chat, len(prompt_ids), score_only))
    request = Request(prompt_ids, sampling, n=n, logprobs=bool(want),
                      score_prompt=echo and bool(want), generate=not score_only)
    echo_text = None
    if echo:
      echo_text = prompt if isinstance(prompt, str) else self.teacher.tokenizer.decode(prompt_ids)
    return Call(request, chat, stream, bool(opts.get("include_usage")), echo_text, top_n,
                bool(body.get("return_tokens_as_token_ids")))
