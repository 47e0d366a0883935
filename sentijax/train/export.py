"""Export a training checkpoint to an HF directory (transformers / vLLM load it).

Training writes `<workdir>/student/` (config.json + tokenizer, no weights) when it starts; this
job restores the params of a checkpoint in `<workdir>/checkpoints` and writes the weights next to
that spec, so a run interrupted before its final export, or any kept step, can be exported.
"""
from __future__ import annotations

import logging
from pathlib import Path

from sentijax import checkpoint, models, sharding
from sentijax.data import tokenizer as tokenizer_lib
from sentijax.models import hf
from sentijax.train import state as state_lib

log = logging.getLogger("sentijax")

SPEC_DIR = "student"


def save_student_spec(model_cfg: models.ModelConfig, tokenizer, workdir: str | Path) -> Path:
  """Writes <workdir>/student/{config.json, tokenizer files}: everything but the weights."""
  out = Path(workdir) / SPEC_DIR
  out.mkdir(parents=True, exist_ok=True)
  hf.save_config(model_cfg, out)
  tokenizer.save_pretrained(str(out))
  return out


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
  mesh = sharding.make_mesh(config.mesh)
  tx = state_lib.make_optimizer(config.train)  # only its state structure matters here
  target, _ = state_lib.abstract_state(model_cfg, tx, mesh, config.sharding_rules)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every=1, keep=1_000_000,
                                 async_save=False)
  try:
    state, _, step = ckpt.restore(target, step=int(config.export.step) or None)
  finally:
    ckpt.close()
  out = Path(config.export.dir or workdir / "hf")
  models.save_hf(model_cfg, state.params, out, tokenizer=tok,
                 dtype=config.export.dtype or "float32")
  log.info("exported step %d of %s to %s", step, workdir, out)
  return out
