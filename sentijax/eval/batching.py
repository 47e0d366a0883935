"""Prompt token ids for scoring: tokenisation, verbalizer / pad / eos / stop ids, the shared
prefix split off the prompts, and left-padded batches in the shapes `buckets.plan` picks."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sentijax import models, sampling
from sentijax import prefix as prefix_lib
from sentijax.eval import buckets, decoding
from sentijax.eval import generation as gen_lib

PyTree = Any
log = logging.getLogger("sentijax")


def tokenize_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Token ids with the tokenizer's default special tokens (BOS for Llama), no truncation."""
  if not texts:
    return []
  return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def verbalizer_token_ids(tokenizer, verbalizers: Sequence[str]) -> list[int]:
  """First token id of each verbalizer string (leading space kept, no special tokens)."""
  out = []
  for v in verbalizers:
    ids = tokenizer(v, add_special_tokens=False)["input_ids"]
    if not ids:
      raise ValueError(f"verbalizer {v!r} tokenises to nothing")
    out.append(int(ids[0]))
  if len(set(out)) != len(out):
    log.warning("verbalizers %s share first tokens %s: argmax picks the first of equal "
                    "scores (as the official harness)", list(verbalizers), out)
  return out


def _model_eos_ids(cfg: models.ModelConfig) -> list[int]:
  """The model config's eos id(s) (an int, a list or None) as a list."""
  eos = cfg.eos_token_id
  return [int(i) for i in (eos if isinstance(eos, (tuple, list)) else [eos]) if i is not None]


def pad_id_of(tokenizer, cfg: models.ModelConfig) -> int:
  """pad = eos (protocol); falls back to the model's (first) eos, then 0."""
  if tokenizer.eos_token_id is not None:
    return int(tokenizer.eos_token_id)
  return (_model_eos_ids(cfg) or [0])[0]


def eos_ids_of(tokenizer, cfg: models.ModelConfig,
               generation: gen_lib.GenerationSettings | None = None) -> list[int]:
  """Every id that ends generation: the generation config's eos list when it has one (what
  `generate` stops at), else the tokenizer's eos and the model config's eos ids."""
  if generation is not None and generation.eos_token_ids:
    return sorted({i for i in generation.eos_token_ids if 0 <= i < cfg.vocab_size})
  ids = set(_model_eos_ids(cfg))
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return sorted(i for i in ids if 0 <= i < cfg.vocab_size)


StopTokens = decoding.StopTokens


def stop_tokens(tokenizer, cfg: models.ModelConfig,
                generation: gen_lib.GenerationSettings | None = None) -> StopTokens:
  """`decoding.stop_tokens` with the eos ids of `eos_ids_of`."""
  return decoding.stop_tokens(tokenizer, cfg.vocab_size, eos_ids_of(tokenizer, cfg, generation))


@dataclasses.dataclass(frozen=True)
class Batch:
  order: list[int]  # positions (in the input list) of the real rows
  ids_BxT: np.ndarray
  mask_BxT: np.ndarray


def make_batches(seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int, divisor: int = 1,
                 extra_len: int = 0, compile_cost: float = 0.0,
                 compiled: set[buckets.Shape] | None = None) -> Iterator[Batch]:
  """Left-padded batches in the shapes `buckets.plan` picks (longest bucket first).

  `compiled`: shapes already compiled in this run (free to reuse); the new ones are added.
  """
  compiled = set() if compiled is None else compiled
  for planned in buckets.plan([len(s) for s in seqs], batch_size, divisor, extra_len,
                              compile_cost, compiled, buckets.LENGTH_MULTIPLE):
    compiled.add(planned.shape)
    ids_BxT, mask_BxT = sampling.left_pad([seqs[i] for i in planned.order], planned.length,
                                          planned.rows, pad_id)
    yield Batch(list(planned.order), ids_BxT, mask_BxT)


def split_prefix(cfg: models.ModelConfig, params: PyTree, seqs: Sequence[Sequence[int]],
                 program: str, enabled: bool = True
                 ) -> tuple[prefix_lib.Prefix | None, list[Sequence[int]], str]:
  """(the shared prefix computed once or None, the sequences after it, the program's key in
  the `compiled` dict: its shapes are compiled with that prefix's slots)."""
  n = prefix_lib.shared_length(seqs) if enabled else 0
  if not n:
    return None, list(seqs), program
  shared = prefix_lib.compute(cfg, params, seqs[0][:n])
  return shared, [s[n:] for s in seqs], f"{program}+prefix{shared.slots}"
