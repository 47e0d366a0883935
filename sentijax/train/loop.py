"""The training loop shared by KnowDist, ICLDist and KD.

Recipe, one phase each: setup (mesh, optimizer, shardings) -> restore (the latest checkpoint, or
fresh params) -> compile (jitted train / eval steps) -> loop over deterministic batches from the
restored data position (step, logging, evaluating, checkpointing every N steps, on SIGTERM and
at the end) -> optional HF export. A pipelined step function (`onpolicy.Overlapped`: `start`,
`pending`) gets the data order and the batch the checkpoint prepared for its step, and each
checkpoint saves the batch it has prepared for the next.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from sentijax import checkpoint, metrics, models, sharding
from sentijax.train import export
from sentijax.train import state as state_lib
from sentijax.train import step as step_lib

log = logging.getLogger("sentijax")

EvalHook = Callable[[int, Any], dict]  # (step, params) -> scalars to log
# Train metrics of distillation steps logged when present (train/kd.py, train/onpolicy.py,
# train/served.py).
DISTILL_METRICS = ("ce", "kd", "kd_support_mass", "rkl_token", "onpolicy_fraction",
                   "rollout_tokens_per_s", "rollout_length", "rollout_dropped",
                   "teacher_score_s", "teacher_requests", "teacher_retries", "rollout_lag")


class TrainingError(RuntimeError):
  pass


@dataclasses.dataclass
class Result:
  step: int
  params: Any
  train_losses: list[tuple[int, float]]
  val_losses: list[tuple[int, float]]
  preempted: bool = False


def _global_batch(local: dict[str, np.ndarray], batch_sh) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}


def held_out_loss(eval_fn, params, dataset, batch_size: int, num_batches: int, batch_sh) -> float:
  """Mean token NLL over the first `num_batches` val batches (fixed, so comparable over time)."""
  nll, tokens = 0.0, 0.0
  for i in range(num_batches):
    out = eval_fn(params, _global_batch(dataset.batch_at(i, batch_size), batch_sh))
    nll += float(out["nll_sum"])
    tokens += float(out["tokens"])
  return nll / max(tokens, 1.0)


# --------------------------------------------------------------------------- setup


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the other phases share: the mesh and rules, batch split, optimizer and shardings."""
  mesh: Any
  rules: Any
  batch_size: int
  num_micro: int
  log_every: int
  tx: Any
  schedule: Any
  target: Any  # the abstract state a checkpoint restores into
  state_sh: Any
  batch_sh: Any


