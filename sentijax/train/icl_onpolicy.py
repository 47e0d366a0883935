"""On-policy ICLDist (context distillation): the teacher sees the k-shot ICL prompt, the student the
same query with `icl.student_shots` demos; the student samples the answer, both score it.

`icl.target=on_policy` (train/icldist.py): the training rows hold the TEACHER's k-shot prompts
with their gold answers (the ICL recipe, prompts sized so a sampled answer of
`kd.rollout.max_new_tokens` fits); `student_prompts` maps each to the student's prompt (the same
instruction, label map and query, the first `icl.student_shots` demos: data/icl.fewer_shots).
Each step `ICLRollout` rewrites the batch: for the first round(kd.lmbda x B) rows the CURRENT
student samples an answer to its own prompt (`onpolicy.Rollout.sample`: the jitted KV-cache
sampler on the sharded params, row keys from (seed, step, global row); several processes each
rebuild their own rows, their prompts decoded as one global batch); the other rows keep the gold
answer. Every segment is laid out twice over the same row positions (`dual_row`): the student's
sequence (prompt + answer) in the batch's own fields, the teacher's (k-shot prompt + the same
answer) in `step.TEACHER_FIELDS`, both right-aligned so the answer tokens sit at the same
positions; the shorter side is padded on the left (segment 0, no loss), its positions restart at
0 where its tokens start. The one distillation path then runs unchanged: a local teacher forwards
its fields in the jitted step (`step.teacher_view`, any `kd.loss` over the full vocabulary, or the
sampled-token estimator with `kd.rollout.estimator=token`); a served teacher (`teacher.backend=
openai`) scores its prompt + the answer through echo + logprobs (train/served.py reads the same
fields). The loss counts exactly the answer tokens: no CE on the student's own samples, CE + the
divergence on gold answers (kd.lmbda < 1). Metrics as kd.mode=on_policy (`onpolicy_fraction`,
`rollout_tokens_per_s`, `rollout_length`, `rollout_dropped`, `rkl_token`, served:
`teacher_score_s`, ...). A resume after SIGKILL redoes the same samples (same params, keys, rows).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from sentijax import models, sharding
from sentijax.data import icl, icl_recipe, packing, sequences
from sentijax.data import tokenizer as tokenizer_lib
from sentijax.data.records import Record
from sentijax.data.spec import DataSpec
from sentijax.train import kd, losses, onpolicy, step

log = logging.getLogger("sentijax")
STUDENT = ("inputs", "segment_ids", "positions")


# --------------------------------------------------------------------------- config


def kd_spec(config) -> kd.KDSpec:
  """`config.kd` + `config.teacher` of an on-policy ICLDist run, read and checked once (as the kd
  job reads them: kd.KDSpec), plus what context distillation needs."""
  for section in ("kd", "teacher"):
    if section not in config:
      raise ValueError(f"icl.target=on_policy reads config.{section} (the divergence, the "
                       "rollouts and the teacher): use configs/icldist.py, which has both")
  spec = kd.KDSpec.from_config(config)
  seq_kd = spec.rollout is not None and spec.rollout.seq_kd
  checks = (("kd.mode", spec.mode, spec.mode == "on_policy", "on-policy ICLDist distils on the "
             "student's samples: kd.mode=on_policy (configs/icldist.py's default)"),
            ("kd.seq_kd", seq_kd, not seq_kd, "the student samples the answer to its own "
             "prompt in context distillation: kd.seq_kd=False (teacher-written answers: "
             "icl.target=teacher)"),
            ("data.truncation", str(config.data.truncation), str(config.data.truncation) ==
             "drop", "on-policy ICLDist prompts are built to fit data.seq_len with the sampled "
             "answer: data.truncation=drop (a cut prompt would lose its student prompt)"))
  for key, value, ok, why in checks:
    if not ok:
      raise ValueError(f"{key}={value!r}: {why}")
  return spec


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
  """The records of on-policy ICLDist: the teacher's k-shot prompts with gold answers (`teacher`:
  the training rows; `val_teacher`) and, aligned, their students' records (`student`;
  `val_student`: the val rows, so eval/loss is the student's on its own prompts)."""
  teacher: list[Record]
  student: list[Record]
  val_teacher: list[Record]
  val_student: list[Record]
  stats: dict


