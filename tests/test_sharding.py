"""Sharded forward on 8 fake CPU devices equals the single-device forward; params are sharded."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hf_fixtures
from sentijax import config as config_lib
from sentijax import models, sharding

RULES = config_lib.base().sharding_rules
MESH_222 = {"data": 2, "fsdp": 2, "tensor": 2}


def test_eight_fake_devices():
  assert jax.device_count() == 8


def test_mesh_shape_and_errors():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
  with pytest.raises(sharding.MeshError, match="needs 12 devices but 8"):
    sharding.mesh_shape({"data": 3, "fsdp": 2, "tensor": 2}, 8)
  with pytest.raises(sharding.MeshError, match="do not divide"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(sharding.MeshError, match="at most one axis"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(sharding.MeshError):
    sharding.make_mesh({"data": 16, "fsdp": 1, "tensor": 1})


def _assert_really_sharded(params, mesh):
  q = params["layers"]["attn"]["q_kernel"]  # (layers, embed, heads, head_dim)
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  shard_shape = q.addressable_shards[0].data.shape
  assert shard_shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2, q.shape[3])
  assert len({d for d in q.sharding.device_set}) == 8
  gate = params["layers"]["mlp"]["gate_kernel"]
  assert gate.addressable_shards[0].data.shape[-1] == gate.shape[-1] // 2


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_sharded_forward_matches_single_device(which, tmp_path):
  make = hf_fixtures.make_llama if which == "llama" else hf_fixtures.make_qwen2
  make(tmp_path)
  cfg, params_1 = models.load_hf(tmp_path)
  mesh = sharding.make_mesh(MESH_222)
  cfg, params_8 = models.load_hf(tmp_path, mesh=mesh, rules=RULES)
  _assert_really_sharded(params_8, mesh)
  ids, mask = hf_fixtures.padded_batch(np.random.default_rng(0), cfg.vocab_size,
                                       [20, 7, 13, 20, 5, 20, 11, 16], "left")
  single = np.asarray(models.apply(cfg, params_1, ids, attention_mask=mask))
  rows = NamedSharding(mesh, P(("data", "fsdp"), None))  # 8 rows: 2 per (data, fsdp) shard
  ids_8 = jax.device_put(ids.astype(np.int32), rows)
  mask_8 = jax.device_put(mask.astype(np.int32), rows)
  sharded = models.apply(cfg, params_8, ids_8, attention_mask=mask_8)
  # The batch stays spread over the devices: inputs as placed, logits follow the rows.
  assert ids_8.sharding == rows and mask_8.sharding == rows
  assert sharded.sharding.spec[0] == ("data", "fsdp"), sharded.sharding
  assert sharded.addressable_shards[0].data.shape[0] == 2
  assert {s.data.shape[0] for s in sharded.addressable_shards} == {2}
  # Sharded matmuls sum partial products in another order: fp32 rounding only (~4e-7 of the
  # largest logit measured); 1e-5 of it holds on any CPU and fails on a real mapping error.
  err, scale = np.abs(np.asarray(sharded) - single).max(), np.abs(single).max()
  assert err <= 1e-5 * scale, (err, scale)


def test_random_init_is_sharded_in_place():
  cfg = models.presets.get("tiny")
  mesh = sharding.make_mesh(MESH_222)
  params = models.init(cfg, 0, mesh=mesh, rules=RULES)
  _assert_really_sharded(params, mesh)
  ref = models.init(cfg, 0)

  def same(a, b):  # the same random bits; the normal transform may round differently per layout
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
  jax.tree.map(same, params, ref)


def test_hf_import_streams_slices_into_place(tmp_path, monkeypatch):
  """Each device receives only its slice of one layer at a time: no [layers, ...] host array.

  (tests/models/test_hf_memory.py bounds the host memory itself on a ~370 MB checkpoint.)
  """
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  hf_cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=12,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
  LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path)

  requested = []
  real = jax.make_array_from_callback

  def spy(shape, sharding_, callback):
    def recording(index):
      out = callback(index)
      requested.append((tuple(shape), out.shape))
      return out
    return real(shape, sharding_, recording)

  monkeypatch.setattr(jax, "make_array_from_callback", spy)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  cfg, params = models.load_hf(tmp_path, mesh=mesh, rules=RULES)
  gate = params["layers"]["mlp"]["gate_kernel"]  # (layers, embed, mlp): embed over fsdp=8
  assert gate.addressable_shards[0].data.shape == (12, 16, 512)
  assert requested.count(((128, 512), (16, 512))) == 2 * 12 * 8  # gate+up: per layer, per device
  assert all(full[0] != 12 for full, _ in requested)  # never a stacked array on the host
  matrices = [(full, got) for full, got in requested if len(full) >= 2]
  assert matrices and all(np.prod(got) * 8 == np.prod(full) for full, got in matrices)
  reference = models.load_hf(tmp_path)[1]  # single device: the same values
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, reference)


def test_indivisible_rule_names_param_axis_sizes_and_fix():
  qwen = models.presets.get("qwen2.5-1.5b")  # 2 KV heads
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  with pytest.raises(sharding.MeshError) as err:
    models.shardings_for(qwen, mesh, RULES)
  msg = str(err.value)
  for part in ["['layers']['attn']['k_", "logical axis 'kv_heads' has size 2",
               "('kv_heads', 'tensor')", "mesh axis 'tensor' of size 4",
               "('kv_heads', None)", "one of [1, 2]"]:
    assert part in msg, (part, msg)
  replicated_kv = [(n, None if n == "kv_heads" else a) for n, a in RULES]
  shardings = models.shardings_for(qwen, mesh, replicated_kv)  # the suggested fix works
  assert shardings["layers"]["attn"]["k_kernel"].spec[2] is None
  assert shardings["layers"]["attn"]["q_kernel"].spec[2] == "tensor"  # 12 heads: 4 divides


def test_auto_fsdp_rule():
  base = config_lib.base().mesh
  assert base.fsdp == 0  # the default is auto
  n8b = models.presets.get("llama-3.1-8b").num_params  # 8.0B x 12 B = 90 GiB of train state
  for gb, want in [(80.0, -1), (200.0, 1)]:  # 90 GiB > 40 GiB -> shard; < 100 GiB -> replicate
    auto = sharding.resolve_auto(dict(base, device_memory_gb=gb), models.presets.get("llama-3.1-8b"))
    assert auto["fsdp"] == want and auto["data"] == (1 if want == -1 else -1), (gb, auto)
  # The boundary: state == half the memory still fits; one byte less memory does not.
  limit = n8b * sharding.TRAIN_BYTES_PER_PARAM / sharding.AUTO_FRACTION
  assert not sharding.needs_fsdp(n8b, int(limit)) and sharding.needs_fsdp(n8b, int(limit) - 1)
  # On 8 CPU devices (no bytes_limit: 16 GiB assumed): the 8B model is sharded over all 8,
  # the tiny one is pure data parallel, a fixed data axis leaves fsdp the rest.
  big = sharding.make_mesh(base, model_cfg=models.presets.get("llama-3.1-8b"))
  assert dict(big.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  small = sharding.make_mesh(base, model_cfg=models.presets.get("tiny"))
  assert dict(small.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  two = sharding.make_mesh(dict(base, data=2), model_cfg=models.presets.get("llama-3.1-8b"))
  assert dict(two.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert dict(sharding.make_mesh(base).shape)["fsdp"] == 1  # no model to size: replicate


def _constraint_specs(jaxpr, out):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "sharding_constraint":
      out.append(str(eqn.params["sharding"].spec))
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _constraint_specs(inner, out)
  return out


def test_activation_sharding_follows_the_logical_rules():
  cfg = models.presets.get("tiny")
  mesh = sharding.make_mesh(MESH_222)
  params = models.init(cfg, 0, mesh=mesh, rules=RULES)
  ids = jax.device_put(np.arange(8 * 16, dtype=np.int32).reshape(8, 16) % cfg.vocab_size,
                       sharding.batch_sharding(mesh, RULES))
  fwd = lambda p, t: models.forward(cfg, p, t)  # noqa: E731
  assert _constraint_specs(jax.make_jaxpr(fwd)(params, ids).jaxpr, []) == []  # no context: none
  with sharding.logical_context(mesh, RULES):
    specs = set(_constraint_specs(jax.make_jaxpr(fwd)(params, ids).jaxpr, []))
    inside = np.asarray(jax.jit(fwd)(params, ids))
  batch = "('data', 'fsdp')"
  assert specs == {f"P({batch}, None, None)",  # hidden [batch, length, embed]
                   f"P({batch}, None, 'tensor', None)",  # q/k/v [batch, length, heads, head_dim]
                   f"P({batch}, None, 'tensor')"}, specs  # mlp [batch, length, mlp]
  outside = np.asarray(jax.jit(fwd)(params, ids))
  assert np.abs(inside - outside).max() <= 1e-5 * np.abs(outside).max()


def test_fsdp4_state_per_device_is_at_most_1_2_over_4_of_replicated():
  """Params + AdamW state one device holds: fsdp=4 <= 1.2/4 of fsdp=1 (tiny preset; only the
  norm scales and the step counts stay replicated). bench/bench_memory.py measures presets."""
  from sentijax.train import state as state_lib
  cfg = models.presets.get("tiny")
  tx = state_lib.make_optimizer(config_lib.base().train)
  per_device = {}
  for fsdp in (1, 4):
    mesh = sharding.make_mesh({"data": 8 // fsdp, "fsdp": fsdp, "tensor": 1})
    target, _ = state_lib.abstract_state(cfg, tx, mesh, RULES)
    per_device[fsdp] = sharding.bytes_per_device(target)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(target))
  assert per_device[1] == total  # fsdp=1: every device holds everything
  assert per_device[4] <= 1.2 / 4 * per_device[1], per_device


def test_placement_carries_mesh_and_rules_together():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  rules = (("batch", "data"),)
  place = sharding.Placement(mesh, rules)
  assert place.batch(3).spec == jax.sharding.PartitionSpec("data", None, None)
  assert place.batch_divisor == 2
  assert sharding.Placement(mesh).batch_divisor == 8  # the base rules: ('data', 'fsdp')
  assert sharding.Placement().batch() is None and sharding.Placement().batch_divisor == 1
  config = config_lib.base()
  config.mesh.update(data=4, fsdp=2)
  from_config = sharding.Placement.from_config(config)
  assert dict(from_config.mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert from_config.rules == config.sharding_rules
