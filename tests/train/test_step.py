"""The train step: loss mask, packing, gradient accumulation, sharding, NaN guard."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sentijax import config as config_lib
from sentijax import models, sharding
from sentijax.data import packing
from sentijax.train import losses, state as state_lib, step as step_lib

CFG = models.presets.get("tiny")
SEQ = 32


def _train_cfg(**kw):
  c = config_lib.base().train
  c.unlock()
  c.update(dict(steps=10, warmup_steps=0, learning_rate=1e-3, schedule="constant"), **kw)
  return c


def _sequences(rng, n):
  """Random (tokens, loss_mask) records: a prompt part (mask 0) then a response (mask 1)."""
  out = []
  for _ in range(n):
    p, r = rng.integers(2, 8), rng.integers(2, 7)
    tokens = rng.integers(5, CFG.vocab_size, size=p + r).astype(np.int32)
    mask = np.r_[np.zeros(p), np.ones(r)].astype(np.int32)
    out.append(packing.TokenizedSequence(tokens, mask))
  return out


def _packed_batch(rng, rows, per_row=3):
  packed = [packing.pack_row(_sequences(rng, per_row), SEQ) for _ in range(rows)]
  return {k: np.stack([r[k] for r in packed]) for k in packed[0]}


def test_loss_is_mean_nll_over_response_tokens_only():
  params = models.init(CFG, 0)
  batch = _packed_batch(np.random.default_rng(0), rows=4)
  nll_sum, w_sum = step_lib.loss_sums(CFG, params, batch)
  # Independent computation from the model's logits, token by token.
  logits = np.asarray(models.forward(CFG, params, batch["inputs"],
                                     segment_ids_BxT=batch["segment_ids"],
                                     positions_BxT=batch["positions"]), np.float64)
  total, count = 0.0, 0
  for b in range(logits.shape[0]):
    for t in range(SEQ):
      if batch["weights"][b, t]:
        row = logits[b, t]
        logp = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
        total -= logp[batch["targets"][b, t]]
        count += 1
  assert int(w_sum) == count
  np.testing.assert_allclose(float(nll_sum) / float(w_sum), total / count, rtol=1e-5)
  # Prompt and padding targets count for nothing: scrambling them leaves the loss unchanged.
  scrambled = dict(batch)
  scrambled["targets"] = np.where(batch["weights"] > 0, batch["targets"],
                                  (batch["targets"] + 7) % CFG.vocab_size)
  nll2, _ = step_lib.loss_sums(CFG, params, scrambled)
  np.testing.assert_allclose(float(nll2), float(nll_sum), rtol=1e-6)


def test_packed_row_equals_sequences_run_unpacked():
  params = models.init(CFG, 1)
  seqs = _sequences(np.random.default_rng(1), 3)
  row = packing.pack_row(seqs, SEQ)
  packed = np.asarray(losses.cross_entropy(
      models.forward(CFG, params, row["inputs"][None], segment_ids_BxT=row["segment_ids"][None],
                     positions_BxT=row["positions"][None]), row["targets"][None]))[0]
  offset = 0
  for s in seqs:
    n = len(s.tokens) - 1
    alone = np.asarray(losses.cross_entropy(models.forward(CFG, params, s.tokens[None, :-1]),
                                            s.tokens[None, 1:]))[0]
    np.testing.assert_allclose(packed[offset:offset + n], alone, atol=1e-5)
    offset += n


def _one_step(batch, num_micro, mesh=None, params=None, loss_chunk=0):
  tc = _train_cfg()
  tx = state_lib.make_optimizer(tc)
  params = models.init(CFG, 2) if params is None else params
  st = state_lib.create_state(params, tx)
  fn = functools.partial(step_lib.train_step, model_cfg=CFG, tx=tx, num_micro=num_micro,
                         schedule=state_lib.learning_rate_schedule(tc), mesh=mesh,
                         loss_chunk=loss_chunk)
  if mesh is None:
    return jax.jit(fn)(st, batch)
  rules = config_lib.base().sharding_rules
  st_sh = state_lib.state_shardings(CFG, tx, mesh, rules)
  st = jax.device_put(st, st_sh)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  new, metrics = jax.jit(fn, in_shardings=(st_sh, sharding.batch_sharding(mesh)),
                         out_shardings=(st_sh, None), donate_argnums=0)(st, batch)
  assert new.params["layers"]["mlp"]["up_kernel"].sharding.spec == \
      jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  return new, metrics


def test_gradient_accumulation_4x8_equals_batch_of_32():
  batch = _packed_batch(np.random.default_rng(3), rows=32)
  big, m_big = _one_step(batch, 1)
  acc, m_acc = _one_step(batch, 4)
  np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
               acc.params, big.params)
  changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), big.params, models.init(CFG, 2))
  assert max(jax.tree.leaves(changed)) > 5e-4  # the step really moved the params


def test_sharded_step_matches_single_device():
  batch = _packed_batch(np.random.default_rng(4), rows=8)
  single, m1 = _one_step(batch, 1)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded, m8 = _one_step(batch, 2, mesh=mesh, loss_chunk=8)  # + accumulation + chunked loss
  np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
               sharded.params, single.params)


def test_nonfinite_loss_keeps_state_and_flags():
  params = models.init(CFG, 2)
  bad = jax.tree.map(lambda x: x, params)
  bad["embedding"] = bad["embedding"].at[0, 0].set(jnp.nan)
  batch = _packed_batch(np.random.default_rng(5), rows=4)
  batch["inputs"][0, 0] = 0  # token 0 reads the NaN embedding row
  new, metrics = _one_step(batch, 1, params=bad)
  assert int(metrics["nonfinite"]) == 1
  assert int(new.step) == 0
  np.testing.assert_array_equal(np.asarray(new.params["layers"]["mlp"]["up_kernel"]),
                                np.asarray(params["layers"]["mlp"]["up_kernel"]))


def test_weight_decay_mask_and_schedule():
  params = models.init(CFG, 0)
  mask = state_lib.decay_mask(params)
  assert mask["layers"]["attn"]["q_kernel"] and mask["embedding"]
  assert not mask["final_norm"]["scale"] and not mask["layers"]["input_norm"]["scale"]
  tc = _train_cfg(steps=100, warmup_steps=10, schedule="cosine", learning_rate=1.0,
                  end_lr_ratio=0.1)
  sched = state_lib.learning_rate_schedule(tc)
  assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6
  assert abs(float(sched(100)) - 0.1) < 1e-6
  with pytest.raises(ValueError, match="schedule"):
    state_lib.learning_rate_schedule(_train_cfg(schedule="bogus"))


def test_kl_divergences():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 11)), rng.normal(size=(2, 3, 11))
  ps, pt = [np.exp(x) / np.exp(x).sum(-1, keepdims=True) for x in (s, t)]
  fwd = (pt * (np.log(pt) - np.log(ps))).sum(-1)
  rev = (ps * (np.log(ps) - np.log(pt))).sum(-1)
  m = 0.5 * (ps + pt)
  jsd = 0.5 * (pt * np.log(pt / m)).sum(-1) + 0.5 * (ps * np.log(ps / m)).sum(-1)
  for kind, want in [("forward", fwd), ("reverse", rev), ("jsd", jsd)]:
    np.testing.assert_allclose(np.asarray(losses.kl_divergence(s, t, kind=kind)), want, rtol=1e-4,
                               atol=1e-6)
  assert float(jnp.abs(losses.kl_divergence(s, s)).max()) < 1e-6


@pytest.mark.parametrize("chunk", [8, 12])  # 12 does not divide 32: the tail is padded
def test_chunked_loss_equals_full_logits_loss_and_grads(chunk):
  params = models.init(CFG, 6)
  batch = _packed_batch(np.random.default_rng(6), rows=4)
  full = jax.value_and_grad(lambda p: step_lib.loss_sums(CFG, p, batch)[0])(params)
  chunked = jax.value_and_grad(lambda p: step_lib.loss_sums(CFG, p, batch, chunk)[0])(params)
  np.testing.assert_allclose(float(chunked[0]), float(full[0]), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), chunked[1], full[1])
