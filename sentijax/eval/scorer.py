"""SentiBench scorer: jitted verbalizer scoring and KV-cache greedy extraction.

Protocol (see ../shared/sentibench/PROTOCOL.md): no chat template, the tokenizer's default
special tokens (BOS for Llama), left padding with pad = eos.
  * Classification: ONE forward per batch with `last_only=True`; the logits at the last prompt
    position restricted to the first token id of each verbalizer (tokenised with its leading
    space, no special tokens), after the generation config's repetition penalty (as
    `generate(...).scores[0]`), are the class scores; argmax -> label.
  * Extraction: `sampling.greedy_decode` up to `max_new_tokens` (repetition penalty, the
    generation config's eos ids), stopping at EOS or at a newline once the answer has started
    (`decoding.stop_tokens`); decoded with special tokens skipped and transformers 4.44's
    clean-up when the tokenizer asks for it; `parsers.extract_answer` + `parsers.parse_tuples`.

The instruction every prompt of a run starts with runs once (`sentijax.prefix`): batches hold
only what follows it, on top of its cached keys and values (`eval.shared_prefix`). Batches are
formed longest-first from prompts sorted by token length, in the shapes `buckets.plan` picks
(a 16-token length grid, rows that divide over the mesh axes of the `batch` sharding rule);
rows shrink with length (a token budget of `batch_size * 512`, and attention memory of
`batch_size` rows of 512 tokens) so 5k-token IMDb prompts do not run out of memory. Results
are restored to file order.

    results = scorer.score(cfg, params, tokenizer, "../shared/sentibench", templates,
                           datasets=["sc/sst2"], seeds=[42], max_examples=0, batch_size=16)
    # {"datasets": {"sc/sst2": {"seeds": {"42": 91.3}, "mean": 91.3}}, "average": 91.3}
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sentijax import models, sampling, sharding
from sentijax import prefix as prefix_lib
from sentijax.data import sentibench
from sentijax.eval import batching, buckets, decoding, metrics, parsers, report
from sentijax.eval import generation as gen_lib

PyTree = Any
log = logging.getLogger("sentijax")


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """What a scoring run applies besides the data: the model's generation config, transformers
  4.44's decode clean-up, the batch-shape trade and the shared prefix (see `score`)."""
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


def _compile_cost(cfg: models.ModelConfig, program: str, setting: float) -> float:
  """`setting` >= 0 as given; < 0 (auto): `buckets.compile_cost_tokens` on the default backend."""
  if setting >= 0:
    return float(setting)
  return buckets.compile_cost_tokens(cfg, program, jax.default_backend())


# --------------------------------------------------------------------------------------------
# Classification.


@functools.partial(jax.jit, static_argnums=0, static_argnames="cache_sharding")
def _verbalizer_logits(cfg: models.ModelConfig, params: PyTree, ids_BxT: jax.Array,
                       mask_BxT: jax.Array, verb_ids_C: jax.Array, penalty: jax.Array,
                       shared: prefix_lib.Prefix | None = None, *, cache_sharding=None
                       ) -> jax.Array:
  """Float32 [B, C]: last-position logits at the verbalizer first tokens, after the repetition
  penalty of verbalizer tokens present in the prompt (`generate(...).scores[0]`). With `shared`,
  the rows are the suffixes that follow that prefix."""
  seen_BxC = jnp.any((ids_BxT[:, :, None] == verb_ids_C[None, None, :])
                     & (mask_BxT[:, :, None] > 0), axis=1)
  if shared is None:
    logits_Bx1xV = models.forward(cfg, params, ids_BxT, segment_ids_BxT=mask_BxT,
                                  positions_BxT=models.default_positions(mask_BxT),
                                  last_only=True)
  else:
    cache = prefix_lib.batch_cache(cfg, shared, ids_BxT.shape[0], ids_BxT.shape[1],
                                   cache_sharding)
    logits_Bx1xV, _ = models.forward_with_cache(cfg, params, ids_BxT,
                                                prefix_lib.suffix_positions(shared, mask_BxT),
                                                mask_BxT, cache, last_only=True)
    seen_BxC = seen_BxC | shared.seen(verb_ids_C)[None]
  logits_BxC = logits_Bx1xV[:, 0, :][:, verb_ids_C].astype(jnp.float32)
  return sampling.repetition_penalty(logits_BxC, seen_BxC, penalty)


