"""The train step: loss mask, packing, gradient accumulation, sharding, NaN guard."""
import functools

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sentijax import config as config_lib
from sentijax import models, sharding
from sentijax.data import packing, sequences
from sentijax.train import losses, state as state_lib, step as step_lib
from tolerances import assert_trees_close

CFG = models.presets.get("tiny")
SEQ = 32
# fp32 rounding: losses and gradient elements here are sums of 10^2..10^4 fp32 terms whose order
# changes with chunking, microbatching, sharding and the CPU (vector width, FMA, threads). They
# agree to ~1e-7..1e-6 of the magnitudes summed (measured <= 5e-7); 1e-5 leaves >20x headroom
# and is still orders of magnitude below the bugs these tests target (a gradient x2 or / M, a
# leaked prompt token, a misaligned chunk: errors of 1e-2..1).
RTOL = 1e-5


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
    out.append(sequences.TokenizedSequence(tokens, mask))
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
  # fp32 logsumexp over V=1024 and a sum over ~50 tokens vs float64: ~1e-7 relative (RTOL above).
  np.testing.assert_allclose(float(nll_sum) / float(w_sum), total / count, rtol=RTOL)
  # Prompt and padding targets count for nothing: scrambling them leaves the loss unchanged.
  scrambled = dict(batch)
  scrambled["targets"] = np.where(batch["weights"] > 0, batch["targets"],
                                  (batch["targets"] + 7) % CFG.vocab_size)
  nll2, _ = step_lib.loss_sums(CFG, params, scrambled)
  # Same weighted terms (masked ones are exactly 0): only summation may differ. One leaked token
  # (NLL ~7 of a ~300 sum) would move it by ~2%.
  np.testing.assert_allclose(float(nll2), float(nll_sum), rtol=RTOL)


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
    # Per-token NLL ~7 from differently shaped (padded vs. not) fp32 matmuls: ~1e-7 relative
    # (measured 5e-7 absolute); a segment leaking into attention changes it by >1e-2.
    np.testing.assert_allclose(packed[offset:offset + n], alone, rtol=RTOL,
                               atol=RTOL * float(np.abs(alone).max()))
    offset += n


class _Recorded(NamedTuple):
  grads: Any


def _record_grads() -> optax.GradientTransformation:
  """Passes updates through and keeps them in its state: chained in front of the real optimizer it
  exposes the gradient train_step computed. Params after one AdamW step cannot show it: Adam's
  first update is ~lr * sign(g), blind to a gradient scaled by 2 or divided by M."""
  return optax.GradientTransformation(
      lambda params: _Recorded(jax.tree.map(jnp.zeros_like, params)),
      lambda updates, state, params=None: (updates, _Recorded(updates)))


def _one_step(batch, num_micro, mesh=None, params=None, loss_chunk=0):
  """One jitted train_step, real AdamW behind `_record_grads`: (new state, metrics)."""
  tc = _train_cfg()
  tx = optax.chain(_record_grads(), state_lib.make_optimizer(tc))
  params = models.init(CFG, 2) if params is None else params
  st = state_lib.create_state(params, tx)
  fn = functools.partial(step_lib.train_step, spec=step_lib.StepSpec(
      CFG, tx, num_micro, state_lib.learning_rate_schedule(tc), loss_chunk),
                         placement=sharding.Placement(mesh))
  if mesh is None:
    return jax.jit(fn)(st, batch)
  rules = config_lib.base().sharding_rules
  st_sh = state_lib.state_shardings(CFG, tx, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh)
  st = jax.device_put(jax.tree.map(np.array, st), st_sh)  # copies: the state is donated
  spec = step_lib.StepSpec(CFG, tx, num_micro, state_lib.learning_rate_schedule(tc), loss_chunk)
  step_fn = step_lib.jit_train_step(spec, sharding.Placement(mesh), st_sh, batch_sh)
  new, metrics = step_fn(st, jax.device_put(batch, batch_sh))
  assert new.params["layers"]["mlp"]["up_kernel"].sharding.spec == \
      jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  return new, metrics


def _reference(params, batch):
  """(mean loss, its gradient) over the whole batch in one pass: no accumulation, no mesh."""
  (nll_sum, w_sum), grads = jax.jit(jax.value_and_grad(
      lambda p, b: step_lib.loss_sums(CFG, p, b), has_aux=True))(params, batch)
  return float(nll_sum / w_sum), jax.tree.map(lambda g: g / w_sum, grads)


def _check_step(new, metrics, batch, want_loss, want_grads):
  """Loss, recorded gradient and grad_norm of one step against the reference."""
  assert int(metrics["nonfinite"]) == 0 and int(new.step) == 1
  assert float(metrics["tokens"]) == float(batch["weights"].sum())
  np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=RTOL)
  assert_trees_close(new.opt_state[0].grads, want_grads)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(want_grads)),
                             rtol=RTOL)


