"""One optimizer step (with gradient accumulation) and one eval step: pure functions to jit.

Batches are dicts of [B, L] arrays (see `sentijax.data.packing`): `inputs`, `targets`,
`weights` (1 on completion tokens), `segment_ids`, `positions`. The loss is the sum of weighted
token NLLs over all microbatches divided by the total weight, so accumulation over M microbatches
equals one large batch exactly. The one distillation term (`losses.Distill`: an online teacher's
logits, or a store's / ICLDist's soft targets in the batch) is summed and normalised the same way
and mixed in by its alpha.
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
# The teacher's own view of each row (`teacher_view`), [B, L] like the student's fields.
TEACHER_FIELDS = ("teacher_inputs", "teacher_segment_ids", "teacher_positions")


@dataclasses.dataclass(frozen=True)
class Teacher:
  """An online teacher: its model config and params (sharded like the student's by the same
  logical rules, passed to the jitted step as their own argument: never donated, never in the
  optimizer state, no gradient)."""
  cfg: models.ModelConfig
  params: Any


def loss_terms(model_cfg: models.ModelConfig, params: Any, batch: Batch, loss_chunk: int = 0,
               distill: losses.Distill | None = None,
               teacher_cfg: models.ModelConfig | None = None, teacher_params: Any = None,
               token_estimator: bool = False) -> dict[str, jax.Array]:
  """Sums for one batch: {"loss", "ce" (weighted token NLL), "kd" (the distillation term, 0
  without `distill`), "tokens" (sum of weights)}; sparse supports add "support_mass" /
  "support_tokens" (losses.chunked_loss_sums). "loss" is "ce", or with `distill`
  (1 - alpha) * "ce" + alpha * "kd".

  The student runs to its final hidden states; the LM head and the losses run in chunks of
  `loss_chunk` positions (0 = one chunk), never holding more than [B, chunk, V] logits. An online
  `distill` (support full / topk) runs the teacher (`teacher_cfg`, `teacher_params`) forward
  under stop_gradient, on the batch's TEACHER_FIELDS when present (`teacher_view`); a listed /
  sampled / served one reads the batch's soft fields (losses.SOFT_FIELDS).
  A batch field "sampled" (on-policy rows) and `token_estimator`: losses.chunked_loss_sums.
  """
  weights_BxL = batch["weights"].astype(jnp.float32)
  where = dict(segment_ids_BxT=batch["segment_ids"], positions_BxT=batch["positions"])
  hidden_BxLxE = models.forward_hidden(model_cfg, params, batch["inputs"], **where)
  teacher = soft = None
  if distill is not None and distill.online:
    if teacher_params is None:
      raise ValueError(f"Distill(support={distill.support!r}) needs an online teacher "
                       "(teacher_cfg, teacher_params)")
    t_inputs, t_where = teacher_view(batch)
    teacher = losses.Head(models.forward_hidden(teacher_cfg, teacher_params, t_inputs, **t_where),
                          models.output_kernel(teacher_cfg, teacher_params),
                          teacher_cfg.logit_softcap)
  elif distill is not None:
    soft = {k: batch[k] for k in losses.SOFT_FIELDS if k in batch}
  student = losses.Head(hidden_BxLxE, models.output_kernel(model_cfg, params),
                        model_cfg.logit_softcap)
  sums = losses.chunked_loss_sums(student, batch["targets"], weights_BxL, loss_chunk,
                                  distill=distill, soft=soft, teacher=teacher,
                                  sampled_BxT=batch.get("sampled"),
                                  token_estimator=token_estimator)
  loss_sum = sums["ce"]
  if distill is not None:
    loss_sum = (1.0 - distill.alpha) * sums["ce"] + distill.alpha * sums["kd"]
  return {"loss": loss_sum, **sums, "tokens": jnp.sum(weights_BxL)}


def teacher_view(batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(inputs, segment_ids / positions) the online teacher reads: the batch's TEACHER_FIELDS when
  present (context distillation, train/icl_onpolicy.py: the teacher's own prompt, its answer
  tokens at the student's answer positions), else the student's own."""
  present = [k for k in TEACHER_FIELDS if k in batch]
  if not present:
    return batch["inputs"], dict(segment_ids_BxT=batch["segment_ids"],
                                 positions_BxT=batch["positions"])
  if len(present) != len(TEACHER_FIELDS):
    raise ValueError(f"the batch has {present} but not all of {TEACHER_FIELDS}")
  return batch["teacher_inputs"], dict(segment_ids_BxT=batch["teacher_segment_ids"],
                                       positions_BxT=batch["teacher_positions"])


def loss_sums(model_cfg: models.ModelConfig, params: Any, batch: Batch, loss_chunk: int = 0, *,
              distill: losses.Distill | None = None, teacher_cfg=None, teacher_params=None
              ) -> tuple[jax.Array, jax.Array]:
  """(sum of the token loss, sum of weights) for one batch (see `loss_terms`): the weighted NLL,
  or with `distill` (1 - alpha) * NLL sum + alpha * distillation sum, both normalised later by
  the same response-token count."""
  terms = loss_terms(model_cfg, params, batch, loss_chunk, distill, teacher_cfg, teacher_params)
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


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What one optimizer step computes (static under jit): the student, the optimizer, grads
  accumulated over `num_micro` microbatches, `loss_chunk` (losses.chunked_loss_sums), the
  distillation term, the online teacher's config, and whether on-policy rows use
  losses.token_reverse_kl's estimator."""
  model_cfg: models.ModelConfig
  tx: optax.GradientTransformation
  num_micro: int = 1
  schedule: optax.Schedule | None = None
  loss_chunk: int = 0
  distill: losses.Distill | None = None
  teacher_cfg: models.ModelConfig | None = None
  token_estimator: bool = False


