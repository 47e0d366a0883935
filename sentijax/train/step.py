"""One optimizer step (with gradient accumulation) and one eval step: pure functions to jit.

Batches are dicts of [B, L] arrays (see `sentijax.data.packing`): `inputs`, `targets`,
`weights` (1 on completion tokens), `segment_ids`, `positions`. The loss is the sum of weighted
token NLLs over all microbatches divided by the total weight, so accumulation over M microbatches
equals one large batch exactly.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sentijax import models, sharding
from sentijax.train import losses
from sentijax.train.state import TrainState

Batch = dict[str, jax.Array]


def loss_sums(model_cfg: models.ModelConfig, params: Any, batch: Batch,
              loss_chunk: int = 0, kl_alpha: float = 0.0, kl_temperature: float = 1.0
              ) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token NLL, sum of weights) for one batch.

  `loss_chunk` > 0 computes the output projection and CE in chunks of that many positions,
  never holding the full [B, L, V] logits (see losses.chunked_cross_entropy_sum).
  With `kl_alpha` > 0 and soft targets in the batch (`soft_ids` / `soft_probs` [B, L, K]) the
  first value is (1 - kl_alpha) * NLL sum + kl_alpha * sum of `losses.verbalizer_kl` at
  `kl_temperature`: both are normalised by the same response-token count.
  """
  weights_BxL = batch["weights"].astype(jnp.float32)
  soft = kl_alpha > 0 and "soft_probs" in batch
  soft_ids = batch["soft_ids"] if soft else None
  soft_probs = batch["soft_probs"] if soft else None
  if loss_chunk:
    hidden_BxLxE = models.forward_hidden(model_cfg, params, batch["inputs"],
                                         segment_ids_BxT=batch["segment_ids"],
                                         positions_BxT=batch["positions"])
    nll_sum, kl_sum = losses.chunked_loss_sums(
        hidden_BxLxE, models.output_kernel(model_cfg, params), batch["targets"], weights_BxL,
        loss_chunk, soft_ids, soft_probs, kl_temperature)
  else:
    logits_BxLxV = models.forward(model_cfg, params, batch["inputs"],
                                  segment_ids_BxT=batch["segment_ids"],
                                  positions_BxT=batch["positions"])
    nll_sum = jnp.sum(losses.cross_entropy(logits_BxLxV, batch["targets"]) * weights_BxL)
    kl_sum = (jnp.sum(losses.verbalizer_kl(logits_BxLxV, soft_ids, soft_probs, kl_temperature))
              if soft else 0.0)
  if soft:
    nll_sum = (1.0 - kl_alpha) * nll_sum + kl_alpha * kl_sum
  return nll_sum, jnp.sum(weights_BxL)


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


def train_step(state: TrainState, batch: Batch, *, model_cfg: models.ModelConfig,
               tx: optax.GradientTransformation, num_micro: int = 1,
               schedule: optax.Schedule | None = None, mesh=None,
               loss_chunk: int = 0, rules=None, kl_alpha: float = 0.0,
               kl_temperature: float = 1.0) -> tuple[TrainState, dict]:
  """Accumulates grads over `num_micro` microbatches, applies one update.

  A non-finite loss or gradient leaves the state unchanged and reports `nonfinite=1`, so the loop
  can stop with the last good params (and checkpoint) intact.
  """
  grad_fn = jax.value_and_grad(functools.partial(loss_sums, model_cfg, loss_chunk=loss_chunk,
                                                 kl_alpha=kl_alpha,
                                                 kl_temperature=kl_temperature), has_aux=True)

  def micro(carry, mb):
    grads_acc, nll_acc, w_acc = carry
    (nll_sum, w_sum), grads = grad_fn(state.params, mb)
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    return (grads_acc, nll_acc + nll_sum, w_acc + w_sum), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  if num_micro == 1:
    (grads, nll_sum, w_sum), _ = micro(init, batch)
  else:
    (grads, nll_sum, w_sum), _ = jax.lax.scan(micro, init,
                                              _split_microbatches(batch, num_micro, mesh, rules))
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
  if schedule is not None:
    metrics["learning_rate"] = schedule(state.step)
  return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model_cfg: models.ModelConfig,
              loss_chunk: int = 0) -> dict:
  nll_sum, w_sum = loss_sums(model_cfg, params, batch, loss_chunk)
  return {"nll_sum": nll_sum, "tokens": w_sum}


def jit_train_step(model_cfg, tx, state_sh: TrainState, batch_sh, num_micro: int, schedule,
                   mesh, loss_chunk: int = 0, rules=None, kl_alpha: float = 0.0,
                   kl_temperature: float = 1.0):
  """The jitted step: explicit in/out shardings, the old state donated."""
  fn = functools.partial(train_step, model_cfg=model_cfg, tx=tx, num_micro=num_micro,
                         schedule=schedule, mesh=mesh, loss_chunk=loss_chunk, rules=rules,
                         kl_alpha=kl_alpha, kl_temperature=kl_temperature)
  return jax.jit(fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                 donate_argnums=0)


def jit_eval_step(model_cfg, param_sh, batch_sh, loss_chunk: int = 0):
  fn = functools.partial(eval_step, model_cfg=model_cfg, loss_chunk=loss_chunk)
  return jax.jit(fn, in_shardings=(param_sh, batch_sh))
