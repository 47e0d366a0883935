"""Orbax checkpoints of the train state plus the data position: async, keep-N, resumable.

Orbax writes each step into a temporary directory and renames it when complete, so a job killed
mid-save resumes from the last complete checkpoint. A checkpoint restores into any mesh: the
arrays are read into the target shardings, so a run saved by N processes / D devices resumes on
M processes / E devices.

Preemption (SIGTERM):
- one process: a Python SIGTERM handler sets a flag the loop polls; it saves at the current step,
  waits for the write and exits cleanly.
- several processes: every host must save the SAME step (the save has barriers) and a host
  seeing SIGTERM cannot just stop at its own step. `jax.distributed.initialize` starts JAX's
  preemption service, whose C++ SIGTERM notifier tells all hosts; `reached_preemption_sync_point`
  then turns True on every host at one agreed step. No Python handler is installed there (it
  would replace the notifier and each host would stop at a different step: a deadlock).
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers


class CheckpointError(RuntimeError):
  pass


_polls = 0


def _next_poll() -> int:
  """1, 2, 3, ... over the whole process (every host polls once per step, in lock-step).

  JAX's sync point is (largest counter any host passed so far, 0 before the first poll) + 1. A
  resumed run passing its training step (k + 1, ...) would never meet a sync point of 1 set by a
  SIGTERM during start-up; a per-process poll count always reaches it, also across the stages of
  one process (pipeline) where the training step starts again from 0.
  """
  global _polls
  _polls += 1
  return _polls


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, except that it never polls JAX's preemption sync point itself.

  Orbax asks `reached_preemption(step)` inside `save` and again in its background finalize
  thread; each such call would overwrite JAX's per-host call counter with a training step and
  could move the agreed sync point. Only `Checkpointer.preempted` polls; Orbax gets its answer.
  """
  preempted_at: int | None = None

  def reached_preemption(self, step: int) -> bool:
    return self.preempted_at == step


class Checkpointer:
  """Saves `{"state": pytree, "data": json}` (and optionally a `pending` batch) every `every`
  steps into `directory`."""

  def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.every = max(int(every), 1)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(n=max(int(keep), 1)),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "pending": ocp.StandardCheckpointHandler(),
                "pending_meta": ocp.JsonCheckpointHandler()}  # known to item_metadata
    self.manager = _Manager(self.directory, options=options, item_handlers=handlers)
    self._preempted = threading.Event()
    self._old_handler = None

  # -- preemption ---------------------------------------------------------------------------

  def install_sigterm_handler(self) -> None:
    """Makes SIGTERM a preemption notice: a Python handler on one process, JAX's preemption
    service (checked here) on several."""
    if jax.process_count() > 1:
      if not jax.distributed.is_initialized():
        raise CheckpointError(
            f"{jax.process_count()} processes but jax.distributed is not initialized: a SIGTERM "
            f"could not be agreed on by all hosts. Run with --config.distributed.enabled=True.")
      if not jax.config.jax_enable_preemption_service:
        raise CheckpointError(
            "jax_enable_preemption_service is off: on several processes a SIGTERM could not be "
            "synchronised across hosts. Leave JAX_ENABLE_PREEMPTION_SERVICE unset (default on).")
      if callable(signal.getsignal(signal.SIGTERM)):
        raise CheckpointError(
            "a Python SIGTERM handler is installed on a multi-process run: it replaces the "
            "notifier of JAX's preemption service, and hosts would stop at different steps. "
            f"Remove the handler ({signal.getsignal(signal.SIGTERM)!r}).")
      return
    if threading.current_thread() is not threading.main_thread():
      return
    self._old_handler = signal.signal(signal.SIGTERM, lambda *_: self._preempted.set())

  def preempted(self, step: int) -> bool:
    """Whether to save and stop after `step`. Call it after every step, on every process: on
    several processes it is True on all of them at the same (agreed) step."""
    if jax.process_count() > 1:  # agreed on poll counts, equal on all hosts (see _next_poll)
      hit = bool(multihost_utils.reached_preemption_sync_point(_next_poll()))
    else:
      hit = self._preempted.is_set()
    if hit:
      self.manager.preempted_at = step
    return hit

  # -- save / restore -----------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, force: bool = False,
           pending: tuple[dict, dict] | None = None) -> bool:
    """`pending`: (arrays, JSON metadata) saved with the state in the same checkpoint (a
    batch prepared for the next step: `restore_pending`)."""
    if not force and step % self.every:
      return False
    if step in (self.manager.all_steps() or []):
      return False
    items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state)}
    if pending is not None:
      items |= {"pending": ocp.args.StandardSave(pending[0]),
                "pending_meta": ocp.args.JsonSave(pending[1])}
    return self.manager.save(step, args=ocp.args.Composite(**items),
                             force=True)  # `every` is decided above, not by Orbax's policy

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores into the shardings of `abstract_state` (jax.ShapeDtypeStruct leaves)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no complete checkpoint to resume from")
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"] or {}), step

  def restore_pending(self, step: int, sharding: Any) -> tuple[dict, dict] | None:
    """(arrays, metadata) saved as `pending` at `step`, the arrays read into `sharding` (any
    mesh: Orbax reshards); None when that checkpoint holds none."""
    meta = self.manager.item_metadata(step)
    if meta.get("pending") is None:
      return None
    tree = getattr(meta["pending"], "tree", meta["pending"])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          tree)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        pending=ocp.args.StandardRestore(target), pending_meta=ocp.args.JsonRestore()))
    return dict(restored["pending"]), dict(restored["pending_meta"])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    if self._old_handler is not None:
      signal.signal(signal.SIGTERM, self._old_handler)
      self._old_handler = None

