"""The SentiBench scorer: a scoring session (`Scorer`) with jitted verbalizer scoring and
KV-cache greedy extraction.

Protocol (see ../shared/sentibench/PROTOCOL.md): no chat template, the tokenizer's default
special tokens (BOS for Llama), left padding with pad = eos.
  * Classification: ONE forward per batch with `last_only=True`; the logits at the last prompt
    position restricted to the first token id of each verbalizer (tokenised with its leading
    space, no special tokens), after the generation config's repetition penalty (as
    `generate(...).scores[0]`), are the class scores; argmax -> label.
  * Extraction: greedy `sampling.decode` up to `max_new_tokens` (repetition penalty, the
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

A `Scorer` holds what stays fixed while params change: the model config, tokenizer, placement
(mesh + sharding rules), `settings.RunSettings`, `settings.ScoringSpec`, templates, the loaded
tasks and the batch shapes compiled so far (datasets, seeds and training steps reuse them). The
sentibench job, the training hook (`hooks.ScoringHook`) and held-out task scoring
(`heldout.score_tasks`) each score through one.

    s = scorer.Scorer(cfg, tokenizer, spec=settings.ScoringSpec(data_dir="../shared/sentibench"))
    results = s.score(params, ["sc/sst2"], seeds=[42])
    # {"datasets": {"sc/sst2": {"seeds": {"42": 91.3}, "mean": 91.3}}, "average": 91.3, ...}
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sentijax import models, sampling, sharding
from sentijax import prefix as prefix_lib
from sentijax.data import sentibench
from sentijax.eval import batching, buckets, decoding, metrics, parsers, report, settings

PyTree = Any
log = logging.getLogger("sentijax")

write_jsonl = report.write_jsonl  # kept here for callers of scorer.*
write_json = report.write_json


def predictions_path(predictions_dir: str | os.PathLike, dataset: str, seed: int) -> str:
  return os.path.join(os.fspath(predictions_dir), f"{dataset.replace('/', '_')}_{seed}.jsonl")


def _compile_cost(cfg: models.ModelConfig, program: str, setting: float) -> float:
  """`setting` >= 0 as given; < 0 (auto): `buckets.compile_cost_tokens` on the default backend."""
  if setting >= 0:
    return float(setting)
  return buckets.compile_cost_tokens(cfg, program, jax.default_backend())


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


def _place(placement: sharding.Placement, *arrays: np.ndarray) -> list[jax.Array]:
  if placement.mesh is None:
    return [jnp.asarray(a) for a in arrays]
  return [jax.device_put(a, placement.batch(a.ndim)) for a in arrays]


def _bar(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, disable=not enabled or jax.process_index() != 0,
              leave=False, dynamic_ncols=True)


def _jsonable(x: Any) -> Any:
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


@dataclasses.dataclass(frozen=True, eq=False)
class Scorer:
  """A scoring session: what stays fixed while params change (see the module docstring).

  `compiled` maps programs to the batch shapes compiled for them so far and `loaded` caches
  tasks by (root, name); both grow as the session scores.
  """
  model_cfg: models.ModelConfig
  tokenizer: Any
  placement: sharding.Placement = sharding.Placement()
  run: settings.RunSettings = settings.RunSettings()
  spec: settings.ScoringSpec = settings.ScoringSpec()
  templates: dict = dataclasses.field(default_factory=sentibench.load_templates)
  compiled: dict[str, set[buckets.Shape]] = dataclasses.field(default_factory=dict)
  loaded: dict[tuple[str, str], sentibench.Task] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_config(cls, config, model_cfg: models.ModelConfig, tokenizer,
                  placement: sharding.Placement | None = None, progress: bool = False
                  ) -> "Scorer":
    """From `config.eval` (`ScoringSpec`, `RunSettings`, templates); `placement` defaults to
    `config.mesh` + `config.sharding_rules` (the training loop's)."""
    placement = placement or sharding.Placement.from_config(config, model_cfg)
    return cls(model_cfg, tokenizer, placement, settings.RunSettings.from_config(config, tokenizer),
               settings.ScoringSpec.from_config(config.eval, progress),
               sentibench.load_templates(config.eval.templates or None))

  @functools.cached_property
  def stops(self) -> batching.StopTokens:
    return batching.stop_tokens(self.tokenizer, self.model_cfg, self.run.generation)

  def protocol_settings(self) -> dict:
    """`settings.protocol_settings` of this session (results' "settings")."""
    return settings.protocol_settings(self.templates, self.spec.max_new_tokens,
                                      self.run.generation, self.run.cleanup)

  def task(self, root: str | os.PathLike, name: str, load=None) -> sentibench.Task:
    """The task `name` under `root`, loaded once (`load()`, default the SentiBench test split)."""
    key = (os.fspath(root), name)
    if key not in self.loaded:
      self.loaded[key] = load() if load else sentibench.load_task(root, name)
    return self.loaded[key]

  # ------------------------------------------------------------------------------------------
  # Classification.

  def classify(self, params: PyTree, texts: Sequence[str], verbalizers: Sequence[str],
               desc: str = "") -> np.ndarray:
    """Verbalizer scores [N, C] (float32, input order) for prompts `texts`, after the generation
    config's repetition penalty (verbalizers seen in the prompt)."""
    cfg, tokenizer, run = self.model_cfg, self.tokenizer, self.run
    verb_ids = batching.verbalizer_token_ids(tokenizer, verbalizers)
    n_classes = len(verb_ids)
    # Padded to a multiple of 8 (repeating the first id): one compile serves 2..8 classes.
    verb_ids_C = np.asarray(verb_ids + verb_ids[:1] * (-n_classes % 8), np.int32)
    if verb_ids_C.max() >= cfg.vocab_size:
      raise ValueError(f"verbalizer token ids {verb_ids_C.tolist()} exceed the model's "
                       f"vocab_size {cfg.vocab_size}: tokenizer and model do not match")
    shared, seqs, program = batching.split_prefix(
        cfg, params, batching.tokenize_prompts(tokenizer, texts), "forward", run.shared_prefix)
    cache_sharding = None if shared is None else self.placement.batch(batch_dim=1)
    scores_NxC = np.zeros((len(seqs), n_classes), np.float32)
    bar = _bar(len(seqs), desc, self.spec.progress)
    cost = _compile_cost(cfg, "forward", run.compile_cost)
    for batch in batching.make_batches(seqs, self.spec.batch_size,
                                       batching.pad_id_of(tokenizer, cfg),
                                       self.placement.batch_divisor, 0, cost,
                                       self.compiled.setdefault(program, set())):
      ids, mask = _place(self.placement, batch.ids_BxT, batch.mask_BxT)
      out_BxC = _verbalizer_logits(cfg, params, ids, mask, jnp.asarray(verb_ids_C),
                                   jnp.asarray(run.generation.repetition_penalty, jnp.float32),
                                   shared, cache_sharding=cache_sharding)
      scores_NxC[batch.order] = sharding.to_host(out_BxC)[:len(batch.order), :n_classes]
      bar.update(len(batch.order))
    bar.close()
    return scores_NxC

  # ------------------------------------------------------------------------------------------
  # Extraction.

  def generate(self, params: PyTree, texts: Sequence[str], desc: str = "") -> list[str]:
    """Greedy continuations (decoded, special tokens skipped, transformers 4.44's clean-up when
    `run.cleanup`; input order) of prompts `texts`, up to `spec.max_new_tokens`."""
    cfg, run, max_new_tokens = self.model_cfg, self.run, self.spec.max_new_tokens
    shared, seqs, program = batching.split_prefix(
        cfg, params, batching.tokenize_prompts(self.tokenizer, texts), "decode",
        run.shared_prefix)
    pad_id = batching.pad_id_of(self.tokenizer, cfg)
    greedy = sampling.SamplingSettings(max_tokens=max_new_tokens,
                                       repetition_penalty=run.generation.repetition_penalty)
    stops = sampling.Stops(self.stops.stop_ids, pad_id, self.stops.soft_stop_ids,
                           self.stops.blank_ids)
    outputs: list[str] = [""] * len(seqs)
    bar = _bar(len(seqs), desc, self.spec.progress)
    cost = _compile_cost(cfg, "decode", run.compile_cost)
    for batch in batching.make_batches(seqs, self.spec.batch_size, pad_id,
                                       self.placement.batch_divisor, max_new_tokens, cost,
                                       self.compiled.setdefault(program, set())):
      out = sampling.decode(cfg, params, batch.ids_BxT, batch.mask_BxT, greedy, stops,
                            placement=self.placement, shared=shared)
      texts_b = decoding.decode(self.tokenizer,
                                [out.tokens_BxN[row, :out.lengths_B[row]].tolist()
                                 for row in range(len(batch.order))], run.cleanup)
      for i, text in zip(batch.order, texts_b):
        outputs[i] = text
      bar.update(len(batch.order))
    bar.close()
    return outputs

  # ------------------------------------------------------------------------------------------
  # SentiBench runs.

  def score_run(self, params: PyTree, task: sentibench.Task, seed: int
                ) -> tuple[float, list[dict]]:
    """One (dataset, seed) run: (score x100, prediction rows in file order); the first
    `spec.limits[task.kind]` test items (0 = all)."""
    templates = self.templates
    prompts = sentibench.build_prompts(task, templates, seed,
                                       max_examples=self.spec.limits[task.kind])
    texts = [p.text for p in prompts]
    desc = f"{task.name} seed {seed}"
    rows = []
    if task.kind == "classification":
      labels = sentibench.label_names(templates, task.name)
      scores_NxC = self.classify(params, texts, sentibench.verbalizers(templates, task.name),
                                 desc)
      preds = [labels[int(j)] for j in np.argmax(scores_NxC, axis=-1)]
      golds = [p.gold for p in prompts]
      for p, pred, s in zip(prompts, preds, scores_NxC):
        rows.append({"index": p.index, "gold": p.gold, "prediction": pred,
                     "scores": [float(x) for x in s]})
      return metrics.score_dataset(task.name, golds, preds), rows

    outputs = self.generate(params, texts, desc)
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

  def score(self, params: PyTree, datasets: str | Sequence[str],
            seeds: str | int | Sequence[int] | None = None,
            predictions_dir: str | os.PathLike | None = None) -> dict:
    """Scores SentiBench `datasets` x `seeds` (None = `spec.seeds`); the results dict (x100).

    {"datasets": {"sc/sst2": {"seeds": {"42": 91.3}, "mean": 91.3}, ...}, "average": 91.3,
     "aggregation": "mean", "settings": {...}}; see `report.aggregate` for `spec.aggregation`
    ("mean" / "official") and `settings.protocol_settings` for "settings". With
    `predictions_dir`, writes `<dataset with / -> _>_<seed>.jsonl` (one {"index", "gold",
    "prediction", "scores"} per item).
    """
    names = settings.parse_datasets(datasets)
    seed_list = settings.parse_seeds(self.spec.seeds if seeds is None else seeds)
    data_dir = self.spec.data_dir
    settings.check_data(data_dir, names)
    per_dataset: dict[str, dict[str, float]] = {}
    for name in names:
      task = self.task(data_dir, name)
      per_seed = {}
      for seed in seed_list:
        value, rows = self.score_run(params, task, seed)
        per_seed[str(seed)] = float(value)
        if predictions_dir is not None and jax.process_index() == 0:
          write_jsonl(predictions_path(predictions_dir, name, seed), rows)
        if self.spec.progress and jax.process_index() == 0:
          log.info("%s seed %d: %.2f", name, seed, value)
      per_dataset[name] = per_seed
    results = report.aggregate(per_dataset, self.spec.aggregation)
    results["settings"] = self.protocol_settings()
    return results