def setup(config, model_cfg: models.ModelConfig) -> Setup:
  """Mesh (fsdp=0: sharded when big), optimizer and shardings; bad batch settings refused."""
  tc = config.train
  mesh = sharding.make_mesh(config.mesh, model_cfg=model_cfg)
  rules = config.sharding_rules
  batch_size, num_micro = int(tc.batch_size), int(tc.microbatches)
  divisor = sharding.batch_divisor(mesh, rules)
  if batch_size % num_micro or (batch_size // num_micro) % divisor:
    raise TrainingError(
        f"train.batch_size={batch_size} must split into train.microbatches={num_micro} "
        f"microbatches whose size is a multiple of {divisor}, the devices of the mesh axes "
        f"{sharding.batch_axes(rules)} that the 'batch' sharding rule splits batches over")
  log_every = int(tc.log_every)
  if log_every < 0:
    raise TrainingError(f"train.log_every={log_every} must be >= 0 (0 = never log train metrics)")
  if batch_size % jax.process_count():
    raise TrainingError(f"train.batch_size={batch_size} is not divisible by the "
                        f"{jax.process_count()} processes")
  tx = state_lib.make_optimizer(tc)
  target, state_sh = state_lib.abstract_state(model_cfg, tx, mesh, rules)
  return Setup(mesh, rules, batch_size, num_micro, log_every, tx,
               state_lib.learning_rate_schedule(tc), target, state_sh,
               sharding.batch_sharding(mesh, rules))


def restore(s: Setup, ckpt: checkpoint.Checkpointer, init_params: Callable[[Any, Any], Any],
            train_ds) -> tuple[Any, Any, int]:
  """(state, batch iterator, start step): resumed from the latest checkpoint (state and data
  position, into this run's mesh), or fresh params from `init_params(mesh, rules)`."""
  restored_data = None
  if ckpt.latest_step() is not None:
    state, restored_data, start = ckpt.restore(s.target)
    log.info("resumed from %s at step %d (%s rows read; saved by %s processes, now %d "
             "processes, %d devices)", ckpt.directory, start, restored_data.get("rows", "?"),
             restored_data.get("process_count", "?"), jax.process_count(), jax.device_count())
    if restored_data.get("fingerprint") not in (None, train_ds.stats.get("cache_key")):
      raise TrainingError(f"{ckpt.directory}: the checkpoint was trained on a different corpus "
                          f"or tokenisation; use a new workdir or the original data")
  else:
    params = init_params(s.mesh, s.rules)
    state = jax.jit(lambda p: state_lib.create_state(p, s.tx), out_shardings=s.state_sh)(params)
  start = int(jax.device_get(state.step))
  batches = train_ds.batches(s.batch_size, start_step=start, prefetch=train_ds.prefetch)
  if restored_data is not None:
    try:  # the data position saved with the state; refuses a changed batch size / seed / order
      batches.set_state({**restored_data, "step": start})
    except ValueError as e:
      raise TrainingError(f"{ckpt.directory}: {e}") from None
  return state, batches, start


def compile_steps(config, model_cfg: models.ModelConfig, s: Setup, loss_options) -> tuple:
  """(train_fn, eval_fn), jitted for this mesh. `loss_options` may be `(mesh, rules) -> them`
  (built on this mesh, e.g. an online teacher's sharded params)."""
  loss_chunk = int(config.train.loss_chunk)
  if callable(loss_options):
    loss_options = loss_options(s.mesh, s.rules)
  options = dict(loss_options or {})
  spec = step_lib.StepSpec(model_cfg, s.tx, s.num_micro, s.schedule, loss_chunk,
                           distill=options.pop("distill", None),
                           token_estimator=options.pop("token_estimator", False))
  train_fn = step_lib.jit_train_step(spec, sharding.Placement(s.mesh, s.rules), s.state_sh,
                                     s.batch_sh, **options)  # teacher, rollout
  return train_fn, step_lib.jit_eval_step(model_cfg, s.state_sh.params, s.batch_sh, loss_chunk)


# --------------------------------------------------------------------------- step, log, eval


class _Run:
  """The loop's mutable side: the state, its metrics, and the step whose results are read one
  step late (after the next step is dispatched, so the host never waits on the device)."""

  def __init__(self, config, s: Setup, state, fns: tuple, ckpt: checkpoint.Checkpointer,
               val_ds, eval_hooks: tuple[EvalHook, ...], flops: tuple[float, float]):
    self.tc, self.s, self.state, (self.train_fn, self.eval_fn) = config.train, s, state, fns
    self.ckpt, self.val_ds, self.eval_hooks = ckpt, val_ds, eval_hooks
    self.flops_per_token, self.teacher_flops_per_token = flops
    self.writer = metrics.MetricWriter(Path(config.workdir) / "tensorboard")
    self.train_losses: list[tuple[int, float]] = []
    self.val_losses: list[tuple[int, float]] = []
    self.pending = None  # (step, metrics, tokens) of the previous step
    self.throughput = metrics.Throughput()  # training steps only (no compile/eval/save)
    self.peak = metrics.peak_tflops_per_device(float(self.tc.peak_tflops))
    if self.peak is None:
      log.info("MFU not reported: no peak FLOP/s known for device kind %r (set "
               "train.peak_tflops)", jax.devices()[0].device_kind)
    self.bar = tqdm(total=int(self.tc.steps), initial=int(jax.device_get(state.step)),
                    desc=f"train {config.job}", disable=jax.process_index() != 0,
                    dynamic_ncols=True)

  def evaluate(self, step: int) -> None:
    """Held-out loss and the eval hooks' scalars, logged under eval/."""
    loss = held_out_loss(self.eval_fn, self.state.params, self.val_ds, self.s.batch_size,
                         int(self.tc.eval_batches), self.s.batch_sh)
    self.val_losses.append((step, loss))
    scalars = {"loss": loss}
    for hook in self.eval_hooks:
      scalars.update(hook(step, self.state.params))
    self.writer.write(step, scalars, prefix="eval/")

  def finish_pending(self) -> None:
    """Reads the previous step's metrics (blocking: the throughput clock sees real time);
    a non-finite loss stops training."""
    if self.pending is None:
      return
    (step, m, tokens), self.pending = self.pending, None
    m = jax.device_get(m)
    if int(m["nonfinite"]):
      raise TrainingError(
          f"non-finite loss/gradient at step {step} (loss={float(m['loss'])}); the update was "
          f"skipped and training stopped. Last good checkpoint: step "
          f"{self.ckpt.latest_step()} in {self.ckpt.directory}. Lower train.learning_rate or "
          f"check the data.")
    self.train_losses.append((step, float(m["loss"])))
    self.bar.set_postfix(loss=f"{float(m['loss']):.4f}")
    if self.throughput.running:
      self.throughput.add(tokens)
    if self.s.log_every and (step % self.s.log_every == 0 or step == int(self.tc.steps)):
      self.writer.write(step, self.train_scalars(m), prefix="train/")

  def train_scalars(self, m: dict) -> dict:
    """Loss, learning rate, grad norm, distillation terms; tokens/s, TFLOP/s and MFU once a
    step has been timed (the first one compiles)."""
    scalars = {"loss": m["loss"], "learning_rate": m["learning_rate"],
               "grad_norm": m["grad_norm"]}
    scalars.update({k: m[k] for k in DISTILL_METRICS if k in m})
    tok_s, n = self.throughput.read(), jax.device_count()
    if tok_s is not None:
      fpt, tfpt, peak = self.flops_per_token, self.teacher_flops_per_token, self.peak
      scalars.update(tokens_per_s=tok_s, tokens_per_s_per_device=tok_s / n,
                     tflops_per_device=tok_s * fpt / n / 1e12,
                     mfu=metrics.mfu(tok_s, fpt, n, peak))
      if tfpt:
        scalars.update(teacher_tflops_per_device=tok_s * tfpt / n / 1e12,
                       teacher_mfu=metrics.mfu(tok_s, tfpt, n, peak))
    return scalars

  def step(self, step: int, local: dict) -> int:
    """Dispatches one train step, then reads the previous one; the first step (which compiled)
    is read at once, untimed, and starts the throughput clock."""
    tokens = int(np.count_nonzero(local["segment_ids"])) * jax.process_count()
    self.state, m = self.train_fn(self.state, _global_batch(local, self.s.batch_sh))
    self.finish_pending()
    self.pending = (step + 1, m, tokens)
    self.bar.update(1)
    return step + 1

  def paused(self, fn: Callable[[], Any]) -> Any:
    """Runs `fn` (eval, checkpoint) after reading the pending step, off the throughput clock."""
    self.finish_pending()  # never evaluate or checkpoint a state not checked for NaN
    self.throughput.pause()
    out = fn()
    self.throughput.resume()
    return out

  def loop(self, start: int, batches, data_state: Callable[[], dict]) -> tuple[int, bool]:
    """Steps from `start` to train.steps: (last step, preempted)."""
    tc, has_val = self.tc, self.val_ds is not None and bool(self.tc.eval_every)
    if has_val and start == 0:  # the baseline the curve falls from
      self.evaluate(0)
    step, preempted = start, False
    while step < int(tc.steps):
      step = self.step(step, next(batches))
      if step == start + 1:
        self.finish_pending()
        self.throughput.resume()
      if has_val and step % int(tc.eval_every) == 0:
        self.paused(lambda: self.evaluate(step))
      preempted = self.ckpt.preempted(step)  # every step on every host (multi-host: agreed)
      if preempted:
        self.finish_pending()
        self.save(step, data_state())
        log.warning("preemption signal: saved step %d, exiting", step)
        break
      if step % self.ckpt.every == 0:
        self.paused(lambda: self.save(step, data_state()))
    self.finish_pending()
    if self.val_ds is not None and not preempted and (not self.val_losses
                                                      or self.val_losses[-1][0] != step):
      self.evaluate(step)
    self.save(step, data_state())
    return step, preempted

  def save(self, step: int, data_state: dict) -> None:
    """A checkpoint of `step`, with the batch a pipelined step function prepared for it
    (`onpolicy.Overlapped.pending`)."""
    get = getattr(self.train_fn, "pending", None)
    ready = get() if get is not None else None
    pending = None
    if ready is not None and ready[0] == step:
      pending = ready[1], {"step": step, "metrics": {k: float(v) for k, v in ready[2].items()}}
    self.ckpt.save(step, self.state, data_state, force=True, pending=pending)

  def close(self) -> None:
    self.bar.close()
    self.ckpt.close()
    self.writer.close()


# --------------------------------------------------------------------------- the loop


def train(config, model_cfg: models.ModelConfig, init_params: Callable[[Any, Any], Any],
          train_ds, val_ds=None, *, tokenizer=None, eval_hooks: tuple[EvalHook, ...] = (),
          loss_options: dict | Callable[[Any, Any], dict] | None = None,
          teacher_flops_per_token: float = 0.0) -> Result:
  """Runs (or resumes) training in `config.workdir`.

  `init_params(mesh, rules)` returns sharded fp32 params for a fresh run (HF import or random).
  `eval_hooks` run with the held-out loss: at step 0 (the baseline), every `train.eval_every`
  steps and at the end. `loss_options`: extra `step.jit_train_step` arguments (distill,
  teacher), or `(mesh, rules) -> them`. `teacher_flops_per_token`: forward FLOPs
  per token of an online teacher, logged apart from the student's training FLOPs
  (`teacher_tflops_per_device`, `teacher_mfu`).
  `train_ds` / `val_ds` are `sentijax.data.dataset.PackedDataset`s.
  """
  workdir = Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  s = setup(config, model_cfg)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every=config.checkpoint.every,
                                 keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
  state, batches, start = restore(s, ckpt, init_params, train_ds)
  fns = compile_steps(config, model_cfg, s, loss_options)
  if hasattr(fns[0], "start"):  # a pipelined step (onpolicy.Overlapped): data order and the
    restored = None             # batch the checkpoint prepared for this step
    if ckpt.latest_step() == start:
      restored = ckpt.restore_pending(start, s.batch_sh)
      log.info("step %d: %s", start, "the batch prepared before the checkpoint restored"
               if restored else "no prepared batch in the checkpoint: sampled now")
    fns[0].start(lambda i: train_ds.batch_at(i, s.batch_size), int(config.train.steps),
                 restored and (start, restored[0], restored[1]["metrics"]))
  fingerprint = train_ds.stats.get("cache_key")
  run = _Run(config, s, state, fns, ckpt, val_ds, eval_hooks,
             (model_cfg.flops_per_token(train_ds.seq_len), teacher_flops_per_token))
  ckpt.install_sigterm_handler()  # one process: Python handler; several: JAX preemption sync
  try:
    step, preempted = run.loop(start, batches,
                               lambda: {**batches.get_state(), "fingerprint": fingerprint})
  finally:
    run.close()
  if config.export_hf and not preempted:
    out = models.save_hf(model_cfg, run.state.params, workdir / "hf", tokenizer=tokenizer)
    if jax.process_index() == 0:
      export.copy_provenance(workdir, out)
    log.info("exported HF checkpoint to %s", out)
  return Result(step, run.state.params, run.train_losses, run.val_losses, preempted)
