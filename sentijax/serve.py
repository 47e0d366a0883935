"""An OpenAI-compatible HTTP server for a sentijax model (a trained student or a local teacher).

    python -m sentijax.main --config=configs/generate_knowdist.py --config.job=serve \
      --config.model.init=runs/knowdist/hf --config.serve.port=8000

Routes: `GET /v1/models`, `POST /v1/completions` (prompt string or token ids; `logprobs: N` gives
tokens, token_logprobs, top_logprobs as token strings, `return_tokens_as_token_ids: true` as
`token_id:N`; `echo: true` prepends the prompt and its logprobs, the first token's None, and with
`max_tokens: 0` scores the prompt only: one forward, no decoding), `POST /v1/chat/completions`
(messages through the tokenizer's chat template; `logprobs: true` + `top_logprobs: N`).
Sampling: temperature (0 = greedy; default 1 as in the OpenAI API), top_p, top_k, max_tokens,
min_tokens, stop, seed; `n` must be 1. A seeded request samples the same text whatever else is in flight: concurrent
requests are gathered for up to `max_wait_ms` into batches of up to `batch_size` rows and decoded
together by `LocalTeacher` (per-row random keys), every batch padded to the full batch size (one
compiled shape per prompt-length bucket). Handler threads block on their row's result.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sentijax.teacher.common import Completion, Sampling
from sentijax.teacher.local import LocalTeacher

log = logging.getLogger("sentijax")


class BadRequest(ValueError):
  """The request body is invalid (answered with HTTP 400)."""


@dataclasses.dataclass
class _Job:
  prompt: Any  # str (completions) or a message list (chat)
  sampling: Sampling
  logprobs: int
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  result: Any = None
  error: Exception | None = None


class Batcher:
  """One worker thread: gathers queued jobs and decodes them in batches with the same settings."""

  def __init__(self, teacher: LocalTeacher, max_batch: int, max_wait_s: float):
    self.teacher, self.max_batch, self.max_wait_s = teacher, max_batch, max_wait_s
    self.jobs: queue.Queue[_Job] = queue.Queue()
    self.batches: list[int] = []  # batch sizes run so far (observability and tests)
    self._thread = threading.Thread(target=self._loop, daemon=True, name="sentijax-batcher")
    self._thread.start()

  def submit(self, job: _Job) -> _Job:
    self.jobs.put(job)
    job.done.wait()
    if job.error is not None:
      raise job.error
    return job

  def _loop(self) -> None:
    while True:
      batch = [self.jobs.get()]
      deadline = time.monotonic() + self.max_wait_s
      while len(batch) < self.max_batch:
        try:
          batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
          break
      groups: dict[tuple, list[_Job]] = {}
      for job in batch:
        groups.setdefault((job.sampling, job.logprobs), []).append(job)
      for (sampling, logprobs), jobs in groups.items():
        self.batches.append(len(jobs))
        try:
          keys = [json.dumps(j.prompt, sort_keys=True) for j in jobs]
          results = self.teacher.generate([j.prompt for j in jobs], keys, sampling, logprobs,
                                          min_rows=min(self.max_batch, self.teacher.batch_size))
          for job, result in zip(jobs, results):
            job.result = result
        except Exception as e:  # pylint: disable=broad-except
          log.exception("generation failed")
          for job in jobs:
            job.error = e
        for job in jobs:
          job.done.set()


def _number(body: dict, key: str, default, kind, lo=None, hi=None):
  value = body.get(key, default)
  if value is None:
    value = default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      kind is int and value != int(value)):
    raise BadRequest(f"'{key}' must be a {kind.__name__}, got {value!r}")
  value = kind(value)
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    raise BadRequest(f"'{key}' must be in [{lo}, {hi}], got {value}")
  return value


def parse_sampling(body: dict, max_tokens_limit: int) -> Sampling:
  """Sampling from an OpenAI request body; BadRequest naming the key."""
  if _number(body, "n", 1, int) != 1:
    raise BadRequest("only 'n' = 1 is supported")
  stop = body.get("stop") or []
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
    raise BadRequest("'stop' must be a string or a list of strings")
  max_tokens = _number(body, "max_tokens", body.get("max_completion_tokens", 16), int, 1,
                       max_tokens_limit)
  try:
    return Sampling(temperature=_number(body, "temperature", 1.0, float, 0.0),
                    top_p=_number(body, "top_p", 1.0, float), top_k=_number(body, "top_k", 0, int),
                    max_tokens=max_tokens, min_tokens=_number(body, "min_tokens", 0, int),
                    stop=tuple(stop), seed=_number(body, "seed", 0, int))
  except ValueError as e:
    raise BadRequest(str(e)) from None


class Server:
  """The HTTP server around a LocalTeacher; `start()` serves from a background thread."""

  def __init__(self, teacher: LocalTeacher, model_name: str, host: str = "127.0.0.1",
               port: int = 0, max_batch: int = 8, max_wait_ms: float = 5.0,
               max_tokens_limit: int = 4096):
    self.teacher, self.model_name, self.max_tokens_limit = teacher, model_name, max_tokens_limit
    self.batcher = Batcher(teacher, max_batch, max_wait_ms / 1000.0)
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

  def _token(self, token_id: int, as_id: bool = False) -> str:
    return f"token_id:{token_id}" if as_id else self.teacher.tokenizer.decode([token_id])

  def _completion_logprobs(self, token_ids, chosen, top_logprobs, as_ids: bool = False) -> dict:
    """The legacy logprobs object; `chosen` / `top_logprobs` entries may be None (echoed first
    prompt token)."""
    tokens = [self._token(t, as_ids) for t in token_ids]
    offsets, pos = [], 0
    for t in tokens:
      offsets.append(pos)
      pos += len(t)
    tops = []
    for top in top_logprobs:  # ids that decode alike (byte pieces) keep the best logprob
      if top is None:
        tops.append(None)
        continue
      pieces: dict[str, float] = {}
      for t, lp in top.items():
        pieces.setdefault(self._token(t, as_ids), lp)
      tops.append(pieces)
    return {"tokens": tokens, "token_logprobs": list(chosen), "text_offset": offsets,
            "top_logprobs": tops}

  def _prompt(self, body: dict) -> str | list[int]:
    """A completions prompt: a string or token ids (also as a one-element list)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
      prompt = prompt[0]
    if isinstance(prompt, list):
      vocab = self.teacher.cfg.vocab_size
      if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                               for t in prompt):
        raise BadRequest(f"'prompt' token ids must be a non-empty list of ints in [0, {vocab})")
      return prompt
    if not isinstance(prompt, str) or not prompt:
      raise BadRequest("'prompt' must be a non-empty string or a list of token ids")
    return prompt

  def _chat_logprobs(self, c) -> dict:
    def entry(t, lp):
      s = self._token(t)
      return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [entry(t, lp) | {"top_logprobs": [entry(a, b) for a, b in top.items()]}
                        for t, lp, top in zip(c.token_ids, c.token_logprobs, c.top_logprobs)]}

  def handle(self, path: str, body: dict) -> dict:
    """The JSON answer to a POST on `path`; BadRequest for invalid bodies."""
    chat = path == "/v1/chat/completions"
    echo = body.get("echo", False)
    if not isinstance(echo, bool) or (echo and chat):
      raise BadRequest("'echo' must be a bool, and only on /v1/completions")
    score_only = echo and body.get("max_tokens") == 0  # the prompt's logprobs, no decoding
    sampling = parse_sampling(body | {"max_tokens": 1} if score_only else body,
                              self.max_tokens_limit)
    if chat:
      prompt = body.get("messages")
      if (not isinstance(prompt, list) or not prompt or not all(
          isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt)):
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
      prompt = [{"role": str(m.get("role", "user")), "content": m["content"]} for m in prompt]
      logprobs = _number(body, "top_logprobs", 0, int, 0, 20) if body.get("logprobs") else 0
      want_logprobs = bool(body.get("logprobs"))
    else:
      prompt = self._prompt(body)
      logprobs = _number(body, "logprobs", 0, int, 0, 20)
      want_logprobs = logprobs > 0
    prompt_ids = self.teacher.encode(prompt)
    if score_only:
      c = Completion(text="", finish_reason="length", completion_tokens=0, token_ids=[],
                     token_logprobs=[], top_logprobs=[])
    else:
      c = self.batcher.submit(_Job(prompt, sampling, max(logprobs, 1) if want_logprobs
                                   else 0)).result
    as_ids = bool(body.get("return_tokens_as_token_ids"))
    choice = {"index": 0, "finish_reason": c.finish_reason}
    if chat:
      choice["message"] = {"role": "assistant", "content": c.text}
      choice["logprobs"] = self._chat_logprobs(c) if want_logprobs and c.token_ids else None
    else:
      ids, chosen, tops = list(c.token_ids or []), c.token_logprobs, c.top_logprobs
      choice["text"] = c.text
      if echo:
        choice["text"] = (prompt if isinstance(prompt, str) else
                          self.teacher.tokenizer.decode(prompt_ids)) + c.text
        if want_logprobs:
          p_chosen, p_tops = self.teacher.logprobs(prompt_ids[:1], prompt_ids[1:], logprobs)
          ids, chosen, tops = prompt_ids + ids, [None] + p_chosen + chosen, [None] + p_tops + tops
      choice["logprobs"] = (self._completion_logprobs(ids, chosen, tops, as_ids)
                            if want_logprobs and ids else None)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "chat.completion" if chat
            else "text_completion", "created": int(time.time()), "model": self.model_name,
            "choices": [choice],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": c.completion_tokens,
                      "total_tokens": len(prompt_ids) + c.completion_tokens}}


