"""Checkpointer: keep-N, sharded restore, and a save killed mid-write is never resumed from."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sentijax import checkpoint, sharding

REPO = Path(__file__).resolve().parents[1]
MESH = {"data": 2, "fsdp": 4, "tensor": 1}


def _state(mesh, value):
  sh = NamedSharding(mesh, P("fsdp", None))
  return {"w": jax.device_put(jnp.full((8, 4), value, jnp.float32), sh),
          "step": jnp.asarray(int(value), jnp.int32)}


def _target(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _steps(directory):
  return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())


def test_keep_n_and_sharded_restore(tmp_path):
  mesh = sharding.make_mesh(MESH)
  ckpt = checkpoint.Checkpointer(tmp_path, every=2, keep=2)
  assert not ckpt.save(1, _state(mesh, 1), {"step": 1})  # not a multiple of `every`
  for step in (2, 4, 6):
    assert ckpt.save(step, _state(mesh, step), {"step": step})
  assert not ckpt.save(6, _state(mesh, 6), {"step": 6}, force=True)  # already saved
  ckpt.close()
  assert _steps(tmp_path) == [4, 6]

  ckpt = checkpoint.Checkpointer(tmp_path, every=2, keep=2)
  state, data, step = ckpt.restore(_target(_state(mesh, 0)), step=4)
  assert step == 4 and data == {"step": 4}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((8, 4), 4.0))  # bitwise restore
  assert state["w"].sharding.spec == P("fsdp", None)
  assert len(state["w"].addressable_shards[0].data) == 2  # 8 rows over fsdp=4
  ckpt.close()


def test_restore_into_another_device_count_and_layout(tmp_path):
  """Saved over 8 devices (fsdp=4), restored over 2 (fsdp=2) and over 3 (replicated)."""
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=1)
  w = np.arange(32, dtype=np.float32).reshape(8, 4)
  mesh8 = sharding.make_mesh(MESH)
  ckpt.save(1, {"w": jax.device_put(w, NamedSharding(mesh8, P("fsdp", None))),
                "step": jnp.asarray(1, jnp.int32)}, {"step": 1})
  ckpt.close()
  for devices, spec in ((2, P("fsdp", None)), (3, P())):
    mesh = sharding.make_mesh({"data": 1, "fsdp": devices, "tensor": 1},
                              devices=jax.devices()[:devices])
    target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, spec)),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=1)
    state, _, _ = ckpt.restore(target)
    ckpt.close()
    np.testing.assert_array_equal(np.asarray(state["w"]), w)
    assert state["w"].sharding.mesh.devices.size == devices and state["w"].sharding.spec == spec


def test_pending_batch_saved_with_the_state_restores_into_another_mesh(tmp_path):
  """A prepared batch (`pending`: 2-D and 3-D batch-sharded arrays + JSON) saved in the same
  checkpoint as the state over 8 devices comes back bitwise over 2; a checkpoint saved without
  one gives None, and the state restores alike from both."""
  mesh8 = sharding.make_mesh(MESH)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 99, (8, 6)).astype(np.int32),
           "soft_probs": rng.random((8, 6, 3)).astype(np.float32)}
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
  on8 = {k: jax.device_put(v, sharding.batch_sharding(mesh8)) for k, v in batch.items()}
  ckpt.save(1, _state(mesh8, 1), {"step": 1}, pending=(on8, {"step": 1, "metrics": {"a": 0.5}}))
  ckpt.save(2, _state(mesh8, 2), {"step": 2})
  ckpt.close()
  mesh2 = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
  arrays, meta = ckpt.restore_pending(1, sharding.batch_sharding(mesh2))
  assert meta == {"step": 1, "metrics": {"a": 0.5}} and sorted(arrays) == sorted(batch)
  for k, v in batch.items():
    np.testing.assert_array_equal(np.asarray(arrays[k]), v)
    assert arrays[k].sharding.mesh.devices.size == 2 and len(arrays[k].addressable_shards[0].data) == 4
  assert ckpt.restore_pending(2, sharding.batch_sharding(mesh2)) is None
  for step in (1, 2):
    state, data, _ = ckpt.restore(_target(_state(mesh8, 0)), step=step)
    assert data == {"step": step} and float(state["w"][0, 0]) == step
  ckpt.close()


def test_sigterm_on_one_process_saves_and_orbax_never_polls_the_sync_point(tmp_path, monkeypatch):
  """One process: SIGTERM sets the flag the loop polls. Orbax's own preemption checks inside
  save() answer from the loop's poll instead of moving JAX's multi-host sync counter."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  polls = []
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: polls.append(step) or False)
  mesh = sharding.make_mesh(MESH)
  ckpt = checkpoint.Checkpointer(tmp_path, every=100, keep=2)
  before = signal.getsignal(signal.SIGTERM)
  ckpt.install_sigterm_handler()
  try:
    assert not ckpt.preempted(1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process keeps running
    assert ckpt.preempted(2) and ckpt.manager.reached_preemption(2)
    assert ckpt.save(2, _state(mesh, 2), {"step": 2}, force=True)
    ckpt.manager.wait_until_finished()
  finally:
    ckpt.close()
  assert polls == []  # neither our single-process poll nor Orbax's save/finalize asked JAX
  assert signal.getsignal(signal.SIGTERM) is before  # handler restored on close
  assert _steps(tmp_path) == [2]


# ---------------------------------------------------------------------------------------------
# A real async save killed mid-write (SIGKILL to the writing process).

ROWS, COLS = 8, 1 << 22  # 128 MiB of float32
FULL_BYTES = ROWS * COLS * 4


def _pattern(step: int) -> np.ndarray:
  """Step 1's weights: distinct values that compress well (Orbax zstd), so they save fast."""
  return (np.arange(ROWS * COLS) % 4093).astype(np.float32).reshape(ROWS, COLS) * 0.25 + step

WRITER = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sentijax import checkpoint, sharding

    rows, cols = int(sys.argv[2]), int(sys.argv[3])
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})

    def state(step):
      if step == 1:  # test_checkpoint._pattern(1)
        w = (np.arange(rows * cols) % 4093).astype(np.float32).reshape(rows, cols) * 0.25 + 1
      else:  # random bytes do not compress: writing them takes a while, and the kill lands in it
        w = np.random.default_rng(step).standard_normal((rows, cols), np.float32)
      return {"w": jax.device_put(w, NamedSharding(mesh, P("fsdp", None))),
              "step": jnp.asarray(step, jnp.int32)}

    ckpt = checkpoint.Checkpointer(sys.argv[1], every=1, keep=5, async_save=True)
    ckpt.save(1, state(1), {"step": 1})
    ckpt.manager.wait_until_finished()
    print("step 1 saved", flush=True)
    ckpt.save(2, state(2), {"step": 2})  # async: returns while the write goes on
    print("step 2 saving", flush=True)
    ckpt.manager.wait_until_finished()
    print("step 2 saved", flush=True)  # never reached: killed before
