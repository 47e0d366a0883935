"""Teacher corpus jobs against a real HTTP server on 127.0.0.1 (sentijax.serve): the corpus
trains KnowDist, faults between client and server lose and duplicate nothing, a SIGKILLed job
resumes to the uninterrupted corpus, and the API key is never written."""
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from teacher import teacher_fixtures as fx
from sentijax import serve
from sentijax.sampling import SamplingSettings
from sentijax.teacher import backend
from sentijax.teacher import corpus as corpus_lib
from sentijax.teacher import generate, inputs
from sentijax.teacher.common import TeacherConfigError, record_key
from sentijax.teacher.openai_api import ClientSpec, OpenAITeacher

REPO = pathlib.Path(__file__).resolve().parents[2]
KEY_ENV = "SENTIJAX_TEST_TEACHER_KEY"
KEY = "sk-test-7f3a9c-never-write-me"
SAMPLING = SamplingSettings(temperature=1.0, top_p=0.95, max_tokens=8, min_tokens=8, seed=3)
TEXTS = [inputs.SourceText(f"t{i}", t) for i, t in enumerate(
    ["The pasta was great but the wait was long.", "Terrible service, never again.",
     "I loved the movie, the ending less so.", "Battery died after two days."])]
PERSPECTIVES = ["polarity", "irony"]


@pytest.fixture(scope="module")
def server(local_teacher):
  srv = serve.Server(local_teacher, "tiny", max_batch=4, max_wait_ms=20).start()
  yield srv
  srv.stop()


