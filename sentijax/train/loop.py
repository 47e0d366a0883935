"""The training loop shared by KnowDist and ICLDist.

Recipe: mesh -> optimizer -> state (restored from the latest checkpoint, or fresh) -> jitted step
-> loop over deterministic batches from the restored data position, logging, evaluating,
checkpointing (every N steps, on SIGTERM, at the end) -> optional HF export.
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
from sentijax.train import state as state_lib
from sentijax.train import step as step_lib

log = logging.getLogger("sentijax")

EvalHook = Callable[[int, Any], dict]  # (step, params) -> scalars to log
# Train metrics of distillation steps logged when present (train/kd.py, train/onpolicy.py).
DISTILL_METRICS = ("ce", "kd", "kd_support_mass", "rkl_token", "onpolicy_fraction",
                   "rollout_tokens_per_s", "rollout_length", "rollout_dropped")


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
  tc = config.train
  workdir = Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)

  # ---- Mesh, optimizer, shardings ----------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh, model_cfg=model_cfg)  # fsdp=0: sharded when big
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
  schedule = state_lib.learning_rate_schedule(tc)
  target, state_sh = state_lib.abstract_state(model_cfg, tx, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)

  # ---- State: resume or start ----------------------------------------------------------------
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every=config.checkpoint.every,
                                 keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
  restored_data = None
  if ckpt.latest_step() is not None:
    state, restored_data, start = ckpt.restore(target)  # into this run's mesh and shardings
    log.info("resumed from %s at step %d (%s rows read; saved by %s processes, now %d "
             "processes, %d devices)", ckpt.directory, start, restored_data.get("rows", "?"),
             restored_data.get("process_count", "?"), jax.process_count(), jax.device_count())
    if restored_data.get("fingerprint") not in (None, train_ds.stats.get("cache_key")):
      raise TrainingError(f"{ckpt.directory}: the checkpoint was trained on a different corpus "
                          f"or tokenisation; use a new workdir or the original data")
  else:
    params = init_params(mesh, rules)
    state = jax.jit(lambda p: state_lib.create_state(p, tx), out_shardings=state_sh)(params)
  start = int(jax.device_get(state.step))
  batches = train_ds.batches(batch_size, start_step=start, prefetch=train_ds.prefetch)
  if restored_data is not None:
    try:  # the data position saved with the state; refuses a changed batch size / seed / order
      batches.set_state({**restored_data, "step": start})
    except ValueError as e:
      raise TrainingError(f"{ckpt.directory}: {e}") from None

  loss_chunk = int(tc.loss_chunk)
  if callable(loss_options):  # built on this mesh (e.g. an online teacher's sharded params)
    loss_options = loss_options(mesh, rules)
  train_fn = step_lib.jit_train_step(model_cfg, tx, state_sh, batch_sh, num_micro, schedule, mesh,
                                     loss_chunk, rules=rules, **(loss_options or {}))
  eval_fn = step_lib.jit_eval_step(model_cfg, state_sh.params, batch_sh, loss_chunk)
  writer = metrics.MetricWriter(workdir / "tensorboard")
  flops_per_token = model_cfg.flops_per_token(train_ds.seq_len)
  peak = metrics.peak_tflops_per_device(float(tc.peak_tflops))
  if peak is None:
    log.info("MFU not reported: no peak FLOP/s known for device kind %r (set train.peak_tflops)",
             jax.devices()[0].device_kind)
  fingerprint = train_ds.stats.get("cache_key")

  def data_state() -> dict:
    return {**batches.get_state(), "fingerprint": fingerprint}

  # ---- Loop ----------------------------------------------------------------------------------
  ckpt.install_sigterm_handler()  # one process: Python handler; several: JAX preemption sync
  train_losses, val_losses = [], []
  pending = None  # (step, metrics, tokens) of the previous step, read after the next dispatch
  throughput = metrics.Throughput()  # runs during training steps only (no compile/eval/save)
  preempted = False
  bar = tqdm(total=int(tc.steps), initial=start, desc=f"train {config.job}",
             disable=jax.process_index() != 0, dynamic_ncols=True)

  def evaluate(step: int, hooks: tuple[EvalHook, ...] = ()) -> None:
    loss = held_out_loss(eval_fn, state.params, val_ds, batch_size, int(tc.eval_batches),
                         batch_sh)
    val_losses.append((step, loss))
    scalars = {"loss": loss}
    for hook in hooks:
      scalars.update(hook(step, state.params))
    writer.write(step, scalars, prefix="eval/")

  def finish_step(step: int, m: dict, tokens: int) -> None:
    m = jax.device_get(m)  # blocks until the step has run: the throughput clock sees real time
    if int(m["nonfinite"]):
      raise TrainingError(
          f"non-finite loss/gradient at step {step} (loss={float(m['loss'])}); the update was "
          f"skipped and training stopped. Last good checkpoint: step {ckpt.latest_step()} in "
          f"{ckpt.directory}. Lower train.learning_rate or check the data.")
    train_losses.append((step, float(m["loss"])))
    bar.set_postfix(loss=f"{float(m['loss']):.4f}")
    if throughput.running:
      throughput.add(tokens)
    if log_every and (step % log_every == 0 or step == int(tc.steps)):
      scalars = {"loss": m["loss"], "learning_rate": m["learning_rate"],
                 "grad_norm": m["grad_norm"]}
      scalars.update({k: m[k] for k in DISTILL_METRICS if k in m})
      tok_s, n = throughput.read(), jax.device_count()
      if tok_s is not None:  # None: no step timed yet (the first one compiles)
        scalars.update(tokens_per_s=tok_s, tokens_per_s_per_device=tok_s / n,
                       tflops_per_device=tok_s * flops_per_token / n / 1e12,
                       mfu=metrics.mfu(tok_s, flops_per_token, n, peak))
        if teacher_flops_per_token:
          scalars.update(teacher_tflops_per_device=tok_s * teacher_flops_per_token / n / 1e12,
                         teacher_mfu=metrics.mfu(tok_s, teacher_flops_per_token, n, peak))
      writer.write(step, scalars, prefix="train/")

  step = start
  try:
    if val_ds is not None and tc.eval_every and start == 0:  # the baseline the curve falls from
      evaluate(0, eval_hooks)
    while step < int(tc.steps):
      local = next(batches)
      tokens = int(np.count_nonzero(local["segment_ids"])) * jax.process_count()
      state, m = train_fn(state, _global_batch(local, batch_sh))
      if pending is not None:
        finish_step(*pending)
      step += 1
      pending = (step, m, tokens)
      bar.update(1)
      if step == start + 1:  # this call compiled the step: finish it untimed, then start the clock
        finish_step(*pending)
        pending = None
        throughput.resume()

      if val_ds is not None and tc.eval_every and step % int(tc.eval_every) == 0:
        if pending is not None:
          finish_step(*pending)
          pending = None
        throughput.pause()
        evaluate(step, eval_hooks)
        throughput.resume()
      preempted = ckpt.preempted(step)  # every step on every host (multi-host: agreed step)
      if step % ckpt.every == 0 or preempted:
        if pending is not None:
          finish_step(*pending)  # never checkpoint a state we have not checked for NaN
          pending = None
        throughput.pause()
        ckpt.save(step, state, data_state(), force=True)
        if preempted:
          log.warning("preemption signal: saved step %d, exiting", step)
          break
        throughput.resume()
    if pending is not None:
      finish_step(*pending)
    if val_ds is not None and not preempted and (not val_losses or val_losses[-1][0] != step):
      evaluate(step, eval_hooks)
    ckpt.save(step, state, data_state(), force=True)
  finally:
    bar.close()
    ckpt.close()
    writer.close()

  if config.export_hf and not preempted:
    out = models.save_hf(model_cfg, state.params, workdir / "hf", tokenizer=tokenizer)
    log.info("exported HF checkpoint to %s", out)
  return Result(step, state.params, train_losses, val_losses, preempted)