def _handler(server: Server):
  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # pylint: disable=arguments-differ
      log.debug("serve: " + fmt, *args)

    def _send(self, status: int, obj: dict) -> None:
      data = json.dumps(obj).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
      self._send(status, {"error": {"message": message, "type": "invalid_request_error"
                                    if status < 500 else "server_error", "code": status}})

    def do_GET(self):  # pylint: disable=invalid-name
      if self.path.rstrip("/") == "/v1/models":
        self._send(200, {"object": "list", "data": [
            {"id": server.model_name, "object": "model", "owned_by": "sentijax"}]})
      else:
        self._error(404, f"no route {self.path}")

    def do_POST(self):  # pylint: disable=invalid-name
      length = int(self.headers.get("Content-Length") or 0)
      raw = self.rfile.read(length)
      if self.path not in ("/v1/completions", "/v1/chat/completions"):
        self._error(404, f"no route {self.path}")
        return
      try:
        body = json.loads(raw)
        if not isinstance(body, dict):
          raise BadRequest("the body must be a JSON object")
        self._send(200, server.handle(self.path, body))
      except (BadRequest, json.JSONDecodeError) as e:
        self._error(400, str(e))
      except Exception as e:  # pylint: disable=broad-except
        self._error(500, f"{type(e).__name__}: {e}")

  return Handler


