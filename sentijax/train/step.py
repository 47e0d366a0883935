"""One optimizer step (with gradient accumulation) and one eval step: pure functions to jit.

Batches are dicts of [B, L] arrays (see `sentijax.data.packing`): `inputs`, `targets`,
`weights` (1 on completion tokens), `segment_ids`, `positions`. The loss is the sum of weighted
token NLLs over all microbatches divided by the total weight, so accumulation over M microbatches
equals one large batch exactly. A distillation term (`losses.Distill`: an online teacher's logits
or soft targets in the batch) is summed and normalised the same way and mixed in by its alpha.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sentijax import models, sharding
from sentijax.train import losses
from sentijax.train.state import TrainState

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Teacher:
  """An online teacher: its model config and params (sharded like the student's by the same
  logical rules, passed to the jitted step as their own argument: never donated, never in the
  optimizer state, no gradient)."""
  cfg: models.ModelConfig
  params: Any


def loss_terms(model_cfg: models.ModelConfig, params: Any, batch: Batch, loss_chunk: int = 0,
               distill: losses.Distill | None = None,
               teacher_cfg: models.ModelConfig | None = None, teacher_params: Any = None
               ) -> dict[str, jax.Array]:
  """{"loss": the token loss sum, "ce": sum of weighted token NLL, "kd": sum of the
  distillation term, "tokens": sum of weights} for one batch; "loss" is "ce", or with a
  distillation term (1 - alpha) * "ce" + alpha * "kd".

  `loss_chunk` > 0 computes the output projection and the losses in chunks of that many
  positions, never holding the full [B, L, V] logits (see losses.chunked_loss_sums). "kd" (0
  without `distill`): with `teacher_params` the divergence to the teacher's logits (its forward
  under stop_gradient) on the weighted tokens; else, with soft targets in the batch (`soft_ids` /
  `soft_probs` [B, L, K]), the divergence over the listed support.
  """
  weights_BxL = batch["weights"].astype(jnp.float32)
  online = distill is not None and teacher_params is not None
  soft = distill is not None and not online and "soft_probs" in batch
  soft_ids = batch["soft_ids"] if soft else None
  soft_probs = batch["soft_probs"] if soft else None
  where = dict(segment_ids_BxT=batch["segment_ids"], positions_BxT=batch["positions"])
  if loss_chunk:
    hidden_BxLxE = models.forward_hidden(model_cfg, params, batch["inputs"], **where)
    t_hidden = t_out = None
    if online:
      t_hidden = models.forward_hidden(teacher_cfg, teacher_params, batch["inputs"], **where)
      t_out = models.output_kernel(teacher_cfg, teacher_params)
    nll_sum, kd_sum = losses.chunked_loss_sums(
        hidden_BxLxE, models.output_kernel(model_cfg, params), batch["targets"], weights_BxL,
        loss_chunk, soft_ids, soft_probs, distill=distill, teacher_hidden_BxTxF=t_hidden,
        teacher_out_FxW=t_out)
  else:
    logits_BxLxV = models.forward(model_cfg, params, batch["inputs"], **where)
    nll_sum = jnp.sum(losses.cross_entropy(logits_BxLxV, batch["targets"]) * weights_BxL)
    kd_sum = jnp.zeros((), jnp.float32)
    if online:
      t_logits = models.forward(teacher_cfg, teacher_params, batch["inputs"], **where)
      kd_sum = jnp.sum(losses.distill_terms(logits_BxLxV, distill, t_logits) * weights_BxL)
    elif soft:
      kd_BxL = losses.distill_terms(logits_BxLxV, distill, soft_ids_BxLxK=soft_ids,
                                    soft_probs_BxLxK=soft_probs)
      kd_sum = jnp.sum(kd_BxL * weights_BxL if distill.weighted else kd_BxL)
  loss_sum = nll_sum
  if online or soft:
    loss_sum = (1.0 - distill.alpha) * nll_sum + distill.alpha * kd_sum
  return {"loss": loss_sum, "ce": nll_sum, "kd": kd_sum, "tokens": jnp.sum(weights_BxL)}


def _distill_of(distill: losses.Distill | None, kl_alpha: float, kl_temperature: float
                ) -> losses.Distill | None:
  """The ICLDist form (`kl_alpha` > 0: forward KL at the soft targets, unweighted) or `distill`."""
  if distill is None and kl_alpha > 0:
    return losses.Distill(alpha=kl_alpha, temperature=kl_temperature, weighted=False)
  return distill


def loss_sums(model_cfg: models.ModelConfig, params: Any, batch: Batch,
              loss_chunk: int = 0, kl_alpha: float = 0.0, kl_temperature: float = 1.0, *,
              distill: losses.Distill | None = None, teacher_cfg=None, teacher_params=None
              ) -> tuple[jax.Array, jax.Array]:
  """(sum of the token loss, sum of weights) for one batch (see `loss_terms`).

  Without distillation the token loss is the weighted NLL. With `distill` (or `kl_alpha` > 0:
  ICLDist's `losses.verbalizer_kl` at `kl_temperature` on soft targets) and a teacher or soft
  targets, it is (1 - alpha) * NLL sum + alpha * distillation sum: both normalised by the same
  response-token count.
  """
  terms = loss_terms(model_cfg, params, batch, loss_chunk,
                     _distill_of(distill, kl_alpha, kl_temperature), teacher_cfg, teacher_params)
  return terms["loss"], terms["tokens"]


def _split_microbatches(batch: Batch, num_micro: int, mesh, rules=None) -> Batch:
  """[B, L] -> [M, B/M, L], microbatch m = rows m, m+M, ... so each stays spread over devices."""
  def split(x):
    b = x.shape[0]
    x = x.reshape(b // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(
          x, sharding.batch_sharding(mesh, rules, x.ndim, batch_dim=1))
    return x
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: Batch, teacher_params: Any = None, *,
               model_cfg: models.ModelConfig, tx: optax.GradientTransformation,
               num_micro: int = 1, schedule: optax.Schedule | None = None, mesh=None,
               loss_chunk: int = 0, rules=None, kl_alpha: float = 0.0,
               kl_temperature: float = 1.0, distill: losses.Distill | None = None,
               teacher_cfg: models.ModelConfig | None = None) -> tuple[TrainState, dict]:
  """Accumulates grads over `num_micro` microbatches, applies one update.

  A non-finite loss or gradient leaves the state unchanged and reports `nonfinite=1`, so the loop
  can stop with the last good params (and checkpoint) intact. With `distill` the metrics also
  hold the per-token `ce` and `kd` terms; `teacher_params` (with `teacher_cfg`): an online
  teacher, run forward on every microbatch.
  """
  distill = _distill_of(distill, kl_alpha, kl_temperature)

  def loss_fn(params, mb):
    terms = loss_terms(model_cfg, params, mb, loss_chunk, distill, teacher_cfg, teacher_params)
    return terms["loss"], terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro(carry, mb):
    grads_acc, nll_acc, w_acc, ce_acc, kd_acc = carry
    (nll_sum, terms), grads = grad_fn(state.params, mb)
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    return (grads_acc, nll_acc + nll_sum, w_acc + terms["tokens"], ce_acc + terms["ce"],
            kd_acc + terms["kd"]), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  zero = jnp.zeros((), jnp.float32)
  init = (zeros, zero, zero, zero, zero)
  if num_micro == 1:
    (grads, nll_sum, w_sum, ce_sum, kd_sum), _ = micro(init, batch)
  else:
    (grads, nll_sum, w_sum, ce_sum, kd_sum), _ = jax.lax.scan(
        micro, init, _split_microbatches(batch, num_micro, mesh, rules))
  denom = jnp.maximum(w_sum, 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
  loss = nll_sum / denom
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                           TrainState(state.step + 1, params, opt_state), state)
  metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": w_sum,
             "nonfinite": (~finite).astype(jnp.int32)}
  if distill is not None:
    metrics.update(ce=ce_sum / denom, kd=kd_sum / denom)
  if schedule is not None:
    metrics["learning_rate"] = schedule(state.step)
  return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model_cfg: models.ModelConfig,
              loss_chunk: int = 0) -> dict:
  nll_sum, w_sum = loss_sums(model_cfg, params, batch, loss_chunk)
  return {"nll_sum": nll_sum, "tokens": w_sum}


def jit_train_step(model_cfg, tx, state_sh: TrainState, batch_sh, num_micro: int, schedule,
                   mesh, loss_chunk: int = 0, rules=None, kl_alpha: float = 0.0,
                   kl_temperature: float = 1.0, distill: losses.Distill | None = None,
                   teacher: Teacher | None = None):
  """The jitted step `(state, batch) -> (state, metrics)`: explicit in/out shardings, the old
  state donated. An online `teacher` goes in as a third, non-donated argument, its params
  sharded over `mesh` by the same logical `rules` as the student's."""
  fn = functools.partial(train_step, model_cfg=model_cfg, tx=tx, num_micro=num_micro,
                         schedule=schedule, mesh=mesh, loss_chunk=loss_chunk, rules=rules,
                         kl_alpha=kl_alpha, kl_temperature=kl_temperature, distill=distill,
                         teacher_cfg=None if teacher is None else teacher.cfg)
  if mesh is not None and rules is None:
    from sentijax import config as config_lib  # pylint: disable=import-outside-toplevel
    rules = config_lib.base().sharding_rules
  if teacher is None:
    return _traced_on(mesh, rules, jax.jit(fn, in_shardings=(state_sh, batch_sh),
                                           out_shardings=(state_sh, None), donate_argnums=0))
  teacher_sh = None if mesh is None else sharding.param_shardings(teacher.cfg, mesh, rules)
  teacher_params = (teacher.params if mesh is None else
                    jax.device_put(teacher.params, teacher_sh))
  jitted = jax.jit(fn, in_shardings=(state_sh, batch_sh, teacher_sh),
                   out_shardings=(state_sh, None), donate_argnums=0)

  traced = _traced_on(mesh, rules, jitted)

  def step_fn(state, batch):
    return traced(state, batch, teacher_params)
  step_fn.teacher_params = teacher_params  # as placed (tests, eval)
  return step_fn


def _traced_on(mesh, rules, jitted):
  """`jitted`, called (hence traced) inside `sharding.logical_context(mesh, rules)`, so the
  decoder's activation sharding constraints apply; as it is without a mesh."""
  if mesh is None:
    return jitted

  def call(*args):
    with sharding.logical_context(mesh, rules):
      return jitted(*args)
  return call


def jit_eval_step(model_cfg, param_sh, batch_sh, loss_chunk: int = 0):
  fn = functools.partial(eval_step, model_cfg=model_cfg, loss_chunk=loss_chunk)
  return jax.jit(fn, in_shardings=(param_sh, batch_sh))