def test_gradient_accumulation_4x8_equals_batch_of_32():
  params = models.init(CFG, 2)
  batch = _packed_batch(np.random.default_rng(3), rows=32)
  # Microbatch 0 (rows 0, 4, ...) keeps only the first half of its response tokens: the token mean
  # over the batch then differs from a mean of per-microbatch means.
  batch["weights"][::4, SEQ // 2:] = 0
  want_loss, want_grads = _reference(params, batch)
  for num_micro in (1, 4):
    _check_step(*_one_step(batch, num_micro, params=params), batch, want_loss, want_grads)


def test_sharded_step_matches_single_device():
  """data=2 x fsdp=2 x tensor=2 over the 8 fake CPU devices, + 2 microbatches + chunked loss."""
  params = models.init(CFG, 2)
  batch = _packed_batch(np.random.default_rng(4), rows=8)
  want_loss, want_grads = _reference(params, batch)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  new, metrics = _one_step(batch, 2, mesh=mesh, params=params, loss_chunk=8)
  _check_step(new, metrics, batch, want_loss, want_grads)
  # The sharded AdamW update equals the single-device one applied to the same gradient. (Not to
  # want_grads: where |g| is near its rounding error, lr * g / (|g| + eps) follows the sign of g.)
  tx = state_lib.make_optimizer(_train_cfg())
  grads = jax.tree.map(np.asarray, new.opt_state[0].grads)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert_trees_close(new.params, optax.apply_updates(params, updates))
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), new.params, params)
  assert max(jax.tree.leaves(moved)) > 5e-4  # lr = 1e-3: the step really moved the params


def test_nonfinite_loss_keeps_state_and_flags():
  params = models.init(CFG, 2)
  bad = jax.tree.map(lambda x: x, params)
  bad["embedding"] = bad["embedding"].at[0, 0].set(jnp.nan)
  batch = _packed_batch(np.random.default_rng(5), rows=4)
  batch["inputs"][0, 0] = 0  # token 0 reads the NaN embedding row
  new, metrics = _one_step(batch, 1, params=bad)
  assert int(metrics["nonfinite"]) == 1
  assert int(new.step) == 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               new.params, bad)


def test_weight_decay_mask_and_schedule():
  params = models.init(CFG, 0)
  mask = state_lib.decay_mask(params)
  assert mask["layers"]["attn"]["q_kernel"] and mask["embedding"]
  assert not mask["final_norm"]["scale"] and not mask["layers"]["input_norm"]["scale"]
  tc = _train_cfg(steps=100, warmup_steps=10, schedule="cosine", learning_rate=1.0,
                  end_lr_ratio=0.1)
  sched = state_lib.learning_rate_schedule(tc)
  assert float(sched(0)) == 0.0
  # A few fp32 ops on O(1) values (ulps); an off-by-one in warmup or decay moves these by >1%.
  np.testing.assert_allclose([float(sched(10)), float(sched(100))], [1.0, 0.1], rtol=RTOL)
  with pytest.raises(ValueError, match="schedule"):
    state_lib.learning_rate_schedule(_train_cfg(schedule="bogus"))


def test_distillation_metrics_accumulate_over_microbatches():
  """A listed support (store-like soft targets) over 2 microbatches: loss, ce, kd and
  kd_support_mass (the student's mass on the listed ids, a mean over the weighted positions with
  a target) equal one pass over the whole batch, from numpy for the support mass."""
  params = models.init(CFG, 3)
  rng = np.random.default_rng(7)
  batch = _packed_batch(rng, rows=8)
  k = 4
  batch["soft_ids"] = np.argsort(rng.random((8, SEQ, CFG.vocab_size)), -1)[..., :k].astype(
      np.int32)  # distinct ids per position, as a store lists them
  batch["soft_probs"] = (rng.dirichlet(np.ones(k + 1), (8, SEQ))[..., :k] * 0.9).astype(np.float32)
  batch["soft_probs"][::2, :SEQ // 2] = 0.0  # positions without a target
  distill = losses.Distill(kind="reverse", alpha=0.4, temperature=1.5, support="listed")
  tc = _train_cfg()
  tx = state_lib.make_optimizer(tc)
  fn = jax.jit(functools.partial(step_lib.train_step,
                                 spec=step_lib.StepSpec(CFG, tx, num_micro=2, distill=distill)))
  _, m = fn(state_lib.create_state(params, tx), batch)
  terms = jax.jit(lambda p: step_lib.loss_terms(CFG, p, batch, 0, distill))(params)
  w = float(terms["tokens"])
  for key in ("loss", "ce", "kd"):
    np.testing.assert_allclose(float(m[key]), float(terms[key]) / w, rtol=RTOL)
  logits = np.asarray(models.forward(CFG, params, batch["inputs"],
                                     segment_ids_BxT=batch["segment_ids"],
                                     positions_BxT=batch["positions"]), np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  valid = batch["soft_probs"] > 0
  in_s = np.zeros(probs.shape, bool)
  for idx in np.ndindex(*valid.shape):
    if valid[idx]:
      in_s[idx[:2] + (batch["soft_ids"][idx],)] = True
  mass = np.where(in_s, probs, 0).sum(-1)
  counted = batch["weights"] * valid.any(-1)
  # fp32 softmax mass over ~100 positions vs float64: ~1e-6 relative.
  np.testing.assert_allclose(float(m["kd_support_mass"]), (mass * counted).sum() / counted.sum(),
                             rtol=1e-4)
  assert 0.0 < float(m["kd_support_mass"]) < 0.1  # 4 of 1024 ids on a random init


@pytest.mark.parametrize("chunk", [8, 12])  # 12 does not divide 32: the tail is padded
def test_chunked_loss_equals_full_logits_loss_and_grads(chunk):
  params = models.init(CFG, 6)
  batch = _packed_batch(np.random.default_rng(6), rows=4)
  full = jax.value_and_grad(lambda p: step_lib.loss_sums(CFG, p, batch)[0])(params)
  chunked = jax.value_and_grad(lambda p: step_lib.loss_sums(CFG, p, batch, chunk)[0])(params)
  np.testing.assert_allclose(float(chunked[0]), float(full[0]), rtol=RTOL)
  # Gradient elements are sums over 128 positions of the [B, L, V] logits' backward: 4e-7 of the
  # leaf's largest element apart (measured), varying with the CPU's vector width / FMA.
  assert_trees_close(chunked[1], full[1])
