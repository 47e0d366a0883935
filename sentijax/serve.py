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
boundaries). Requests are validated in serve_requests.py, answers shaped in serve_answers.py.

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
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sentijax import serve_engine
from sentijax.serve_answers import Answers
from sentijax.serve_events import Draining, QueueFull
from sentijax.serve_requests import APIError, BadRequest, Call, RequestReader
from sentijax.teacher.local import LocalTeacher

log = logging.getLogger("sentijax")


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
    self.requests = RequestReader(teacher, self.engine.slots)
    self.answers = Answers(teacher.tokenizer, self.model_name, limits.request_timeout_s)
    self._inflight = 0
    self._lock = threading.Lock()
    self.httpd = ThreadingHTTPServer((host, port), type("Handler", (_Handler,), {"app": self}))
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

  def track(self, delta: int) -> None:
    """Counts POST requests in flight (+1 on arrival, -1 when answered)."""
    with self._lock:
      self._inflight += delta

  def submit(self, call: Call) -> None:
    call.deadline = time.monotonic() + self.limits.request_timeout_s
    try:
      self.engine.submit(call.request)
    except QueueFull as e:
      raise APIError(429, f"server busy: {e}; retry later", code="rate_limit_exceeded") from None
    except Draining as e:
      raise APIError(503, f"{e}; retry later", code="unavailable") from None

  def answer(self, path: str, body: Any) -> tuple[Call, Any]:
    """Validates and queues a POST body of route `path`: (the call, its whole answer or an
    iterator of stream chunks)."""
    if not isinstance(body, dict):
      raise BadRequest("the body must be a JSON object")
    call = self.requests.prepare(path, body)
    self.submit(call)
    return call, self.answers.stream(call) if call.stream else self.answers.complete(call)


class _Handler(BaseHTTPRequestHandler):
  """The HTTP side of `app` (a Server, set on the subclass each Server makes)."""
  protocol_version = "HTTP/1.1"
  app: Server

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
    headers = ({"Retry-After": str(self.app.limits.retry_after_s)} if e.status in (429, 503)
               else {})
    if e.status in (401, 413):
      self.close_connection = True  # the body was not read
      headers["Connection"] = "close"
    self._send(e.status, e.body(), headers)

  def _check_auth(self) -> bool:
    if self.app.authorized(self.headers.get("Authorization")):
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
          {"id": self.app.model_name, "object": "model", "created": 0, "owned_by": "sentijax",
           "max_model_len": self.app.positions}]})
    elif path == "/metrics":
      self._send(200, self.app.metrics())
    else:
      self._error(APIError(404, f"no route GET {self.path}", code="not_found"))

  def do_POST(self):  # pylint: disable=invalid-name
    self.app.track(+1)
    try:
      self._post()
    finally:
      self.app.track(-1)

  def _body(self) -> bytes | None:
    """The request body; None (413 sent) when its length is missing or over the limit."""
    try:
      length = int(self.headers.get("Content-Length") or 0)
    except ValueError:
      length = -1
    limit = self.app.limits.max_body_bytes
    if length < 0 or length > limit:
      self._error(APIError(413, f"the request body has {length} bytes; the limit is {limit} "
                           "(serve.max_body_bytes)", code="request_too_large"))
      return None
    return self.rfile.read(length)

  def _post(self):
    if not self._check_auth():
      return
    raw = self._body()
    if raw is None:
      return
    try:
      if self.path not in ("/v1/completions", "/v1/chat/completions"):
        raise APIError(404, f"no route POST {self.path}", code="not_found")
      try:
        body = json.loads(raw)
      except json.JSONDecodeError as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
      call, answer = self.app.answer(self.path, body)
      if call.stream:
        self._stream(answer)
      else:
        self._send(200, answer)
    except APIError as e:
      self._error(e)
    except Exception as e:  # pylint: disable=broad-except
      log.exception("request failed")
      self._error(APIError(500, f"{type(e).__name__}: {e}"))

  def _stream(self, chunks: Iterator[dict]) -> None:
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Connection", "close")
    self.end_headers()
    self.close_connection = True
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
