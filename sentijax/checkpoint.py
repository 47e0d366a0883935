"""Orbax checkpoints of the train state plus the data position: async, keep-N, resumable.

Orbax writes each step into a temporary directory and renames it when complete, so a job killed
mid-save resumes from the last complete checkpoint. SIGTERM (preemption) sets a flag the loop
polls: it saves at the current step, waits for the write, and exits cleanly.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class Checkpointer:
  """Saves `{"state": pytree, "data": json}` every `every` steps into `directory`."""

  def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.every = max(int(every), 1)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(n=max(int(keep), 1)),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._preempted = threading.Event()
    self._old_handler = None

  # -- preemption ---------------------------------------------------------------------------

  def install_sigterm_handler(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    self._old_handler = signal.signal(signal.SIGTERM, lambda *_: self._preempted.set())

  def preempted(self, step: int) -> bool:
    """True when this process got SIGTERM or (multi-host) any host reached preemption."""
    if self._preempted.is_set():
      return True
    try:
      return bool(self.manager.reached_preemption(step))
    except Exception:  # no distributed preemption service: single-process runs
      return False

  # -- save / restore -----------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
    if not force and step % self.every:
      return False
    if step in (self.manager.all_steps() or []):
      return False
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)),
        force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores into the shardings of `abstract_state` (jax.ShapeDtypeStruct leaves)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no complete checkpoint to resume from")
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"] or {}), step

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    if self._old_handler is not None:
      signal.signal(signal.SIGTERM, self._old_handler)
      self._old_handler = None

