"""On-policy distillation rollouts: the current student writes part of each batch's responses.

GKD (Agarwal et al. 2024; TRL's `GKDTrainer`): before each step, the first round(lmbda x B)
rows of the corpus batch keep their records' PROMPTS and get new responses, sampled by the
current student (`sampling.decode`, the jitted KV-cache sampler, on the sharded params as they
are: no host copy of params) or, with `seq_kd`, by the teacher; the rest keep the corpus
responses. The step then distils on every row (`step.train_step`, the teacher in the step).
Rows of sampled segments are re-packed in order; a segment that no longer fits is dropped
(counted). A batch field "sampled" marks the student's own tokens: they get no CE (a student's
own sample is no target) and the per-token reverse-KL estimate log q(x) - log p(x)
(`losses.token_reverse_kl`) is reported on them.

Randomness: row i of step s samples with fold_in(fold_in(key(seed), s), i) (`sampling.row_keys`,
rows numbered over the global batch), so a rerun, a resume after SIGKILL and any device count
sample the same tokens from the same params.

Several processes (jax.distributed): each process takes its own rows of the global batch (the
ones its devices hold), the sampled share being the global rows [0, round(lmbda x B)); the
prompts of all processes are gathered (`distributed.gather_sequences`, small) and decoded as one
global batch on the mesh, numbered as one process numbers them, so P processes x D devices sample
exactly what 1 x P*D samples; each process re-packs its own rows, a served teacher scores them
(its metrics summed over processes), and the rows go back as the process's part of the global
batch. The student's (or, seq_kd, the teacher's) params stay where they lie on the mesh. Any
rollout does the same with `own_rows`, `Rollout.sample` (called by every process),
`rollout_metrics` / `served_metrics` and `to_batch`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from sentijax import distributed, models, sampling, sharding
from sentijax.data import packing, sequences
from sentijax.sampling import SamplingSettings
from sentijax.train import served

ESTIMATORS = ("full", "token")
Rows = tuple  # (this process's rows of a global batch: numpy by field, its first row's global
#              index, the global batch size)


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
  """`kd.lmbda`, `kd.seq_kd` and `kd.rollout.*`, read and checked once; `sampling`: the
  rollouts' temperature, top_p, max_tokens (kd.rollout.max_new_tokens) and seed (`seed`)."""
  lmbda: float
  seq_kd: bool
  sampling: SamplingSettings
  estimator: str = "full"  # full | token (losses.token_reverse_kl on the student's samples)
  overlap: bool = False  # kd.rollout.overlap: Overlapped (a served teacher only)

  @classmethod
  def from_config(cls, config) -> "RolloutSpec":
    k, r = config.kd, config.kd.rollout
    temperature, top_p, max_new = float(r.temperature), float(r.top_p), int(r.max_new_tokens)
    lmbda, seq_kd, estimator = float(k.lmbda), bool(k.seq_kd), str(r.estimator)
    overlap = bool(r.get("overlap", False))
    backend = str(config.teacher.backend) if overlap else ""
    checks = (("kd.lmbda", lmbda, 0 <= lmbda <= 1, "must be in [0, 1] (the sampled share of rows)"),
              ("kd.rollout.temperature", temperature, temperature > 0,
               "must be > 0 (on-policy samples are drawn; 1 = the student's own distribution)"),
              ("kd.rollout.top_p", top_p, 0 < top_p <= 1, "must be in (0, 1]"),
              ("kd.rollout.max_new_tokens", max_new, max_new >= 1, "must be >= 1"),
              ("kd.rollout.estimator", estimator, estimator in ESTIMATORS,
               f"expected one of {ESTIMATORS}"),
              ("kd.rollout.estimator", estimator, estimator != "token" or str(k.loss) == "reverse",
               f"'token' estimates reverse KL: set kd.loss=reverse (got {k.loss!r})"),
              ("kd.rollout.estimator", estimator, estimator != "token" or not seq_kd,
               "'token' needs the student's own samples: kd.seq_kd=False"),
              ("kd.rollout.overlap", overlap, not overlap or backend != "local",
               "overlaps a served teacher's scoring with the train step: set "
               "teacher.backend=openai (a local teacher scores inside the step)"))
    for key, value, ok, why in checks:
      if not ok:
        raise ValueError(f"{key}={value!r}: {why}")
    stop = tuple(x for x in str(r.get("stop", "")).split("|") if x)  # as sampling.stop
    return cls(lmbda=lmbda, seq_kd=seq_kd, estimator=estimator, overlap=overlap,
               sampling=SamplingSettings(
        temperature=temperature, top_p=top_p, max_tokens=max_new, stop=stop,
        seed=int(config.seed)))