def records(recipe: icl_recipe.RecipeSpec, sources, forbidden, tok: Any, data: DataSpec,
            max_new_tokens: int) -> Data:
  """The ICL recipe's gold prompts as `Data`. Prompts shrink until the longer of the gold answer
  and `max_new_tokens` sampled tokens fits data.seq_len; every prompt, the teacher's and the
  student's, is held-out checked."""
  base = sequences.sequence_length_fn(tok, data.chat_template)

  def length(prompt: str, answer: str) -> int:
    return max(base(prompt, answer), base(prompt, "") - 1 + max_new_tokens)
  train, val, stats = icl_recipe.gold_prompts(recipe, sources, forbidden, length, data.seq_len)
  out = Data(icl.to_records(train, "icl"),
             icl_recipe.student_records(recipe, train, forbidden, "icl-student"),
             icl.to_records(val, "icl-val-teacher"),
             icl_recipe.student_records(recipe, val, forbidden, "icl-val"), stats)
  stats["prompts_checked"] += len(out.student) + len(out.val_student)
  stats["student_shots"] = recipe.student_shots
  return out


def _split(recs: Sequence[Record], tok: Any, chat_template: bool
           ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Each record as the data path tokenises it: (prompt: its tokens before the first response
  token, what a packed segment holds up to its first loss target; the response tokens)."""
  seqs, _ = sequences.tokenize_records(recs, tok, chat_template, show_progress=False)
  out = []
  for s in seqs:
    first = sequences.first_response_index(s)
    out.append((s.tokens[:first].astype(np.int32), s.tokens[first:].astype(np.int32)))
  return out


def student_prompts(teacher: Sequence[Record], student: Sequence[Record], tok: Any,
                    chat_template: bool) -> dict[bytes, np.ndarray]:
  """{teacher prompt tokens (bytes): student prompt tokens}. The teacher's prompt determines the
  student's (its first demos), so equal teacher prompts map to one student prompt; a record
  mixed in without a student prompt (icl.mix_corpus) is listed with itself as both."""
  if len(teacher) != len(student):
    raise ValueError(f"{len(teacher)} teacher records, {len(student)} student records")
  return {t.tobytes(): s for (t, _), (s, _) in zip(_split(teacher, tok, chat_template),
                                                   _split(student, tok, chat_template))}


# --------------------------------------------------------------------------- rows


def split_segments(row: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
  """(prompt, response) token ids of each packed segment with a response, in order: the prompt up
  to the segment's first loss target, the response the rest (packing: inputs[t] -> targets[t])."""
  out = []
  seg_L, w_L = row["segment_ids"], row["weights"]
  for seg in np.unique(seg_L[seg_L > 0]):
    where = np.flatnonzero(seg_L == seg)
    if not w_L[where].any():
      continue
    tokens = np.append(row["inputs"][where], row["targets"][where[-1]]).astype(np.int32)
    first = int(np.argmax(w_L[where] > 0)) + 1
    out.append((tokens[:first], tokens[first:]))
  return out


def dual_row(segments: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], seq_len: int,
             sampled: bool) -> tuple[dict[str, np.ndarray], int]:
  """(one row, segments dropped) from (student prompt, teacher prompt, answer) per segment: the
  student's sequence in FIELDS, the teacher's in step.TEACHER_FIELDS, each right-aligned in the
  segment's span so the answer's targets share positions; "weights" (and with `sampled` the
  "sampled" mask) on the answer's targets. A segment that no longer fits is dropped."""
  row = packing.empty_row(seq_len)
  row |= {k: np.zeros(seq_len, np.int32) for k in step.TEACHER_FIELDS}
  row["sampled"] = np.zeros(seq_len, np.float32)
  teacher = dict(zip(STUDENT, step.TEACHER_FIELDS))
  offset = seg = dropped = 0
  for s_prompt, t_prompt, answer in segments:
    longest = max(len(s_prompt), len(t_prompt))
    answer = answer[:seq_len + 1 - longest]  # n tokens fill n - 1 positions
    end = offset + longest + len(answer) - 1
    if not len(answer) or end > seq_len:
      dropped += 1
      continue
    seg += 1
    for prompt, names in ((s_prompt, dict(zip(STUDENT, STUDENT))), (t_prompt, teacher)):
      tokens = np.concatenate([prompt, answer])
      start = end - len(tokens) + 1
      row[names["inputs"]][start:end] = tokens[:-1]
      row[names["segment_ids"]][start:end] = seg
      row[names["positions"]][start:end] = np.arange(len(tokens) - 1)
      if prompt is s_prompt:
        row["targets"][start:end] = tokens[1:]
    row["weights"][end - len(answer):end] = 1.0
    if sampled:
      row["sampled"][end - len(answer):end] = 1.0
    offset = end
  return row, dropped


