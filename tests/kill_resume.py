"""The shared body of the kill/resume tests: SIGKILL a training job after a checkpoint, rerun it."""
import signal
import time
from pathlib import Path


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