""")


def _bytes_under(path: Path) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:  # renamed or removed while walking
        pass
  return total


def _kill_while_writing(directory: Path, step: int, min_bytes: int, timeout: float = 120):
  """Starts WRITER; SIGKILLs it once Orbax's temporary directory for `step` holds `min_bytes`
  (state data partly written, not yet renamed to its final name). Returns (tmp dir, output)."""
  proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(ROWS), str(COLS)],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline, partial = time.monotonic() + timeout, None
  try:
    while time.monotonic() < deadline and proc.poll() is None:
      tmp = [p for p in directory.glob(f"{step}.*") if "tmp" in p.name] \
          if directory.is_dir() else []
      if tmp and _bytes_under(tmp[0]) >= min_bytes:
        proc.send_signal(signal.SIGKILL)
        partial = tmp[0]
        break
      time.sleep(0.002)
  finally:
    if proc.poll() is None and partial is None:
      proc.kill()
    out, _ = proc.communicate(timeout=60)
  assert partial is not None, f"step {step} was never caught mid-write:\n{out[-3000:]}"
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  return partial, out


def test_save_killed_mid_write_resumes_from_last_complete_checkpoint(tmp_path):
  partial, out = _kill_while_writing(tmp_path, step=2, min_bytes=1 << 20)
  assert "step 2 saving" in out and "step 2 saved" not in out, out[-3000:]
  # What the kill left: step 1 complete, step 2 a torn temporary directory.
  assert _steps(tmp_path) == [1]
  assert partial.is_dir() and _bytes_under(partial) < FULL_BYTES

  mesh = sharding.make_mesh(MESH)
  target = {"w": jax.ShapeDtypeStruct((ROWS, COLS), jnp.float32,
                                      sharding=NamedSharding(mesh, P("fsdp", None))),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=5)
  assert ckpt.latest_step() == 1
  state, data, step = ckpt.restore(target)
  assert step == 1 and data == {"step": 1} and int(state["step"]) == 1
  np.testing.assert_array_equal(np.asarray(state["w"]), _pattern(1))  # bitwise: the bytes saved
  assert state["w"].sharding.spec == P("fsdp", None)
  del state

  # The torn directory is cleaned up and step 2 can be written again.
  assert not partial.exists()
  small = {"w": jnp.zeros((ROWS, 4), jnp.float32), "step": jnp.asarray(2, jnp.int32)}
  assert ckpt.save(2, small, {"step": 2}, force=True)
  ckpt.close()
  assert _steps(tmp_path) == [1, 2]
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=5)
  assert ckpt.latest_step() == 2
  ckpt.close()