class ICLRollout:
  """`(state, batch) -> (batch, host metrics)` for `step.jit_train_step` (its `rollout`): the
  rows of teacher prompts become the student / teacher rows of context distillation (module
  docstring). `rollout`: the kd job's `onpolicy.Rollout` (its spec, sampler, scorer, placement,
  seq_len); `student_of`: `student_prompts`."""

  def __init__(self, rollout: onpolicy.Rollout, student_of: dict[bytes, np.ndarray]):
    if rollout.spec.seq_kd:
      raise ValueError("kd.seq_kd=True: in context distillation the student samples")
    self.rollout, self.student_of = rollout, student_of

  def student_prompt(self, teacher_prompt: np.ndarray) -> np.ndarray:
    found = self.student_of.get(teacher_prompt.astype(np.int32).tobytes())
    if found is None:
      raise ValueError(f"a training segment's prompt ({len(teacher_prompt)} tokens) is none of "
                       f"the {len(self.student_of)} ICL prompts this job built: the rows and the "
                       "student prompts come from different data (rerun in a fresh workdir)")
    return found

  def __call__(self, state, batch: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], dict]:
    """Several processes: each rebuilds its own rows (`onpolicy.own_rows`); the global rows
    [0, round(lmbda x B)) are sampled, all processes' prompts decoded as one global batch
    (`Rollout.sample`, a collective every process calls), metrics over all processes."""
    step = int(jax.device_get(state.step))
    rows = (*onpolicy.own_rows(batch), batch["inputs"].shape[0])
    local, metrics = self.sampled(state.params, rows, step)
    return self.scored(local, step, metrics)

  def sampled(self, params: Any, rows: onpolicy.Rows, step: int
              ) -> tuple[dict[str, np.ndarray], dict]:
    """(this process's student / teacher rows, the student's answers sampled by `params` at
    step `step`, not yet scored; host metrics), as `Rollout.sampled`."""
    r = self.rollout
    local, row0, b = rows
    extra = sorted(set(local) - set(packing.FIELDS))
    if extra:
      raise ValueError(f"on-policy ICLDist rows carry no batch fields {extra} (gold ICL "
                       "prompts only: no soft targets)")
    b_local = local["inputs"].shape[0]
    n_on = int(round(r.spec.lmbda * b))
    mine = min(max(n_on - row0, 0), b_local)  # this process's sampled rows
    per_row = [[(self.student_prompt(p), p, answer) for p, answer in
                split_segments({k: v[i] for k, v in local.items()})] for i in range(b_local)]
    flat = [s for segs in per_row[:mine] for s, _, _ in segs]
    start = time.perf_counter()
    answers = r.sample(params, flat, step)
    seconds = time.perf_counter() - start
    it = iter(answers)
    per_row[:mine] = [[(s, t, next(it)) for s, t, _ in segs] for segs in per_row[:mine]]
    out, dropped = zip(*(dual_row(segs, r.seq_len, i < mine) for i, segs in enumerate(per_row)))
    metrics = {"onpolicy_fraction": n_on / b}
    metrics |= onpolicy.rollout_metrics(answers, sum(dropped), seconds)
    return {k: np.stack([row[k] for row in out]) for k in out[0]}, metrics

  def scored(self, local: dict[str, np.ndarray], step: int, metrics: dict
             ) -> tuple[dict[str, jax.Array], dict]:
    return self.rollout.scored(local, step, metrics)


# --------------------------------------------------------------------------- job