def train_step(state: TrainState, batch: Batch, teacher_params: Any = None, *, spec: StepSpec,
               placement: sharding.Placement = sharding.Placement()
               ) -> tuple[TrainState, dict]:
  """Accumulates grads over `spec.num_micro` microbatches, applies one update.

  A non-finite loss or gradient leaves the state unchanged and reports `nonfinite=1`, so the loop
  can stop with the last good params (and checkpoint) intact. With `distill` the metrics also
  hold the per-token `ce` and `kd` terms, and for a sparse support `kd_support_mass` (the
  student's probability on the teacher's support, averaged where the term counts);
  `teacher_params` (with `teacher_cfg`): an online teacher, run forward on every microbatch.
  """
  distill, num_micro = spec.distill, spec.num_micro

  def loss_fn(params, mb):
    terms = loss_terms(spec.model_cfg, params, mb, spec.loss_chunk, distill, spec.teacher_cfg,
                       teacher_params, spec.token_estimator)
    return terms["loss"], terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro(carry, mb):
    grads_acc, sums_acc = carry
    (_, terms), grads = grad_fn(state.params, mb)
    return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, terms)), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  keys = ("loss", "ce", "kd", "tokens") + (
      ("support_mass", "support_tokens") if distill is not None and distill.sparse else ()) + (
      ("rkl_token", "sampled_tokens") if "sampled" in batch and distill is not None
      and (distill.online or distill.support == "served") else ())
  init = (zeros, {k: jnp.zeros((), jnp.float32) for k in keys})
  if num_micro == 1:
    (grads, sums), _ = micro(init, batch)
  else:
    (grads, sums), _ = jax.lax.scan(micro, init,
                                    _split_microbatches(batch, num_micro, placement.mesh,
                                                        placement.rules))
  denom = jnp.maximum(sums["tokens"], 1.0)
  grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
  loss = sums["loss"] / denom
  grad_norm = optax.global_norm(grads)
  updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                           TrainState(state.step + 1, params, opt_state), state)
  metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": sums["tokens"],
             "nonfinite": (~finite).astype(jnp.int32)}
  if distill is not None:
    metrics.update(ce=sums["ce"] / denom, kd=sums["kd"] / denom)
  if "support_mass" in sums:
    metrics["kd_support_mass"] = sums["support_mass"] / jnp.maximum(sums["support_tokens"], 1.0)
  if "rkl_token" in sums:  # on-policy rows: the per-token reverse-KL estimate on the samples
    metrics["rkl_token"] = sums["rkl_token"] / jnp.maximum(sums["sampled_tokens"], 1.0)
  if spec.schedule is not None:
    metrics["learning_rate"] = spec.schedule(state.step)
  return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model_cfg: models.ModelConfig,
              loss_chunk: int = 0) -> dict:
  nll_sum, w_sum = loss_sums(model_cfg, params, batch, loss_chunk)
  return {"nll_sum": nll_sum, "tokens": w_sum}


def jit_train_step(spec: StepSpec, placement: sharding.Placement, state_sh: TrainState,
                   batch_sh, teacher: Teacher | None = None, rollout=None):
  """The jitted step `(state, batch) -> (state, metrics)`: explicit in/out shardings, the old
  state donated. An online `teacher` goes in as a third, non-donated argument, its params
  sharded over the placement's mesh by the same logical rules as the student's. `rollout`
  (on-policy, `train.onpolicy.Rollout`): `(state, batch) -> (batch, host metrics)` runs first,
  the current (sharded) params writing the responses of part of the batch; its metrics join the
  step's. A rollout with `wrap(inner) -> step function` (`onpolicy.Overlapped`) runs the step."""
  if rollout is not None:
    inner = jit_train_step(spec, placement, state_sh, batch_sh, teacher)
    if hasattr(rollout, "wrap"):  # a pipelined rollout (onpolicy.Overlapped) runs the step
      rollout_step = rollout.wrap(inner)
    else:
      def rollout_step(state, batch):
        batch, extra = rollout(state, batch)
        state, metrics = inner(state, batch)
        return state, {**metrics, **extra}
    rollout_step.teacher_params = getattr(inner, "teacher_params", None)
    return rollout_step
  mesh, rules = placement.mesh, placement.rules
  if mesh is not None and rules is None:
    from sentijax import config as config_lib  # pylint: disable=import-outside-toplevel
    rules = config_lib.base().sharding_rules
  placement = sharding.Placement(mesh, rules)
  spec = dataclasses.replace(spec, teacher_cfg=None if teacher is None else teacher.cfg)
  fn = functools.partial(train_step, spec=spec, placement=placement)
  if teacher is None:
    return _traced_on(mesh, rules, jax.jit(fn, in_shardings=(state_sh, batch_sh),
                                           out_shardings=(state_sh, None), donate_argnums=0))
  teacher_sh = None if mesh is None else models.shardings_for(teacher.cfg, mesh, rules)
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
