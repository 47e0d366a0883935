"""Logit distillation: the student matches a teacher's next-token distributions.

Recipe: `config.kd` + `config.teacher` read once into `KDSpec` -> student tokenizer (the teacher's
when the student names none) and the tokenizer-identity check -> records and packed rows (online:
the corpus of `config.data`; offline: a top-k teacher store, its top-k as the batches' soft
targets) -> the shared loop (`loop.train`): per step (1 - alpha) CE + alpha divergence, both per
response token; online, the teacher runs forward inside the jitted step (stop_gradient, its params
sharded over the same mesh, a separate non-donated argument, never in the optimizer state).
Sparse supports (online `kd.top_k`, offline stores) keep the teacher's tail as one bucket
(`kd.tail=bucket`, losses.py); `train/kd_support_mass` logs the student's mass on the teacher's
support. Held out (`kd_eval.divergence_hook`), at step 0, every `train.eval_every` steps and at the end,
also for `kd.loss=ce` (the baseline): the full-vocabulary KL to a teacher model when one is at hand
(`eval/kl_teacher`, `eval/kl_teacher_reverse`: online, or `kd.eval_teacher` offline or served; with
`kd.eval_onpolicy` also `eval/kl_teacher_onpolicy` on the student's samples), else a top-k store's bucketed KL
(`eval/kl_teacher_bucketed`), the training divergence (`eval/kd`) and `eval/kd_support_mass`.
On-policy with a served teacher (`teacher.backend=openai`): no teacher model in the step (with
`kd.eval_teacher`, one here for the held-out divergences only); its tokenizer
(`teacher.tokenizer`) is checked and its server probed before the data pipeline, then it scores
the student's samples (train/served.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax

from sentijax import models, sharding
from sentijax.data import dataset, readers, records
from sentijax.data import tokenizer as tokenizer_lib
from sentijax.data.spec import DataSpec
from sentijax.models import factory
from sentijax.teacher import backend
from sentijax.train import export, kd_eval, loop, losses, onpolicy, served, step

log = logging.getLogger("sentijax")
LOSSES = ("ce",) + losses.KINDS
MODES = ("online", "offline", "on_policy")


class TokenizerMismatch(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class KDSpec:
  """`config.kd` and `config.teacher`, read and checked once."""
  loss: str
  alpha: float
  beta: float
  temperature: float
  top_k: int
  tail: str
  mode: str
  store: str
  eval_teacher: str
  teacher_dir: str
  teacher_preset: str
  teacher_tokenizer: str
  teacher_dtype: str
  teacher_seed: int
  rollout: onpolicy.RolloutSpec | None = None  # kd.mode=on_policy
  eval_rollout: onpolicy.RolloutSpec | None = None  # kd.eval_onpolicy: every val row sampled
  teacher_backend: str = "local"  # local (the model here) | a served one (on_policy only)

  @property
  def online(self) -> bool:
    """The teacher scores every step's rows (online and on_policy; in the step unless served)."""
    return self.mode != "offline"

  @property
  def served(self) -> bool:
    """A served teacher scores the student's samples (train/served.py)."""
    return self.teacher_backend != "local"

  @classmethod
  def from_config(cls, config) -> "KDSpec":
    k, t = config.kd, config.teacher
    spec = cls(loss=str(k.loss), alpha=float(k.alpha), beta=float(k.beta),
               temperature=float(k.temperature), top_k=int(k.top_k), tail=str(k.tail),
               mode=str(k.mode), store=str(k.store), eval_teacher=str(k.eval_teacher),
               teacher_dir=str(t.model_dir), teacher_preset=str(t.preset),
               teacher_tokenizer=str(t.tokenizer), teacher_dtype=str(t.dtype),
               teacher_seed=int(t.seed), teacher_backend=str(t.backend),
               rollout=(onpolicy.RolloutSpec.from_config(config) if str(k.mode) == "on_policy"
                        else None),
               eval_rollout=(dataclasses.replace(onpolicy.RolloutSpec.from_config(config),
                                                 lmbda=1.0, seq_kd=False, estimator="full",
                                                 overlap=False)
                             if bool(k.get("eval_onpolicy", False)) else None))
    checks = (("kd.loss", spec.loss in LOSSES, f"expected one of {LOSSES}"),
              ("kd.mode", spec.mode in MODES, f"expected one of {MODES}"),
              ("kd.alpha", 0 <= spec.alpha <= 1, "must be in [0, 1]"),
              ("kd.beta", 0 <= spec.beta <= 1, "must be in [0, 1] (0 = forward KL, 1 = reverse)"),
              ("kd.temperature", spec.temperature > 0, "must be > 0"),
              ("kd.top_k", spec.top_k >= 0, "must be >= 0 (0 = full vocabulary)"),
              ("kd.tail", spec.tail in losses.TAILS, f"expected one of {losses.TAILS}"),
              ("kd.top_k", spec.top_k != 1 or spec.tail != "renorm",
               "with kd.tail=renorm one token renormalised is probability 1 on both sides (a "
               "divergence of 0): use kd.tail=bucket or kd.top_k >= 2"),
              ("kd.loss", spec.mode != "on_policy" or spec.loss != "ce",
               "kd.mode=on_policy distils on the student's own samples: set kd.loss=forward | "
               "reverse | jsd (kd.loss=ce is the baseline of kd.mode=online)"),
              ("kd.eval_teacher", spec.mode == "offline" or spec.served or not spec.eval_teacher,
               "only for kd.mode=offline or a served teacher (an online run scores the teacher "
               "it trains with)"),
              ("kd.store", spec.online or spec.store,
               "kd.mode=offline needs the directory of a top-k teacher store"),
              ("kd.top_k", spec.online or spec.top_k > 0,
               "kd.mode=offline needs the number of stored entries per token to use (> 0)"),
              ("teacher.model_dir", spec.mode == "offline" or spec.served or spec.teacher_dir
               or spec.teacher_preset, f"kd.mode={spec.mode} needs teacher.model_dir (an HF "
               "directory) or teacher.preset (a random init)"))
    checks += _served_checks(spec)
    if spec.rollout is None and bool(k.rollout.get("overlap", False)):
      raise ValueError(f"kd.rollout.overlap=True pipelines on-policy rollouts: only for "
                       f"kd.mode=on_policy (got kd.mode={spec.mode!r})")
    for key, ok, why in checks:
      if not ok:
        raise ValueError(f"{key}={_value(spec, key)!r}: {why}")
    for key, where in (("teacher.model_dir", spec.teacher_dir),
                       ("kd.eval_teacher", spec.eval_teacher)):
      if where and not Path(where).is_dir():
        raise FileNotFoundError(f"{key}={where!r}: directory not found")
    return spec

  @property
  def teacher_model_dir(self) -> str:
    """The HF dir of the teacher model run here: online the one trained with, offline the
    held-out scorer (kd.eval_teacher, offline or beside a served teacher); "" = a preset
    (online) or none."""
    return self.teacher_dir if self.online and not self.served else self.eval_teacher

  @property
  def teacher_tokenizer_dir(self) -> str:
    return self.teacher_tokenizer or self.teacher_model_dir

  def distill(self, vocab: int, store_support: str = "listed") -> losses.Distill | None:
    """The training term (None for kd.loss=ce); logits cut to the tokenizer's `vocab` ids.
    Online: the full vocabulary, or the teacher's top-k + tail; offline: `store_support`, the
    store's (`listed` top-k + tail, or `sampled`)."""
    if self.loss == "ce":
      return None
    if self.served:
      return losses.Distill(kind="reverse", alpha=self.alpha, support="served", vocab=vocab)
    support = ("topk" if self.top_k else "full") if self.online else store_support
    if support == "sampled" and self.loss != "forward":
      raise ValueError(f"kd.loss={self.loss!r}: {self.store} is a sampled store, an unbiased "
                       "estimate of forward KL only: set kd.loss=forward or use a top-k store")
    return losses.Distill(kind=self.loss, alpha=self.alpha, beta=self.beta,
                          temperature=self.temperature, support=support,
                          top_k=self.top_k if support == "topk" else 0, tail=self.tail,
                          vocab=vocab)


