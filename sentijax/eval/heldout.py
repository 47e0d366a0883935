"""Held-out evaluation of any registered task (SentiBench's 12 and others) during training.

SentiBench datasets are scored exactly as the `sentibench` job scores them (`scorer.score_run`,
the templates' instruction). Any other registered task (`sentijax.data.tasks.TaskSpec`) gets the
same protocol -- its own instruction, k demos from its train split drawn per seed, the query,
verbalizer first-token scoring or greedy extraction -- and its layout's parser and metric.
Results use the scorer's schema ({"datasets": {name: {"seeds": {...}, "mean": ...}},
"average": ...}); classification entries also carry "accuracy" (x100, mean over seeds).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from sentijax import models, sharding
from sentijax.data import sentibench, tasks
from sentijax.eval import batching, metrics, parsers, scorer

log = logging.getLogger("sentijax")


def _accuracy(rows: Sequence[dict]) -> float:
  return 100.0 * float(np.mean([str(r["gold"]).lower() == r["prediction"] for r in rows]))


def score_task(model_cfg: models.ModelConfig, params: Any, tokenizer, spec: tasks.TaskSpec,
               task: sentibench.Task, templates: dict, seed: int, max_examples: int,
               batch_size: int, mesh=None, max_new_tokens: int = 150,
               stops: batching.StopTokens | None = None, rules=None,
               run: scorer.RunSettings | None = None, compiled: dict | None = None
               ) -> tuple[float, list[dict]]:
  """(score x100, prediction rows) of one (task, seed) run.

  `run`: generation config, clean-up and batch-shape settings; `compiled`: as `scorer.score_run`.
  """
  run = run or scorer.RunSettings()
  compiled = {} if compiled is None else compiled
  if spec.sentibench and spec.name in templates["instructions"]:
    return scorer.score_run(model_cfg, params, tokenizer, task, templates, seed, max_examples,
                            batch_size, mesh, max_new_tokens, progress=False, stops=stops,
                            rules=rules, generation=run.generation, cleanup=run.cleanup,
                            compile_cost=run.compile_cost, compiled=compiled,
                            shared_prefix=run.shared_prefix)
  own = dict(templates, instructions={**templates["instructions"], spec.name: spec.instruction})
  prompts = sentibench.build_prompts(task, own, seed, max_examples=max_examples)
  texts = [p.text for p in prompts]
  rows: list[dict] = []
  if spec.kind == "classification":
    scores_NxC = scorer.classify(model_cfg, params, tokenizer, texts, spec.verbalizers,
                                 batch_size, mesh, rules=rules,
                                 repetition_penalty=run.generation.repetition_penalty,
                                 compile_cost=run.compile_cost, compiled=compiled,
                                 shared_prefix=run.shared_prefix)
    preds = [spec.labels[int(j)] for j in np.argmax(scores_NxC, axis=-1)]
    for p, pred, s in zip(prompts, preds, scores_NxC):
      rows.append({"index": p.index, "gold": p.gold, "prediction": pred,
                   "scores": [float(x) for x in s]})
    golds = [p.gold for p in prompts]
    return metrics.score_dataset(spec.name, golds, preds, metric=spec.metric), rows
  outputs = scorer.generate(model_cfg, params, tokenizer, texts, max_new_tokens, batch_size, mesh,
                            stops=stops, rules=rules, generation=run.generation,
                            cleanup=run.cleanup, compile_cost=run.compile_cost,
                            compiled=compiled, shared_prefix=run.shared_prefix)
  examples = [task.test[p.index] for p in prompts]
  preds = [parsers.parse_tuples(parsers.extract_answer(out), spec.parser, sentence=ex.sentence)
           for ex, out in zip(examples, outputs)]
  for p, pred in zip(prompts, preds):
    rows.append({"index": p.index, "gold": [list(t) for t in p.gold],
                 "prediction": [list(t) for t in pred], "scores": []})
  kw = {}
  if spec.metric == "graph_f1":
    kw = dict(sentences=[ex.sentence for ex in examples],
              gold_opinions=[ex.raw.get("opinions", []) for ex in examples])
  return metrics.score_dataset(spec.name, [list(p.gold) for p in prompts], preds,
                               metric=spec.metric, **kw), rows


def score_tasks(model_cfg: models.ModelConfig, params: Any, tokenizer,
                specs: Sequence[tasks.TaskSpec], templates: dict, seeds: Sequence[int],
                max_examples: int, batch_size: int, mesh=None, max_new_tokens: int = 150,
                rules=None, loaded: dict[str, sentibench.Task] | None = None,
                run: scorer.RunSettings | None = None, compiled: dict | None = None
                ) -> tuple[dict, dict[tuple[str, int], list[dict]]]:
  """(results, {(task, seed): prediction rows}) of every task x seed; `loaded` caches the
  loaded tasks and `compiled` the batch shapes between calls; `run`: see `score_task`."""
  loaded = {} if loaded is None else loaded
  run = run or scorer.RunSettings()
  compiled = {} if compiled is None else compiled
  stops = None
  if any(s.kind == "extraction" for s in specs):
    stops = batching.stop_tokens(tokenizer, model_cfg, run.generation)
  results: dict[str, Any] = {"datasets": {}}
  predictions: dict[tuple[str, int], list[dict]] = {}
  for spec in specs:
    if spec.name not in loaded:
      loaded[spec.name] = tasks.load_task(spec)
    per_seed, acc = {}, []
    for seed in seeds:
      value, rows = score_task(model_cfg, params, tokenizer, spec, loaded[spec.name], templates,
                               seed, max_examples, batch_size, mesh, max_new_tokens, stops, rules,
                               run, compiled)
      per_seed[str(seed)] = float(value)
      predictions[(spec.name, seed)] = rows
      if spec.kind == "classification":
        acc.append(_accuracy(rows))
    entry = {"seeds": per_seed, "mean": float(np.mean(list(per_seed.values()))),
             "metric": spec.metric}
    if acc:
      entry["accuracy"] = float(np.mean(acc))
    results["datasets"][spec.name] = entry
  results["average"] = float(np.mean([d["mean"] for d in results["datasets"].values()]))
  results["aggregation"] = "mean"
  results["settings"] = scorer.protocol_settings(templates, max_new_tokens, run.generation,
                                                 run.cleanup)
  return results, predictions


def heldout_hook(config, model_cfg: models.ModelConfig, tokenizer,
                 specs: Sequence[tasks.TaskSpec]) -> Callable[[int, Any], dict]:
  """(step, params) -> {"sentibench/<task>": score, "sentibench/average": ...}; each result is
  also written to <workdir>/sentibench/step_<N>.json and its predictions to
  sentibench/predictions/step_<N>/ (for `sentijax.compare`). Seeds etc. from `config.eval`."""
  ec = config.eval
  mesh = sharding.make_mesh(config.mesh, model_cfg=model_cfg)  # the training loop's mesh
  templates = sentibench.load_templates(ec.templates or None)
  seeds = scorer.parse_seeds(ec.seeds)
  out_dir = Path(config.workdir) / "sentibench"
  loaded: dict[str, sentibench.Task] = {}
  run = scorer.RunSettings.from_config(config, tokenizer)
  compiled: dict = {}

  def hook(step: int, params: Any) -> dict:
    results, predictions = score_tasks(model_cfg, params, tokenizer, specs, templates, seeds,
                          int(ec.max_examples), int(ec.batch_size), mesh, int(ec.max_new_tokens),
                          config.sharding_rules, loaded, run, compiled)
    if jax.process_index() == 0:
      scorer.write_json(out_dir / f"step_{step}.json", results)
      for (name, seed), rows in predictions.items():
        scorer.write_jsonl(scorer.predictions_path(out_dir / "predictions" / f"step_{step}",
                                                   name, seed), rows)
      log.info("held-out at step %d: %s", step, ", ".join(
          f"{n} {d['mean']:.2f}" for n, d in results["datasets"].items()))
    scalars = {f"sentibench/{name}": d["mean"] for name, d in results["datasets"].items()}
    scalars["sentibench/average"] = results["average"]
    return scalars

  return hook