def _place(mesh: Mesh | None, rules, *arrays: np.ndarray) -> list[jax.Array]:
  if mesh is None:
    return [jnp.asarray(a) for a in arrays]
  return [jax.device_put(a, sharding.batch_sharding(mesh, rules, a.ndim)) for a in arrays]


def classify(cfg: models.ModelConfig, params: PyTree, tokenizer, texts: Sequence[str],
             verbalizers: Sequence[str], batch_size: int, mesh: Mesh | None = None,
             progress: bool = False, desc: str = "", rules=None,
             repetition_penalty: float = 1.0, compile_cost: float = -1.0,
             compiled: dict[str, set[buckets.Shape]] | None = None,
             shared_prefix: bool = True) -> np.ndarray:
  """Verbalizer scores [N, C] (float32, input order) for prompts `texts`.

  `rules`: sharding rules whose `batch` rule shards batches on `mesh` (None = the base config's).
  `repetition_penalty`: the generation config's (applied to verbalizers seen in the prompt).
  `compile_cost` / `compiled`: batch shapes, see `make_batches` (< 0: `compile_cost_tokens`);
  `compiled` maps programs to the shapes compiled for them so far (updated).
  `shared_prefix`: run the prompts' common prefix once (`sentijax.prefix`).
  """
  verb_ids = batching.verbalizer_token_ids(tokenizer, verbalizers)
  n_classes = len(verb_ids)
  # Padded to a multiple of 8 (repeating the first id): one compile serves 2..8 classes.
  verb_ids_C = np.asarray(verb_ids + verb_ids[:1] * (-n_classes % 8), np.int32)
  if verb_ids_C.max() >= cfg.vocab_size:
    raise ValueError(f"verbalizer token ids {verb_ids_C.tolist()} exceed the model's vocab_size "
                     f"{cfg.vocab_size}: tokenizer and model do not match")
  shared, seqs, program = batching.split_prefix(
      cfg, params, batching.tokenize_prompts(tokenizer, texts), "forward", shared_prefix)
  compiled = {} if compiled is None else compiled
  divisor = sharding.batch_divisor(mesh, rules)
  cache_sharding = (None if mesh is None or shared is None
                    else sharding.batch_sharding(mesh, rules, batch_dim=1))
  scores_NxC = np.zeros((len(seqs), n_classes), np.float32)
  bar = _bar(len(seqs), desc, progress)
  cost = _compile_cost(cfg, "forward", compile_cost)
  for batch in batching.make_batches(seqs, batch_size, batching.pad_id_of(tokenizer, cfg),
                                     divisor, 0, cost, compiled.setdefault(program, set())):
    ids, mask = _place(mesh, rules, batch.ids_BxT, batch.mask_BxT)
    out_BxC = _verbalizer_logits(cfg, params, ids, mask, jnp.asarray(verb_ids_C),
                                 jnp.asarray(repetition_penalty, jnp.float32), shared,
                                 cache_sharding=cache_sharding)
    scores_NxC[batch.order] = sharding.to_host(out_BxC)[:len(batch.order), :n_classes]
    bar.update(len(batch.order))
  bar.close()
  return scores_NxC


# --------------------------------------------------------------------------------------------
# Extraction.


def generate(cfg: models.ModelConfig, params: PyTree, tokenizer, texts: Sequence[str],
             max_new_tokens: int, batch_size: int, mesh: Mesh | None = None,
             progress: bool = False, desc: str = "",
             stops: batching.StopTokens | None = None, rules=None,
             generation: gen_lib.GenerationSettings | None = None,
             cleanup: bool = False, compile_cost: float = -1.0,
             compiled: dict[str, set[buckets.Shape]] | None = None,
             shared_prefix: bool = True) -> list[str]:
  """Greedy continuations (decoded, special tokens skipped; input order) of prompts `texts`.

  `stops`: from `batching.stop_tokens(tokenizer, cfg, generation)` (computed when None).
  `generation`: repetition penalty and eos ids (`generation.load`); None = none / defaults.
  `cleanup`: apply transformers 4.44's `clean_up_tokenization` (`decoding.cleanup_enabled`).
  `compile_cost` / `compiled` / `shared_prefix`: as in `classify` (for the decode loop).
  """
  generation = generation or gen_lib.GenerationSettings()
  shared, seqs, program = batching.split_prefix(
      cfg, params, batching.tokenize_prompts(tokenizer, texts), "decode", shared_prefix)
  compiled = {} if compiled is None else compiled
  divisor = sharding.batch_divisor(mesh, rules)
  pad_id = batching.pad_id_of(tokenizer, cfg)
  stops = stops if stops is not None else batching.stop_tokens(tokenizer, cfg, generation)
  outputs: list[str] = [""] * len(seqs)
  bar = _bar(len(seqs), desc, progress)
  cost = _compile_cost(cfg, "decode", compile_cost)
  for batch in batching.make_batches(seqs, batch_size, pad_id, divisor, max_new_tokens, cost,
                                     compiled.setdefault(program, set())):
    out = sampling.greedy_decode(cfg, params, batch.ids_BxT, batch.mask_BxT, max_new_tokens,
                                 stops.stop_ids, pad_id, soft_stop_ids=stops.soft_stop_ids,
                                 blank_ids=stops.blank_ids, mesh=mesh, rules=rules,
                                 repetition_penalty=generation.repetition_penalty,
                                 shared=shared)
    texts_b = decoding.decode(tokenizer, [out.tokens_BxN[row, :out.lengths_B[row]].tolist()
                                          for row in range(len(batch.order))], cleanup)
    for i, text in zip(batch.order, texts_b):
      outputs[i] = text
    bar.update(len(batch.order))
  bar.close()
  return outputs


