"""Several processes (jax.distributed on localhost, 2 CPU devices each, fsdp across them) train
exactly like one process, checkpoints move between process and device counts, and a SIGTERM to
one process of two saves one checkpoint at a step both agree on.

One chain of runs, 6 steps of the tiny KnowDist model:
  ref    1 process x 4 devices, uninterrupted (the reference)
  multi  2 processes x 2 devices, uninterrupted: same loss curve and params as ref; its
         checkpoint restored in the test process on 4 devices equals ref's whole train state
  pre    2 processes resume ref's step-3 checkpoint (1 -> 2 processes); SIGTERM to process 1
         during start-up: both save step 4 and exit 0 (a SIGTERM mid-run is agreed on the same
         way, at a step that depends on timing)
  post   1 process x 2 devices resumes pre's step 4 (2 -> 1 processes, 4 -> 2 devices) and
         ends with ref's params

And the sentibench job on 2 processes x 1 device writes what 1 process x 2 devices writes; the kd
job on-policy on 2 processes x 4 devices samples the tokens and ends with the params of 1 process
x 8 devices.
"""
import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from sentijax import checkpoint, distributed, metrics, sharding
from sentijax import config as config_lib
from sentijax.models import factory
from sentijax.train import state as state_lib
import hf_fixtures
from tolerances import assert_close, assert_trees_close

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
ARGS = ["--config=configs/knowdist.py", f"--config.train.steps={STEPS}",
        "--config.train.eval_every=3", "--config.checkpoint.every=3", "--config.checkpoint.keep=3",
        "--config.train.log_every=1", "--config.mesh.data=1", "--config.mesh.fsdp=-1"]
TIMEOUT = 300  # per run; a deadlocked save would hang forever


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class _Run:
  """A `sentijax.main` subprocess whose merged output is collected by a thread.

  Runs of one test share a JAX compilation cache (the 2-process resume reuses the programs the
  first 2-process run compiled); the cache only skips XLA compiles of identical programs.
  """

  def __init__(self, workdir, devices, extra=(), args=ARGS, entry=("-m", "sentijax.main")):
    cache = Path(workdir).parent / "jax_cache"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, *entry, *args, f"--config.workdir={workdir}", *extra]
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)

  @property
  def out(self) -> str:
    return "".join(self.lines)

  def wait_for(self, text: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while text not in self.out:
      assert self.proc.poll() is None or self._reader.is_alive(), \
          f"exited before printing {text!r}:\n{self.out[-4000:]}"
      assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n{self.out[-4000:]}"
      time.sleep(0.05)

  def finish(self, timeout: float = TIMEOUT) -> str:
    """Waits for the exit; asserts return code 0 (a hang is killed and fails)."""
    try:
      self.proc.wait(timeout=timeout)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
        self.proc.wait()
      self._reader.join(10)
    assert self.proc.returncode == 0, f"returncode {self.proc.returncode}:\n{self.out[-4000:]}"
    return self.out


def _two_processes(workdir, args=ARGS, devices=2, **kw) -> list[_Run]:
  port = _free_port()
  return [_Run(workdir, devices, ["--config.distributed.enabled=True",
                            f"--config.distributed.coordinator_address=localhost:{port}",
                            "--config.distributed.num_processes=2",
                            f"--config.distributed.process_id={i}",
                            "--config.distributed.initialization_timeout=120"], args, **kw)
          for i in range(2)]


def _finish_all(runs: list[_Run], timeout: float = TIMEOUT) -> list[str]:
  try:
    return [r.finish(timeout) for r in runs]
  finally:
    for r in runs:
      if r.proc.poll() is None:
        r.proc.kill()


def _params(workdir: Path) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(workdir / "hf" / "model.safetensors"))


