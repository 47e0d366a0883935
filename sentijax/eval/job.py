"""The `sentibench` job: score an HF checkpoint on SentiBench, write results, table and plot.

    python -m sentijax.main --config=configs/sentibench.py --config.model.init=DIR \
        --config.eval.data_dir=../shared/sentibench --config.workdir=OUT

Writes into `config.workdir`: results.json (scorer schema), predictions/<dataset>_<seed>.jsonl,
results.md (table) and results.png (bar chart); prints the table. Compiled XLA programs are kept
in a persistent cache (`eval.compilation_cache`), so a second run compiles nothing.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax

from sentijax import models, sharding
from sentijax.data import sentibench
from sentijax.eval import report, scorer, settings
from sentijax.models import factory

log = logging.getLogger("sentijax")


def training_provenance(model_dir: str | os.PathLike) -> dict | None:
  """What an ICLDist export (`<model_dir>/heldout_audit.json`) trained on, as SentiBench tasks:
  {"trained_on": datasets whose train split gave prompts, "heldout": datasets held out};
  None for a model without one (a base model, a KnowDist export)."""
  path = os.path.join(os.fspath(model_dir), "heldout_audit.json")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    audit = json.load(f)
  try:
    sources, heldout = audit["sources"], audit["heldout_tasks"]
    trained = [n for n in sentibench.DATASETS
               if n in sources and sources[n]["examples"] > sources[n]["dropped"]]
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a held-out audit (missing {e}); remove it or rerun the "
                     "ICLDist export") from None
  return {"trained_on": trained, "heldout": [n for n in sentibench.DATASETS if n in heldout],
          "audit": path}


def default_cache_dir() -> str:
  """$SENTIJAX_CACHE_DIR, else $XDG_CACHE_HOME/sentijax or ~/.cache/sentijax."""
  return os.environ.get("SENTIJAX_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
      "sentijax")


def setup_compilation_cache(setting: str) -> str | None:
  """Persistent XLA compilation cache: 'auto' = <default_cache_dir()>/xla, '' / 'off' = none,
  else a directory. Every compiled program is kept (no minimum compile time or size).
  Returns the directory used (None when off)."""
  setting = str(setting or "").strip()
  if setting.lower() in ("", "off", "none", "false"):
    return None
  path = os.path.join(default_cache_dir(), "xla") if setting == "auto" else setting
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != path:
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel
    compilation_cache.reset_cache()  # the cache decision is latched at the first compile
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def _model_dir(config: Any) -> str:
  init = str(config.model.init or "")
  if not init:
    raise ValueError("the sentibench job needs a model: set --config.model.init=DIR "
                     "(a local HF directory with config.json + *.safetensors)")
  if not os.path.isdir(init):
    raise FileNotFoundError(f"model.init directory not found: {init}")
  return init


def load_model(config: Any, placement: sharding.Placement
               ) -> tuple[models.ModelConfig, Any, Any]:
  """(model cfg, params, tokenizer) of `config.model` (init, init_layers, tokenizer, dtype:
  params and activations) on `placement`, built by `models.factory` as every job builds it."""
  _model_dir(config)
  cfg = factory.model_config(config, training=False)
  params = factory.param_initializer(config, cfg)(placement.mesh, placement.rules)
  return cfg, params, factory.tokenizer(config, cfg)


def run(config: Any) -> dict:
  """Runs the job described by `config` (see configs/sentibench.py); returns the results dict."""
  ev = config.eval
  _model_dir(config)  # fail before reading any data
  datasets = settings.parse_datasets(ev.datasets)
  spec = settings.ScoringSpec.from_config(ev, progress=True)  # checks every eval.* value
  settings.check_data(spec.data_dir, datasets)  # fail before the (slow) model load
  templates = sentibench.load_templates(ev.templates or None)
  missing = [d for d in datasets if d not in templates["instructions"]]
  if missing:
    raise ValueError(f"templates {ev.templates or '(package default)'} have no instructions for "
                     f"{missing}")

  placement = sharding.Placement.from_config(
      config, factory.model_config(config, training=False))
  t0 = time.time()
  cache_dir = setup_compilation_cache(ev.get("compilation_cache", "auto"))
  cfg, params, tokenizer = load_model(config, placement)
  run = settings.RunSettings.from_config(config, tokenizer)
  generation = run.generation
  log.info("loaded %s (%.1fM params, %s) in %.1fs on mesh %s", config.model.init,
           cfg.num_params / 1e6, cfg.dtype, time.time() - t0, dict(placement.mesh.shape))
  log.info("generation config %s: repetition_penalty %g, eos %s; compilation cache %s",
           generation.source, generation.repetition_penalty,
           list(generation.eos_token_ids or ()) or "(model/tokenizer)", cache_dir or "off")

  workdir = str(config.workdir)
  t0 = time.time()
  session = scorer.Scorer(cfg, tokenizer, placement, run, spec, templates)
  results = session.score(params, datasets,
                          predictions_dir=os.path.join(workdir, "predictions"))
  provenance = training_provenance(str(config.model.init or ""))
  if provenance:
    results["training"] = provenance
    log.info("the model's ICLDist run trained on %s (marked in compare); held out: %s",
             ", ".join(provenance["trained_on"]) or "-", ", ".join(provenance["heldout"]) or "-")
  if jax.process_index() == 0:
    scorer.write_json(os.path.join(workdir, "results.json"), results)
    md_path, png_path = report.write_report(results, workdir)
    print(report.markdown_table(results))
    print(f"SentiBench: {len(datasets)} dataset(s) x {len(spec.seeds)} seed(s) in "
          f"{time.time() - t0:.0f}s; wrote {os.path.join(workdir, 'results.json')}, {md_path}, "
          f"{png_path}")
  return results
