"""The one place a model (config, params, tokenizer) is built from `config.model`.

Used by training (the student), the local teacher, the serve job and the sentibench job, so
`model.init`, `model.init_layers`, `model.preset`, `model.dtype`, `model.remat`,
`model.attention_chunk` and `model.tokenizer` mean the same thing everywhere.

    cfg = factory.model_config(config)                 # training: fp32 params
    cfg = factory.model_config(config, training=False)  # inference: params in model.dtype
    tok = factory.tokenizer(config, cfg, corpus_texts)
    params = factory.param_initializer(config, cfg)(mesh, rules)
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import jax

from sentijax.data import tokenizer as tokenizer_lib
from sentijax.models import check_tokenizer, hf, init, load_hf, presets, resolve_dtype
from sentijax.models.decoder import ModelConfig

log = logging.getLogger("sentijax")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Where a model's weights come from: the `model` keys that build it, read once."""
  init: str  # HF directory, "" = random init of `preset`
  init_layers: tuple[int, ...] | None  # decoder layers of `init` kept (None = all)
  preset: str
  dtype: str
  remat: bool
  attention_chunk: int
  tokenizer: str

  @classmethod
  def from_config(cls, config) -> "ModelSpec":
    mc = config.model
    return cls(init=str(mc.init or ""), init_layers=_parse_layers(mc.init_layers, mc.init),
               preset=str(mc.preset), dtype=str(mc.dtype), remat=bool(mc.remat),
               attention_chunk=int(mc.attention_chunk), tokenizer=str(mc.tokenizer or ""))


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


def model_config(config, *, training: bool = True) -> ModelConfig:
  """From `model.init` (an HF dir; only `model.init_layers` when set) or `model.preset`.

  Compute dtype `model.dtype`; params float32 for training (the optimizer's master copy), else
  in `model.dtype` with no remat (inference)."""
  spec = ModelSpec.from_config(config)
  if spec.init:
    cfg = hf.read_config(spec.init)
    if spec.init_layers is not None:
      cfg = hf.select_layers(cfg, spec.init_layers, setting="model.init_layers",
                             source=Path(spec.init) / "config.json")
  else:
    cfg = presets.get(spec.preset)
  dtype = resolve_dtype(spec.dtype)
  return cfg.replace(dtype=dtype, param_dtype="float32" if training else dtype,
                     remat=spec.remat and training, attention_chunk=spec.attention_chunk)


def tokenizer(config, model_cfg: ModelConfig,
              texts: Callable[[], Iterable[str]] | None = None) -> Any:
  """`model.tokenizer`, else the tokenizer of `model.init`, else one trained on `texts()`.

  The trained one (vocab = the preset's vocab size) is saved in <workdir>/tokenizer and reused
  on resume, so an offline machine needs no download.
  """
  spec = ModelSpec.from_config(config)
  source = spec.tokenizer or spec.init
  if source:
    tok = tokenizer_lib.load_tokenizer(source)
  else:
    tok = _trained_tokenizer(Path(config.workdir) / "tokenizer", model_cfg.vocab_size, texts)
  check_tokenizer(model_cfg, tok, where=str(source or "trained tokenizer"))
  return tok


def _trained_tokenizer(out: Path, vocab_size: int,
                       texts: Callable[[], Iterable[str]] | None) -> Any:
  if (out / "tokenizer.json").is_file():
    return tokenizer_lib.load_tokenizer(out)
  if texts is None:
    raise ValueError("no model.tokenizer and no model.init: set --config.model.tokenizer=DIR "
                     "(or model.init=HF_DIR) for this job, which has no corpus to train one on")
  log.info("no model.tokenizer: training a %d-token BPE tokenizer on the corpus into %s",
           vocab_size, out)
  # Every host trains the same tokenizer (deterministic) in a private dir; the first rename
  # wins, so no host ever reads a half-written tokenizer.
  tmp = out.with_name(f"{out.name}.tmp-{jax.process_index()}-{os.getpid()}")
  tok = tokenizer_lib.train_tokenizer(texts(), vocab_size, tmp)
  try:
    os.rename(tmp, out)
  except OSError:  # another host got there first: same content
    shutil.rmtree(tmp, ignore_errors=True)
  return tok


def param_initializer(config, model_cfg: ModelConfig) -> Callable[[Any, Any], Any]:
  """(mesh, rules) -> sharded params in `model_cfg.param_dtype`: HF weights streamed into
  place, or a random init of the preset (seed `config.seed`)."""
  spec = ModelSpec.from_config(config)

  def build(mesh, rules):
    if spec.init:
      cfg, params = load_hf(spec.init, dtype=model_cfg.param_dtype, mesh=mesh, rules=rules,
                            layers=spec.init_layers)
      if cfg.num_layers != model_cfg.num_layers:
        raise ValueError(f"{spec.init}: loaded {cfg.num_layers} layers, the model config has "
                         f"{model_cfg.num_layers}; build it with factory.model_config")
      return params
    return init(model_cfg, config.seed, mesh=mesh, rules=rules)
  return build