def _served_checks(spec: KDSpec) -> tuple:
  """(key, ok, why) of a served teacher: it gives the log-prob of the student's sampled tokens
  only, through the sampled-token estimator."""
  if not spec.served:
    return ()
  est = spec.rollout.estimator if spec.rollout else None
  return (("teacher.backend", spec.teacher_backend in backend.REGISTRY,
           f"expected one of {sorted(backend.REGISTRY)}"),
          ("teacher.backend", spec.mode == "on_policy", f"a served teacher scores the student's "
           f"samples: kd.mode=on_policy only (kd.mode={spec.mode} needs the teacher's logits: "
           "teacher.backend=local)"),
          ("kd.rollout.estimator", est == "token", "a served teacher gives the log-prob of the "
           "sampled token only: set kd.rollout.estimator=token (with kd.loss=reverse)"),
          ("kd.temperature", spec.temperature == 1, "a served teacher's log-probs are at T = 1"),
          ("kd.top_k", spec.top_k == 0, "a served teacher gives sampled tokens only: 0"),
          ("teacher.tokenizer", spec.teacher_tokenizer, "a served teacher needs its tokenizer "
           "dir (its vocabulary is checked against the student's before training)"),
          ("teacher.model_dir", not spec.teacher_dir, "a served teacher runs on its server: "
           "leave teacher.model_dir empty (or use teacher.backend=local)"))