def segments(row: dict[str, np.ndarray]) -> list[np.ndarray]:
  """The prompts of a packed row's segments that have a response, in order: each segment's
  tokens up to its first loss target (packing: inputs[t] predicts targets[t])."""
  out = []
  seg_L, w_L = row["segment_ids"], row["weights"]
  for seg in np.unique(seg_L[seg_L > 0]):
    where = np.flatnonzero(seg_L == seg)
    w = w_L[where]
    if w.any():
      first = int(np.argmax(w > 0))
      out.append(row["inputs"][where[:first + 1]].astype(np.int32))
  return out


def rollout_keys(seed: int, step: int, rows: int) -> jax.Array:
  """[rows] PRNG keys of step `step`: row i gets fold_in(fold_in(key(seed), step), i)."""
  return sampling.row_keys(jax.random.fold_in(jax.random.key(seed), step), rows)


class Rollout:
  """`(state, batch) -> (batch with sampled responses, host metrics)` for `step.jit_train_step`.

  `cfg` / `teacher`: the student's config and the teacher (`step.Teacher`, params on the mesh;
  needed for `spec.seq_kd`). `vocab`: the shared tokenizer's length (a sample of a padding
  embedding row ends the response, dropped); `eos_id` ends a response (kept, trained on), as do
  `stop_ids` (the tokens holding one of `spec.sampling.stop`, `tokenizer.ids_containing`).
  `scorer` (a served teacher, `served.Scorer`): `(host batch, step) -> (teacher_logp [B, T],
  metrics)`, run on this process's host rows once "sampled" is set; its field joins the batch.
  """

  def __init__(self, spec: RolloutSpec, cfg: models.ModelConfig, *, vocab: int, eos_id: int,
               seq_len: int, placement: sharding.Placement | None = None, teacher=None,
               per_layer: bool | None = None, scorer=None, stop_ids=()):
    if spec.seq_kd and teacher is None:
      raise ValueError("kd.seq_kd=True samples from the teacher: it needs a teacher model")
    self.spec, self.cfg, self.teacher, self.scorer = spec, cfg, teacher, scorer
    self.vocab, self.eos_id, self.seq_len = vocab, eos_id, seq_len
    self.stop_ids = sorted(set(int(i) for i in stop_ids) - {eos_id})
    self.placement, self.per_layer = placement or sharding.Placement(), per_layer

  def sample(self, params: Any, prompts: list[np.ndarray], step: int) -> list[np.ndarray]:
    """One response per prompt (eos kept; a padding-row id ends it, dropped).

    Several processes: a collective, every process calls it with its own prompts (an empty list
    too). The prompts are numbered over processes in process order (process 0's first), which
    is the order of their rows in the global batch, and decoded as ONE global batch on the mesh
    (`sampling.decode`, each device its rows; rows keyed by that global number), so any process
    and device count samples the same tokens; each process gets its own prompts' responses."""
    everyone = distributed.gather_sequences(prompts)
    first = sum(len(ps) for ps in everyone[:jax.process_index()])
    flat = [p for ps in everyone for p in ps]
    if not flat:
      return []
    return self._decode(params, flat, step)[first:first + len(prompts)]

  def _decode(self, params: Any, prompts: list[np.ndarray], step: int) -> list[np.ndarray]:
    """Responses to `prompts`, the global batch's: the same list on every process."""
    cfg, params = ((self.teacher.cfg, self.teacher.params) if self.spec.seq_kd
                   else (self.cfg, params))
    length = max(len(p) for p in prompts)
    ids_BxT, mask_BxT = sampling.left_pad(prompts, length, len(prompts), self.eos_id)
    s = self.spec.sampling
    out = sampling.decode(
        cfg, params, ids_BxT, mask_BxT, s,
        sampling.Stops([self.eos_id], self.eos_id,
                       end_ids=[*self.stop_ids, *range(self.vocab, cfg.vocab_size)]),
        keys_B=rollout_keys(s.seed, step, len(prompts)), placement=self.placement,
        per_layer=self.per_layer)
    responses = []
    for toks, n in zip(out.tokens_BxN, out.lengths_B):
      toks = toks[:int(n)]
      if len(toks) and toks[-1] >= self.vocab:
        toks = toks[:-1]
      responses.append(toks.astype(np.int32))
    return responses

  def rows(self, prompts_per_row: list[list[np.ndarray]], responses: list[np.ndarray]
           ) -> tuple[list[dict[str, np.ndarray]], int]:
    """Packed rows of prompt + response per segment, in order; (rows, segments dropped)."""
    it, rows, dropped = iter(responses), [], 0
    for prompts in prompts_per_row:
      seqs, used = [], 0
      for prompt in prompts:
        resp = next(it)
        room = self.seq_len + 1 - len(prompt)  # a sequence of n tokens fills n - 1 positions
        resp = resp[:room]
        n = len(prompt) + len(resp) - 1
        if not len(resp) or used + n > self.seq_len:
          dropped += 1
          continue
        seqs.append(sequences.TokenizedSequence(
            np.concatenate([prompt, resp]).astype(np.int32),
            np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(resp), np.int32)])))
        used += n
      rows.append(packing.pack_row(seqs, self.seq_len))
    return rows, dropped

  def __call__(self, state, batch: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], dict]:
    step = int(jax.device_get(state.step))
    local, metrics = self.sampled(state.params, (*own_rows(batch), batch["inputs"].shape[0]), step)
    return self.scored(local, step, metrics)

  def sampled(self, params: Any, rows: Rows, step: int) -> tuple[dict[str, np.ndarray], dict]:
    """(this process's `rows` with step `step`'s sampled responses written by `params`, their
    host metrics): everything but the served teacher's scores. A collective."""
    local, row0, b = rows
    b_local = local["inputs"].shape[0]
    n_on = int(round(self.spec.lmbda * b))  # global rows [0, n_on) are sampled
    mine = min(max(n_on - row0, 0), b_local)
    prompts_per_row = [segments({k: v[r] for k, v in local.items()}) for r in range(mine)]
    flat = [p for ps in prompts_per_row for p in ps]
    sampled_L = np.zeros(local["weights"].shape, np.float32)
    metrics = {"onpolicy_fraction": n_on / b}
    start = time.perf_counter()
    responses = self.sample(params, flat, step)  # every process: a collective
    seconds = time.perf_counter() - start
    new_rows, dropped = self.rows(prompts_per_row, responses)
    sampled = rollout_metrics(responses, dropped, seconds)
    if sampled:  # some process sampled: every process's sampled rows are re-packed
      for r, row in enumerate(new_rows):
        for k in local:
          if k not in row:
            raise ValueError(f"on-policy rows have no batch field {k!r} (kd.mode=on_policy "
                             "trains on the corpus prompts and an online teacher only)")
          local[k][r] = row[k]
        if not self.spec.seq_kd:
          sampled_L[r] = row["weights"]
      metrics |= sampled
    local["sampled"] = sampled_L
    return local, metrics

  def scored(self, local: dict[str, np.ndarray], step: int, metrics: dict
             ) -> tuple[dict[str, jax.Array], dict]:
    """`sampled`'s rows, scored by the served teacher (if any), as this process's part of the
    global batch; the metrics with the scorer's (a collective with several processes)."""
    if self.scorer is not None:  # each process scores its own rows
      try:
        local["teacher_logp"], scored = self.scorer(local, step)
      except Exception as e:  # pylint: disable=broad-except
        served_metrics({}, step, error=e)  # raises on every process, none left waiting
      metrics = metrics | served_metrics(scored, step)
    return to_batch(local, self.placement), metrics


