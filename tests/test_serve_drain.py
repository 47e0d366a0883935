"""sentijax.serve in its own process: SIGTERM refuses new requests (503), finishes the ones in
flight, then the process exits 0."""
import concurrent.futures
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from teacher import teacher_fixtures

pytest.importorskip("torch")
openai = pytest.importorskip("openai")

TESTS = pathlib.Path(__file__).resolve().parent
SCRIPT = """
import logging, pathlib, sys
sys.path[:0] = [{tests!r}, {teacher!r}]
logging.basicConfig(level=logging.INFO, format="%(message)s")
import teacher_fixtures
from sentijax import serve
srv = serve.Server(teacher_fixtures.load_teacher(pathlib.Path({root!r})), "tiny", max_batch=1)
sys.exit(0 if serve.serve_until_signal(srv, drain_timeout_s=120) else 3)
"""


def test_sigterm_drains_in_flight_requests(tmp_path):
  root = teacher_fixtures.make_teacher_dir(tmp_path)
  script = SCRIPT.format(tests=str(TESTS), teacher=str(TESTS / "teacher"), root=str(root))
  proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
  lines: queue.Queue = queue.Queue()  # the server's log, read on a thread (the pipe never fills)
  threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
  log = []

  def wait_for(pattern):
    while True:
      log.append(lines.get(timeout=300))
      if m := re.search(pattern, log[-1]):
        return m

  try:
    url = wait_for(r"serving tiny at (\S+)").group(1)
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    # One decode row: eight requests of 60 tokens run one after another.
    body = dict(model="tiny", prompt="Once upon a time", max_tokens=60, temperature=0,
                extra_body={"min_tokens": 60})
    client.completions.create(**body | {"max_tokens": 2, "extra_body": {}})  # compiles first
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      stream = client.completions.create(**body, stream=True)
      first = next(iter(stream))
      queued = [pool.submit(client.completions.create, **body) for _ in range(7)]
      metrics = url.removesuffix("/v1") + "/metrics"
      while httpx.get(metrics).json()["requests"] < 9:  # the warm-up, the stream, the seven
        time.sleep(0.005)
      proc.send_signal(signal.SIGTERM)
      assert int(wait_for(r"draining (\d+)").group(1)) >= 1
      refused = httpx.post(url + "/completions", json={"prompt": "x", "max_tokens": 2})
      assert refused.status_code == 503 and refused.headers["Retry-After"]
      text = first.choices[0].text + "".join(c.choices[0].text for c in stream
                                             if c.choices)
      done = [f.result() for f in queued]
    assert all(r.usage.completion_tokens == 60 for r in done)
    assert text == done[0].choices[0].text  # the stream ran to its end too
    assert proc.wait(timeout=60) == 0
  except BaseException:
    time.sleep(1)
    while not lines.empty():
      log.append(lines.get())
    print("server log:\n" + "".join(log[-60:]))
    raise
  finally:
    if proc.poll() is None:
      proc.kill()
