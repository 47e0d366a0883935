"""The shared body of the kill/resume tests: SIGKILL a training job after a checkpoint, rerun it."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_main(config: str, workdir, *flags: str, **popen_kw) -> subprocess.Popen:
  """`python -m sentijax.main --config=configs/<config>.py --config.workdir=<workdir> <flags>` in
  the repo root on 2 fake CPU devices, stdout and stderr merged as text."""
  cmd = [sys.executable, "-m", "sentijax.main", f"--config=configs/{config}.py",
         f"--config.workdir={workdir}", *flags]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen_kw)


def checkpoint_steps(workdir) -> list[int]:
  """Steps of the Orbax checkpoints under <workdir>/checkpoints (sorted; [] before the first)."""
  d = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def kill_then_resume(start, work, at_least: int, steps: int, timeout: float,
                     final_timeout: float) -> tuple[int, str]:
  """Runs `start(work)` (a Popen factory), SIGKILLs it once a checkpoint >= `at_least` exists,
  checks the kill landed mid-run, reruns to the end; (the step it was killed at, the rerun's
  output)."""
  proc = start(work)
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if checkpoint_steps(work) and checkpoint_steps(work)[-1] >= at_least:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  killed_at = checkpoint_steps(work)[-1]
  assert at_least <= killed_at < steps
  final = start(work)
  out, _ = final.communicate(timeout=final_timeout)
  assert final.returncode == 0, out[-3000:]
  return killed_at, out