def _value(spec: KDSpec, key: str) -> Any:
  name = key.split(".")[-1]
  name = {"model_dir": "teacher_dir", "backend": "teacher_backend",
          "tokenizer": "teacher_tokenizer"}.get(name, name)
  return getattr(spec.rollout, name) if name == "estimator" else getattr(spec, name)


# --------------------------------------------------------------------------- tokenizers


def tokenizer_identity(tok: Any) -> dict[str, Any]:
  """What must agree for two models' token ids to mean the same: the id <-> token table (added
  tokens included) and the bos / eos tokens; the length is reported."""
  return {"vocab": tokenizer_lib.vocab_fingerprint(tok), "bos": tok.bos_token,
          "eos": tok.eos_token, "size": len(tok)}


def check_same_tokenizer(student_tok: Any, student_where: str, teacher_tok: Any,
                         teacher_where: str) -> int:
  """The shared tokenizer's length (both models' logits are cut to it); TokenizerMismatch naming
  both tokenizers when their ids differ. Embedding rows are not compared: Qwen2.5-1.5B (151936
  rows) and Qwen2.5-72B (152064) share one tokenizer."""
  s, t = tokenizer_identity(student_tok), tokenizer_identity(teacher_tok)
  differ = [k for k in ("vocab", "bos", "eos") if s[k] != t[k]]
  if differ:
    what = ", ".join(f"{k}: {s[k] if k != 'vocab' else s[k][:12]!r} vs "
                     f"{t[k] if k != 'vocab' else t[k][:12]!r}" for k in differ)
    raise TokenizerMismatch(
        f"the student's tokenizer ({student_where}, {s['size']} tokens) and the teacher's "
        f"({teacher_where}, {t['size']} tokens) differ ({what}): logit distillation needs one "
        "vocabulary. Give the student the teacher's tokenizer (--config.model.tokenizer=...) or "
        "pick a teacher of the student's family.")
  return s["size"]