def _corpus(workdir) -> list[dict]:
  path = workdir / "corpus.jsonl"
  return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _rejects(workdir) -> list[dict]:
  return [json.loads(x) for x in (workdir / "rejects.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
  """An uninterrupted run straight against the server."""
  workdir = tmp_path_factory.mktemp("reference")
  items = generate.knowdist_items(TEXTS, PERSPECTIVES, SAMPLING)
  teacher = OpenAITeacher(ClientSpec(server.url, "tiny", endpoint="completions", concurrency=4))
  summary = generate.generate(items, teacher, SAMPLING, workdir, progress=False)
  assert summary["written"] == len(items) == 8 and summary["rejected"] == 0
  return workdir, items


def test_corpus_from_server_trains_knowdist(reference, tmp_path):
  from sentijax.data import readers
  from sentijax.train import knowdist
  workdir, items = reference
  records, _ = readers.read_records(workdir / "corpus.jsonl")
  assert sorted(r.id for r in records) == sorted(i.id for i in items)
  for r in records:
    assert r.response.strip() and r.meta["teacher"] == "openai:tiny"
    assert r.meta["sampling"] == SAMPLING.to_json() and r.meta["finish_reason"] == "length"
    assert r.meta["source_id"] in {t.id for t in TEXTS} and r.meta["perspective"] in PERSPECTIVES
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["completion_tokens"] == 8 * len(items)
  config = fx.job_config("knowdist")
  config.workdir = str(tmp_path / "kd")
  config.data.corpus = str(workdir / "corpus.jsonl")
  config.data.val_fraction = 0.25
  config.train.steps, config.train.warmup_steps, config.train.log_every = 3, 1, 1
  config.train.eval_every, config.checkpoint.every, config.export_hf = 3, 3, False
  config.data.prefetch = 0
  result = knowdist.run(config)
  assert result.step == 3 and len(result.train_losses) == 3
  assert all(math.isfinite(loss) for _, loss in result.train_losses)


FAULTS = [500, 429, "timeout", "malformed", "wrong", "truncated", "drop"]


def test_faults_lose_and_duplicate_nothing(server, reference, tmp_path, monkeypatch):
  """~60% of requests fail in one of seven ways; prompts of one text fail every time."""
  monkeypatch.setenv(KEY_ENV, KEY)
  ref_dir, items = reference
  doomed_text = TEXTS[3].text

  def fault(n, body):
    if doomed_text in body["prompt"]:
      return 500
    return FAULTS[n % len(FAULTS)] if n % 5 < 3 else None

  # The client times out after 8 s: a loaded 2-core machine can take seconds per decode, and a
  # genuine request that times out 12 times in a row would be rejected (seen at load ~14).
  proxy = fx.FaultProxy(server.url, fault, sleep_s=8.5)
  try:
    teacher = OpenAITeacher(ClientSpec(proxy.url, "tiny", endpoint="completions", concurrency=4,
                                       api_key_env=KEY_ENV, timeout_s=8.0, max_retries=12,
                                       backoff_s=0.001, max_backoff_s=0.01))
    summary = generate.generate(items, teacher, SAMPLING, tmp_path, progress=False)
  finally:
    proxy.stop()
  assert proxy.seen_auth == {f"Bearer {KEY}"}
  assert teacher.retries > 0 and {"timeout", "drop"} <= {FAULTS[i % 7] for i in range(proxy.count)}
  written, rejected = _corpus(tmp_path), _rejects(tmp_path)
  ids = [r["id"] for r in written] + [r["id"] for r in rejected]
  assert sorted(ids) == sorted(i.id for i in items)  # every prompt exactly once
  assert {r["meta"]["source_id"] for r in rejected} == {TEXTS[3].id}
  assert all("HTTP 500" in r["error"] and "***" in r["error"] for r in rejected)
  assert summary["written"] == 6 and summary["rejected"] == 2
  ref = {r["id"]: r["response"] for r in _corpus(ref_dir)}
  assert all(r["response"] == ref[r["id"]] for r in written)  # retries changed no text
  for path in tmp_path.rglob("*"):
    assert KEY not in path.read_text()


GREEDY = SamplingSettings(temperature=0.0, top_p=0.95, max_tokens=8, min_tokens=8, seed=3)


@pytest.mark.parametrize("sampling", [SAMPLING, GREEDY], ids=["seeded", "greedy"])
def test_sigkill_and_restart_equal_uninterrupted_run(server, reference, tmp_path, sampling):
  """A job process killed mid-run and restarted ends with the uninterrupted run's corpus."""
  ref_dir, items = reference
  if sampling is GREEDY:
    ref_dir = tmp_path / "greedy-reference"
    items = generate.knowdist_items(TEXTS, PERSPECTIVES, GREEDY)
    teacher = OpenAITeacher(ClientSpec(server.url, "tiny", endpoint="completions", concurrency=4))
    generate.generate(items, teacher, GREEDY, ref_dir, progress=False)
  state = {"hold": True}
  proxy = fx.FaultProxy(server.url, lambda n, body: "hold" if state["hold"] and n >= 3 else None)
  texts = tmp_path / "texts.jsonl"
  texts.write_text("".join(json.dumps({"id": t.id, "text": t.text}) + "\n" for t in TEXTS))
  workdir = tmp_path / "job"
  cmd = [sys.executable, "-m", "sentijax.main", f"--config={REPO}/configs/generate_knowdist.py",
         f"--config.workdir={workdir}", "--config.teacher.backend=openai",
         f"--config.teacher.base_url={proxy.url}", "--config.teacher.model=tiny",
         "--config.teacher.endpoint=completions", "--config.teacher.concurrency=1",
         f"--config.teacher.api_key_env={KEY_ENV}", f"--config.inputs.path={texts}",
         f"--config.generate.perspectives={','.join(PERSPECTIVES)}",
         "--config.generate.leak_check=off",
         f"--config.sampling.temperature={sampling.temperature}",
         "--config.sampling.top_p=0.95", "--config.sampling.max_tokens=8",
         "--config.sampling.min_tokens=8", "--config.sampling.seed=3"]
  env = dict(os.environ, **{KEY_ENV: KEY, "JAX_PLATFORMS": "cpu"})
  outputs = []
  try:
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while len(_corpus(workdir)) < 3 and time.time() < deadline and job.poll() is None:
      time.sleep(0.05)
    assert len(_corpus(workdir)) == 3, "the job did not reach the held request"
    os.kill(job.pid, signal.SIGKILL)
    outputs.append(job.communicate(timeout=30)[0].decode())
    state["hold"] = False
    proxy.release.set()
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=180, check=False)
    outputs.append(done.stdout.decode())
    assert done.returncode == 0, outputs[-1][-3000:]
  finally:
    proxy.stop()
  # By prompt: the ids differ from the reference's (base_url, the proxy's, is in the id).
  got = {r["prompt"]: r["response"] for r in _corpus(workdir)}
  ref = {r["prompt"]: r["response"] for r in _corpus(ref_dir)}
  assert len(_corpus(workdir)) == len(got) == len(items)  # no duplicates
  assert got == ref and len(set(got.values())) > 1  # same prompts, same (varied) texts
  assert all(r["id"] == record_key(r["prompt"], sampling, r["meta"]["settings"])
             and r["meta"]["settings"]["base_url"] == proxy.url for r in _corpus(workdir))
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["skipped"] == 3 and summary["written"] == len(items) - 3
  for path in workdir.rglob("*"):
    if path.is_file():
      assert KEY not in path.read_text(errors="replace"), path
  assert all(KEY not in out for out in outputs)
  assert KEY_ENV in (workdir / "generate_config.json").read_text()  # the name only


def test_local_backend_resume_and_rerun(local_teacher, tmp_path):
  """Local backend: a run over part of the items, then all, equals one run; a rerun adds
  nothing. Greedy, so the texts are also the server's greedy texts."""
  s = SamplingSettings(max_tokens=8, min_tokens=8)
  items = generate.knowdist_items(TEXTS, PERSPECTIVES, s)
  generate.generate(items[:3], local_teacher, s, tmp_path / "a", progress=False)
  generate.generate(items, local_teacher, s, tmp_path / "a", progress=False)
  generate.generate(items, local_teacher, s, tmp_path / "b", progress=False)
  again = generate.generate(items, local_teacher, s, tmp_path / "b", progress=False)
  assert again["written"] == 0 and again["skipped"] == len(items)
  a, b = _corpus(tmp_path / "a"), _corpus(tmp_path / "b")
  assert sorted(map(json.dumps, a)) == sorted(map(json.dumps, b)) and len(b) == len(items)


def test_logprob_strings_mapped_to_ids(server, local_teacher):
  """Token strings from the server map back to the ids (and values) of the local teacher."""
  teacher = OpenAITeacher(ClientSpec(server.url, "tiny", endpoint="completions"),
                          tokenizer=local_teacher.tokenizer)
  s = SamplingSettings(max_tokens=8, min_tokens=8)
  got = teacher.complete("The pasta was great", s, logprobs=5)
  [ref] = local_teacher.generate(["The pasta was great"], ["x"], s, logprobs=5)
  assert len(got.top_logprobs) == len(ref.top_logprobs) == 8
  mapped = 0
  for g, r in zip(got.top_logprobs, ref.top_logprobs):
    for token_id, value in g.items():
      assert value == pytest.approx(r[token_id], abs=1e-6)  # the same numbers through JSON
      mapped += 1
  assert mapped + got.unmapped >= 8 and mapped > 0


@pytest.mark.parametrize("status", [401, 404])
def test_refused_requests_stop_the_job(tmp_path, status):
  """A server that refuses every request (bad key / model / URL) stops the job with the reason
  after the first answers, instead of rejecting every prompt in turn; nothing is written."""
  import http.server
  import threading
  hits = []

  class Refuse(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # pylint: disable=invalid-name
      hits.append(self.path)
      self.rfile.read(int(self.headers.get("content-length", 0)))
      body = b'{"error": {"message": "nope"}}'
      self.send_response(status)
      self.send_header("content-type", "application/json")
      self.send_header("content-length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  try:
    texts = [inputs.SourceText(f"r{i}", f"Review {i}: it was fine.") for i in range(40)]
    items = generate.knowdist_items(texts, PERSPECTIVES, SAMPLING)  # 80 prompts
    teacher = OpenAITeacher(ClientSpec(f"http://127.0.0.1:{srv.server_port}/v1", "tiny",
                                       endpoint="completions", concurrency=2, max_retries=3))
    with pytest.raises(TeacherConfigError, match=f"HTTP {status}.*check (the key in )?teacher"):
      generate.generate(items, teacher, SAMPLING, tmp_path, progress=False)
  finally:
    srv.shutdown()
  assert len(hits) < 10  # the requests already in flight, not one per prompt, and no retries
  assert _corpus(tmp_path) == [] and _rejects(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Record ids and reruns: everything that changes an answer is in the id, and a workdir holds
# the records of one set of settings.


def _knowdist_config(**overrides):
  return fx.job_config("generate_knowdist",
                       **{"teacher.backend": "openai", "teacher.model": "fake", **overrides})


SETTING_CHANGES = [("teacher.backend", "local"), ("teacher.model", "other"),
                   ("teacher.base_url", "http://10.0.0.9:8000/v1"),
                   ("teacher.endpoint", "completions"), ("teacher.system_prompt", "Be brief."),
                   ("teacher.tokenizer", "/models/tok"), ("generate.logprobs", 5),
                   ("sampling.temperature", 0.3), ("sampling.seed", 9),
                   ("sampling.repetition_penalty", 1.3)]


@pytest.mark.parametrize("key, value", SETTING_CHANGES, ids=[k for k, _ in SETTING_CHANGES])
def test_record_ids_cover_every_answer_setting(key, value):
  def ids(config):
    items = generate.knowdist_items(TEXTS, PERSPECTIVES,
                                    SamplingSettings.from_config(config.sampling),
                                    backend.answer_settings(config))
    return [i.id for i in items]
  base, changed = ids(_knowdist_config()), ids(_knowdist_config(**{key: value}))
  assert base == ids(_knowdist_config()) and not set(base) & set(changed)


def test_sampling_json_of_a_corpus_is_unchanged_by_the_repetition_penalty_key():
  """Record ids hash `to_json`: without a penalty it holds exactly the keys corpora recorded
  before the setting existed (their ids stay valid)."""
  assert set(SAMPLING.to_json()) == {"temperature", "top_p", "top_k", "max_tokens", "min_tokens",
                                     "stop", "seed"}
  assert SamplingSettings(repetition_penalty=1.2).to_json()["repetition_penalty"] == 1.2


def test_local_teacher_ids_cover_model_and_chat_template():
  local = {"teacher.backend": "local"}
  settings = [backend.answer_settings(_knowdist_config(**local | extra)) for extra in (
      {}, {"model.init": "/models/a"}, {"model.preset": "small"}, {"teacher.chat_template": True},
      {"model.dtype": "bfloat16"}, {"seed": 5})]
  assert len({json.dumps(s, sort_keys=True) for s in settings}) == len(settings)


def _scripted_run(server, workdir, system_prompt="", logprobs=0):
  config = _knowdist_config(**{"teacher.base_url": server.url, "teacher.endpoint": "completions",
                               "teacher.system_prompt": system_prompt,
                               "generate.logprobs": logprobs})
  settings = backend.answer_settings(config)
  items = generate.knowdist_items(TEXTS, PERSPECTIVES, SAMPLING, settings)
  teacher = OpenAITeacher(ClientSpec(server.url, "fake", endpoint="completions", concurrency=2))
  try:
    return generate.generate(items, teacher, SAMPLING, workdir, settings=settings,
                             progress=False), items
  finally:
    teacher.close()


def test_rerun_with_other_settings_is_refused_naming_them(tmp_path):
  """Not '0 written, 8 already there': the differing settings are named, nothing is written."""
  server = fx.ScriptedServer()
  try:
    summary, items = _scripted_run(server, tmp_path)
    assert summary["written"] == len(items) == 8
    assert all(r["meta"]["settings"]["base_url"] == server.url for r in _corpus(tmp_path))
    with open(tmp_path / "rejects.jsonl", "a", encoding="utf-8") as f:  # one left from run 1
      f.write(json.dumps({"id": "x", "error": "HTTP 500"}) + "\n")
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    asked = len(server.arrivals)
    with pytest.raises(corpus_lib.SettingsMismatch,
                       match=r"8 record\(s\).*teacher.system_prompt='' there, 'Be brief.' now"):
      _scripted_run(server, tmp_path, system_prompt="Be brief.")
    with pytest.raises(corpus_lib.SettingsMismatch, match=r"generate.logprobs=0 there, 3 now"):
      _scripted_run(server, tmp_path, logprobs=3)
    assert len(server.arrivals) == asked  # refused before asking anything, nothing touched:
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    assert _scripted_run(server, tmp_path)[0]["skipped"] == 8  # same settings: resumes
    # A corpus from before settings were recorded (ids of prompt + sampling only).
    old = tmp_path / "old"
    teacher = OpenAITeacher(ClientSpec(server.url, "fake", endpoint="completions"))
    generate.generate(generate.knowdist_items(TEXTS, PERSPECTIVES, SAMPLING), teacher, SAMPLING,
                      old, progress=False)
    with pytest.raises(corpus_lib.SettingsMismatch, match="records no answer settings"):
      _scripted_run(server, old)
  finally:
    server.stop()


def test_generate_icl_rerun_with_logprobs(teacher_dir, tmp_path):
  """generate_icl without logprobs, then with them in the same workdir: refused with the setting
  named (the old job wrote '0 written' and teacher_probs then failed); in a new workdir every
  classification record gets its distribution and icl.target=teacher_probs reads them."""
  from sentijax.data import icl
  from sentijax.teacher import icl_job
  from sentijax.data import icl_recipe
  config = fx.job_config("generate_icl")
  config.workdir, config.model.init = str(tmp_path / "a"), str(teacher_dir)
  config.icl.num_prompts, config.sampling.max_tokens = 3, 2
  config.generate.leak_check, config.generate.progress = "off", False
  config.generate.logprobs = 0
  first = icl_job.run(config)
  assert first["written"] == first["items"] >= 2
  assert not any("teacher_probs" in r["meta"] for r in _corpus(tmp_path / "a"))
  config.generate.logprobs = 20
  files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
  with pytest.raises(corpus_lib.SettingsMismatch, match=r"generate.logprobs=0 there, 20 now"):
    icl_job.run(config)
  assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()} == files
  config.workdir = str(tmp_path / "b")
  assert icl_job.run(config)["written"] == first["items"]
  records = _corpus(tmp_path / "b")
  assert all(r["meta"]["teacher_probs"] for r in records)
  config.icl.target, config.icl.teacher_corpus = "teacher_probs", str(tmp_path / "b/corpus.jsonl")
  spec = icl_recipe.RecipeSpec.from_config(config)
  sources, heldout, groups = icl_recipe.resolve_tasks(spec)
  train, val, _ = icl_recipe.teacher_records(spec, sources, heldout,
                                             icl.forbidden_sentences(groups))
  assert len(train) + len(val) == len(records)
