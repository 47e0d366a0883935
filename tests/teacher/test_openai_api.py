"""The OpenAI-compatible client under pressure, against a scripted server on 127.0.0.1:
Retry-After (seconds and HTTP-date, capped by max_retry_after_s) pauses every worker, a 503
storm loses and duplicates nothing, and the API key never leaks, not even cut short."""
import email.utils
import json
import math
import time

import pytest

from teacher import teacher_fixtures as fx
from sentijax.sampling import SamplingSettings
from sentijax.teacher import backend, generate, inputs
from sentijax.teacher.common import TeacherConfigError, TeacherError
from sentijax.teacher.openai_api import ClientSpec, OpenAITeacher, parse_retry_after

SAMPLING = SamplingSettings(temperature=0.0, max_tokens=8)
KEY_ENV = "SENTIJAX_TEST_TEACHER_KEY"
KEY = "sk-live-4b1d9e0c7a2f-do-not-log"


def _items(n=12):
  texts = [inputs.SourceText(f"t{i}", f"Review number {i}: it was fine.") for i in range(n)]
  return generate.knowdist_items(texts, ["polarity"], SAMPLING)


def _corpus(workdir):
  return [json.loads(x) for x in (workdir / "corpus.jsonl").read_text().splitlines()]


def _run(server, workdir, n=12, **kwargs):
  items = _items(n)
  teacher = OpenAITeacher(ClientSpec(server.url, "fake", endpoint="completions", concurrency=4,
                                     backoff_s=0.01, max_backoff_s=0.05, **kwargs))
  start = time.time()
  try:
    summary = generate.generate(items, teacher, SAMPLING, workdir, progress=False)
  finally:
    teacher.close()
  records = _corpus(workdir)
  assert sorted(r["id"] for r in records) == sorted(i.id for i in items)  # each exactly once
  assert all(r["response"] == fx.answer(r["prompt"]).strip() for r in records)
  assert summary["written"] == len(items) and summary["rejected"] == 0
  return time.time() - start, teacher


def test_parse_retry_after_both_forms():
  now = 1_700_000_000.0
  assert parse_retry_after("7", now) == 7.0 and parse_retry_after(" 0.5 ", now) == 0.5
  date = email.utils.formatdate(now + 42, usegmt=True)  # 'Tue, 14 Nov 2023 22:14:02 GMT'
  assert parse_retry_after(date, now) == pytest.approx(42, abs=1)
  assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now) == 0.0
  assert parse_retry_after(None) is None and parse_retry_after("soon") is None


@pytest.mark.parametrize("form", ["seconds", "http-date", "capped"])
def test_retry_after_pauses_every_worker(tmp_path, form):
  """Request 2 of 24 gets 429 + Retry-After while 4 workers are busy (answers take 0.05 s).
  From the moment the client has read it, no worker sends anything until the requested wait is
  over (a pause of the whole client, not of one worker), and the job takes about that wait."""
  wait = {"seconds": 1.0, "capped": 0.6}.get(form)
  header = {"seconds": "1", "capped": "3600"}.get(form)
  if form == "http-date":  # whole seconds only: the next full second + 1 (1-2 s from now)
    resume_at = math.ceil(time.time()) + 1.0
    header = email.utils.formatdate(resume_at, usegmt=True)

  def script(n, body):
    return (429, {"Retry-After": header}, '{"error": "rate limited"}') if n == 2 else None

  server = fx.ScriptedServer(script, delay_s=0.05)
  try:
    elapsed, teacher = _run(server, tmp_path, n=24, max_retries=2,
                            **({"max_retry_after_s": 0.6} if form == "capped" else {}))
  finally:
    server.stop()
  [t429] = [t for t, n, status in server.replies if status == 429]
  earliest = resume_at if form == "http-date" else t429 + wait
  # Requests already on their way when the 429 left the server may still arrive (0.25 s of
  # slack for a loaded machine); after that, nothing until the wait is over.
  during = [t - t429 for t, n, _ in server.arrivals if t429 + 0.25 < t < earliest - 0.05]
  assert during == [], (during, earliest - t429)
  assert max(t for t, _, _ in server.arrivals) >= earliest - 0.05
  # The wait plus at most 10% + backoff of spread and 24 answers of 0.05 s over 4 workers:
  # generous bounds, far below a second pause or the 3600 s asked for in the capped case.
  requested = earliest - t429
  assert requested - 0.05 <= elapsed <= requested * 1.5 + 2.0
  assert teacher.pauses == 1