def load_teacher(config) -> LocalTeacher:
  """A LocalTeacher from `config.model` (HF dir in model.init, else the preset + tokenizer)."""
  from sentijax import sharding  # pylint: disable=import-outside-toplevel
  from sentijax.train import student  # pylint: disable=import-outside-toplevel
  from sentijax.data import records  # pylint: disable=import-outside-toplevel
  cfg = student.model_config(config)
  demo = records.demo_corpus_path().read_text(encoding="utf-8").splitlines()
  tok = student.tokenizer(config, cfg, lambda: [
      t for line in demo for t in (json.loads(line)["prompt"], json.loads(line)["response"])])
  mesh = sharding.make_mesh(config.mesh, model_cfg=cfg)  # fsdp=0: sharded when big
  rules = sharding.rules_from_config(config.sharding_rules)
  params = student.param_initializer(config, cfg)(mesh, rules)
  return LocalTeacher(cfg, params, tok, batch_size=int(config.teacher.batch_size), mesh=mesh,
                      rules=rules, chat_template=bool(config.teacher.chat_template),
                      name=config.model.init or f"preset:{config.model.preset}")


def run(config) -> None:
  """`config.job = "serve"`: serves `config.model` until interrupted."""
  teacher = load_teacher(config)
  sc = config.serve
  server = Server(teacher, sc.model_name or teacher.name, sc.host, int(sc.port),
                  int(config.teacher.batch_size), float(sc.max_wait_ms))
  log.info("serving %s at %s", server.model_name, server.url)
  try:
    server.httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.httpd.server_close()
