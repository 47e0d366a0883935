"""sentijax.serve through the official `openai` client: routes, logprobs, streaming, mixed-setting
batches, limits, seeds, n, auth."""
import concurrent.futures
import logging
import math
import time

import httpx
import pytest

from sentijax import serve
from sentijax.sampling import SamplingSettings
from teacher import teacher_fixtures

openai = pytest.importorskip("openai")
pytest.importorskip("torch")

KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  root = teacher_fixtures.make_teacher_dir(tmp_path_factory.mktemp("serve"))
  return teacher_fixtures.load_teacher(root, batch_size=4)


@pytest.fixture(scope="module")
def server(teacher):
  srv = serve.Server(teacher, "tiny", max_batch=4, max_wait_ms=20, api_key=KEY).start()
  yield srv
  srv.stop()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def _post(server, route, body, key=KEY):
  headers = {"Authorization": f"Bearer {key}"} if key else {}
  return httpx.post(server.url + route, json=body, headers=headers, timeout=60)


def test_models_and_completions(server, client):
  assert [m.id for m in client.models.list().data] == ["tiny"]
  r = client.completions.create(model="tiny", prompt="The pasta was great", max_tokens=8,
                                temperature=0, logprobs=3)
  [direct] = server.teacher.generate(["The pasta was great"], ["x"],
                                     SamplingSettings(max_tokens=8), logprobs=3)
  choice = r.choices[0]
  assert choice.text == direct.text and choice.finish_reason == direct.finish_reason
  lp = choice.logprobs
  tok = server.teacher.tokenizer
  assert lp.tokens == [tok.decode([t]) for t in direct.token_ids]  # pieces, not whole text
  assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(direct.token_ids)
  for chosen, top, ref in zip(lp.token_logprobs, lp.top_logprobs, direct.token_logprobs):
    assert len(top) <= 3 and max(top.values()) == pytest.approx(chosen)  # greedy = argmax
    assert chosen == pytest.approx(ref, abs=1e-4 * max(1.0, abs(ref)))
  assert r.usage.completion_tokens == direct.completion_tokens
  assert r.usage.prompt_tokens == len(server.teacher.encode("The pasta was great"))


def test_chat_completions(server, client):
  msgs = [{"role": "user", "content": "Hello there"}]
  r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                     logprobs=True, top_logprobs=2,
                                     extra_body={"min_tokens": 8})
  choice = r.choices[0]
  assert choice.message.role == "assistant"
  content = choice.logprobs.content
  assert len(content) == 8
  for pos in content:
    assert len(pos.top_logprobs) == 2 and pos.logprob <= 0
    assert sum(math.exp(t.logprob) for t in pos.top_logprobs) <= 1 + 1e-5
  [direct] = server.teacher.generate([msgs], ["x"], SamplingSettings(max_tokens=8, min_tokens=8))
  assert choice.message.content == direct.text


def test_echo_scores_the_prompt(server, client):
  prompt = "The service was slow but friendly"
  r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
  ids = server.teacher.encode(prompt)
  ref, _ = server.teacher.logprobs(ids[:1], ids[1:], 3)
  lp = r.choices[0].logprobs
  assert r.choices[0].text == prompt and lp.token_logprobs[0] is None
  assert lp.token_logprobs[1:] == pytest.approx(ref, rel=1e-4, abs=1e-5)


def _stream_text(stream, chat):
  texts, finish, usage, chunks = {}, {}, None, 0
  for c in stream:
    chunks += 1
    if c.usage is not None:
      usage = c.usage
    for ch in c.choices:
      piece = ch.delta.content if chat else ch.text
      texts[ch.index] = texts.get(ch.index, "") + (piece or "")
      if ch.finish_reason:
        finish[ch.index] = ch.finish_reason
  return texts, finish, usage, chunks


def test_stream_completions_equal_non_streamed(client):
  body = dict(model="tiny", prompt="Review: the soup was", max_tokens=24, temperature=1.0,
              seed=11, stop=["an"])
  whole = client.completions.create(**body)
  texts, finish, usage, chunks = _stream_text(client.completions.create(
      **body, stream=True, stream_options={"include_usage": True}), chat=False)
  assert chunks > 2
  assert texts[0] == whole.choices[0].text and finish[0] == whole.choices[0].finish_reason
  assert usage.completion_tokens == whole.usage.completion_tokens
  assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_chat_equal_non_streamed(client):
  body = dict(model="tiny", messages=[{"role": "user", "content": "Tell me about soup"}],
              max_tokens=20, temperature=0.8, top_p=0.9, seed=5, n=2)
  whole = client.chat.completions.create(**body)
  texts, finish, usage, _ = _stream_text(client.chat.completions.create(
      **body, stream=True, stream_options={"include_usage": True}), chat=True)
  assert texts == {c.index: c.message.content for c in whole.choices}
  assert finish == {c.index: c.finish_reason for c in whole.choices}
  assert usage.total_tokens == whole.usage.total_tokens
  assert len(set(texts.values())) == 2  # the two choices draw differently