# --------------------------------------------------------------------------------------------
# SentiBench runs.


def _bar(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, disable=not enabled or jax.process_index() != 0,
              leave=False, dynamic_ncols=True)


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


def _jsonable(x: Any) -> Any:
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


write_jsonl = report.write_jsonl  # kept here for callers of scorer.*
write_json = report.write_json


def predictions_path(predictions_dir: str | os.PathLike, dataset: str, seed: int) -> str:
  return os.path.join(os.fspath(predictions_dir), f"{dataset.replace('/', '_')}_{seed}.jsonl")


def score_run(cfg: models.ModelConfig, params: PyTree, tokenizer, task: sentibench.Task,
              templates: dict, seed: int, max_examples: int, batch_size: int,
              mesh: Mesh | None = None, max_new_tokens: int = 150, progress: bool = True,
              stops: batching.StopTokens | None = None, rules=None,
              generation: gen_lib.GenerationSettings | None = None,
              cleanup: bool = False, compile_cost: float = -1.0,
              compiled: dict[str, set[buckets.Shape]] | None = None,
              shared_prefix: bool = True) -> tuple[float, list[dict]]:
  """One (dataset, seed) run: (score x100, prediction rows in file order).

  `compiled`: {program: shapes} compiled earlier in the run (updated); `shared_prefix`: run the
  instruction the prompts share once (`sentijax.prefix`).
  """
  generation = generation or gen_lib.GenerationSettings()
  compiled = {} if compiled is None else compiled
  prompts = sentibench.build_prompts(task, templates, seed, max_examples=max_examples)
  texts = [p.text for p in prompts]
  desc = f"{task.name} seed {seed}"
  rows = []
  if task.kind == "classification":
    labels = sentibench.label_names(templates, task.name)
    scores_NxC = classify(cfg, params, tokenizer, texts, sentibench.verbalizers(templates,
                                                                                task.name),
                          batch_size, mesh, progress, desc, rules=rules,
                          repetition_penalty=generation.repetition_penalty,
                          compile_cost=compile_cost, compiled=compiled,
                          shared_prefix=shared_prefix)
    preds = [labels[int(j)] for j in np.argmax(scores_NxC, axis=-1)]
    golds = [p.gold for p in prompts]
    for p, pred, s in zip(prompts, preds, scores_NxC):
      rows.append({"index": p.index, "gold": p.gold, "prediction": pred,
                   "scores": [float(x) for x in s]})
    return metrics.score_dataset(task.name, golds, preds), rows

  outputs = generate(cfg, params, tokenizer, texts, max_new_tokens, batch_size, mesh, progress,
                     desc, stops, rules=rules, generation=generation, cleanup=cleanup,
                     compile_cost=compile_cost, compiled=compiled,
                     shared_prefix=shared_prefix)
  examples = [task.test[p.index] for p in prompts]
  golds = [list(p.gold) for p in prompts]
  preds = []
  for p, ex, out in zip(prompts, examples, outputs):
    answer = parsers.extract_answer(out)
    pred = parsers.parse_tuples(answer, task.name, sentence=ex.sentence)
    preds.append(pred)
    rows.append({"index": p.index, "gold": _jsonable(p.gold), "prediction": _jsonable(pred),
                 "scores": []})
  kw = {}
  if task.name == "absa/opener":
    kw = dict(sentences=[ex.sentence for ex in examples],
              gold_opinions=[ex.raw.get("opinions", []) for ex in examples])
  return metrics.score_dataset(task.name, golds, preds, **kw), rows