class Overlapped:
  """`kd.rollout.overlap=True`: the served teacher scores step t + 1's rows while the device
  runs step t, so step t + 1 trains on rows sampled by the params step t started from: one
  update old (`rollout_lag` 1; asynchronous RL's trade-off), the price of hiding the scoring.

  Per call at step t (the step function `wrap` returns): step t + 1's rows (`batch_at(t + 1)`,
  the loop's own data order) are sampled by params_t (`rollout.sampled`, blocking on the
  device: the step below donates those params), train step t is dispatched on the batch
  prepared during step t - 1, and while it runs the host scores the new rows
  (`rollout.scored`). The first step of a run, and a resume from a checkpoint without a
  prepared batch, samples its own rows first (`rollout_lag` 0). The prepared batch is saved in
  every checkpoint (`pending`, loop.py: the same Orbax save as the state, atomic with it) and
  handed back by `start`, so a resumed run trains on exactly what the uninterrupted one did.
  The last step prepares nothing. `rollout`: a `Rollout` or `icl_onpolicy.ICLRollout`.
  """

  def __init__(self, rollout: Any):
    self.rollout, self.inner = rollout, None
    self.batch_at, self.last_step = None, 0
    self.ready = None  # (step, global batch, host metrics): what step `step` trains on

  def wrap(self, inner):
    """The pipelined step function `(state, batch) -> (state, metrics)` around `inner`
    (`step.jit_train_step`'s jitted step)."""
    self.inner = inner
    return self

  def start(self, batch_at, last_step: int, restored: tuple | None = None) -> None:
    """`batch_at(step)`: this process's rows of the loop's global batch `step` (numpy);
    `last_step`: the step the run ends at; `restored`: `(step, batch, metrics)` of a checkpoint."""
    self.batch_at, self.last_step, self.ready = batch_at, int(last_step), restored

  def pending(self) -> tuple | None:
    """`(step, global batch, host metrics)` prepared for the next step, or None."""
    return self.ready

  def __call__(self, state, batch: dict[str, jax.Array]) -> tuple[Any, dict]:
    if self.batch_at is None:
      raise RuntimeError("Overlapped: call start(batch_at, last_step) before the first step")
    step = int(jax.device_get(state.step))
    if self.ready is not None and self.ready[0] == step:
      _, current, metrics = self.ready
      metrics = {**metrics, "rollout_lag": 1}
    else:  # nothing prepared: this step's own params sample its rows
      current, metrics = self.rollout(state, batch)
      metrics = {**metrics, "rollout_lag": 0}
    self.ready, nxt = None, step + 1
    if nxt < self.last_step:
      local, next_metrics = self.rollout.sampled(state.params, self._rows(nxt), nxt)
    state, out = self.inner(state, current)  # dispatched: the device trains while the host scores
    if nxt < self.last_step:
      self.ready = (nxt, *self.rollout.scored(local, nxt, next_metrics))
    return state, {**out, **metrics}

  def _rows(self, step: int) -> Rows:
    local = {k: np.array(v) for k, v in self.batch_at(step).items()}  # writable
    b_local = local["inputs"].shape[0]
    return local, jax.process_index() * b_local, b_local * jax.process_count()


