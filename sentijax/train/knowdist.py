"""KnowDist (stage 1): the student learns teacher analyses of user texts, prompt masked."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jax

from sentijax.data import dataset, readers
from sentijax.data.spec import DataSpec
from sentijax.eval import hooks as eval_hooks
from sentijax.models import factory
from sentijax.train import export, loop

log = logging.getLogger("sentijax")


def run(config) -> loop.Result:
  """Trains on `config.data.corpus` (default: the demo corpus in the package)."""
  workdir = Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  model_cfg = factory.model_config(config)

  spec = DataSpec.from_config(config.data, workdir=config.workdir, seed=config.seed)
  train_records, val_records, corpus_stats = readers.load_corpus(spec)
  tok = factory.tokenizer(config, model_cfg,
                          lambda: [t for r in train_records for t in (r.prompt, r.response)])
  train_ds, val_ds, stats = dataset.build_train_val(
      train_records, val_records, tok, spec, show_progress=jax.process_index() == 0)
  stats = {"corpus": corpus_stats} | stats
  if jax.process_index() == 0:
    (workdir / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))
    export.save_student_spec(model_cfg, tok, workdir, config.model.init)
  log.info("KnowDist: %s, %d params, %d train rows x %d tokens", model_cfg.architecture,
           model_cfg.num_params, train_ds.num_rows, train_ds.seq_len)
  hooks = ()
  if config.eval.during_training:
    hooks = (eval_hooks.ScoringHook(config, model_cfg, tok, config.eval.during_training),)
  result = loop.train(config, model_cfg, factory.param_initializer(config, model_cfg), train_ds,
                      val_ds, tokenizer=tok, eval_hooks=hooks)
  if result.train_losses:
    log.info("KnowDist done at step %d: train loss %.4f -> %.4f%s", result.step,
             result.train_losses[0][1], result.train_losses[-1][1],
             f", val loss {result.val_losses[-1][1]:.4f}" if result.val_losses else "")
  return result