def test_503_storm_with_http_date_loses_nothing(tmp_path):
  """For ~1 s every request gets 503 + Retry-After as an HTTP-date; with 2 retries per item
  every prompt is still written exactly once (the wait costs no retry)."""
  storm_end = math.ceil(time.time()) + 1.0
  header = email.utils.formatdate(storm_end, usegmt=True)

  def script(n, body):
    if time.time() < storm_end:
      return 503, {"Retry-After": header}, '{"error": "overloaded"}'
    return None

  server = fx.ScriptedServer(script)
  try:
    elapsed, _ = _run(server, tmp_path, max_retries=2)
  finally:
    server.stop()
  storm = [t for t, n, status in server.replies if status == 503]
  assert storm and elapsed <= (storm_end - storm[0]) * 1.5 + 1.5


def test_503_storm_without_retry_after_backs_off(tmp_path):
  """20 plain 503s (no Retry-After): per-worker backoff, every prompt written exactly once."""
  server = fx.ScriptedServer(lambda n, body: (503, {}, "busy") if n < 20 else None)
  try:
    _, teacher = _run(server, tmp_path, max_retries=12)
  finally:
    server.stop()
  assert teacher.retries == 20 and teacher.pauses == 0


@pytest.mark.parametrize("status, limit", [(500, 200), (400, 500), (401, 300)])
def test_key_scrubbed_before_the_text_is_cut(monkeypatch, status, limit):
  """A server echoing the key right where its text is cut: no prefix of the key survives."""
  monkeypatch.setenv(KEY_ENV, KEY)
  text = "x" * (limit - 10) + KEY + " trailing"
  server = fx.ScriptedServer(lambda n, body: (status, {}, text))
  teacher = OpenAITeacher(ClientSpec(server.url, "fake", endpoint="completions",
                                     api_key_env=KEY_ENV, max_retries=0))
  try:
    with pytest.raises(TeacherError) as info:
      teacher.complete("hello", SAMPLING)
  finally:
    teacher.close()
    server.stop()
  message = str(info.value)
  assert f"HTTP {status}" in message and "xxxxx" in message
  assert KEY[:6] not in message, message[-60:]
  assert isinstance(info.value, TeacherConfigError) == (status == 401)


def test_client_spec_from_config_and_request_extras():
  """config.teacher is read once into a ClientSpec; non-OpenAI extras go out only when set."""
  from sentijax.teacher import config as teacher_config
  c = teacher_config.teacher()
  c.update(base_url="http://h:1/v1/", model="m", endpoint="completions", concurrency=3)
  spec = ClientSpec.from_config(c)
  assert spec == ClientSpec("http://h:1/v1/", "m", endpoint="completions", concurrency=3,
                            timeout_s=120.0)
  teacher = OpenAITeacher(spec)
  try:
    assert teacher.url == "http://h:1/v1/completions"
    assert not {"top_k", "min_tokens", "repetition_penalty"} & set(teacher.body("hi", SAMPLING, 0))
    extra = teacher.body("hi", SamplingSettings(top_k=5, min_tokens=2, repetition_penalty=1.2), 0)
    assert (extra["top_k"], extra["min_tokens"], extra["repetition_penalty"]) == (5, 2, 1.2)
  finally:
    teacher.close()
  with pytest.raises(ValueError, match="teacher.endpoint"):
    ClientSpec("http://h:1/v1", "m", endpoint="responses")


def test_prompt_token_logprobs_chosen_outside_the_top_n_and_a_server_without_them():
  """A vLLM-shaped echo answer: each prompt token's own logprob (token_logprobs) comes back even
  where it is not among the top-1; the ids echoed are checked. A completion without prompt
  logprobs (llama.cpp's server ignores echo) is MissingCapability at once, not retried."""
  ids = [5, 9, 7]
  echo = {"choices": [{"text": "x", "logprobs": {
      "tokens": [f"token_id:{i}" for i in ids], "token_logprobs": [None, -3.5, -0.25],
      "top_logprobs": [None, {"token_id:4": -0.1}, {"token_id:7": -0.25}]}}]}
  plain = {"choices": [{"text": "", "logprobs": None, "finish_reason": "length"}]}
  server = fx.ScriptedServer(lambda n, body: (200, {}, json.dumps(echo if n < 2 else plain)))
  client = OpenAITeacher(ClientSpec(base_url=server.url, model="m", max_retries=3))
  try:
    assert client.prompt_token_logprobs(ids) == [None, -3.5, -0.25]
    assert client.prompt_logprobs(ids, 1) == ([None, {4: -0.1}, {7: -0.25}], 0)
    with pytest.raises(backend.MissingCapability, match=r"'openai:m'.*'prompt_logprobs'"):
      client.prompt_token_logprobs(ids)
  finally:
    client.close()
    server.stop()
  assert len(server.arrivals) == 3 and server.arrivals[0][2]["echo"] is True