def test_mixed_settings_share_decode_steps(server, client):
  """Requests with different max_tokens / temperature / top_p / top_k / seed / stop join a
  running batch and decode in the same steps; each seeded answer is the one it gets alone."""
  bodies = [dict(max_tokens=190, temperature=0.0),
            dict(max_tokens=12, temperature=0.7, top_p=0.9, seed=1),
            dict(max_tokens=18, temperature=1.0, seed=2, stop=["zz"]),
            dict(max_tokens=24, temperature=1.3, top_p=0.8, top_k=50, seed=3)]

  def ask(i):
    body = dict(bodies[i])
    extra = {"min_tokens": body["max_tokens"] if "stop" not in body else 4}
    if "top_k" in body:
      extra["top_k"] = body.pop("top_k")
    return client.completions.create(model="tiny", prompt=f"Review number {i}: it was fine",
                                     extra_body=extra, **body)

  before = server.metrics()
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    first = pool.submit(ask, 0)
    while server.metrics()["live_rows"] == 0 and not first.done():
      time.sleep(0.001)
    rest = list(pool.map(ask, range(1, 4)))
    together = [first.result()] + rest
  after = server.metrics()
  tokens = [r.usage.completion_tokens for r in together]
  steps = after["decode_steps"] - before.get("decode_steps", 0)
  assert after["shared_steps"] - before.get("shared_steps", 0) > 0
  # Alone, a request takes completion_tokens - 1 steps; the three join the first one's batch.
  assert steps < tokens[0] - 1 + max(tokens[1:]) - 1, (steps, tokens)
  assert tokens[0] == 190 and tokens[1] == 12 and tokens[3] == 24
  # The first request outgrew the first cache length (rolled and resized mid-batch): still the
  # sampler's greedy text.
  [ref] = server.teacher.generate(["Review number 0: it was fine"], ["x"],
                                  SamplingSettings(max_tokens=190, min_tokens=190))
  assert together[0].choices[0].text == ref.text
  alone = [ask(i).choices[0].text for i in range(4)]
  assert alone == [r.choices[0].text for r in together]


def test_length_limit_is_a_bad_request(server, client):
  prompt = "The pasta was great"
  n = len(server.teacher.encode(prompt))
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model="tiny", prompt=prompt, max_tokens=250)
  msg = e.value.body["message"]
  assert f"{n} tokens" in msg and "250" in msg and "256 positions" in msg
  assert e.value.body["param"] == "max_tokens"


def test_unseeded_sampling_is_random_seeded_is_reproducible(client):
  body = dict(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=1.0)
  unseeded = [client.completions.create(**body).choices[0].text for _ in range(2)]
  assert unseeded[0] != unseeded[1]
  many = client.completions.create(**body, n=3)
  assert len(many.choices) == 3 and len({c.text for c in many.choices}) == 3
  seeded = [[c.text for c in client.completions.create(**body, seed=42, n=2).choices]
            for _ in range(2)]
  assert seeded[0] == seeded[1] and seeded[0][0] != seeded[0][1]


def test_auth(server, caplog):
  caplog.set_level(logging.DEBUG, logger="sentijax")
  wrong = openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0)
  with pytest.raises(openai.AuthenticationError):
    wrong.completions.create(model="tiny", prompt="hi", max_tokens=2)
  r = _post(server, "/completions", {"prompt": "hi", "max_tokens": 2}, key=None)
  assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
  assert httpx.get(server.url + "/models").status_code == 401
  assert _post(server, "/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200
  assert KEY not in caplog.text and "sk-wrong" not in caplog.text


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
])
def test_bad_requests(server, body, param):
  r = _post(server, "/completions", body)
  err = r.json()["error"]
  assert r.status_code == 400 and err["param"] == param and f"'{param}'" in err["message"]
  assert err["type"] == "invalid_request_error"


def test_limits_body_queue_timeout(teacher):
  """413 for a big body; 429 + Retry-After once the queue is full; 504 past the timeout."""
  srv = serve.Server(teacher, "tiny", max_batch=4, limits=serve.Limits(
      max_queue=1, max_body_bytes=2000, retry_after_s=3)).start()
  long = {"prompt": "Once", "max_tokens": 240, "min_tokens": 240, "temperature": 0}
  try:
    r = _post(srv, "/completions", {"prompt": "x" * 3000}, key=None)
    assert r.status_code == 413 and "2000" in r.json()["error"]["message"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      first = [pool.submit(_post, srv, "/completions", long, None) for _ in range(4)]
      while srv.metrics()["live_rows"] < 4 and not any(f.done() for f in first):
        pass
      rest = list(pool.map(lambda _: _post(srv, "/completions", long, None), range(2)))
      assert [f.result().status_code for f in first] == [200] * 4
    codes = sorted(r.status_code for r in rest)
    assert codes == [200, 429], codes
    busy = next(r for r in rest if r.status_code == 429)
    assert busy.headers["Retry-After"] == "3" and busy.json()["error"]["code"]
  finally:
    srv.stop()
  srv = serve.Server(teacher, "tiny", max_batch=4,
                     limits=serve.Limits(request_timeout_s=0.0)).start()
  try:
    r = _post(srv, "/completions", long, key=None)
    assert r.status_code == 504 and "request_timeout_s" in r.json()["error"]["message"]
  finally:
    srv.stop()


def test_spec_from_config(monkeypatch):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "serve.py"
  spec = importlib.util.spec_from_file_location("serve_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.serve.max_queue, c.serve.api_key_env = 3, "SENTIJAX_TEST_KEY"
  got = serve.ServeSpec.from_config(c.serve)
  assert got.limits.max_queue == 3 and got.max_batch == 16 and got.port == 8000
  monkeypatch.delenv("SENTIJAX_TEST_KEY", raising=False)
  with pytest.raises(ValueError, match="SENTIJAX_TEST_KEY"):
    got.api_key()
  monkeypatch.setenv("SENTIJAX_TEST_KEY", KEY)
  assert got.api_key() == KEY


def test_a_failed_step_answers_500_and_the_server_recovers(server, client, monkeypatch):
  from sentijax import serve_engine

  def broken(*args, **kw):
    raise RuntimeError("injected step failure")

  with monkeypatch.context() as m:
    m.setattr(serve_engine, "_step", broken)
    with pytest.raises(openai.InternalServerError, match="injected step failure"):
      client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
  r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                extra_body={"min_tokens": 5})
  assert r.usage.completion_tokens == 5