def val_triples(val_teacher: Sequence[Record], val_student: Sequence[Record], tok: Any,
                chat_template: bool) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(student prompt, teacher prompt, gold answer) token ids of each val query."""
  return [(s, t, a) for (t, a), (s, _) in zip(_split(val_teacher, tok, chat_template),
                                              _split(val_student, tok, chat_template))]


def kl_teacher_hook(ctx: kd.Context, model_cfg: models.ModelConfig, triples, seq_len: int,
                    batch_size: int, num_batches: int, loss_chunk: int, vocab: int):
  """(step, params) -> {"kl_teacher": KL(teacher || student) per gold-answer token at T = 1 over
  the shared vocabulary, the teacher on its k-shot prompt, the student on its own}: held-out
  context distillation, on the first `num_batches` x `batch_size` val queries (one per row,
  `dual_row`). Needs the local teacher (`ctx.teacher`, on the mesh once the step is built)."""
  rows = [dual_row([t], seq_len, sampled=False)[0] for t in triples[:num_batches * batch_size]]
  rows += [dual_row([], seq_len, sampled=False)[0]] * (-len(rows) % batch_size)
  distill = losses.Distill(alpha=0.0, vocab=vocab)
  fn = None

  def hook(step_num: int, params) -> dict:
    nonlocal fn
    del step_num
    if fn is None:
      fn = jax.jit(lambda p, b, tp: step.loss_terms(model_cfg, p, b, loss_chunk, distill,
                                                    ctx.teacher.cfg, tp))
    kl = tokens = 0.0
    for i in range(0, len(rows), batch_size):
      full = {k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]
              if k != "sampled"}  # every process builds the whole batch: each places its part
      batch = ({k: jax.numpy.asarray(v) for k, v in full.items()} if ctx.mesh is None else
               {k: jax.make_array_from_callback(v.shape, sharding.batch_sharding(
                   ctx.mesh, ctx.rules), lambda idx, v=v: v[idx]) for k, v in full.items()})
      out = jax.device_get(fn(params, batch, ctx.teacher.params))
      kl, tokens = kl + float(out["kd"]), tokens + float(out["tokens"])
    return {"kl_teacher": kl / max(tokens, 1.0)}
  return hook


class Setup(NamedTuple):
  """What the ICLDist job hands `loop.train`: `loss_options` (`(mesh, rules) -> step options`),
  eval `hooks` (eval/kl_teacher with a local teacher), the teacher's forward FLOPs per token;
  `scorer`: a served teacher's (its client closed after training)."""
  loss_options: Any
  hooks: tuple
  teacher_flops: float
  scorer: Any


def setup(config, spec: kd.KDSpec, model_cfg: models.ModelConfig, tok: Any, seq_len: int,
          data: Data, mixed: Sequence[Record]) -> Setup:
  """The kd job's step options (distill, the teacher on the mesh, an `onpolicy.Rollout`) with the
  Rollout wrapped in `ICLRollout` (`data`'s prompts and the `mixed` records, each its own
  student prompt), and the held-out KL to the teacher."""
  mc, dc, tc = config.model, config.data, config.train
  tok_where = str(mc.tokenizer or mc.init or f"{config.workdir}/tokenizer")
  teacher_cfg, scorer, vocab = kd.teacher_setup(config, spec, tok, tok_where, data.teacher[0].prompt)
  if tok.eos_token_id is None:
    raise ValueError("icl.target=on_policy: the tokenizer has no eos token to end sampled answers")
  student_of = student_prompts([*data.teacher, *mixed], [*data.student, *mixed], tok,
                               dc.chat_template)
  rollout_args = {"cfg": model_cfg, "vocab": vocab, "eos_id": int(tok.eos_token_id),
                  "seq_len": seq_len, "stop_ids": tokenizer_lib.ids_containing(
                      tok, spec.rollout.sampling.stop, model_cfg.vocab_size)}
  ctx = kd.Context(spec, teacher_cfg, spec.distill(vocab), rollout_args, scorer,
                   adapt_rollout=lambda rollout: ICLRollout(rollout, student_of))
  s = spec.rollout.sampling
  log.info("on-policy ICLDist: %.0f%% of each batch's rows answered by the student (T %g, "
           "top_p %g, <= %d new tokens), scored by %s", 100 * spec.rollout.lmbda, s.temperature,
           s.top_p, s.max_tokens,
           f"the served {config.teacher.model!r}" if scorer else
           f"the local {teacher_cfg.architecture} ({teacher_cfg.num_params} params)")

  hooks = ()
  if teacher_cfg is not None and data.val_teacher:
    hooks = (kl_teacher_hook(ctx, model_cfg, val_triples(data.val_teacher, data.val_student, tok,
                                                         dc.chat_template),
                             seq_len, int(tc.batch_size), int(tc.eval_batches),
                             int(tc.loss_chunk), vocab),)
  teacher_flops = 0.0 if teacher_cfg is None else teacher_cfg.flops_per_token(seq_len) / 3
  return Setup(ctx.loss_options, hooks, teacher_flops, scorer)
