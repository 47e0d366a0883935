"""An OpenAI-compatible HTTP server for a sentijax model (a trained student or a local teacher).

    python -m sentijax.main --config=configs/serve.py --config.model.init=runs/knowdist/hf \
      --config.serve.port=8000

Routes: `GET /v1/models`, `POST /v1/completions` (prompt string or token ids; `logprobs: N`
gives tokens, token_logprobs, top_logprobs as token strings, `return_tokens_as_token_ids: true`
as `token_id:N`; `echo: true` prepends the prompt and its logprobs, the first token's None, and
with `max_tokens: 0` scores the prompt only), `POST /v1/chat/completions` (messages through the
tokenizer's chat template; `logprobs: true` + `top_logprobs: N`), `GET /metrics` (decode steps,
rows per step, queue), `GET /health`. `stream: true` answers server-sent events as the OpenAI API
does (chunks, then `data: [DONE]`; `stream_options.include_usage` adds a usage chunk); the
streamed text equals the non-streamed one.

Sampling: temperature (0 = greedy; default 1 as in the OpenAI API), top_p, top_k, max_tokens
(completions: 16; chat: up to the model's positions), min_tokens, stop, seed (unseeded requests
draw a fresh seed), n. Requests with any mix of settings decode together in one batch of
`max_batch` rows (`serve_engine.Engine`: continuous batching, requests join and leave at step
boundaries).

Limits: prompt + max_tokens beyond the model's positions -> 400 naming both; a body over
`max_body_bytes` -> 413; more than `max_queue` choices waiting for a decode row -> 429 with
Retry-After; a request unanswered after `request_timeout_s` -> 504; SIGTERM (or Ctrl-C) stops
taking requests (503 with Retry-After), lets those in flight finish (up to `drain_timeout_s`),
then exits. With
`serve.api_key_env` naming an environment variable, every route but /health needs
`Authorization: Bearer <its value>` (401 otherwise); the key is never logged. Errors use the
OpenAI shape `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import queue
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sentijax import serve_engine
from sentijax.sampling import SamplingSettings
from sentijax.serve_engine import Delta, Failed, Finished, PromptScores
from sentijax.teacher.local import LocalTeacher

log = logging.getLogger("sentijax")


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


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request and the queue may take (config keys of the same names under `serve`)."""
  max_queue: int = 64  # choices waiting for a free decode row; more -> 429
  max_body_bytes: int = 4 << 20  # larger request bodies -> 413
  request_timeout_s: float = 600.0  # unanswered after this -> 504 (the rows are freed)
  retry_after_s: int = 1  # Retry-After of 429 / 503 answers
  drain_timeout_s: float = 60.0  # SIGTERM: longest wait for requests in flight


@dataclasses.dataclass(frozen=True)
class ServeSpec:
  """`config.serve`, read once."""
  host: str = "127.0.0.1"
  port: int = 8000
  model_name: str = ""  # "" = model.init
  max_batch: int = 0  # decode rows shared by all requests; 0 = teacher.batch_size
  max_wait_ms: float = 5.0  # an idle server gathers concurrent arrivals this long
  api_key_env: str = ""  # NAME of the env variable holding the key; "" = no key
  limits: Limits = Limits()

  @classmethod
  def from_config(cls, c) -> "ServeSpec":
    """Keys missing from `c` (serve sections of the teacher configs) keep these defaults."""
    def get(key, default):
      return type(default)(c.get(key, default))
    limits = Limits(**{f.name: get(f.name, f.default) for f in dataclasses.fields(Limits)})
    return cls(**{f.name: get(f.name, f.default) for f in dataclasses.fields(cls)
                  if f.name != "limits"}, limits=limits)

  def api_key(self) -> str | None:
    if not self.api_key_env:
      return None
    key = os.environ.get(self.api_key_env, "")
    if not key:
      raise ValueError(f"serve.api_key_env={self.api_key_env!r}: that environment variable is "
                       f"empty or unset; export it, or set serve.api_key_env='' for no key")
    return key


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
class _Call:
  """A validated request and how to answer it."""
  request: serve_engine.Request
  chat: bool
  stream: bool
  include_usage: bool
  echo_text: str | None  # completions with echo: the prompt text
  top_n: int  # logprob alternatives per token (logprobs asked when request.logprobs)
  as_ids: bool
  deadline: float = 0.0
  id: str = dataclasses.field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))