def _ckpt_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_curve(got: dict, want: dict, tag: str, steps: list[int]) -> None:
  # Same global batches and params; the runs differ only in the order fp32 partial sums are
  # reduced (across processes / over 2 or 4 devices). Losses: rtol 1e-5 is 10x the ~1e-6 relative
  # error bound of reordering a ~2k-term fp32 token sum, while a host reading the wrong rows (or a
  # resume at the wrong data position) moves the loss by >1e-3.
  assert sorted(got[tag]) == steps, (tag, sorted(got[tag]))
  np.testing.assert_allclose([got[tag][s] for s in steps], [want[tag][s] for s in steps],
                             rtol=1e-5, err_msg=tag)


def _restore_on_4_devices(workdir: Path, step: int):
  """(train state, data state) of `workdir`'s checkpoint `step`, restored in this one process
  onto 4 of its devices (the test process has 8) with the runs' mesh, data=1 x fsdp=4."""
  config = runpy.run_path(str(REPO / "configs" / "knowdist.py"))["get_config"]()
  model_cfg = factory.model_config(config)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, devices=jax.devices()[:4])
  target, _ = state_lib.abstract_state(model_cfg, state_lib.make_optimizer(config.train), mesh,
                                       config.sharding_rules)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every=3, keep=3)
  try:
    state, data, _ = ckpt.restore(target, step=step)
  finally:
    ckpt.close()
  return state, data


def test_processes_and_devices_change_between_runs_and_preemption_agrees(tmp_path):
  ref_dir, multi_dir, pre_dir = tmp_path / "ref", tmp_path / "multi", tmp_path / "pre"

  # ---- 2 processes x 2 devices == 1 process x 4 devices --------------------------------------
  multi = _two_processes(multi_dir)
  ref = _Run(ref_dir, 4)
  outs = _finish_all([*multi, ref])
  assert all(f"KnowDist done at step {STEPS}" in o for o in outs)
  ref_curve = metrics.read_scalars(ref_dir / "tensorboard")
  multi_curve = metrics.read_scalars(multi_dir / "tensorboard")
  every_step = list(range(1, STEPS + 1))
  for tag, steps in (("train/loss", every_step), ("train/grad_norm", every_step),
                     ("eval/loss", [0, 3, 6])):
    _assert_curve(multi_curve, ref_curve, tag, steps)
  want = _params(ref_dir)
  # Params: Adam turns a few-ulp gradient difference into an update difference of ~1e-7 of the
  # update; after 6 steps weights differ by a few ulps (~1e-8 measured). 1e-5 of each tensor's
  # largest element leaves ~100x margin, yet one skipped or repeated step (lr >= 1.5e-4 against
  # weights ~0.02..1) is >1e-3 of that scale.
  assert_trees_close(_params(multi_dir), want)
  # The 2-process checkpoint in ONE process on 4 devices: the whole train state (params, Adam
  # moments, step) equals the 1-process run's, and the data position is the same global one.
  (multi_state, multi_data), (ref_state, ref_data) = (
      _restore_on_4_devices(d, STEPS) for d in (multi_dir, ref_dir))
  assert_trees_close(multi_state, ref_state)
  assert {x.sharding.mesh.devices.size for x in jax.tree.leaves(multi_state)} == {4}
  assert multi_data == ref_data | {"process_count": 2} and multi_data["rows"] == STEPS * 8

  # ---- 1 -> 2 processes; SIGTERM to process 1 of 2 ---------------------------------------------
  (pre_dir / "checkpoints").mkdir(parents=True)
  shutil.copytree(ref_dir / "checkpoints" / "3", pre_dir / "checkpoints" / "3")
  pre = _two_processes(pre_dir)
  # After jax.distributed.initialize, before restore and compile (seconds of work): JAX's notifier
  # (polled every 1 s) has told both hosts long before the first step, so the agreed sync point
  # is the first poll, step 4, on any machine.
  pre[1].wait_for("KnowDist: ")
  pre[1].proc.send_signal(signal.SIGTERM)
  outs = _finish_all(pre)  # both exit 0: no deadlock at the save barrier
  for out in outs:
    assert f"resumed from {pre_dir / 'checkpoints'} at step 3 (24 rows read; saved by 1 " \
           f"processes, now 2 processes, 4 devices)" in out, out[-4000:]
    assert "preemption signal: saved step 4, exiting" in out, out[-4000:]
  assert _ckpt_steps(pre_dir) == [3, 4]  # one checkpoint, at the agreed step
  _assert_curve(metrics.read_scalars(pre_dir / "tensorboard"), ref_curve, "train/loss", [4])

  # ---- 2 -> 1 process, 4 -> 2 devices: rerunning in the same workdir finishes the run ------------
  post = _Run(pre_dir, 2)
  out = post.finish()
  assert "at step 4 (32 rows read; saved by 2 processes, now 1 processes, 2 devices)" in out
  assert f"KnowDist done at step {STEPS}" in out
  _assert_curve(metrics.read_scalars(pre_dir / "tensorboard"), ref_curve, "train/loss", [4, 5, 6])
  assert_trees_close(_params(pre_dir), want)