def example_limits(max_examples: int, max_extraction: int = -1) -> dict[str, int]:
  """{task kind: first N test items scored (0 = all)} from `eval.max_examples` and
  `eval.max_examples_extraction` (-1 = the same as `max_examples`)."""
  if max_examples < 0 or max_extraction < -1:
    raise ValueError(f"eval.max_examples={max_examples} must be >= 0 (0 = all items) and "
                     f"eval.max_examples_extraction={max_extraction} >= -1 (-1 = the same)")
  return {"classification": max_examples,
          "extraction": max_examples if max_extraction == -1 else max_extraction}


def score(model_cfg: models.ModelConfig, params: PyTree, tokenizer, data_dir: str | os.PathLike,
          templates: dict | str | None, datasets: str | Sequence[str],
          seeds: str | int | Sequence[int], max_examples: int | dict[str, int] = 0,
          batch_size: int = 16,
          mesh: Mesh | None = None, predictions_dir: str | os.PathLike | None = None,
          progress: bool = True, max_new_tokens: int = 150, rules=None,
          generation: gen_lib.GenerationSettings | None = None,
          decode_cleanup: str | bool = "auto", aggregation: str = "mean",
          compile_cost: float = -1.0,
          compiled: dict[str, set[buckets.Shape]] | None = None,
          shared_prefix: bool = True) -> dict:
  """Scores `datasets` x `seeds` and returns the results dict (scores x100).

  {"datasets": {"sc/sst2": {"seeds": {"42": 91.3}, "mean": 91.3}, ...}, "average": 91.3,
   "aggregation": "mean"}; see `report.aggregate` for "mean" / "official". With
  `predictions_dir`, writes `<dataset with / -> _>_<seed>.jsonl` (one {"index", "gold",
  "prediction", "scores"} per item). `max_examples`: the first N test items (0 = all), one
  number or {task kind: N} (`example_limits`). `generation`: the model's generation config
  (`generation.load`); `decode_cleanup`: auto | on | off (`decoding.cleanup_enabled`) or a bool.
  `compile_cost`: tokens of compute one compilation is worth (`buckets`; < 0 = estimate);
  datasets and seeds reuse each other's batch shapes when that is cheaper; pass the same
  `compiled` dict to later calls in this process (e.g. scoring during training) to extend that.
  `shared_prefix`: each run's common instruction runs once (`sentijax.prefix`).
  """
  if aggregation not in report.AGGREGATIONS:
    raise ValueError(f"eval.aggregation must be one of {report.AGGREGATIONS}, got {aggregation!r}")
  cleanup = (decode_cleanup if isinstance(decode_cleanup, bool)
             else decoding.cleanup_enabled(tokenizer, decode_cleanup))
  if not isinstance(templates, dict):
    templates = sentibench.load_templates(templates or None)
  names = parse_datasets(datasets)
  seed_list = parse_seeds(seeds)
  check_data(data_dir, names)
  if batch_size < 1:
    raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
  stops = None
  if any(n in sentibench.EXTRACTION_DATASETS for n in names):
    stops = batching.stop_tokens(tokenizer, model_cfg, generation)
  per_dataset: dict[str, dict[str, float]] = {}
  if compiled is None:
    compiled = {}
  for name in names:
    task = sentibench.load_task(data_dir, name)
    limit = max_examples[task.kind] if isinstance(max_examples, dict) else max_examples
    per_seed = {}
    for seed in seed_list:
      value, rows = score_run(model_cfg, params, tokenizer, task, templates, seed, limit,
                              batch_size, mesh, max_new_tokens, progress, stops, rules=rules,
                              generation=generation, cleanup=cleanup,
                              compile_cost=compile_cost, compiled=compiled,
                              shared_prefix=shared_prefix)
      per_seed[str(seed)] = float(value)
      if predictions_dir is not None and jax.process_index() == 0:
        write_jsonl(predictions_path(predictions_dir, name, seed), rows)
      if progress and jax.process_index() == 0:
        log.info("%s seed %d: %.2f", name, seed, value)
    per_dataset[name] = per_seed
  results = report.aggregate(per_dataset, aggregation)
  results["settings"] = protocol_settings(templates, max_new_tokens, generation, cleanup)
  return results


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
