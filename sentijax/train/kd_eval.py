"""The kd job's held-out divergences (train/kd.py), each named for what it measures: to a teacher
model over the full vocabulary on the val rows (both directions) and, with kd.eval_onpolicy, on
responses the student samples for their prompts; to a store's support otherwise."""
from __future__ import annotations

import types

import jax

from sentijax import models, sharding
from sentijax.train import losses, onpolicy, step


def eval_terms(ctx, vocab: int, store_support: str | None) -> dict[str, losses.Distill]:
  """The held-out divergences, each named for what it measures: "kl_teacher" (a teacher model
  at hand: KL(teacher || student) at T = 1 over the whole shared vocabulary) and
  "kl_teacher_reverse" (KL(student || teacher), the direction on-policy and reverse-KL runs
  minimise, on the same tokens), else
  "kl_teacher_bucketed" (a top-k store: the same over its listed ids + the tail bucket, a lower
  bound of it); "kd" (the training divergence)."""
  terms = {}
  if ctx.teacher_cfg is not None:
    terms["kl_teacher"] = losses.Distill(alpha=0.0, vocab=vocab)
    terms["kl_teacher_reverse"] = losses.Distill(kind="reverse", alpha=0.0, vocab=vocab)
  elif store_support == "listed":
    terms["kl_teacher_bucketed"] = losses.Distill(alpha=0.0, support="listed", vocab=vocab)
  if ctx.distill is not None and ctx.distill.support != "served":  # val rows are not scored
    terms["kd"] = ctx.distill
  return terms


def divergence_hook(ctx, model_cfg: models.ModelConfig, val_ds, batch_size: int,
                    num_batches: int, loss_chunk: int, terms: dict[str, losses.Distill],
                    rollout_args: dict | None = None):
  """(step, params) -> `terms` (see `eval_terms`) and "kd_support_mass" (the student's mass on
  the teacher's support, for a sparse "kd" or "kl_teacher_bucketed"), per response token over the
  first `num_batches` val batches (the ones `eval/loss` uses). `rollout_args` (kd.eval_onpolicy):
  also "kl_teacher_onpolicy", "kl_teacher_reverse" on the student's own samples of those rows."""
  mass_term = next((n for n in ("kd", "kl_teacher_bucketed") if n in terms and terms[n].sparse),
                   None)
  fn = rollout = None

  def hook(step_num: int, params) -> dict:
    nonlocal fn, rollout
    del step_num
    if fn is None:  # the mesh and the teacher exist once the loop has built the step
      t_cfg = None if ctx.teacher is None else ctx.teacher.cfg
      fn = jax.jit(lambda p, b, tp: {
          name: step.loss_terms(model_cfg, p, b, loss_chunk, d, t_cfg, tp)
          for name, d in terms.items()})
      if rollout_args is not None:
        rollout = onpolicy.Rollout(ctx.spec.eval_rollout, placement=sharding.Placement(
            ctx.mesh, ctx.rules), **rollout_args)
    batch_sh = sharding.batch_sharding(ctx.mesh, ctx.rules)
    t_params = None if ctx.teacher is None else ctx.teacher.params
    sums = {name: 0.0 for name in terms}
    tokens = mass = mass_tokens = 0.0
    sampled = sampled_tokens = 0.0
    for i in range(num_batches):
      local = val_ds.batch_at(i, batch_size)
      batch = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}
      out = jax.device_get(fn(params, batch, t_params))
      for name in terms:
        sums[name] += float(out[name]["kd"])
      tokens += float(next(iter(out.values()))["tokens"])
      if rollout is not None:  # the same rows, responses the student writes now
        own, _ = rollout(types.SimpleNamespace(params=params, step=0), batch)
        rev = jax.device_get(fn(params, own, t_params))["kl_teacher_reverse"]
        sampled, sampled_tokens = sampled + float(rev["kd"]), sampled_tokens + float(rev["tokens"])
      if mass_term:
        mass += float(out[mass_term]["support_mass"])
        mass_tokens += float(out[mass_term]["support_tokens"])
    scalars = {name: total / max(tokens, 1.0) for name, total in sums.items()}
    if rollout is not None:
      scalars["kl_teacher_onpolicy"] = sampled / max(sampled_tokens, 1.0)
    if mass_term:
      scalars["kd_support_mass"] = mass / max(mass_tokens, 1.0)
    return scalars
  return hook