# ---------------------------------------------------------------------------------------------
# SentiBench scoring over 2 processes equals 1 process.


def _predictions(workdir: Path) -> dict[str, list[dict]]:
  return {p.name: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
          for p in sorted((workdir / "predictions").glob("*.jsonl"))}


def test_sentibench_over_two_processes_equals_one(tmp_path, sentibench_dir):
  """The sentibench job (classification with the shared prefix, greedy extraction) on 2
  processes x 1 device, rows sharded over both, writes what 1 process x 2 devices writes."""
  pytest.importorskip("torch")  # the fixture model is written by transformers
  model_dir = tmp_path / "model"
  hf_fixtures.make_llama(model_dir, vocab_size=512, weight_std=0.3)
  hf_fixtures.make_sentibench_tokenizer(sentibench_dir, model_dir)
  args = ["--config=configs/sentibench.py", f"--config.model.init={model_dir}",
          "--config.model.dtype=float32", f"--config.eval.data_dir={sentibench_dir}",
          "--config.eval.datasets=sc/sst2,absa/opener", "--config.eval.seeds=42",
          "--config.eval.max_examples=10", "--config.eval.max_new_tokens=24",
          "--config.eval.batch_size=8", "--config.eval.compilation_cache=off",
          "--config.mesh.data=-1", "--config.mesh.fsdp=1"]
  ref_dir, multi_dir = tmp_path / "ref", tmp_path / "multi"
  outs = _finish_all([*_two_processes(multi_dir, args, devices=1), _Run(ref_dir, 2, args=args)])
  assert all("SentiBench: 2 dataset(s) x 1 seed(s)" in o for o in (outs[0], outs[2])), outs[0]
  assert "SentiBench:" not in outs[1]  # process 1 scores its rows but writes nothing
  want, got = _predictions(ref_dir), _predictions(multi_dir)
  assert list(got) == list(want) == ["absa_opener_42.jsonl", "sc_sst2_42.jsonl"]
  for name in want:
    assert [r["index"] for r in got[name]] == list(range(10)), name
    for g, w in zip(got[name], want[name]):
      # Rows are scored independently: the same row on another device of another process runs
      # the same program (fp32 rounding at most, ~1e-7 of the scores).
      assert (g["gold"], g["prediction"]) == (w["gold"], w["prediction"]), (name, g, w)
      if w["scores"]:
        assert_close(g["scores"], w["scores"], 1e-5, name)
  ref_results = json.loads((ref_dir / "results.json").read_text(encoding="utf-8"))
  assert json.loads((multi_dir / "results.json").read_text(encoding="utf-8")) == ref_results


# ---------------------------------------------------------------------------------------------
# On-policy KD over 2 processes equals 1 process.

ONPOLICY_STEPS = 4
ONPOLICY_ARGS = ["--config=configs/kd.py", "--config.kd.mode=on_policy", "--config.kd.lmbda=0.75",
                 "--config.kd.loss=reverse", "--config.kd.rollout.max_new_tokens=8",
                 "--config.data.seq_len=64", f"--config.train.steps={ONPOLICY_STEPS}",
                 "--config.train.eval_every=0", "--config.train.log_every=1",
                 "--config.mesh.data=1", "--config.mesh.fsdp=-1"]
