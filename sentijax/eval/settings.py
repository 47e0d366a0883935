"""Scoring settings, read once: `ScoringSpec` (what a run covers: data, seeds, item limits,
batch size, decoding budget, aggregation) from `config.eval`, `RunSettings` (what it applies:
generation config, decode clean-up, compile cost, shared prefix), and the checks of the values.

    spec = settings.ScoringSpec.from_config(config.eval)
    spec.seeds, spec.limits   # (42, 52, 62), {"classification": 0, "extraction": 0}
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from sentijax.data import sentibench
from sentijax.eval import decoding, report
from sentijax.eval import generation as gen_lib


def parse_datasets(datasets: str | Sequence[str]) -> list[str]:
  """'all' / 'sc/sst2,absa/opener' / a list -> validated dataset names (protocol order kept)."""
  if isinstance(datasets, str):
    names = (list(sentibench.DATASETS) if datasets.strip() == "all"
             else [d.strip() for d in datasets.split(",") if d.strip()])
  else:
    names = [str(d) for d in datasets]
  if not names:
    raise ValueError("no SentiBench datasets selected (eval.datasets is empty)")
  unknown = [n for n in names if n not in sentibench.CATEGORIES]
  if unknown:
    raise ValueError(f"unknown SentiBench dataset(s) {unknown}; known: "
                     f"{', '.join(sentibench.DATASETS)}")
  return list(dict.fromkeys(names))


def parse_seeds(seeds: str | int | Sequence[int]) -> list[int]:
  """'42,52,62' / 42 / (42, 52) -> [42, 52, 62]."""
  if isinstance(seeds, (int, np.integer)):
    return [int(seeds)]
  if isinstance(seeds, str):
    parts = [s.strip() for s in seeds.split(",") if s.strip()]
  else:
    parts = list(seeds)
  try:
    out = [int(s) for s in parts]
  except ValueError:
    raise ValueError(f"eval.seeds must be integers like '42,52,62', got {seeds!r}") from None
  if not out:
    raise ValueError("eval.seeds is empty")
  return out


def check_data(data_dir: str | os.PathLike, datasets: Sequence[str]) -> None:
  """Raises FileNotFoundError naming the first missing data dir / split file."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"SentiBench data directory not found: {data_dir} "
                            "(set --config.eval.data_dir=.../sentibench)")
  for name in datasets:
    for split in ("train", "test"):
      path = os.path.join(os.fspath(data_dir), name, f"{split}.json")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"SentiBench dataset {name!r}: {path} not found")


def example_limits(max_examples: int, max_extraction: int = -1) -> dict[str, int]:
  """{task kind: first N test items scored (0 = all)} from `eval.max_examples` and
  `eval.max_examples_extraction` (-1 = the same as `max_examples`)."""
  if max_examples < 0 or max_extraction < -1:
    raise ValueError(f"eval.max_examples={max_examples} must be >= 0 (0 = all items) and "
                     f"eval.max_examples_extraction={max_extraction} >= -1 (-1 = the same)")
  return {"classification": max_examples,
          "extraction": max_examples if max_extraction == -1 else max_extraction}


@dataclasses.dataclass(frozen=True)
class ScoringSpec:
  """What a scoring run covers (`config.eval` read once): the SentiBench data, the seeds, the
  first N test items per task kind (`example_limits`), rows per batch, the extraction decoding
  budget, how seeds and datasets aggregate (`report.aggregate`), and whether to show progress
  bars and per-run log lines."""
  data_dir: str = "../shared/sentibench"
  seeds: tuple[int, ...] = (42,)
  max_examples: int = 0
  max_examples_extraction: int = -1
  batch_size: int = 16
  max_new_tokens: int = 150
  aggregation: str = "mean"
  progress: bool = False

  def __post_init__(self):
    self.limits  # pylint: disable=pointless-statement  # validates the item limits
    if self.batch_size < 1:
      raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
    if self.aggregation not in report.AGGREGATIONS:
      raise ValueError(f"eval.aggregation must be one of {report.AGGREGATIONS}, "
                       f"got {self.aggregation!r}")

  @property
  def limits(self) -> dict[str, int]:
    return example_limits(self.max_examples, self.max_examples_extraction)

  @classmethod
  def from_config(cls, ev, progress: bool = False) -> "ScoringSpec":
    """From `config.eval` (data_dir, seeds, max_examples, max_examples_extraction, batch_size,
    max_new_tokens, aggregation)."""
    return cls(str(ev.data_dir), tuple(parse_seeds(ev.seeds)), int(ev.max_examples),
               int(ev.get("max_examples_extraction", -1)), int(ev.batch_size),
               int(ev.max_new_tokens), str(ev.aggregation), bool(progress))


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """What a scoring run applies besides the data: the model's generation config, transformers
  4.44's decode clean-up, the batch-shape trade (tokens of compute one compilation is worth,
  `buckets`; < 0 = estimate) and the shared prefix (`sentijax.prefix`)."""
  generation: gen_lib.GenerationSettings = gen_lib.GenerationSettings()
  cleanup: bool = False
  compile_cost: float = -1.0
  shared_prefix: bool = True

  @classmethod
  def from_config(cls, config, tokenizer) -> "RunSettings":
    """From `config.eval` (generation_config, decode_cleanup, compile_cost_tokens,
    shared_prefix); the generation config is read from `config.model.init` when that is a
    directory."""
    ev, init = config.eval, str(config.model.init or "")
    return cls(gen_lib.load(init if os.path.isdir(init) else None, str(ev.generation_config)),
               decoding.cleanup_enabled(tokenizer, str(ev.decode_cleanup)),
               float(ev.compile_cost_tokens), bool(ev.get("shared_prefix", True)))


def protocol_settings(templates: dict, max_new_tokens: int,
                      generation: gen_lib.GenerationSettings | None, cleanup: bool) -> dict:
  """What makes two runs' scores comparable besides the items: the prompt templates (k shots
  and a digest of the instructions and formats), the decoding budget and generation config."""
  generation = generation or gen_lib.GenerationSettings()
  digest = hashlib.sha256(json.dumps(templates, sort_keys=True, default=str).encode())
  return {"templates": digest.hexdigest()[:16], "k_shot": int(templates["k_shot"]),
          "max_new_tokens": int(max_new_tokens),
          "repetition_penalty": float(generation.repetition_penalty),
          "eos_token_ids": sorted(int(i) for i in (generation.eos_token_ids or ())),
          "decode_cleanup": bool(cleanup)}
