"""The `batch` sharding rule of the config decides how batches are placed: training batches,
microbatches inside the train step, and scoring batches (the loop: tests/train/test_loop.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sentijax import config, sharding
from sentijax.eval import scorer
from sentijax.train import step as step_lib

BASE = config.base().sharding_rules
OTHERS = tuple(r for r in BASE if r[0] != "batch")
DATA_ONLY = (("batch", "data"),) + OTHERS


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})


def test_rule_decides_sharding_and_divisor(mesh):
  assert sharding.batch_sharding(mesh, BASE).spec == P(("data", "fsdp"), None)
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)  # None: base rules
  assert sharding.batch_divisor(mesh, BASE) == 8
  assert sharding.batch_sharding(mesh, DATA_ONLY, ndim=3).spec == P("data", None, None)
  assert sharding.batch_sharding(mesh, DATA_ONLY, batch_dim=1).spec == P(None, "data")
  assert sharding.batch_divisor(mesh, DATA_ONLY) == 2
  replicated = (("batch", None),) + OTHERS
  assert sharding.batch_sharding(mesh, replicated).spec == P(None, None)
  assert sharding.batch_divisor(mesh, replicated) == 1
  assert sharding.batch_divisor(None, DATA_ONLY) == 1
  with pytest.raises(sharding.MeshError, match=r"no \('batch', mesh axes\) rule"):
    sharding.batch_sharding(mesh, OTHERS)
  with pytest.raises(sharding.MeshError, match=r"'batch' rule names mesh axes \['dp'\]"):
    sharding.batch_divisor(mesh, (("batch", ("dp", "fsdp")),))


def test_microbatches_and_scoring_batches_follow_the_rule(mesh):
  x_BxL = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)  # microbatches of 8 rows: both
  # rules split them evenly, so only the rule decides
  split = jax.jit(lambda b: step_lib._split_microbatches(b, 2, mesh, DATA_ONLY))(
      {"x": jnp.asarray(x_BxL)})["x"]
  np.testing.assert_array_equal(np.asarray(split), np.stack([x_BxL[0::2], x_BxL[1::2]]))
  assert split.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 3)
  assert not split.sharding.is_equivalent_to(NamedSharding(mesh, P(None, ("data", "fsdp"))), 3)

  place = scorer._place  # pylint: disable=protected-access
  ids, = place(sharding.Placement(mesh, DATA_ONLY), x_BxL)
  assert ids.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)
  ids, = place(sharding.Placement(mesh), x_BxL)
  assert ids.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2)