RECORDER = (str(REPO / "tests" / "onpolicy_recorder.py"),)  # the job + each step's batch


def _rollouts(workdir: Path) -> list[dict[str, np.ndarray]]:
  """Per step, the global batch the rollouts handed the train step ("inputs", "sampled";
  tests/onpolicy_recorder.py)."""
  with np.load(workdir / "rollouts.npz") as f:
    return [{k: f[f"{k}_{i}"] for k in ("inputs", "sampled")} for i in range(ONPOLICY_STEPS)]


def test_on_policy_kd_over_two_processes_equals_one(tmp_path):
  """kd.mode=on_policy with kd.lmbda=0.75 of 8 rows: global rows 0-5 get responses sampled by
  the current student (process 0's four rows and process 1's first two), rows 6-7 keep the
  corpus's. 2 processes x 4 devices (params fsdp-sharded over both processes) hand every train
  step the same batch, token for token, as 1 process x 8 devices, and end with its params and
  curves: rollout keys are numbered over the global batch, not per process."""
  ref_dir, multi_dir = tmp_path / "ref", tmp_path / "multi"
  outs = _finish_all([*_two_processes(multi_dir, ONPOLICY_ARGS, devices=4, entry=RECORDER),
                      _Run(ref_dir, 8, args=ONPOLICY_ARGS, entry=RECORDER)])
  assert all(f"KD done at step {ONPOLICY_STEPS}" in o for o in outs), outs[0][-3000:]
  want, got = _rollouts(ref_dir), _rollouts(multi_dir)
  for step, (g, w) in enumerate(zip(got, want)):
    # Rows 0-5 hold the student's tokens (up to 8 per segment), rows 6-7 none.
    assert w["sampled"][:6].any(-1).all() and not w["sampled"][6:].any(), step
    for k in w:  # tokens are discrete: equal, not close
      np.testing.assert_array_equal(g[k], w[k], err_msg=f"step {step + 1} {k}")
  ref_curve = metrics.read_scalars(ref_dir / "tensorboard")
  multi_curve = metrics.read_scalars(multi_dir / "tensorboard")
  every_step = list(range(1, ONPOLICY_STEPS + 1))
  for tag in ("train/loss", "train/kd", "train/grad_norm"):
    _assert_curve(multi_curve, ref_curve, tag, every_step)  # see _assert_curve's bound
  _assert_curve(multi_curve, ref_curve, "eval/kl_teacher", [ONPOLICY_STEPS])  # at the end
  for tag in ("train/onpolicy_fraction", "train/rollout_length", "train/rollout_dropped"):
    assert multi_curve[tag] == ref_curve[tag], tag  # counts over all processes' rows
  # Same batches, so only reduction order differs: the bound of the knowdist test above (Adam
  # after a few steps: a few ulps, ~1e-7 of each tensor's largest element measured; one row
  # sampled with another key moves the params by > 1e-3 of that scale).
  assert_trees_close(_params(multi_dir), _params(ref_dir))


