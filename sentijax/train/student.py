"""The student: model config, tokenizer and param initialiser from `config.model`."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import jax

from sentijax import models
from sentijax.data import tokenizer as tokenizer_lib

log = logging.getLogger("sentijax")


def model_config(config) -> models.ModelConfig:
  """From `model.init` (an HF dir) or `model.preset`, with dtype and remat from the config."""
  mc = config.model
  cfg = models.hf.read_config(mc.init) if mc.init else models.presets.get(mc.preset)
  return cfg.replace(dtype=models.resolve_dtype(mc.dtype), param_dtype="float32", remat=bool(mc.remat),
                     attention_chunk=int(mc.attention_chunk))


def tokenizer(config, model_cfg: models.ModelConfig, texts: Callable[[], Iterable[str]]) -> Any:
  """`model.tokenizer`, else the tokenizer of `model.init`, else one trained on the corpus.

  The trained one (vocab = the preset's vocab size) is saved in <workdir>/tokenizer and reused
  on resume, so an offline machine needs no download.
  """
  mc = config.model
  source = mc.tokenizer or mc.init
  if source:
    tok = tokenizer_lib.load_tokenizer(source)
  else:
    out = Path(config.workdir) / "tokenizer"
    if (out / "tokenizer.json").is_file():
      tok = tokenizer_lib.load_tokenizer(out)
    else:
      log.info("no model.tokenizer: training a %d-token BPE tokenizer on the corpus into %s",
               model_cfg.vocab_size, out)
      # Every host trains the same tokenizer (deterministic) in a private dir; the first rename
      # wins, so no host ever reads a half-written tokenizer.
      tmp = out.with_name(f"{out.name}.tmp-{jax.process_index()}-{os.getpid()}")
      tok = tokenizer_lib.train_tokenizer(texts(), model_cfg.vocab_size, tmp)
      try:
        os.rename(tmp, out)
      except OSError:  # another host got there first: same content
        shutil.rmtree(tmp, ignore_errors=True)
  models.check_tokenizer(model_cfg, tok, where=str(source or "trained tokenizer"))
  return tok


def param_initializer(config, model_cfg: models.ModelConfig) -> Callable[[Any, Any], Any]:
  """(mesh, rules) -> sharded fp32 params: HF weights streamed into place, or a random init."""
  def init(mesh, rules):
    if config.model.init:
      _, params = models.load_hf(config.model.init, dtype="float32", mesh=mesh, rules=rules)
      return params
    return models.init(model_cfg, config.seed, mesh=mesh, rules=rules)
  return init
