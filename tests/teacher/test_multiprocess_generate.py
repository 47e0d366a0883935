"""Teacher jobs on 2 processes (jax.distributed on localhost, 1 CPU device each) against a
scripted OpenAI server: the inputs are split between the processes and they yield ONE corpus;
after a SIGKILL of one process mid-run, a rerun completes it with every input exactly once."""
import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

from teacher import teacher_fixtures as fx
from sentijax.sampling import SamplingSettings
from sentijax.teacher import backend, generate, inputs

REPO = pathlib.Path(__file__).resolve().parents[2]
TEXTS = [f"Review {i}: the {w} was {a}." for i, (w, a) in enumerate(
    [(w, a) for w in ("pasta", "service", "screen", "plot") for a in ("great", "awful", "fine")])]
PERSPECTIVES = ["polarity", "irony"]  # 12 texts x 2 = 24 prompts


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _args(config: str, workdir, url: str, extra=()) -> list[str]:
  return [f"--config={REPO}/configs/{config}.py", f"--config.workdir={workdir}",
          "--config.teacher.backend=openai", f"--config.teacher.base_url={url}",
          "--config.teacher.model=fake", "--config.teacher.endpoint=completions",
          "--config.teacher.concurrency=1", "--config.generate.leak_check=off",
          "--config.generate.progress=False", *extra]


def _start(args: list[str], processes: int = 2) -> list[subprocess.Popen]:
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  dist = ["--config.distributed.enabled=True",
          f"--config.distributed.coordinator_address=localhost:{port}",
          f"--config.distributed.num_processes={processes}",
          "--config.distributed.initialization_timeout=60"]
  return [subprocess.Popen([sys.executable, "-m", "sentijax.main", *args, *dist,
                            f"--config.distributed.process_id={i}"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(processes)]


def _finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[str]:
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _records(path: pathlib.Path) -> list[dict]:
  return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _expected_items(args: list[str]) -> list[generate.Item]:
  """The items the job builds, from its config with the same overrides (ids included)."""
  spec = importlib.util.spec_from_file_location("cfg_gkd", REPO / "configs/generate_knowdist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for arg in args[1:]:
    key, value = arg.removeprefix("--config.").split("=", 1)
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = type(node[last])(value) if not isinstance(node[last], bool) else value == "True"
  texts, _ = inputs.load_texts(inputs.InputSpec.from_config(config.inputs))
  return generate.knowdist_items(texts, PERSPECTIVES,
                                 SamplingSettings.from_config(config.sampling),
                                 backend.answer_settings(config))


def test_two_processes_sigkill_then_rerun_write_every_input_once(tmp_path):
  texts = tmp_path / "texts.jsonl"
  texts.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n"
                           for i, t in enumerate(TEXTS)))
  workdir = tmp_path / "job"
  state = {"hold": True}
  server = fx.ScriptedServer(lambda n, body: "hold" if state["hold"] and n >= 6 else None)
  args = _args("generate_knowdist", workdir, server.url,
               [f"--config.inputs.path={texts}",
                f"--config.generate.perspectives={','.join(PERSPECTIVES)}"])
  items = _expected_items(args)
  assert len(items) == 24
  try:
    procs = _start(args)
    parts = [workdir / "parts" / f"corpus.{i}.jsonl" for i in range(2)]
    deadline = time.time() + 90
    while sum(len(_records(p)) for p in parts) < 6 and time.time() < deadline:
      assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
      time.sleep(0.05)
    assert sum(len(_records(p)) for p in parts) == 6
    assert not (workdir / "corpus.jsonl").exists()  # each process writes its own part
    os.kill(procs[1].pid, signal.SIGKILL)  # mid-run: its next request is held by the server
    procs[1].wait()
    state["hold"] = False
    server.release.set()
    # Process 0 answers its whole share (every other item), then waits for process 1 at the
    # merge (it would fail once the coordinator notices the dead process): stop it too.
    while len(_records(parts[0])) < 12 and time.time() < deadline and procs[0].poll() is None:
      time.sleep(0.05)
    assert len(_records(parts[0])) == 12
    procs[0].kill()
    procs[0].wait()
    before = {r["id"] for p in parts for r in _records(p)}
    asked_before = len(server.arrivals)
    assert 12 < len(before) < 24
    _finish(_start(args))  # the rerun, again on 2 processes
  finally:
    server.stop()
  corpus = _records(workdir / "corpus.jsonl")
  assert [r["id"] for r in corpus] == [i.id for i in items]  # each once, in item order
  assert all(r["response"] == fx.answer(r["prompt"]).strip() for r in corpus)
  assert not (workdir / "parts").exists()
  rerun_prompts = {body["prompt"] for _, n, body in server.arrivals if n >= asked_before}
  assert rerun_prompts == {i.prompt for i in items if i.id not in before}  # nothing asked twice
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["processes"] == 2 and summary["corpus_records"] == 24
  assert summary["skipped"] == len(before) and summary["written"] == 24 - len(before)


def test_generate_icl_on_two_processes_equals_one(tmp_path):
  """generate_icl (ICL prompts of the demo tasks) on 2 processes writes the corpus one process
  writes: the same records in the same (item) order, each prompt asked once."""
  from sentijax.teacher import icl_job
  server = fx.ScriptedServer()
  extra = ["--config.icl.num_prompts=8", "--config.generate.logprobs=0"]
  try:
    _finish(_start(_args("generate_icl", tmp_path / "multi", server.url, extra)))
    asked = [body["prompt"] for _, _, body in server.arrivals]
    spec = importlib.util.spec_from_file_location("cfg_gicl", REPO / "configs/generate_icl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.workdir, config.teacher.backend = str(tmp_path / "one"), "openai"
    config.teacher.base_url, config.teacher.model = server.url, "fake"
    config.teacher.concurrency, config.generate.leak_check = 1, "off"
    config.generate.progress, config.icl.num_prompts, config.generate.logprobs = False, 8, 0
    icl_job.run(config)
  finally:
    server.stop()
  multi, one = _records(tmp_path / "multi/corpus.jsonl"), _records(tmp_path / "one/corpus.jsonl")
  assert len(one) >= 6 and multi == one
  assert sorted(asked) == sorted(r["prompt"] for r in one)  # split, not repeated
