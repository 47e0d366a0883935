"""The `sentibench` job: score an HF checkpoint on SentiBench, write results, table and plot.

    python -m sentijax.main --config=configs/sentibench.py --config.model.init=DIR \
        --config.eval.data_dir=../shared/sentibench --config.workdir=OUT

Writes into `config.workdir`: results.json (scorer schema), predictions/<dataset>_<seed>.jsonl,
results.md (table) and results.png (bar chart); prints the table.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax

from sentijax import models, sharding
from sentijax.data import sentibench
from sentijax.data import tokenizer as tokenizer_lib
from sentijax.eval import report, scorer

log = logging.getLogger(__name__)


def _model_dir(config: Any) -> str:
  init = str(config.model.init or "")
  if not init:
    raise ValueError("the sentibench job needs a model: set --config.model.init=DIR "
                     "(a local HF directory with config.json + *.safetensors)")
  return init


def load_model(config: Any, mesh) -> tuple[models.ModelConfig, Any, Any]:
  """(model cfg, params, tokenizer) from config.model.init / .tokenizer / .dtype on `mesh`."""
  init = _model_dir(config)
  if not os.path.isdir(init):
    raise FileNotFoundError(f"model.init directory not found: {init}")
  dtype = models.resolve_dtype(config.model.dtype)
  cfg, params = models.load_hf(init, dtype=dtype, compute_dtype=dtype, mesh=mesh,
                               rules=config.sharding_rules)
  cfg = cfg.replace(attention_chunk=int(config.model.attention_chunk))
  tokenizer = tokenizer_lib.load_tokenizer(str(config.model.tokenizer or init))
  models.check_tokenizer(cfg, tokenizer, where=str(config.model.tokenizer or init))
  return cfg, params, tokenizer


def run(config: Any) -> dict:
  """Runs the job described by `config` (see configs/sentibench.py); returns the results dict."""
  ev = config.eval
  _model_dir(config)  # fail before reading any data
  datasets = scorer.parse_datasets(ev.datasets)
  seeds = scorer.parse_seeds(ev.seeds)
  scorer.check_data(ev.data_dir, datasets)  # fail before the (slow) model load
  templates = sentibench.load_templates(ev.templates or None)
  missing = [d for d in datasets if d not in templates["instructions"]]
  if missing:
    raise ValueError(f"templates {ev.templates or '(package default)'} have no instructions for "
                     f"{missing}")

  mesh = sharding.make_mesh(config.mesh)
  t0 = time.time()
  cfg, params, tokenizer = load_model(config, mesh)
  log.info("loaded %s (%.1fM params, %s) in %.1fs on mesh %s", config.model.init,
           cfg.num_params / 1e6, cfg.dtype, time.time() - t0, dict(mesh.shape))

  workdir = str(config.workdir)
  t0 = time.time()
  results = scorer.score(cfg, params, tokenizer, ev.data_dir, templates, datasets, seeds,
                         max_examples=int(ev.max_examples), batch_size=int(ev.batch_size),
                         mesh=mesh, predictions_dir=os.path.join(workdir, "predictions"),
                         progress=True, max_new_tokens=int(ev.max_new_tokens))
  if jax.process_index() == 0:
    scorer.write_json(os.path.join(workdir, "results.json"), results)
    md_path, png_path = report.write_report(results, workdir)
    print(report.markdown_table(results))
    print(f"SentiBench: {len(datasets)} dataset(s) x {len(seeds)} seed(s) in "
          f"{time.time() - t0:.0f}s; wrote {os.path.join(workdir, 'results.json')}, {md_path}, "
          f"{png_path}")
  return results