class Server:
  """The HTTP server around a LocalTeacher's model; `start()` serves from a background thread."""

  def __init__(self, teacher: LocalTeacher, model_name: str = "", host: str = "127.0.0.1",
               port: int = 0, max_batch: int = 8, max_wait_ms: float = 5.0, *,
               limits: Limits = Limits(), api_key: str | None = None):
    self.teacher, self.model_name = teacher, model_name or teacher.name
    self.limits, self._api_key = limits, api_key
    self.positions = teacher.cfg.max_position_embeddings
    self.engine = serve_engine.Engine(
        teacher.cfg, teacher.params, decode=lambda ids: teacher.tokenizer.decode(
            ids, skip_special_tokens=True), stop_ids=teacher.stop_ids, pad_id=teacher.pad_id,
        slots=max_batch, max_queue=limits.max_queue, max_wait_s=max_wait_ms / 1000.0)
    self._inflight = 0
    self._lock = threading.Lock()
    self.httpd = ThreadingHTTPServer((host, port), _handler(self))
    self.httpd.daemon_threads = True
    self.port = self.httpd.server_address[1]
    self.url = f"http://{host}:{self.port}/v1"

  def start(self) -> "Server":
    threading.Thread(target=self.httpd.serve_forever, daemon=True, name="sentijax-http").start()
    return self

  def stop(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()

  def in_flight(self) -> int:
    """POST requests being answered now."""
    with self._lock:
      return self._inflight

  def drain(self, timeout_s: float) -> bool:
    """Refuses new requests (503), waits up to `timeout_s` for those in flight; True if all
    finished."""
    self.engine.drain()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self.in_flight() == 0 and not self.engine.busy():
        return True
      time.sleep(0.02)
    return False

  def authorized(self, header: str | None) -> bool:
    if self._api_key is None:
      return True
    scheme, _, key = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(),
                                                              self._api_key.encode())

  def metrics(self) -> dict:
    with self.engine.cv:
      return dict(self.engine.stats) | {"waiting": len(self.engine.waiting),
                                        "live_rows": sum(r is not None for r in self.engine.rows),
                                        "slots": self.engine.slots}

  # ---- requests

  def _token(self, token_id: int, as_id: bool = False) -> str:
    return f"token_id:{token_id}" if as_id else self.teacher.tokenizer.decode([token_id])

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

  def _messages(self, body: dict) -> list[dict]:
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

  def prepare(self, path: str, body: dict) -> _Call:
    """Validates a POST body into a call (nothing queued yet); BadRequest names the key."""
    chat = path == "/v1/chat/completions"
    for key, off in _UNSUPPORTED.items():
      if body.get(key) not in (None, off, {}, []):
        raise BadRequest(f"'{key}' is not supported by sentijax.serve (got {body[key]!r})", key)
    echo = body.get("echo", False)
    if not isinstance(echo, bool) or (echo and chat):
      raise BadRequest("'echo' must be a bool, and only on /v1/completions", "echo")
    n = _number(body, "n", 1, int, 1, self.engine.slots)
    stream = body.get("stream") or False
    opts = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(opts, dict):
      raise BadRequest("'stream' must be a bool and 'stream_options' an object", "stream")
    if chat:
      prompt = self._messages(body)
      want = body.get("logprobs") or False
      top_n = _number(body, "top_logprobs", 0, int, 0, serve_engine.TOP_N) if want else 0
    else:
      prompt = self._prompt(body)
      top_n = _number(body, "logprobs", 0, int, 0, serve_engine.TOP_N)
      want = top_n > 0
    prompt_ids = self.teacher.encode(prompt)
    score_only = echo and body.get("max_tokens") == 0
    sampling = parse_sampling(body, self._max_tokens(body, chat, len(prompt_ids), score_only))
    request = serve_engine.Request(prompt_ids, sampling, n=n, logprobs=bool(want),
                                   score_prompt=echo and bool(want), generate=not score_only)
    echo_text = None
    if echo:
      echo_text = prompt if isinstance(prompt, str) else self.teacher.tokenizer.decode(prompt_ids)
    return _Call(request, chat, stream, bool(opts.get("include_usage")), echo_text, top_n,
                 bool(body.get("return_tokens_as_token_ids")))

  def submit(self, call: _Call) -> None:
    call.deadline = time.monotonic() + self.limits.request_timeout_s
    try:
      self.engine.submit(call.request)
    except serve_engine.QueueFull as e:
      raise APIError(429, f"server busy: {e}; retry later", code="rate_limit_exceeded") from None
    except serve_engine.Draining as e:
      raise APIError(503, f"{e}; retry later", code="unavailable") from None

  def _events(self, call: _Call) -> Iterator[Any]:
    """The call's engine events until every choice finished; 504 past the deadline."""
    req = call.request
    todo = req.n if req.generate else 0
    scores = req.score_prompt
    try:
      while todo or scores:
        try:
          ev = req.events.get(timeout=max(call.deadline - time.monotonic(), 0.0))
        except queue.Empty:
          raise APIError(504, f"the request took longer than {self.limits.request_timeout_s} s "
                         f"(serve.request_timeout_s)", code="timeout") from None
        if isinstance(ev, Failed):
          raise APIError(500, f"{type(ev.error).__name__}: {ev.error}")
        todo -= isinstance(ev, Finished)
        scores = scores and not isinstance(ev, PromptScores)
        yield ev
    finally:
      req.cancelled.set()  # done, timed out or the client left: the rows are freed

  # ---- answers

  def _completion_logprobs(self, token_ids, chosen, top_logprobs, call: _Call,
                           offset: int = 0) -> dict:
    """The legacy logprobs object; `chosen` / `top_logprobs` entries may be None (echoed first
    prompt token)."""
    tokens = [self._token(t, call.as_ids) for t in token_ids]
    offsets = []
    for t in tokens:
      offsets.append(offset)
      offset += len(t)
    tops = []
    for top in top_logprobs:  # ids that decode alike (byte pieces) keep the best logprob
      if top is None:
        tops.append(None)
        continue
      pieces: dict[str, float] = {}
      for t, lp in list(top.items())[:call.top_n]:
        pieces.setdefault(self._token(t, call.as_ids), lp)
      tops.append(pieces)
    return {"tokens": tokens, "token_logprobs": list(chosen), "text_offset": offsets,
            "top_logprobs": tops}

  def _chat_logprobs(self, token_ids, chosen, top_logprobs, call: _Call) -> dict:
    def entry(t, lp):
      s = self._token(t)
      return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [entry(t, lp) | {"top_logprobs": [
        entry(a, b) for a, b in list(top.items())[:call.top_n]]}
                        for t, lp, top in zip(token_ids, chosen, top_logprobs)]}

  def _usage(self, call: _Call, completion_tokens: int) -> dict:
    n = len(call.request.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": completion_tokens,
            "total_tokens": n + completion_tokens}

  def _envelope(self, call: _Call, chunk: bool) -> dict:
    kind = ("chat.completion" if call.chat else "text_completion") + (
        ".chunk" if chunk and call.chat else "")
    return {"id": call.id, "object": kind, "created": call.created, "model": self.model_name}

  def complete(self, call: _Call) -> dict:
    """The non-streamed answer (the streamed pieces joined)."""
    req = call.request
    texts = {i: "" for i in range(req.n if req.generate else 1)}
    ids = {i: [] for i in texts}
    chosen = {i: [] for i in texts}
    tops = {i: [] for i in texts}
    finish = {i: "length" for i in texts}
    used = 0
    for ev in self._events(call):
      if isinstance(ev, PromptScores):
        for i in texts:
          ids[i] = list(req.prompt_ids) + ids[i]
          chosen[i], tops[i] = ev.token_logprobs + chosen[i], ev.top_logprobs + tops[i]
      elif isinstance(ev, Delta):
        texts[ev.index] += ev.text
        ids[ev.index] += ev.token_ids
        if ev.token_logprobs is not None:
          chosen[ev.index] += ev.token_logprobs
          tops[ev.index] += ev.top_logprobs
      elif isinstance(ev, Finished):
        finish[ev.index] = ev.reason
        used += ev.completion_tokens
    choices = []
    for i, text in texts.items():
      choice: dict[str, Any] = {"index": i, "finish_reason": finish[i]}
      if call.chat:
        choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = (self._chat_logprobs(ids[i], chosen[i], tops[i], call)
                              if req.logprobs and ids[i] else None)
      else:
        choice["text"] = (call.echo_text or "") + text
        choice["logprobs"] = (self._completion_logprobs(ids[i], chosen[i], tops[i], call)
                              if req.logprobs and ids[i] else None)
      choices.append(choice)
    return self._envelope(call, False) | {"choices": choices, "usage": self._usage(call, used)}

  def stream(self, call: _Call) -> Iterator[dict]:
    """The streamed answer: chunk objects (each sent as `data: <json>`)."""
    req, used = call.request, 0
    usage = {"usage": None} if call.include_usage else {}
    offsets = {i: 0 for i in range(req.n)}

    def chunk(index: int, text: str, logprobs=None, finish=None, first=False) -> dict:
      c: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish}
      if call.chat:
        c["delta"] = ({"role": "assistant", "content": text} if first else
                      {"content": text} if text or finish is None else {})
      else:
        c["text"] = text
      return self._envelope(call, True) | {"choices": [c]} | usage

    if call.chat:
      for i in range(req.n):
        yield chunk(i, "", first=True)
    for ev in self._events(call):
      if isinstance(ev, PromptScores):
        lp = self._completion_logprobs(req.prompt_ids, ev.token_logprobs, ev.top_logprobs, call)
        for i in range(req.n):
          yield chunk(i, call.echo_text or "", lp if req.logprobs else None)
          offsets[i] += len(call.echo_text or "")
      elif isinstance(ev, Delta):
        if call.echo_text is not None and not req.score_prompt and offsets[ev.index] == 0:
          yield chunk(ev.index, call.echo_text)
          offsets[ev.index] += len(call.echo_text)
        lp = None
        if ev.token_logprobs is not None:
          lp = (self._chat_logprobs(ev.token_ids, ev.token_logprobs, ev.top_logprobs, call)
                if call.chat else self._completion_logprobs(
                    ev.token_ids, ev.token_logprobs, ev.top_logprobs, call, offsets[ev.index]))
        offsets[ev.index] += len(ev.text)
        yield chunk(ev.index, ev.text, lp)
      elif isinstance(ev, Finished):
        used += ev.completion_tokens
        yield chunk(ev.index, "", finish=ev.reason)
    if call.include_usage:
      yield self._envelope(call, True) | {"choices": [], "usage": self._usage(call, used)}