def student_tokenizer(config, spec: KDSpec, model_cfg: models.ModelConfig, texts
                      ) -> tuple[Any, str]:
  """(tokenizer, where from): model.tokenizer / model.init, else the teacher's (online:
  teacher.tokenizer or teacher.model_dir; offline: the store's copy), else one trained on the
  corpus (<workdir>/tokenizer)."""
  mc = config.model
  if not (mc.tokenizer or mc.init):
    source = (spec.teacher_tokenizer_dir if spec.online
              else spec.teacher_tokenizer or str(Path(spec.store) / "tokenizer"))
    if source and Path(source).is_dir():
      log.info("student tokenizer: the teacher's, %s", source)
      tok = tokenizer_lib.load_tokenizer(source)
      models.check_tokenizer(model_cfg, tok, where=source)
      return tok, source
  where = str(mc.tokenizer or mc.init or Path(config.workdir) / "tokenizer")
  return factory.tokenizer(config, model_cfg, texts), where


# --------------------------------------------------------------------------- teacher


def teacher_config(spec: KDSpec) -> models.ModelConfig | None:
  """The config of the teacher model run here (`KDSpec.teacher_model_dir`), None offline or
  served without kd.eval_teacher."""
  if (spec.mode == "offline" or spec.served) and not spec.eval_teacher:
    return None
  dtype = models.resolve_dtype(spec.teacher_dtype)
  cfg = (models.hf.read_config(spec.teacher_model_dir) if spec.teacher_model_dir
         else models.presets.get(spec.teacher_preset))
  return cfg.replace(dtype=dtype, param_dtype=dtype)


class Context:
  """What the loop builds on its mesh (the teacher model's sharded params: online, or the
  offline held-out scorer) and the held-out divergence hook reads; `loss_options(mesh, rules)`
  is passed to `loop.train`."""

  def __init__(self, spec: KDSpec, teacher_cfg: models.ModelConfig | None,
               distill: losses.Distill | None, rollout_args: dict | None = None,
               scorer: served.Scorer | None = None, adapt_rollout=None):
    """`rollout_args` (kd.mode=on_policy): `onpolicy.Rollout`'s cfg, vocab, eos_id, seq_len;
    `scorer`: a served teacher's; `adapt_rollout(rollout) -> rollout` (e.g. ICLDist's)."""
    self.spec, self.teacher_cfg, self.distill = spec, teacher_cfg, distill
    self.rollout_args, self.scorer = rollout_args, scorer
    self.adapt_rollout = adapt_rollout or (lambda rollout: rollout)
    self.mesh = self.rules = self.teacher = None

  def load_teacher(self, mesh, rules) -> step.Teacher:
    s = self.spec
    if s.teacher_model_dir:
      _, params = models.load_hf(s.teacher_model_dir, dtype=self.teacher_cfg.param_dtype,
                                 mesh=mesh, rules=rules)
    else:
      params = models.init(self.teacher_cfg, s.teacher_seed, mesh=mesh, rules=rules)
    return step.Teacher(self.teacher_cfg, params)

  def loss_options(self, mesh, rules) -> dict:
    self.mesh, self.rules = mesh, rules
    if self.teacher_cfg is not None and self.teacher is None:
      self.teacher = self.load_teacher(mesh, rules)
    if self.distill is None:
      return {}
    options = {"distill": self.distill, "teacher": self.teacher if self.distill.online else None}
    if self.spec.rollout is not None:
      rollout = self.adapt_rollout(onpolicy.Rollout(
          self.spec.rollout, placement=sharding.Placement(mesh, rules), teacher=self.teacher,
          scorer=self.scorer, **self.rollout_args))
      options["rollout"] = (onpolicy.Overlapped(rollout) if self.spec.rollout.overlap
                            else rollout)
      options["token_estimator"] = self.spec.rollout.estimator == "token"
    return options


# --------------------------------------------------------------------------- job


