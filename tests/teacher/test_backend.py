"""The teacher-backend contract: a backend written against `backend.TeacherBackend` plugs into a
teacher job through one registry line; a job needing a capability the backend lacks stops naming
both."""
import json

import pytest

from sentijax.data import readers
from sentijax.teacher import backend, generate, icl_job, topk
from sentijax.teacher.common import Completion
from sentijax.teacher.local import LocalTeacher
from sentijax.teacher.openai_api import ClientSpec, OpenAITeacher
from teacher import teacher_fixtures as fx


class EchoTeacher:
  """A minimal backend: answers with the prompt's word count; token logprobs: one made-up entry
  per answer word ({word count: -1.0})."""
  CONFIG_KEYS = {"flavour": "teacher.model"}
  capabilities = backend.Capabilities(frozenset({backend.TOKEN_LOGPROBS}))
  collective = False

  def __init__(self, flavour: str):
    self.name, self.tokenizer, self.closed = f"echo:{flavour}", None, False

  @classmethod
  def from_config(cls, config):
    return cls(str(config.teacher.model))

  @staticmethod
  def answer_settings(config):
    return {"flavour": str(config.teacher.model)}

  def stream(self, items, s, logprobs=0):
    for item in items:
      n = len(item.prompt.split())
      text = " ".join(["word"] * min(n % 5 + 1, s.max_tokens))
      tops = [{n: -1.0} for _ in text.split()] if logprobs else None
      yield item, Completion(text=text, finish_reason="stop",
                             completion_tokens=len(text.split()), top_logprobs=tops)

  def close(self):
    self.closed = True


class PlainTeacher(EchoTeacher):
  """The same answers, no capability besides completions."""
  capabilities = backend.Capabilities()


def _config(name, workdir, **overrides):
  return fx.job_config(name, **{"workdir": str(workdir), "teacher.backend": "echo",
                                "teacher.model": "plain", "generate.leak_check": "off",
                                "generate.progress": False, **overrides})


@pytest.fixture
def registered(monkeypatch):
  monkeypatch.setitem(backend.REGISTRY, "echo", EchoTeacher)
  monkeypatch.setitem(backend.REGISTRY, "plain", PlainTeacher)


def test_the_backends_satisfy_the_protocol():
  assert isinstance(EchoTeacher("x"), backend.TeacherBackend)
  assert not isinstance(object(), backend.TeacherBackend)
  for cls in (LocalTeacher, OpenAITeacher):
    missing = [m for m in ("stream", "close", "capabilities", "collective", "CONFIG_KEYS",
                           "from_config", "answer_settings") if not hasattr(cls, m)]
    assert not missing, (cls.__name__, missing)
  server = OpenAITeacher(ClientSpec("http://127.0.0.1:9/v1", "m"))
  try:
    assert isinstance(server, backend.TeacherBackend)
    assert backend.PROMPT_LOGPROBS in server.capabilities
    assert backend.TOKEN_LOGPROBS not in server.capabilities  # no tokenizer to map strings
  finally:
    server.close()


def test_a_registered_backend_runs_the_knowdist_job(registered, tmp_path):
  """generate_knowdist through the registry: records from the fake backend, its own answer
  setting in every record id and meta; logprobs stored; a rerun adds nothing."""
  config = _config("generate_knowdist", tmp_path, **{
      "inputs.limit": 3, "generate.perspectives": "polarity,intent", "generate.logprobs": 2})
  summary = generate.run(config)
  assert summary["teacher"] == "echo:plain" and summary["written"] == summary["items"] == 6
  records, _ = readers.read_records(tmp_path / "corpus.jsonl")
  assert len(records) == 6 and all(r.response.startswith("word") for r in records)
  meta = json.loads((tmp_path / "corpus.jsonl").read_text().splitlines()[0])["meta"]
  assert meta["settings"] == {"backend": "echo", "logprobs": 2, "flavour": "plain"}
  assert meta["teacher"] == "echo:plain" and meta["top_logprobs"]
  assert generate.run(config)["written"] == 0
  # Another flavour is another answer setting: refused, naming the backend's own config key.
  config.teacher.model = "spicy"
  with pytest.raises(ValueError, match=r"teacher.model='plain' there, 'spicy' now"):
    generate.run(config)


def test_a_missing_capability_names_backend_and_capability(registered, tmp_path):
  config = _config("generate_knowdist", tmp_path / "kd", **{
      "teacher.backend": "plain", "inputs.limit": 2, "generate.logprobs": 2})
  with pytest.raises(backend.MissingCapability,
                     match=r"PlainTeacher \('echo:plain'\) has no 'token_logprobs' capability.*"
                           r"needed for generate.logprobs=2"):
    generate.run(config)
  config = _config("generate_icl", tmp_path / "icl", **{
      "teacher.backend": "plain", "generate.logprobs": 5})
  with pytest.raises(backend.MissingCapability, match=r"'token_logprobs'.*verbalizer"):
    icl_job.run(config)
  config = _config("generate_topk", tmp_path / "topk")
  with pytest.raises(backend.MissingCapability,
                     match=r"EchoTeacher \('echo:plain'\) has no 'prompt_logprobs'"):
    topk.run(config)
  config.topk.mode = "sample"
  with pytest.raises(backend.MissingCapability, match=r"no 'model' capability.*topk.mode=sample"):
    topk.run(config)
  with pytest.raises(ValueError, match=r"teacher.backend='nope': expected one of \["):
    backend.make(_config("generate_knowdist", tmp_path, **{"teacher.backend": "nope"}))
