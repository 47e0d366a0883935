"""Export a training checkpoint to an HF directory (transformers / vLLM load it).

Training writes `<workdir>/student/` (config.json + tokenizer, no weights) when it starts; this
job restores the params of a checkpoint in `<workdir>/checkpoints` and writes the weights next to
that spec, so a run interrupted before its final export, or any kept step, can be exported.

Memory: only the params are read (an Orbax partial restore: the optimizer moments, 2x the params,
stay on disk), sharded over the mesh; `models.save_hf` then gathers one tensor at a time.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sentijax import models, sharding
from sentijax.data import tokenizer as tokenizer_lib
from sentijax.models import hf

log = logging.getLogger("sentijax")

SPEC_DIR = "student"
GENERATION_CONFIG = "generation_config.json"
# What travels with the weights: the generation config training started from (in the student
# spec) and what the run trained on (the sentibench job reads it from model.init and marks the
# SentiBench tasks the student saw in training, eval/job.py).
PROVENANCE = (f"{SPEC_DIR}/{GENERATION_CONFIG}", "heldout_audit.json")


def copy_provenance(workdir: str | Path, out: str | Path) -> list[Path]:
  """Copies the run's provenance files (`PROVENANCE`) from `workdir` into the export `out`."""
  copied = []
  for rel in PROVENANCE:
    if (Path(workdir) / rel).is_file():
      dest = Path(out) / Path(rel).name
      copied.append(Path(shutil.copyfile(Path(workdir) / rel, dest)))
  return copied


def save_student_spec(model_cfg: models.ModelConfig, tokenizer, workdir: str | Path,
                      init: str | Path = "") -> Path:
  """Writes <workdir>/student/{config.json, tokenizer files}: everything but the weights, and
  the generation config of `init` (the HF dir training started from) when it has one: its eos
  ids and repetition penalty are part of how SentiBench scores the model (eval/generation.py)."""
  out = Path(workdir) / SPEC_DIR
  out.mkdir(parents=True, exist_ok=True)
  hf.save_config(model_cfg, out)
  tokenizer.save_pretrained(str(out))
  if init and (Path(init) / GENERATION_CONFIG).is_file():
    shutil.copyfile(Path(init) / GENERATION_CONFIG, out / GENERATION_CONFIG)
  return out


def params_target(model_cfg: models.ModelConfig, mesh, rules) -> dict:
  """The restore target `{"params": ShapeDtypeStructs with their shardings}`: nothing else."""
  shardings = models.shardings_for(model_cfg, mesh, rules)
  shapes = models.param_shapes(model_cfg)
  return {"params": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 shapes, shardings)}


def restore_params(checkpoints: str | Path, target: dict, step: int | None = None
                   ) -> tuple[Any, int]:
  """(params, step) of `step` (None = latest) under `checkpoints`, read into `target`'s
  shardings; the rest of the train state (optimizer moments, step) is not read."""
  checkpoints = Path(checkpoints).absolute()
  manager = ocp.CheckpointManager(checkpoints,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    steps = list(manager.all_steps())
    step = manager.latest_step() if step is None else step
    if step is None or step not in steps:
      raise FileNotFoundError(f"{checkpoints}: no complete checkpoint "
                              f"{'' if step is None else f'for step {step} '}(steps: {steps})")
    args = ocp.args.PyTreeRestore(item=target,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=args))
  finally:
    manager.close()
  return restored["state"]["params"], step


def run(config) -> Path:
  """Restores `export.step` (0 = latest) from `workdir` and writes `export.dir`."""
  workdir = Path(config.workdir)
  spec = workdir / SPEC_DIR
  if not (spec / "config.json").is_file():
    raise FileNotFoundError(f"{spec / 'config.json'}: not found; --config.workdir must be a "
                            f"training run directory (KnowDist writes it when it starts)")
  model_cfg = hf.read_config(spec).replace(dtype=models.resolve_dtype(config.model.dtype),
                                           param_dtype="float32")
  tok = tokenizer_lib.load_tokenizer(spec)
  mesh = sharding.make_mesh(config.mesh, model_cfg=model_cfg)
  target = params_target(model_cfg, mesh, config.sharding_rules)
  params, step = restore_params(workdir / "checkpoints", target,
                                step=int(config.export.step) or None)
  out = Path(config.export.dir or workdir / "hf")
  models.save_hf(model_cfg, params, out, tokenizer=tok, dtype=config.export.dtype or "float32")
  copy_provenance(workdir, out)
  log.info("exported step %d of %s to %s", step, workdir, out)
  return out