def served_scorer(config, spec: KDSpec, tok: Any, tok_where: str, probe_text: str
                  ) -> tuple[served.Scorer, int]:
  """(a served teacher's scorer, the shared vocabulary size): teacher.tokenizer checked against
  the student's, then the server probed with `probe_text`'s ids (served.connect)."""
  where = spec.teacher_tokenizer
  vocab = check_same_tokenizer(tok, tok_where, tokenizer_lib.load_tokenizer(where),
                               f"teacher.tokenizer={where}")
  probe = tok.encode(probe_text, add_special_tokens=False)[:32]
  client = served.connect(config, probe + [tok.eos_token_id or 0] * (2 - len(probe)))
  log.info("teacher: %r served at %s scores the student's samples (%d requests at once)",
           str(config.teacher.model), config.teacher.base_url, int(config.teacher.concurrency))
  return served.Scorer(client, int(config.teacher.echo_max_tokens),
                       served.top_logprobs_setting(config)), vocab


def teacher_setup(config, spec: KDSpec, tok: Any, tok_where: str, probe_text: str
                  ) -> tuple[models.ModelConfig | None, served.Scorer | None, int]:
  """(the local teacher's config or None, a served teacher's scorer or None, the shared vocab):
  the teacher's tokenizer checked against the student's (`tok`, from `tok_where`); a served
  teacher probed with `probe_text` (served_scorer)."""
  vocab, scorer = len(tok), None
  teacher_cfg = teacher_config(spec)
  if spec.served:
    scorer, vocab = served_scorer(config, spec, tok, tok_where, probe_text)
  if teacher_cfg is not None:  # served: the held-out scorer (kd.eval_teacher)
    where = spec.teacher_model_dir if spec.served else spec.teacher_tokenizer_dir
    if where:
      vocab = check_same_tokenizer(tok, tok_where, tokenizer_lib.load_tokenizer(where), where)
    else:
      log.info("teacher preset %r: shares the student's tokenizer", spec.teacher_preset)
    models.check_tokenizer(teacher_cfg, tok, where=where or f"teacher preset {spec.teacher_preset}")
  return teacher_cfg, scorer, vocab


def _records(spec: KDSpec, data: DataSpec):
  """(train records, val records, soft targets or None, stats)."""
  if spec.online:
    train, val, stats = readers.load_corpus(data)
    return train, val, None, stats
  from sentijax.data import topk_store  # pylint: disable=import-outside-toplevel
  support = topk_store.distill_support(spec.store, spec.temperature)  # checks a sample store's T
  recs, soft = topk_store.load(spec.store, spec.top_k)
  train, val = records.split_train_val(recs, data.val_fraction)
  return train, val, soft, {"store": spec.store, "store_support": support,
                            "num_train": len(train), "num_val": len(val)}


