"""SentiBench as a training-loop hook: score a subset every `train.eval_every` steps."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax

from sentijax import models, sharding
from sentijax.eval import scorer


def sentibench_hook(config, model_cfg: models.ModelConfig, tokenizer
                    ) -> Callable[[int, Any], dict]:
  """(step, params) -> {"sentibench/<dataset>": score, "sentibench/average": ...}.

  Datasets from `eval.during_training` (comma list), seeds/max_examples/batch size and the
  fidelity settings (generation config of the `model.init` directory, decode clean-up,
  aggregation) from `eval.*`, as the sentibench job applies them; each result is also written
  to <workdir>/sentibench/step_<N>.json, its predictions to sentibench/predictions/step_<N>/
  (what `sentijax.compare` needs for confidence intervals). Batch shapes compiled at one step are reused later.
  """
  ec = config.eval
  mesh = sharding.make_mesh(config.mesh, model_cfg=model_cfg)  # the training loop's mesh
  out_dir = Path(config.workdir) / "sentibench"
  run = scorer.RunSettings.from_config(config, tokenizer)
  compiled: dict = {}

  def hook(step: int, params: Any) -> dict:
    results = scorer.score(model_cfg, params, tokenizer, ec.data_dir, ec.templates or None,
                           ec.during_training, ec.seeds, ec.max_examples, ec.batch_size, mesh,
                           progress=False, max_new_tokens=ec.max_new_tokens,
                           rules=config.sharding_rules, generation=run.generation,
                           decode_cleanup=run.cleanup, aggregation=str(ec.aggregation),
                           compile_cost=run.compile_cost, compiled=compiled,
                           shared_prefix=run.shared_prefix,
                           predictions_dir=out_dir / "predictions" / f"step_{step}")
    if jax.process_index() == 0:
      scorer.write_json(out_dir / f"step_{step}.json", results)
    scalars = {f"sentibench/{name}": d["mean"] for name, d in results["datasets"].items()}
    scalars["sentibench/average"] = results["average"]
    return scalars

  return hook
