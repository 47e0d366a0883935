"""The student: model config, tokenizer and param initialiser from `config.model`."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import jax

from sentijax import models
from sentijax.data import tokenizer as tokenizer_lib

log = logging.getLogger("sentijax")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Where the student's weights come from: the `model` keys that build it, read once."""
  init: str  # HF directory, "" = random init of `preset`
  init_layers: tuple[int, ...] | None  # decoder layers of `init` kept (None = all)
  preset: str
  dtype: str
  remat: bool
  attention_chunk: int

  @classmethod
  def from_config(cls, config) -> "ModelSpec":
    mc = config.model
    return cls(init=str(mc.init or ""), init_layers=_parse_layers(mc.init_layers, mc.init),
               preset=str(mc.preset), dtype=str(mc.dtype), remat=bool(mc.remat),
               attention_chunk=int(mc.attention_chunk))


def _parse_layers(value: str, init: str) -> tuple[int, ...] | None:
  """`model.init_layers` ("0,3,6"; "" = all) as layer indices; range checks need the checkpoint
  (models.hf.select_layers)."""
  text = str(value or "").strip()
  if not text:
    return None
  if not init:
    raise ValueError(f"model.init_layers={text!r} selects layers of model.init, which is not "
                     f"set: give --config.model.init=HF_DIR, or clear model.init_layers for a "
                     f"random init of model.preset")
  out = []
  for tok in text.split(","):
    try:
      out.append(int(tok.strip()))
    except ValueError:
      raise ValueError(f"model.init_layers={text!r}: {tok.strip()!r} is not a layer index; "
                       f"give a comma list of layer indices of {init}, e.g. 0,3,6") from None
  return tuple(out)


def model_config(config) -> models.ModelConfig:
  """From `model.init` (an HF dir; only `model.init_layers` when set) or `model.preset`, with
  dtype and remat from the config."""
  spec = ModelSpec.from_config(config)
  if spec.init:
    cfg = models.hf.read_config(spec.init)
    if spec.init_layers is not None:
      cfg = models.hf.select_layers(cfg, spec.init_layers, setting="model.init_layers",
                                    source=Path(spec.init) / "config.json")
  else:
    cfg = models.presets.get(spec.preset)
  return cfg.replace(dtype=models.resolve_dtype(spec.dtype), param_dtype="float32",
                     remat=spec.remat, attention_chunk=spec.attention_chunk)


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
  spec = ModelSpec.from_config(config)

  def init(mesh, rules):
    if spec.init:
      cfg, params = models.load_hf(spec.init, dtype="float32", mesh=mesh, rules=rules,
                                   layers=spec.init_layers)
      if cfg.num_layers != model_cfg.num_layers:
        raise ValueError(f"{spec.init}: loaded {cfg.num_layers} layers, the student config has "
                         f"{model_cfg.num_layers}; build it with student.model_config")
      return params
    return models.init(model_cfg, config.seed, mesh=mesh, rules=rules)
  return init