def own_rows(batch: dict[str, jax.Array]) -> tuple[dict[str, np.ndarray], int]:
  """(this process's rows of the global batch, writable numpy; the global index of its first
  row): every row on one process. With several processes a rollout rebuilds these rows only and
  hands them back with `to_batch`."""
  local, firsts = {}, set()
  for k, v in batch.items():
    rows, first = sharding.process_rows(v)
    local[k] = np.array(rows)  # writable
    firsts.add(first)
  b, b_local = batch["inputs"].shape[0], local["inputs"].shape[0]
  if len(firsts) > 1 or b_local * jax.process_count() != b:
    raise ValueError(
        f"on-policy rollout: process {jax.process_index()} holds {b_local} rows (from "
        f"{sorted(firsts)}) of a batch of {b} over {jax.process_count()} processes, not its "
        "1/process_count share: set the ('batch', ...) rule of sharding_rules to mesh axes "
        "that split batches over every process's devices (the default ('data', 'fsdp') does)")
  return local, firsts.pop()


def to_batch(local: dict[str, np.ndarray], placement: sharding.Placement
             ) -> dict[str, jax.Array]:
  """This process's rows as its part of the global batch on `placement`'s mesh (the batch rule;
  on the default device without a mesh)."""
  batch_sh = placement.batch()
  if batch_sh is None:
    return {k: jax.numpy.asarray(v) for k, v in local.items()}
  return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}


def rollout_metrics(responses: list[np.ndarray], dropped: int, seconds: float) -> dict:
  """rollout_tokens_per_s, rollout_length (mean tokens per response), rollout_dropped (segments)
  over all processes' `responses` and `dropped` (every process calls); {} when none sampled."""
  count, generated, dropped = distributed.allgather(np.asarray(
      [len(responses), sum(len(x) for x in responses), dropped], np.int32)).sum(0).tolist()
  if not count:
    return {}
  return {"rollout_tokens_per_s": generated / max(seconds, 1e-9),
          "rollout_length": generated / count, "rollout_dropped": dropped}


SERVED_KEYS = ("teacher_requests", "teacher_retries", "teacher_score_s")  # served.Scorer's


def served_metrics(scored: dict, step: int, error: Exception | None = None) -> dict:
  """A served teacher's step metrics over all processes: requests and retries summed, the wall
  seconds the slowest process's. Every process calls it, also the one whose scoring raised
  `error`: the failure is gathered with the metrics, so all processes stop (that one with its
  error, the others with `served.ScoringError` naming it) instead of waiting for it."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return scored
  row = [float(error is not None)] + [float(scored.get(k, 0.0)) for k in SERVED_KEYS]
  values_PxK = distributed.allgather(np.asarray(row, np.float32))
  if error is not None:
    raise error
  failed = np.flatnonzero(values_PxK[:, 0]).tolist()
  if failed:
    raise served.ScoringError(
        f"step {step}: process(es) {failed} could not score their rows with the served teacher "
        "(their logs name the request); this process stops too, as no step trains without its "
        "teacher signal: fix the server, then rerun the same command (it resumes from the last "
        "checkpoint)")
  return {k: (values_PxK[:, i + 1].max() if k == "teacher_score_s" else
              values_PxK[:, i + 1].sum()) for i, k in enumerate(SERVED_KEYS)}
