"""Two local processes (jax.distributed on localhost, 2 CPU devices each) train exactly like one
process with 4 devices: each host reads only its half of every batch."""
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import safetensors.numpy
from tensorboardX.proto import event_pb2

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


def _scalars(logdir: Path) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from the TensorBoard event files (TFRecord framing) in `logdir`."""
  out = {}
  for path in sorted(logdir.glob("events.*")):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])  # length, length crc, event, event crc
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


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
  # Both runs use the same 4-device mesh and the same global batches; they differ only in the
  # order fp32 partial sums are reduced (across processes vs within one), a few ulps per
  # gradient/loss (the runs measured here agree to 1 ulp). Losses: rtol 1e-5 is 10x the ~1e-6
  # relative error bound of reordering a ~2k-term fp32 token sum, while a host reading the wrong
  # rows moves the loss by >1e-3.
  curves = [_scalars(tmp_path / run / "tensorboard") for run in ("multi", "single")]
  for tag, steps in (("train/loss", [3, 6]), ("eval/loss", [0, 3, 6]), ("train/grad_norm", [3, 6])):
    assert sorted(curves[0][tag]) == sorted(curves[1][tag]) == steps, tag
    np.testing.assert_allclose([curves[0][tag][s] for s in steps],
                               [curves[1][tag][s] for s in steps], rtol=1e-5, err_msg=tag)
  # Params: Adam turns a few-ulp gradient difference into an update difference of ~1e-7 of the
  # update; after 6 steps weights (|w| < ~1) differ by a few ulps (~1e-8 measured). atol 1e-6
  # leaves 100x margin yet is ~1% of one step's update (lr >= 1.5e-4 from step 2). Both runs
  # execute on the same CPU, so its vector width and FMA shape both alike: only the reduction order
  # differs between them, and that noise does not grow with the machine,
  # so a skipped, repeated or wrongly sharded step fails.
  multi = safetensors.numpy.load_file(str(tmp_path / "multi" / "hf" / "model.safetensors"))
  one = safetensors.numpy.load_file(str(tmp_path / "single" / "hf" / "model.safetensors"))
  assert multi.keys() == one.keys()
  for name in one:
    np.testing.assert_allclose(multi[name], one[name], rtol=1e-6, atol=1e-6, err_msg=name)