def run(config) -> loop.Result:
  """Distils `teacher.*` into the student of `model.*` (see the module docstring)."""
  workdir = Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  spec = KDSpec.from_config(config)
  model_cfg = factory.model_config(config)
  data = DataSpec.from_config(config.data, workdir=config.workdir, seed=config.seed)
  train_recs, val_recs, soft, corpus_stats = _records(spec, data)
  tok, tok_where = student_tokenizer(
      config, spec, model_cfg, lambda: [t for r in train_recs for t in (r.prompt, r.response)])
  vocab = len(tok)
  if spec.mode == "offline":
    from sentijax.data import topk_store  # pylint: disable=import-outside-toplevel
    topk_store.check_tokenizer(spec.store, tok)
  # before the data pipeline: a wrong tokenizer or server fails at once
  teacher_cfg, scorer, vocab = teacher_setup(config, spec, tok, tok_where, train_recs[0].prompt)
  if spec.top_k > vocab:
    raise ValueError(f"kd.top_k={spec.top_k} exceeds the tokenizer's {vocab} tokens")
  store_support = corpus_stats.get("store_support")
  distill = spec.distill(vocab, store_support or "listed")

  train_ds, val_ds, ds_stats = dataset.build_train_val(
      train_recs, val_recs, tok, data, soft_targets=soft,
      show_progress=jax.process_index() == 0)
  if jax.process_index() == 0:
    stats = {"corpus": corpus_stats, "kd": dataclasses.asdict(spec), "vocab": vocab} | ds_stats
    (workdir / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))
    export.save_student_spec(model_cfg, tok, workdir, config.model.init)
  t_desc = (f"served {config.teacher.model!r}" if scorer
            else f"{teacher_cfg.architecture} {teacher_cfg.num_params} params" if teacher_cfg
            else "-")
  log.info("KD (%s, loss %s, alpha %g, T %g, top_k %d): student %s %d params, teacher %s; "
           "%d train rows x %d tokens, vocab %d", spec.mode, spec.loss, spec.alpha,
           spec.temperature, spec.top_k, model_cfg.architecture, model_cfg.num_params, t_desc,
           train_ds.num_rows, train_ds.seq_len, vocab)

  rollout_args = None
  if spec.rollout is not None or spec.eval_rollout is not None:
    if tok.eos_token_id is None:
      raise ValueError(f"kd.mode={spec.mode}, kd.eval_onpolicy={spec.eval_rollout is not None}: "
                       "the tokenizer has no eos token to end sampled responses with")
    rollout_args = {"cfg": model_cfg, "vocab": vocab, "eos_id": int(tok.eos_token_id),
                    "seq_len": train_ds.seq_len, "stop_ids": tokenizer_lib.ids_containing(
                        tok, (spec.rollout or spec.eval_rollout).sampling.stop,
                        model_cfg.vocab_size)}
  if spec.rollout is not None:
    log.info("on-policy: %.0f%% of each batch's rows sampled by the %s (T %g, top_p %g, <= %d "
             "new tokens)", 100 * spec.rollout.lmbda, "teacher" if spec.rollout.seq_kd else
             "student", spec.rollout.sampling.temperature, spec.rollout.sampling.top_p,
             spec.rollout.sampling.max_tokens)
  ctx = Context(spec, teacher_cfg, distill, rollout_args, scorer)
  tc = config.train
  hooks = ()
  terms = kd_eval.eval_terms(ctx, vocab, store_support)
  if spec.eval_rollout is not None and val_ds is None:
    raise ValueError("kd.eval_onpolicy=True samples responses for the held-out rows: set "
                     "data.val_fraction > 0 (or a validation corpus)")
  if spec.eval_rollout is not None and "kl_teacher_reverse" not in terms:
    raise ValueError("kd.eval_onpolicy=True scores the student's samples with a teacher model: "
                     "set teacher.model_dir / teacher.preset (online), or kd.eval_teacher "
                     "(offline, or beside a served teacher)")
  if val_ds is not None and terms:
    hooks = (kd_eval.divergence_hook(
        ctx, model_cfg, val_ds, int(tc.batch_size), int(tc.eval_batches), int(tc.loss_chunk),
        terms, rollout_args if spec.eval_rollout is not None else None),)
  teacher_flops = 0.0
  if distill is not None and distill.online:  # forward only: 1/3 of a training step
    teacher_flops = teacher_cfg.flops_per_token(train_ds.seq_len) / 3
  try:
    result = loop.train(config, model_cfg, factory.param_initializer(config, model_cfg),
                        train_ds, val_ds, tokenizer=tok, eval_hooks=hooks,
                        loss_options=ctx.loss_options, teacher_flops_per_token=teacher_flops)
  finally:
    if scorer is not None:
      scorer.client.close()
  if result.train_losses:
    log.info("KD done at step %d: train loss %.4f -> %.4f%s", result.step,
             result.train_losses[0][1], result.train_losses[-1][1],
             f", val loss {result.val_losses[-1][1]:.4f}" if result.val_losses else "")
  return result

