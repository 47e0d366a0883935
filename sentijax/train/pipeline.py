"""Both stages from one command: KnowDist -> ICLDist -> SentiBench (-> the HF export), one workdir.

Each stage runs in `<workdir>/<stage>` with the shared config plus its `config.stage.<stage>`
overrides. A training stage resumes from its own checkpoints and exports `<stage>/hf`, which the
next stage starts from (`model.init`); a finished stage writes `<stage>/stage_done.json` and is
skipped on a rerun. `pipeline.stages` picks the stages (the ablations: "knowdist,sentibench",
"icldist,sentibench", or all three); the final student is `<workdir>/<last training stage>/hf`.
"""
from __future__ import annotations

import copy
import importlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("sentijax")
STAGES = ("knowdist", "icldist", "sentibench")
_JOBS = {"knowdist": "sentijax.train.knowdist", "icldist": "sentijax.train.icldist",
         "sentibench": "sentijax.eval.job"}
DONE = "stage_done.json"


def parse_stages(stages: str) -> list[str]:
  names = [s.strip() for s in str(stages).split(",") if s.strip()]
  bad = [s for s in names if s not in STAGES]
  if bad or not names:
    raise ValueError(f"pipeline.stages={stages!r}: expected a comma list of {', '.join(STAGES)}")
  return sorted(dict.fromkeys(names), key=STAGES.index)


def stage_config(config, stage: str, init: str):
  """The config of one stage: shared keys, `config.stage.<stage>` overrides, its own workdir."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    for section, values in config.stage[stage].items():
      for key, value in values.items():
        if key not in cfg[section]:
          raise ValueError(f"stage.{stage}.{section}.{key}: no such key config.{section}.{key}")
        cfg[section][key] = value
    cfg.job = stage
    cfg.workdir = os.path.join(config.workdir, stage)
    if init != str(config.model.init or ""):  # the previous stage's export: already a subset
      cfg.model.init_layers = ""
    cfg.model.init = init
    cfg.export_hf = True
  return cfg


def run(config) -> dict:
  """Runs the stages in order; returns {stage: summary}."""
  stages = parse_stages(config.pipeline.stages)
  root = Path(config.workdir)
  root.mkdir(parents=True, exist_ok=True)
  init, out = str(config.model.init or ""), {}
  for stage in stages:
    if stage == "sentibench" and not init:
      raise ValueError("pipeline: the sentibench stage needs a trained stage before it or "
                       "model.init")
    cfg = stage_config(config, stage, init)
    done = Path(cfg.workdir) / DONE
    if done.is_file():
      log.info("pipeline: stage %s already complete (%s); skipped", stage, done)
      out[stage] = json.loads(done.read_text())
    elif stage == "sentibench" and not os.path.isdir(cfg.eval.data_dir):
      log.info("pipeline: stage sentibench skipped: eval.data_dir=%s does not exist",
               cfg.eval.data_dir)
      continue
    else:
      log.info("pipeline: stage %s in %s (model.init=%s)", stage, cfg.workdir, init or "preset")
      result = importlib.import_module(_JOBS[stage]).run(cfg)
      if stage == "sentibench":
        summary = {"average": result["average"]}
      else:
        if getattr(result, "preempted", False):
          log.warning("pipeline: stage %s preempted at step %d; rerun to resume", stage,
                      result.step)
          return out
        summary = {"step": result.step, "hf": os.path.join(cfg.workdir, "hf")}
      Path(cfg.workdir, DONE).write_text(json.dumps(summary))
      out[stage] = summary
    if stage != "sentibench":
      init = os.path.join(cfg.workdir, "hf")
  log.info("pipeline done: %s", json.dumps(out))
  return out
