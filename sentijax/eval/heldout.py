"""Held-out evaluation of any registered task (SentiBench's 12 and others) during training.

SentiBench datasets are scored exactly as the `sentibench` job scores them
(`scorer.Scorer.score_run`, the templates' instruction). Any other registered task
(`sentijax.data.tasks.TaskSpec`) gets the same protocol -- its own instruction, k demos from its
train split drawn per seed, the query, verbalizer first-token scoring or greedy extraction -- and
its layout's parser and metric, through the same `Scorer` session. Results use the scorer's
schema ({"datasets": {name: {"seeds": {...}, "mean": ..., "metric": ...}}, "average": ...});
classification entries also carry "accuracy" (x100, mean over seeds).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np

from sentijax.data import sentibench, tasks
from sentijax.eval import metrics, parsers, scorer

PyTree = Any


def _accuracy(rows: Sequence[dict]) -> float:
  return 100.0 * float(np.mean([str(r["gold"]).lower() == r["prediction"] for r in rows]))


def score_task(session: scorer.Scorer, params: PyTree, spec: tasks.TaskSpec,
               task: sentibench.Task, seed: int) -> tuple[float, list[dict]]:
  """(score x100, prediction rows) of one (task, seed) run: the first
  `session.spec.limits[spec.kind]` items of `task` (loaded from `spec`)."""
  templates = session.templates
  if spec.sentibench and spec.name in templates["instructions"]:
    return session.score_run(params, task, seed)
  own = dict(templates, instructions={**templates["instructions"], spec.name: spec.instruction})
  prompts = sentibench.build_prompts(task, own, seed,
                                     max_examples=session.spec.limits[spec.kind])
  texts = [p.text for p in prompts]
  desc = f"{spec.name} seed {seed}"
  rows: list[dict] = []
  if spec.kind == "classification":
    scores_NxC = session.classify(params, texts, spec.verbalizers, desc)
    preds = [spec.labels[int(j)] for j in np.argmax(scores_NxC, axis=-1)]
    for p, pred, s in zip(prompts, preds, scores_NxC):
      rows.append({"index": p.index, "gold": p.gold, "prediction": pred,
                   "scores": [float(x) for x in s]})
    golds = [p.gold for p in prompts]
    return metrics.score_dataset(spec.name, golds, preds, metric=spec.metric), rows
  outputs = session.generate(params, texts, desc)
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


def score_tasks(session: scorer.Scorer, params: PyTree, specs: Sequence[tasks.TaskSpec],
                seeds: Sequence[int] | None = None,
                predictions_dir: str | os.PathLike | None = None) -> dict:
  """Results of every task x seed (None = `session.spec.seeds`); each task is loaded once per
  session. With `predictions_dir`, writes each run's rows as `scorer.predictions_path` names
  them (what `sentijax.compare` reads)."""
  seeds = session.spec.seeds if seeds is None else seeds
  results: dict[str, Any] = {"datasets": {}}
  for spec in specs:
    task = session.task(spec.root, spec.name, lambda spec=spec: tasks.load_task(spec))
    per_seed, acc = {}, []
    for seed in seeds:
      value, rows = score_task(session, params, spec, task, seed)
      per_seed[str(seed)] = float(value)
      if predictions_dir is not None and jax.process_index() == 0:
        scorer.write_jsonl(scorer.predictions_path(predictions_dir, spec.name, seed), rows)
      if spec.kind == "classification":
        acc.append(_accuracy(rows))
    entry = {"seeds": per_seed, "mean": float(np.mean(list(per_seed.values()))),
             "metric": spec.metric}
    if acc:
      entry["accuracy"] = float(np.mean(acc))
    results["datasets"][spec.name] = entry
  results["average"] = float(np.mean([d["mean"] for d in results["datasets"].values()]))
  results["aggregation"] = "mean"
  results["settings"] = session.protocol_settings()
  return results
