"""ICLDist (stage 2): the student learns to answer few-shot task prompts, held-out tasks scored.

Recipe (data/icl_recipe.py): task registry -> held-out filter (tasks and sentences) -> training
records (`gold`: ICL prompts with their gold answers; `teacher` / `teacher_probs`: a teacher
corpus whose records name their task in `meta.task`) -> the shared tokenise/mask/pack path -> the
shared loop (`loop.train`), scoring the held-out tasks at step 0, every `train.eval_every` steps
and at the end -> HF export. `config.icl` is read once into `ICLSpec` (the recipe + the loss).
`icl.target=on_policy`: context distillation (train/icl_onpolicy.py): the student answers its
`icl.student_shots` prompt, a teacher (`teacher.*`, local or served) seeing the k-shot prompt
scores the answer (`kd.*`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax

from sentijax import atomic
from sentijax.data import dataset, icl, icl_recipe, sequences, tasks
from sentijax.data.spec import DataSpec
from sentijax.eval import hooks as eval_hooks
from sentijax.models import factory
from sentijax.train import export, icl_onpolicy, kd, loop, losses

log = logging.getLogger("sentijax")


@dataclasses.dataclass(frozen=True)
class ICLSpec:
  """`config.icl`: the data recipe and, for icl.target=teacher_probs, the verbalizer KL; for
  icl.target=on_policy `on_policy` (config.kd + config.teacher: the divergence, rollouts,
  teacher)."""
  recipe: icl_recipe.RecipeSpec
  distill: losses.Distill | None
  on_policy: kd.KDSpec | None = None

  @classmethod
  def from_config(cls, config) -> "ICLSpec":
    distill = _distill(config.icl)
    recipe = icl_recipe.RecipeSpec.from_config(config)
    if recipe.soft_width == 1 and distill is not None and distill.tail == "renorm":
      raise ValueError(f"icl.soft_width={recipe.soft_width!r}: with icl.tail=renorm one "
                       "verbalizer renormalised is probability 1 on both sides (a KL of 0): use "
                       "icl.tail=bucket")
    on_policy = icl_onpolicy.kd_spec(config) if recipe.target == "on_policy" else None
    return cls(recipe, distill, on_policy)


def _distill(c) -> losses.Distill | None:
  """icl.target=teacher_probs: forward KL(teacher || student) over the verbalizers' first tokens
  plus the tail bucket ("any other answer"), at icl.temperature, mixed with CE by icl.alpha,
  counted wherever a distribution is (unweighted); else None."""
  checks = (("icl.temperature", float(c.temperature) > 0, "must be > 0"),
            ("icl.alpha", 0 <= float(c.alpha) <= 1, "must be in [0, 1]"),
            ("icl.tail", str(c.tail) in losses.TAILS, f"expected one of {losses.TAILS}"))
  for key, ok, why in checks:
    if not ok:
      raise ValueError(f"{key}={c[key.split('.')[1]]!r}: {why}")
  if str(c.target) != "teacher_probs":
    return None
  return losses.Distill(kind="forward", alpha=float(c.alpha), temperature=float(c.temperature),
                        support="listed", tail=str(c.tail), weighted=False)


# --------------------------------------------------------------------------- job


def _records(spec: ICLSpec, sources, heldout, forbidden, tok, data: DataSpec):
  """(train, val, stats, soft targets or None) of `icl.target`."""
  recipe = spec.recipe
  if recipe.target == "gold":
    train, val, stats = icl_recipe.gold_records(
        recipe, sources, forbidden, sequences.sequence_length_fn(tok, data.chat_template),
        data.seq_len)
    return train, val, stats, None
  train, val, stats = icl_recipe.teacher_records(recipe, sources, heldout, forbidden)
  soft = icl_recipe.soft_targets(recipe, tok) if recipe.target == "teacher_probs" else None
  return train, val, stats, soft


def _tokenizer_texts(sources):
  def texts():
    out = [ex.sentence for t in sources for ex in tasks.load_examples(t, "train")]
    out += [t.instruction for t in sources] + [p for ps in icl.PARAPHRASES.values() for p in ps]
    out += [" ".join(icl.ARBITRARY)] + [" ".join(w) for w in icl.SYNONYMS.values()]
    return out + [ex.label for t in sources for ex in tasks.load_examples(t, "train")]
  return texts


def run(config) -> loop.Result:
  """Trains on ICL prompts of the source tasks; scores the held-out tasks during training."""
  workdir = Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  spec = ICLSpec.from_config(config)
  recipe = spec.recipe
  data = DataSpec.from_config(config.data, workdir=config.workdir, seed=config.seed)
  sources, heldout, groups = icl_recipe.resolve_tasks(recipe)
  forbidden = icl.forbidden_sentences(groups)
  log.info("ICLDist: %d source tasks (%s); held out: %s; %d forbidden sentences",
           len(sources), ", ".join(t.name for t in sources),
           ", ".join(t.name for t in heldout) or "-", len(forbidden))
  model_cfg = factory.model_config(config)
  tok = factory.tokenizer(config, model_cfg, _tokenizer_texts(sources))
  onp = None
  if spec.on_policy is not None:
    onp = icl_onpolicy.records(recipe, sources, forbidden, tok, data,
                               spec.on_policy.rollout.sampling.max_tokens)
    train, val, stats, soft = onp.teacher, onp.val_student, onp.stats, None
  else:
    train, val, stats, soft = _records(spec, sources, heldout, forbidden, tok, data)
  audit = icl_recipe.heldout_audit(recipe, heldout, groups, forbidden, stats)
  icl_recipe.log_audit(audit)
  mixed = icl_recipe.mix_records(recipe, len(train))
  stats["mixed_records"] = len(mixed)
  if jax.process_index() == 0:
    atomic.write_json(workdir / "heldout_audit.json", audit)
    icl_recipe.write_prompts(workdir / "icl_prompts.jsonl",
                             {"train": train, "val": val, "mix": mixed,
                              "student": onp.student if onp else []})
  train = train + mixed
  train_ds, val_ds, ds_stats = dataset.build_train_val(
      train, val, tok, data, soft_targets=soft, show_progress=jax.process_index() == 0)
  if jax.process_index() == 0:
    all_stats = {"icl": stats, "tasks": [t.name for t in sources],
                 "heldout": [t.name for t in heldout], "heldout_audit": audit} | ds_stats
    atomic.write_json(workdir / "data_stats.json", json.loads(json.dumps(all_stats, default=str)))
    export.save_student_spec(model_cfg, tok, workdir, config.model.init)
  log.info("ICLDist: %s, %d params, %d train records -> %d rows x %d tokens (target %s)",
           model_cfg.architecture, model_cfg.num_params, len(train), train_ds.num_rows,
           train_ds.seq_len, recipe.target)
  hooks = (eval_hooks.ScoringHook(config, model_cfg, tok, heldout),) if heldout else ()
  loss_options = {"distill": spec.distill} if spec.distill is not None else None
  scorer, teacher_flops = None, 0.0
  if onp is not None:
    onp_setup = icl_onpolicy.setup(config, spec.on_policy, model_cfg, tok, train_ds.seq_len, onp,
                                   mixed)
    loss_options, scorer = onp_setup.loss_options, onp_setup.scorer
    hooks, teacher_flops = hooks + onp_setup.hooks, onp_setup.teacher_flops
  try:
    result = loop.train(config, model_cfg, factory.param_initializer(config, model_cfg),
                        train_ds, val_ds, tokenizer=tok, eval_hooks=hooks,
                        loss_options=loss_options, teacher_flops_per_token=teacher_flops)
  finally:
    if scorer is not None:
      scorer.client.close()
  if result.train_losses:
    log.info("ICLDist done at step %d: train loss %.4f -> %.4f%s", result.step,
             result.train_losses[0][1], result.train_losses[-1][1],
             f", val loss {result.val_losses[-1][1]:.4f}" if result.val_losses else "")
  return result
