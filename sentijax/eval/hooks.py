"""Scoring as a training-loop hook: one hook, one `scorer.Scorer`, every `train.eval_every` steps.

KnowDist scores the SentiBench datasets of `eval.during_training`; ICLDist scores its held-out
tasks (any registered task, `heldout.score_tasks`). Either way the step's results go to
<workdir>/sentibench/step_<N>.json and its predictions to sentibench/predictions/step_<N>/
(what `sentijax.compare` reads for confidence intervals).

    hook = hooks.ScoringHook(config, model_cfg, tokenizer, "sc/sst2,absa/atsa_rest16")
    hook(step, params)   # {"sentibench/sc/sst2": 61.2, ..., "sentibench/average": 48.0}
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from sentijax import models
from sentijax.data import tasks as tasks_lib
from sentijax.eval import heldout, scorer, settings

log = logging.getLogger("sentijax")


class ScoringHook:
  """(step, params) -> {"sentibench/<task>": score, "sentibench/average": ...}.

  `tasks`: SentiBench dataset names (a comma list such as `eval.during_training`), scored and
  aggregated as the sentibench job does; or registered tasks (`heldout.score_tasks`: each with
  its own metric, classification entries with "accuracy" too). Seeds, item limits, batch size
  and the fidelity settings (the `model.init` directory's generation config, decode clean-up,
  aggregation) come from `config.eval` through one `Scorer` (`self.scorer`) on the training
  loop's placement (`config.mesh`, `config.sharding_rules`): batch shapes compiled at one step
  are reused at the next.
  """

  def __init__(self, config, model_cfg: models.ModelConfig, tokenizer,
               tasks: str | Sequence[tasks_lib.TaskSpec]):
    self.scorer = scorer.Scorer.from_config(config, model_cfg, tokenizer)
    self.names = settings.parse_datasets(tasks) if isinstance(tasks, str) else None
    self.tasks = tasks
    self.out_dir = Path(config.workdir) / "sentibench"

  def __call__(self, step: int, params: Any) -> dict:
    pred_dir = self.out_dir / "predictions" / f"step_{step}"
    if self.names is not None:
      results = self.scorer.score(params, self.names, predictions_dir=pred_dir)
    else:
      results = heldout.score_tasks(self.scorer, params, self.tasks, predictions_dir=pred_dir)
    if jax.process_index() == 0:
      scorer.write_json(self.out_dir / f"step_{step}.json", results)
      log.info("held-out at step %d: %s", step, ", ".join(
          f"{n} {d['mean']:.2f}" for n, d in results["datasets"].items()))
    scalars = {f"sentibench/{name}": d["mean"] for name, d in results["datasets"].items()}
    scalars["sentibench/average"] = results["average"]
    return scalars