def test_on_policy_kd_with_a_served_teacher_over_two_processes_equals_one(tmp_path):
  """The same with a served teacher (teacher.backend=openai, the sampled-token estimator): each
  process sends its own rows' samples to the server (sentijax.serve of a tiny model in this
  process); 2 processes x 4 devices sample the tokens, send the requests (summed over
  processes) and end with the params of 1 process x 8 devices."""
  from sentijax import models, serve  # pylint: disable=import-outside-toplevel
  from sentijax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  from sentijax.teacher.local import LocalTeacher  # pylint: disable=import-outside-toplevel
  from teacher import teacher_fixtures  # pylint: disable=import-outside-toplevel
  t_cfg = models.presets.get("tiny")  # the student's: its vocabulary is the tokenizer's
  tok_dir = tmp_path / "tok"
  tok_lib.train_tokenizer(teacher_fixtures.demo_texts(), t_cfg.vocab_size, tok_dir)
  params = jax.tree.map(np.asarray, models.init(t_cfg, 7))
  params["embedding"] = params["embedding"] * 12.0  # log-probs spread over several nats
  srv = serve.Server(LocalTeacher(t_cfg, params, tok_lib.load_tokenizer(tok_dir), batch_size=4,
                                  name="tiny"), "tiny", max_batch=4, max_wait_ms=5).start()
  args = [*ONPOLICY_ARGS, "--config.kd.rollout.estimator=token",
          "--config.teacher.backend=openai", f"--config.teacher.base_url={srv.url}",
          "--config.teacher.model=tiny", f"--config.teacher.tokenizer={tok_dir}"]
  ref_dir, multi_dir = tmp_path / "ref", tmp_path / "multi"
  try:
    outs = _finish_all([*_two_processes(multi_dir, args, devices=4, entry=RECORDER),
                        _Run(ref_dir, 8, args=args, entry=RECORDER)])
  finally:
    srv.stop()
  assert all(f"KD done at step {ONPOLICY_STEPS}" in o for o in outs), outs[0][-3000:]
  for step, (g, w) in enumerate(zip(_rollouts(multi_dir), _rollouts(ref_dir))):
    assert w["sampled"][:6].any(-1).all() and not w["sampled"][6:].any(), step
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=f"step {step + 1} {k}")
  ref_curve = metrics.read_scalars(ref_dir / "tensorboard")
  multi_curve = metrics.read_scalars(multi_dir / "tensorboard")
  every_step = list(range(1, ONPOLICY_STEPS + 1))
  for tag in ("train/loss", "train/rkl_token"):
    # The server batches requests as they come: a teacher log-prob may round differently
    # (~1e-7 relative) in another batch; 1e-5 is _assert_curve's reduction-order bound.
    _assert_curve(multi_curve, ref_curve, tag, every_step)
  assert multi_curve["train/teacher_requests"] == ref_curve["train/teacher_requests"]
  assert min(ref_curve["train/teacher_requests"].values()) >= 6  # a segment or more per row
  assert_trees_close(_params(multi_dir), _params(ref_dir))


# ---------------------------------------------------------------------------------------------
# config.distributed: checked once, passed to jax.distributed.initialize.


def _dist(**overrides):
  cfg = config_lib.base().distributed
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def test_distributed_config_reaches_jax_initialize(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert distributed.initialize(_dist()) == distributed.DistributedSpec()  # off: no call
  assert calls == []
  spec = distributed.initialize(_dist(
      enabled=True, coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3,
      initialization_timeout=1800, local_device_ids=" 0, 1,2,3"))
  assert calls == [{"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3,
                    "initialization_timeout": 1800, "local_device_ids": [0, 1, 2, 3]}]
  assert spec.local_device_ids == (0, 1, 2, 3)
  distributed.initialize(_dist(enabled=True))  # cluster auto-detection: only the timeout
  assert calls[-1] == {"initialization_timeout": 900}


@pytest.mark.parametrize("overrides, message", [
    ({"initialization_timeout": 0}, "initialization_timeout=0: must be a positive number"),
    ({"local_device_ids": "0,x"}, "local_device_ids='0,x': expected a comma list"),
    ({"local_device_ids": "0,1,1"}, "local_device_ids='0,1,1': lists a device twice"),
    ({"num_processes": 2, "process_id": 2}, "process_id=2: must be < distributed.num_processes=2"),
    ({"coordinator_address": "10.0.0.2"}, "coordinator_address='10.0.0.2': expected HOST:PORT"),
])
def test_distributed_config_errors_name_the_key(overrides, message):
  with pytest.raises(distributed.DistributedConfigError, match=message.replace("(", r"\(")):
    distributed.DistributedSpec.from_config(_dist(enabled=True, **overrides))


def test_distributed_settings_without_enabled_are_refused():
  with pytest.raises(distributed.DistributedConfigError,
                     match=r"num_processes=2: is set but distributed.enabled is False"):
    distributed.DistributedSpec.from_config(_dist(num_processes=2))