def _handler(server: Server):
  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # pylint: disable=arguments-differ
      log.debug("serve: " + fmt, *args)  # the request line only: never headers (the key)

    def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
      data = json.dumps(obj).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      for k, v in (headers or {}).items():
        self.send_header(k, v)
      self.end_headers()
      self.wfile.write(data)

    def _error(self, e: APIError) -> None:
      headers = {"Retry-After": str(server.limits.retry_after_s)} if e.status in (429,
                                                                                  503) else {}
      if e.status in (401, 413):
        self.close_connection = True  # the body was not read
        headers["Connection"] = "close"
      self._send(e.status, e.body(), headers)

    def _check_auth(self) -> bool:
      if server.authorized(self.headers.get("Authorization")):
        return True
      self._error(APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key"))
      return False

    def do_GET(self):  # pylint: disable=invalid-name
      path = self.path.rstrip("/")
      if path == "/health":
        self._send(200, {"status": "ok"})
      elif not self._check_auth():
        return
      elif path == "/v1/models":
        self._send(200, {"object": "list", "data": [
            {"id": server.model_name, "object": "model", "created": 0, "owned_by": "sentijax",
             "max_model_len": server.positions}]})
      elif path == "/metrics":
        self._send(200, server.metrics())
      else:
        self._error(APIError(404, f"no route GET {self.path}", code="not_found"))

    def do_POST(self):  # pylint: disable=invalid-name
      with server._lock:  # pylint: disable=protected-access
        server._inflight += 1  # pylint: disable=protected-access
      try:
        self._post()
      finally:
        with server._lock:  # pylint: disable=protected-access
          server._inflight -= 1  # pylint: disable=protected-access

    def _post(self):
      if not self._check_auth():
        return
      try:
        length = int(self.headers.get("Content-Length") or 0)
      except ValueError:
        length = -1
      if length < 0 or length > server.limits.max_body_bytes:
        self._error(APIError(413, f"the request body has {length} bytes; the limit is "
                             f"{server.limits.max_body_bytes} (serve.max_body_bytes)",
                             code="request_too_large"))
        return
      raw = self.rfile.read(length)
      try:
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
          raise APIError(404, f"no route POST {self.path}", code="not_found")
        try:
          body = json.loads(raw)
        except json.JSONDecodeError as e:
          raise BadRequest(f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
          raise BadRequest("the body must be a JSON object")
        call = server.prepare(self.path, body)
        server.submit(call)
        if call.stream:
          self._stream(call)
        else:
          self._send(200, server.complete(call))
      except APIError as e:
        self._error(e)
      except Exception as e:  # pylint: disable=broad-except
        log.exception("request failed")
        self._error(APIError(500, f"{type(e).__name__}: {e}"))

    def _stream(self, call: _Call) -> None:
      self.send_response(200)
      self.send_header("Content-Type", "text/event-stream")
      self.send_header("Cache-Control", "no-cache")
      self.send_header("Connection", "close")
      self.end_headers()
      self.close_connection = True
      chunks = server.stream(call)
      try:
        try:
          for c in chunks:
            self.wfile.write(f"data: {json.dumps(c)}\n\n".encode("utf-8"))
            self.wfile.flush()
        except APIError as e:  # after the headers: an error event ends the stream
          self.wfile.write(f"data: {json.dumps(e.body())}\n\n".encode("utf-8"))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
      except (BrokenPipeError, ConnectionResetError):
        log.debug("serve: client left a stream")
      finally:
        chunks.close()  # frees the rows of a request whose client left

  return Handler


def serve_until_signal(server: Server, drain_timeout_s: float) -> bool:
  """Serves until SIGTERM / SIGINT, then drains (503 for new requests) and closes; True when
  every request in flight finished."""
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  server.start()
  log.info("serving %s at %s", server.model_name, server.url)
  while not stop.wait(0.05):
    pass
  log.info("signal received: draining %d requests in flight (up to %.0f s)", server.in_flight(),
           drain_timeout_s)
  clean = server.drain(drain_timeout_s)
  server.stop()
  log.info("stopped (%s)", "drained" if clean else "drain timed out")
  return clean


def run(config) -> None:
  """`config.job = "serve"`: serves `config.model` until SIGTERM / Ctrl-C."""
  spec = ServeSpec.from_config(config.serve)
  api_key = spec.api_key()
  teacher = LocalTeacher.from_config(config)
  server = Server(teacher, spec.model_name or teacher.name, spec.host, spec.port,
                  spec.max_batch or int(config.teacher.batch_size), spec.max_wait_ms,
                  limits=spec.limits, api_key=api_key)
  serve_until_signal(server, spec.limits.drain_timeout_s)
