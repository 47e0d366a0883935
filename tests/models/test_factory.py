"""A model built from `config.model` (models.factory, the one builder): `model.init_layers` keeps a subset of model.init's
layers, on a sharded mesh, and bad values are refused naming the key."""
import jax
import numpy as np
import pytest

import hf_fixtures
from sentijax import config as config_lib
from sentijax import models, sharding
from sentijax.models import factory

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama5")
  hf_fixtures.make_llama(path, seed=7, num_layers=5)
  return path


def _config(init, init_layers):
  c = config_lib.base()
  c.model.init, c.model.init_layers = str(init), init_layers
  return c


def test_init_layers_student_holds_the_named_layers_sharded(deep_llama):
  config = _config(deep_llama, " 0, 2,4 ")
  model_cfg = factory.model_config(config)
  assert model_cfg.num_layers == 3
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  rules = sharding.rules_from_config(config.sharding_rules)
  params = factory.param_initializer(config, model_cfg)(mesh, rules)
  _, full = models.load_hf(deep_llama)  # all 5 layers, single device
  want = jax.tree.map(lambda a: np.asarray(a), full)
  want["layers"] = jax.tree.map(lambda a: a[[0, 2, 4]], want["layers"])
  assert jax.tree.structure(params) == jax.tree.structure(want)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(g), w, err_msg=jax.tree_util.keystr(path))
  kernel = params["layers"]["mlp"]["up_kernel"]
  assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated


@pytest.mark.parametrize("value,why", [
    ("0,5", r"layer 5 is out of range; .*config\.json has 5 layers \(0\.\.4\)"),
    ("1,1", r"layer 1 is listed twice; .*config\.json has 5 layers"),
    ("3,1", r"layers must be listed in ascending order .*config\.json has 5 layers"),
    ("0,a", r"'a' is not a layer index; give a comma list of layer indices of .*llama5"),
    (",", r"'' is not a layer index"),
])
def test_bad_init_layers_name_the_key_value_and_layer_count(value, why, deep_llama):
  with pytest.raises(ValueError, match=rf"^model\.init_layers='{value}': {why}"):
    factory.model_config(_config(deep_llama, value))


def test_init_layers_without_init_is_refused():
  with pytest.raises(ValueError, match=r"model\.init_layers='0,3' selects layers of model\.init, "
                                       r"which is not set"):
    factory.model_config(_config("", "0,3"))
