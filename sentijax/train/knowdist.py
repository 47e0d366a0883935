"""KnowDist (stage 1): the student learns teacher analyses of user texts, prompt masked."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import jax

from sentijax.data import corpus as corpus_lib
from sentijax.data import pipeline
from sentijax.train import export, loop, student

log = logging.getLogger("sentijax")


def run(config) -> loop.Result:
  """Trains on `config.data.corpus` (default: the demo corpus in the package)."""
  workdir = Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  model_cfg = student.model_config(config)

  corpus = corpus_lib.load_corpus(config.data)
  tok = student.tokenizer(config, model_cfg,
                          lambda: [t for r in corpus[0] for t in (r.prompt, r.response)])
  train_ds, val_ds, stats = pipeline.build_train_val(
      config, tok, show_progress=jax.process_index() == 0, corpus=corpus)
  if jax.process_index() == 0:
    (workdir / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))
    export.save_student_spec(model_cfg, tok, workdir)
  log.info("KnowDist: %s, %d params, %d train rows x %d tokens", model_cfg.architecture,
           model_cfg.num_params, train_ds.num_rows, train_ds.seq_len)
  hooks = ()
  if config.eval.during_training:
    from sentijax.eval import hooks as eval_hooks  # local: the scorer is optional in training
    hooks = (eval_hooks.sentibench_hook(config, model_cfg, tok),)
  result = loop.train(config, model_cfg, student.param_initializer(config, model_cfg), train_ds,
                      val_ds, tokenizer=tok, eval_hooks=hooks)
  if result.train_losses:
    log.info("KnowDist done at step %d: train loss %.4f -> %.4f%s", result.step,
             result.train_losses[0][1], result.train_losses[-1][1],
             f", val loss {result.val_losses[-1][1]:.4f}" if result.val_losses else "")
  return result
