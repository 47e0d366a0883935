"""Train state (step, fp32 params, optimizer state) and the Optax optimizer built from config."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from sentijax import models, sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup, then cosine / linear decay to end_lr_ratio * peak, or constant."""
  peak = float(train_cfg.learning_rate)
  warmup = int(train_cfg.warmup_steps)
  decay_steps = max(int(train_cfg.steps) - warmup, 1)
  end = peak * float(train_cfg.end_lr_ratio)
  kind = train_cfg.schedule
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, warmup + decay_steps, end)
  if kind == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)),
         optax.linear_schedule(peak, end, decay_steps)], [warmup])
  if kind == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
        [warmup])
  raise ValueError(f"train.schedule={kind!r}: use cosine | linear | constant")


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: no decay on norm scales and biases (1-D per layer)."""
  def is_matrix(path, _):
    name = jax.tree_util.keystr(path)
    return not ("norm" in name or "bias" in name)
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(float(train_cfg.grad_clip)) if train_cfg.grad_clip
      else optax.identity(),
      optax.adamw(learning_rate_schedule(train_cfg), b1=float(train_cfg.b1),
                  b2=float(train_cfg.b2), weight_decay=float(train_cfg.weight_decay),
                  mask=decay_mask),
  )


def state_shardings(model_cfg: models.ModelConfig, tx: optax.GradientTransformation, mesh,
                    rules) -> TrainState:
  """Shardings of the whole state: optimizer moments follow their params."""
  param_sh = models.shardings_for(model_cfg, mesh, rules)
  abstract_params = models.param_shapes(model_cfg)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = sharding.replicated(mesh)

  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, param_sh,
                                 transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh)


def create_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_state(model_cfg: models.ModelConfig, tx: optax.GradientTransformation, mesh,
                   rules) -> tuple[TrainState, TrainState]:
  """(restore target: ShapeDtypeStructs carrying their shardings, the shardings themselves)."""
  state_sh = state_shardings(model_cfg, tx, mesh, rules)
  shapes = jax.eval_shape(lambda: create_state(models.param_shapes(model_cfg), tx))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, state_sh)
  return target, state_sh
