"""sentijax.serve: OpenAI routes, logprobs, concurrent requests batched, bad requests."""
import concurrent.futures
import math

import httpx
import pytest

from sentijax import serve
from sentijax.teacher.common import Sampling
from teacher import teacher_fixtures

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  root = teacher_fixtures.make_teacher_dir(tmp_path_factory.mktemp("serve"))
  teacher = teacher_fixtures.load_teacher(root, batch_size=4)
  srv = serve.Server(teacher, "tiny", max_batch=4, max_wait_ms=200).start()
  yield srv
  srv.stop()


def test_models_and_completions(server):
  models = httpx.get(server.url + "/models").json()
  assert [m["id"] for m in models["data"]] == ["tiny"]
  body = {"model": "tiny", "prompt": "The pasta was great", "max_tokens": 8, "temperature": 0,
          "logprobs": 3}
  r = httpx.post(server.url + "/completions", json=body, timeout=60).json()
  [direct] = server.teacher.generate(["The pasta was great"], ["x"], Sampling(max_tokens=8),
                                     logprobs=3)
  choice = r["choices"][0]
  assert choice["text"] == direct.text and choice["finish_reason"] == direct.finish_reason
  lp = choice["logprobs"]
  tok = server.teacher.tokenizer
  assert lp["tokens"] == [tok.decode([t]) for t in direct.token_ids]  # pieces, not whole text
  assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(direct.token_ids)
  for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
    assert len(top) <= 3 and max(top.values()) == pytest.approx(chosen)  # greedy = argmax
  assert r["usage"]["completion_tokens"] == direct.completion_tokens
  assert r["usage"]["prompt_tokens"] == len(server.teacher.encode("The pasta was great"))


def test_chat_completions(server):
  body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}],
          "max_tokens": 8, "min_tokens": 8, "temperature": 0, "logprobs": True,
          "top_logprobs": 2}
  r = httpx.post(server.url + "/chat/completions", json=body, timeout=60).json()
  choice = r["choices"][0]
  assert choice["message"]["role"] == "assistant"
  content = choice["logprobs"]["content"]
  assert len(content) == 8
  for pos in content:
    assert len(pos["top_logprobs"]) == 2 and pos["logprob"] <= 0
    assert sum(math.exp(t["logprob"]) for t in pos["top_logprobs"]) <= 1 + 1e-5
  [direct] = server.teacher.generate([[{"role": "user", "content": "Hello there"}]], ["x"],
                                     Sampling(max_tokens=8, min_tokens=8))
  assert choice["message"]["content"] == direct.text


def test_concurrent_requests_are_batched_and_seeded(server):
  prompts = [f"Review number {i}: it was fine" for i in range(8)]

  def ask(p):
    body = {"model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 1.0, "seed": 7}
    return httpx.post(server.url + "/completions", json=body, timeout=120).json()

  before = list(server.batcher.batches)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    together = [r["choices"][0]["text"] for r in pool.map(ask, prompts)]
  assert max(server.batcher.batches[len(before):]) > 1  # requests shared a decode
  alone = [ask(p)["choices"][0]["text"] for p in prompts[:3]]
  assert alone == together[:3]  # a seeded row samples the same text in any batch
  assert len(set(together)) > 1


@pytest.mark.parametrize("body,needle", [
    ({"prompt": "x", "max_tokens": 0}, "'max_tokens'"),
    ({"prompt": "x", "n": 2}, "'n'"),
    ({"prompt": 3}, "'prompt'"),
    ({"prompt": "x", "temperature": "hot"}, "'temperature'"),
])
def test_bad_requests(server, body, needle):
  r = httpx.post(server.url + "/completions", json=body, timeout=30)
  assert r.status_code == 400 and needle in r.json()["error"]["message"]
