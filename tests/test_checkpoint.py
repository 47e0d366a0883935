"""Checkpointer: keep-N, sharded restore, and a save interrupted mid-write is never resumed from."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sentijax import checkpoint, sharding


def _state(mesh, value):
  sh = NamedSharding(mesh, P("fsdp", None))
  return {"w": jax.device_put(jnp.full((8, 4), value, jnp.float32), sh),
          "step": jnp.asarray(int(value), jnp.int32)}


def test_keep_n_restore_sharded_and_ignore_partial_save(tmp_path):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
  for step in (1, 2, 3):
    assert ckpt.save(step, _state(mesh, step), {"step": step})
  ckpt.close()
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]

  # A job killed while writing step 4 leaves Orbax's temporary directory: copy step 3 under the
  # temporary name and tear out part of it, as a half-finished write would look.
  partial = tmp_path / "4.orbax-checkpoint-tmp-1234"
  shutil.copytree(tmp_path / "3", partial)
  shutil.rmtree(partial / "state")

  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
  assert ckpt.latest_step() == 3
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        _state(mesh, 0))
  state, data, step = ckpt.restore(target)
  assert step == 3 and data == {"step": 3}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((8, 4), 3.0))
  assert state["w"].sharding.spec == P("fsdp", None)
  assert len(state["w"].addressable_shards[0].data) == 2  # 8 rows over fsdp=4
  # The step can be written again (the stale temporary directory does not block it).
  assert ckpt.save(4, _state(mesh, 4), {"step": 4}, force=True)
  ckpt.close()
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
  assert ckpt.latest_step() == 4
  ckpt.close()
