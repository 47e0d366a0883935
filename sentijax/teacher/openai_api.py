"""OpenAI-compatible teacher: vLLM, SGLang, TGI, llama.cpp's server, lmdeploy, `sentijax.serve`.

Requests go through one `httpx.Client` from a pool of `concurrency` threads. A request is retried
with exponential backoff and full jitter (sleep ~ U(0, min(max_backoff, backoff * 2^attempt)))
on 408/409/429/5xx, timeouts, dropped or refused connections, and bodies that are not the JSON an
OpenAI server sends; other 4xx fail at once. After `max_retries` retries the item fails with a
TeacherError (the job writes it to rejects).

Rate limits: a 429, or any retryable answer carrying `Retry-After` (seconds or an HTTP-date),
pauses the WHOLE client: no worker sends until the pause ends (Retry-After, capped at
`max_retry_after_s`; without one, the backoff delay), and each then waits its own small random
extra (up to 10% of the pause + `backoff_s`), so workers do not retry in lock-step. Waiting out
a pause costs no retry.

Logprobs: servers return token STRINGS (llama.cpp and vLLM: decoded pieces, <= 20 per position).
Each is mapped to an id with the tokenizer when it encodes to exactly one token; otherwise it is
dropped and counted in `Completion.unmapped` (the job reports the total). Strings of the form
`token_id:N` (vLLM's `return_tokens_as_token_ids`, also `sentijax.serve`) are the id N itself.

Prompt scoring (`prompt_logprobs`: the offline top-k store; `prompt_token_logprobs`: a served
on-policy teacher): the token ids themselves are sent as the prompt of `/v1/completions` with
`echo: true, logprobs: k, max_tokens: 0, return_tokens_as_token_ids: true`, so the server scores
exactly these ids (teacher forcing) and returns, at every prompt position, its top-k and the
log-prob of the prompt token itself (`token_logprobs`; vLLM and `sentijax.serve` do). A well-formed
completion without them (llama.cpp's server) is `backend.MissingCapability`, not retried.

The API key is read from the environment variable named in the config, sent only in the
Authorization header, and scrubbed from every error message this module produces (from the
server's text before it is cut short, so no prefix of the key survives).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from sentijax.sampling import SamplingSettings
from sentijax.teacher import backend
from sentijax.teacher.common import Completion, TeacherConfigError, TeacherError

log = logging.getLogger("sentijax")

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
FATAL_STATUS = {401: "check the key in teacher.api_key_env", 403: "check the key's permissions",
                404: "check teacher.base_url (ends in /v1?), teacher.endpoint and teacher.model"}


class _Retryable(Exception):
  """A failure worth another try; `pause`: the whole client should wait (429 / Retry-After)."""

  def __init__(self, message: str, retry_after: float = 0.0, pause: bool = False):
    super().__init__(message)
    self.retry_after, self.pause = retry_after, pause


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
  """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date); None when absent
  or unreadable. A date in the past gives 0."""
  if value is None or not value.strip():
    return None
  value = value.strip()
  try:
    seconds = float(value)
  except ValueError:
    try:
      when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
      return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
      return None
    seconds = when.timestamp() - (time.time() if now is None else now)
  return max(0.0, seconds) if seconds == seconds else None  # NaN -> None


@dataclasses.dataclass(frozen=True)
class ClientSpec:
  """A server and how to talk to it: `config.teacher` (teacher/config.py), read once.

  base_url: e.g. http://127.0.0.1:8000/v1; model: the served model name; endpoint: "chat"
  (/chat/completions, the prompt as one user message) or "completions"; api_key_env: NAME of the
  environment variable holding the key ("" = no key); tokenizer: the teacher's tokenizer dir
  (maps logprob token strings to ids; "" = none: no token logprobs).
  """
  base_url: str
  model: str
  endpoint: str = "chat"
  api_key_env: str = ""
  concurrency: int = 8
  timeout_s: float = 60.0
  max_retries: int = 5
  backoff_s: float = 0.5
  max_backoff_s: float = 30.0
  max_retry_after_s: float = 300.0
  system_prompt: str = ""
  tokenizer: str = ""

  def __post_init__(self):
    if self.endpoint not in ("chat", "completions"):
      raise ValueError(f"teacher.endpoint must be 'chat' or 'completions', got {self.endpoint!r}")
    if self.max_retry_after_s < 0:
      raise ValueError(f"teacher.max_retry_after_s must be >= 0, got {self.max_retry_after_s}")

  @classmethod
  def from_config(cls, tc) -> "ClientSpec":
    return cls(**{f.name: type(f.default)(tc[f.name]) if f.default is not dataclasses.MISSING
                  else str(tc[f.name]) for f in dataclasses.fields(cls)})


class OpenAITeacher:
  """Completions (and prompt logprobs) from an OpenAI-compatible server; a
  `backend.TeacherBackend`. `tokenizer`: maps logprob token strings to ids (None: token
  logprobs cannot be asked for)."""

  CONFIG_KEYS = {"model": "teacher.model", "tokenizer": "teacher.tokenizer",
                 "base_url": "teacher.base_url", "endpoint": "teacher.endpoint",
                 "system_prompt": "teacher.system_prompt"}
  collective = False  # each process sends its own requests

  def __init__(self, spec: ClientSpec, tokenizer: Any = None):
    self.spec, self.tokenizer = spec, tokenizer
    base = spec.base_url.rstrip("/")
    self.url = base + ("/chat/completions" if spec.endpoint == "chat" else "/completions")
    self.completions_url = base + "/completions"
    self.model, self.endpoint, self.system_prompt = spec.model, spec.endpoint, spec.system_prompt
    self.concurrency, self.max_retries = max(1, int(spec.concurrency)), int(spec.max_retries)
    self.backoff_s, self.max_backoff_s = float(spec.backoff_s), float(spec.max_backoff_s)
    self.max_retry_after_s = float(spec.max_retry_after_s)
    self.name = f"openai:{spec.model}"
    self._key = ""
    if spec.api_key_env:
      self._key = os.environ.get(spec.api_key_env, "")
      if not self._key:
        raise ValueError(f"teacher.api_key_env={spec.api_key_env!r}: that environment variable "
                         "is not set or empty")
    headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
    self._client = httpx.Client(
        headers=headers, timeout=httpx.Timeout(spec.timeout_s),
        limits=httpx.Limits(max_connections=self.concurrency,
                            max_keepalive_connections=self.concurrency))
    self._rng = random.Random()
    self._rng_lock = threading.Lock()
    self._pause_until = 0.0  # time.monotonic() before which no request is sent (429)
    self.retries = 0  # retries made so far (all items)
    self.pauses = 0  # client-wide pauses (429 / Retry-After)

  @classmethod
  def from_config(cls, config) -> "OpenAITeacher":
    spec = ClientSpec.from_config(config.teacher)
    tokenizer = None
    if spec.tokenizer:
      from sentijax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
      tokenizer = tok_lib.load_tokenizer(spec.tokenizer)
    return cls(spec, tokenizer)

  @staticmethod
  def answer_settings(config) -> dict:
    """What besides the prompt and sampling changes an answer: the server, model, endpoint,
    system prompt and tokenizer."""
    tc = config.teacher
    return {"model": str(tc.model), "base_url": str(tc.base_url).rstrip("/"),
            "endpoint": str(tc.endpoint), "system_prompt": str(tc.system_prompt),
            "tokenizer": str(tc.tokenizer)}

  @property
  def capabilities(self) -> backend.Capabilities:
    """Prompt logprobs (servers that echo them); token logprobs with a tokenizer."""
    far = "a server returns at most 20 logprobs per position: use teacher.backend=local"
    have = {backend.PROMPT_LOGPROBS} | ({backend.TOKEN_LOGPROBS} if self.tokenizer else set())
    return backend.Capabilities(frozenset(have), {
        backend.TOKEN_LOGPROBS: "set teacher.tokenizer to the teacher's tokenizer dir (maps the "
                                "server's token strings to ids)",
        backend.NEXT_TOKEN_DISTRIBUTION: far, backend.MODEL: far})

  def _scrub(self, text: str) -> str:
    return text.replace(self._key, "***") if self._key else text

  def _server_text(self, response: httpx.Response, limit: int) -> str:
    """The server's text, key scrubbed, THEN cut to `limit` characters (a cut key would not
    match the scrub and would leak its prefix)."""
    return self._scrub(response.text)[:limit]

  def body(self, prompt: str, s: SamplingSettings, logprobs: int) -> dict:
    """The JSON request for one prompt (non-OpenAI extras only when set: top_k, min_tokens,
    repetition_penalty)."""
    body: dict[str, Any] = {"model": self.model, "max_tokens": s.max_tokens,
                            "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}
    if s.stop:
      body["stop"] = list(s.stop)
    if s.top_k:
      body["top_k"] = s.top_k
    if s.min_tokens:
      body["min_tokens"] = s.min_tokens
    if s.repetition_penalty != 1.0:
      body["repetition_penalty"] = s.repetition_penalty
    if self.endpoint == "chat":
      messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
      body["messages"] = messages + [{"role": "user", "content": prompt}]
      if logprobs:
        body |= {"logprobs": True, "top_logprobs": logprobs}
    else:
      body["prompt"] = prompt
      if logprobs:
        body["logprobs"] = logprobs
    return body

  def _token_id(self, piece: str) -> int | None:
    if piece.startswith("token_id:") and piece[9:].isdigit():
      return int(piece[9:])
    if self.tokenizer is None:
      return None
    ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None

  def _parse(self, obj: Any) -> Completion:
    """A Completion from a response body; _Retryable when it is not what a server sends."""
    try:
      choice = obj["choices"][0]
      text = choice["message"]["content"] if self.endpoint == "chat" else choice["text"]
      if not isinstance(text, str):
        raise TypeError(f"text is {type(text).__name__}")
      finish = str(choice.get("finish_reason") or "unknown")
      usage = obj.get("usage") or {}
      tokens = int(usage.get("completion_tokens") or 0)
      tops = None
      lp = choice.get("logprobs")
      if lp:
        if self.endpoint == "chat":
          tops = [{e["token"]: float(e["logprob"]) for e in pos["top_logprobs"]}
                  for pos in lp["content"]]
        else:
          tops = [{k: float(v) for k, v in pos.items()} for pos in lp["top_logprobs"]]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
      raise _Retryable(f"malformed response ({type(e).__name__}: {e})") from None
    c = Completion(text=text, finish_reason=finish, completion_tokens=tokens)
    if tops is not None:
      if self.tokenizer is None:
        raise TeacherError("logprobs asked for but no tokenizer to map token strings to ids")
      c.top_logprobs = []
      for top in tops:
        mapped = {}
        for piece, value in top.items():
          token_id = self._token_id(piece)
          if token_id is None:
            c.unmapped += 1
          else:
            mapped.setdefault(token_id, value)
        c.top_logprobs.append(mapped)
    return c

  def _once(self, body: dict, url: str | None = None, parse=None) -> Any:
    try:
      response = self._client.post(url or self.url, json=body)
    except httpx.TimeoutException as e:
      raise _Retryable(f"timeout ({type(e).__name__})") from None
    except httpx.TransportError as e:  # refused, reset, dropped mid-response, protocol errors
      raise _Retryable(f"connection error ({type(e).__name__}: {e})") from None
    status = response.status_code
    if status in RETRY_STATUS:
      retry_after = parse_retry_after(response.headers.get("retry-after"))
      raise _Retryable(f"HTTP {status}: {self._server_text(response, 200)}",
                       retry_after or 0.0, pause=status == 429 or retry_after is not None)
    if status in FATAL_STATUS:
      raise TeacherConfigError(f"HTTP {status} from {url or self.url} ({FATAL_STATUS[status]}): "
                               f"{self._server_text(response, 300)}")
    if status != 200:
      raise TeacherError(f"HTTP {status} from {url or self.url}: "
                         f"{self._server_text(response, 500)}")
    try:
      obj = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise _Retryable(f"malformed JSON ({e})") from None
    return (parse or self._parse)(obj)

  def complete(self, prompt: str, s: SamplingSettings, logprobs: int = 0) -> Completion:
    """One completion, retried; TeacherError (key scrubbed) when it fails for good."""
    return self._retried(self.body(prompt, s, logprobs))

  def prompt_logprobs(self, token_ids: Sequence[int], k: int, max_tokens: int = 0
                      ) -> tuple[list[dict[int, float] | None], int]:
    """The server's top-k {id: logprob} for each of `token_ids` given the ids before it (None
    for the first), scored as sent (echo), and the number of unmappable token strings."""
    _, tops, unmapped = self._echo(token_ids, k, max_tokens)
    return tops, unmapped

  def prompt_token_logprobs(self, token_ids: Sequence[int], max_tokens: int = 0
                            ) -> list[float | None]:
    """The log-prob of each of `token_ids` itself given the ids before it (None for the first),
    scored as sent (echo's `token_logprobs`: the chosen token's, in or out of any top-N)."""
    return self._echo(token_ids, 1, max_tokens)[0]

  def prompt_token_scores(self, token_ids: Sequence[int], k: int, max_tokens: int = 0
                          ) -> tuple[list[float | None], list[dict[int, float] | None]]:
    """Both in one request: each of `token_ids`' own log-prob (as `prompt_token_logprobs`) and
    the server's top-k {id: logprob} at each position (as `prompt_logprobs`; None for the
    first). Ids come back as ids (`return_tokens_as_token_ids`); a key that maps to no id is
    dropped, so a position may hold fewer than k (the caller checks)."""
    chosen, tops, _ = self._echo(token_ids, k, max_tokens)
    return chosen, tops

  def _echo(self, token_ids: Sequence[int], k: int, max_tokens: int
            ) -> tuple[list[float | None], list[dict[int, float] | None], int]:
    """(chosen logprobs, top-k {id: logprob}, unmappable strings) of `token_ids` scored by the
    server with echo; MissingCapability when it answers without the prompt's logprobs."""
    ids = [int(t) for t in token_ids]
    body = {"model": self.model, "prompt": ids, "echo": True, "logprobs": int(k),
            "max_tokens": int(max_tokens), "temperature": 0.0,
            "return_tokens_as_token_ids": True}

    def parse(obj: Any):
      tokens, chosen, pieces = self._echoed(obj, len(ids), int(max_tokens))
      for i, (piece, want) in enumerate(zip(tokens, ids)):  # exact check when ids come back
        got = self._token_id(str(piece)) if str(piece).startswith("token_id:") else want
        if got != want:
          raise TeacherError(f"the server echoed token {piece!r} at position {i} for id {want}: "
                             "it does not score the ids as sent (another tokenizer?)")
      out, unmapped = [], 0
      for top in pieces:
        if top is None:
          out.append(None)
          continue
        mapped: dict[int, float] = {}
        for piece, value in top.items():
          token_id = self._token_id(piece)
          if token_id is None:
            unmapped += 1
          else:
            mapped.setdefault(token_id, value)
        out.append(mapped)
      return chosen, out, unmapped

    return self._retried(body, self.completions_url, parse)

  def _echoed(self, obj: Any, n: int, max_tokens: int) -> tuple[list, list, list]:
    """(tokens, chosen logprobs, top-k pieces) of the first n echoed positions. _Retryable for a
    body that is no completion; MissingCapability for a completion without prompt logprobs
    (llama.cpp's server ignores echo)."""
    try:
      choice = obj["choices"][0]
      if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
        raise TypeError("choices[0] has no text")
    except (KeyError, IndexError, TypeError) as e:
      raise _Retryable(f"malformed echo response ({type(e).__name__}: {e})") from None
    lp = choice.get("logprobs")
    try:
      tokens, chosen, tops = (lp[key][:n] for key in ("tokens", "token_logprobs", "top_logprobs"))
      if not len(tokens) == len(chosen) == len(tops) == n:
        raise ValueError(f"{len(tokens)} echoed tokens for a prompt of {n}")
      chosen = [None if c is None else float(c) for c in chosen]
      pieces = [None if top is None else {str(p): float(v) for p, v in top.items()}
                for top in tops]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
      raise backend.MissingCapability(
          f"teacher backend {type(self).__name__} ({self.name!r}): the server at "
          f"{self.completions_url} answered a prompt-scoring request (echo + logprobs, "
          f"max_tokens {max_tokens}) without the prompt's logprobs ({type(e).__name__}: {e}): "
          f"it lacks the {backend.PROMPT_LOGPROBS!r} capability "
          f"({backend.MEANING[backend.PROMPT_LOGPROBS]}). llama.cpp's server does not echo "
          "them; serve the teacher with vLLM or sentijax.serve") from None
    return tokens, chosen, pieces

  def _wait_for_pause(self) -> None:
    """Sleeps while a client-wide pause lasts, then a random extra so workers spread out."""
    while True:
      with self._rng_lock:
        left = self._pause_until - time.monotonic()
        if left <= 0:
          return
        extra = self._rng.uniform(0, 0.1 * left + self.backoff_s)
      time.sleep(left + extra)

  def _backoff(self, attempt: int, e: _Retryable) -> None:
    """After failed `attempt`: a client-wide pause (429 / Retry-After) or this worker's own
    backoff sleep."""
    with self._rng_lock:
      delay = self._rng.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** attempt))
      self.retries += 1
      if e.pause:
        wanted = e.retry_after
        if wanted > self.max_retry_after_s:
          log.warning("teacher: server asks to wait %.0f s (Retry-After); waiting "
                      "teacher.max_retry_after_s=%.0f s", wanted, self.max_retry_after_s)
          wanted = self.max_retry_after_s
        until = time.monotonic() + max(wanted, delay)
        if until > self._pause_until:
          self._pause_until = until
          self.pauses += 1
    if not e.pause:
      time.sleep(delay)

  def _retried(self, body: dict, url: str | None = None, parse=None) -> Any:
    for attempt in range(self.max_retries + 1):
      self._wait_for_pause()
      try:
        return self._once(body, url, parse)
      except _Retryable as e:
        if attempt == self.max_retries:
          raise TeacherError(self._scrub(f"gave up after {attempt + 1} attempts: {e}")) from None
        self._backoff(attempt, e)
      except TeacherError as e:
        raise type(e)(self._scrub(str(e))) from None
    raise AssertionError("unreachable")

  def stream(self, items: Sequence[Any], s: SamplingSettings, logprobs: int = 0
             ) -> Iterator[tuple[Any, Completion | Exception]]:
    """(item, completion or TeacherError) as requests finish, `concurrency` in flight."""
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      futures = {pool.submit(self.complete, item.prompt, s, logprobs): item for item in items}
      try:
        for future in concurrent.futures.as_completed(futures):
          try:
            yield futures[future], future.result()
          except TeacherError as e:  # already scrubbed; the type tells the job to stop or not
            yield futures[future], e
          except Exception as e:  # pylint: disable=broad-except
            yield futures[future], TeacherError(self._scrub(f"{type(e).__name__}: {e}"))
      finally:
        for future in futures:
          future.cancel()

  def close(self) -> None:
    self._client.close()
