"""Test helpers: a job config with a teacher's settings, a tiny HF teacher and a fault-injecting
HTTP proxy on 127.0.0.1."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

import hf_fixtures
from sentijax.data import records

VOCAB = 320
REPO = pathlib.Path(__file__).resolve().parents[2]


def job_config(name: str, **settings):
  """configs/<name>.py's config with `settings` set in order; keys are dotted paths
  ("teacher.model"), or "__"-separated ones where a keyword argument is handier."""
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in settings.items():
    *path, last = key.replace("__", ".").split(".")
    node = config
    for part in path:
      node = node[part]
    node[last] = value
  return config


def demo_texts() -> list[str]:
  rows = [json.loads(line) for line in
          records.demo_corpus_path().read_text(encoding="utf-8").splitlines()]
  return [r["prompt"] + r["response"] for r in rows]


def make_teacher_dir(root: pathlib.Path) -> pathlib.Path:
  """An HF dir (tokenizer + Llama weights varied enough that greedy outputs differ)."""
  from sentijax.data import tokenizer as tok_lib
  tok_lib.train_tokenizer(demo_texts(), VOCAB, root)
  hf_fixtures.make_llama(root, vocab_size=VOCAB, weight_std=0.3)
  return root


def load_teacher(path: pathlib.Path, batch_size: int = 4):
  from sentijax import models
  from sentijax.data import tokenizer as tok_lib
  from sentijax.teacher.local import LocalTeacher
  cfg, params = models.load_hf(path, dtype="float32")
  return LocalTeacher(cfg, params, tok_lib.load_tokenizer(path), batch_size=batch_size,
                      name="tiny")


class FaultProxy:
  """Forwards POSTs to `upstream`; `fault(n, body)` picks what request n gets:
  None (forwarded), 500, 429, "timeout", "malformed", "truncated", "drop", "hold" (wait until
  `release` is set, then forward)."""

  def __init__(self, upstream: str, fault, sleep_s: float = 1.0):
    self.upstream, self.fault, self.sleep_s = upstream.rstrip("/"), fault, sleep_s
    self.count = 0
    self.forwarded = 0
    self.lock = threading.Lock()
    self.release = threading.Event()
    self.seen_auth: set[str] = set()
    proxy = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def _reply(self, status, data: bytes, length=None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        try:
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout fault)
          self.close_connection = True

      def do_POST(self):  # noqa: N802
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization", "")
        with proxy.lock:
          n = proxy.count
          proxy.count += 1
          proxy.seen_auth.add(auth)
        kind = proxy.fault(n, json.loads(raw))
        if kind == 500:
          # A careless server echoing the request headers: the client must scrub the key.
          return self._reply(500, json.dumps({"error": f"boom; you sent {auth}"}).encode())
        if kind == 429:
          return self._reply(429, b'{"error": "slow down"}')
        if kind == "timeout":
          time.sleep(proxy.sleep_s)
          return self._reply(500, b'{"error": "late"}')
        if kind == "malformed":
          return self._reply(200, b'{"choices": [{"text": ')
        if kind == "wrong":
          return self._reply(200, b'{"choices": []}')
        if kind == "truncated":  # a body cut short, then the connection closes
          self.close_connection = True
          return self._reply(200, b'{"choices": [', length=500)
        if kind == "drop":
          self.close_connection = True
          return None
        if kind == "hold":
          proxy.release.wait()
        r = httpx.post(proxy.upstream + self.path.removeprefix("/v1"), content=raw,
                       headers={"Content-Type": "application/json"}, timeout=60)
        with proxy.lock:
          proxy.forwarded += 1
        return self._reply(r.status_code, r.content)

    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def stop(self):
    self.release.set()
    self.httpd.shutdown()
    self.httpd.server_close()


class ScriptedServer:
  """A stand-in OpenAI /v1/completions server on 127.0.0.1 (no model): `script(n, body)` gives
  request n either None (answer: `answer(prompt)`), "hold" (answer once `release` is set) or
  (status, headers, text). Arrival times (time.time()) and bodies of every request are kept;
  answers take `delay_s`."""

  def __init__(self, script=lambda n, body: None, delay_s: float = 0.0):
    self.script, self.delay_s = script, delay_s
    self.release = threading.Event()
    self.lock = threading.Lock()
    self.arrivals: list[tuple[float, int, dict]] = []  # (time, n, body)
    self.replies: list[tuple[float, int, int]] = []  # (time sent, n, status)
    server = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        with server.lock:
          n = len(server.arrivals)
          server.arrivals.append((time.time(), n, body))
        plan = server.script(n, body)
        if plan == "hold":
          server.release.wait()
          plan = None
        if plan is None:
          time.sleep(server.delay_s)
          status, headers = 200, {}
          text = json.dumps({"choices": [{"text": answer(body["prompt"]),
                                          "finish_reason": "stop"}],
                             "usage": {"completion_tokens": 3}})
        else:
          status, headers, text = plan
        data = text.encode()
        self.send_response(status)
        for key, value in headers.items():
          self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with server.lock:
          server.replies.append((time.time(), n, status))
        self.wfile.write(data)

    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def stop(self):
    self.release.set()
    self.httpd.shutdown()
    self.httpd.server_close()


def answer(prompt: str) -> str:
  """The scripted server's deterministic answer to `prompt`."""
  import hashlib
  return " analysis " + hashlib.sha256(prompt.encode()).hexdigest()[:12]
