"""Two local processes (jax.distributed on localhost, 2 CPU devices each) train exactly like one
process with 4 devices: each host reads only its half of every batch."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import safetensors.numpy

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--config=configs/knowdist.py", "--config.train.steps=6", "--config.train.eval_every=3",
        "--config.checkpoint.every=3", "--config.train.log_every=3"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, devices, extra=()):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "sentijax.main", *ARGS, f"--config.workdir={workdir}", *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  procs = [_launch(tmp_path / "multi", 2, [
      "--config.distributed.enabled=True",
      f"--config.distributed.coordinator_address=localhost:{port}",
      "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"])
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  single = _launch(tmp_path / "single", 4)
  out = single.communicate(timeout=600)[0]
  assert single.returncode == 0, out[-4000:]
  assert "KnowDist done at step 6" in outs[0] and "KnowDist done at step 6" in out
  multi = safetensors.numpy.load_file(str(tmp_path / "multi" / "hf" / "model.safetensors"))
  one = safetensors.numpy.load_file(str(tmp_path / "single" / "hf" / "model.safetensors"))
  assert multi.keys() == one.keys()
  for name in one:
    np.testing.assert_allclose(multi[name], one[name], atol=2e-5, err_msg=name)
