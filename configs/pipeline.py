"""KnowDist -> ICLDist -> SentiBench in one workdir, each stage resumable and skipped when done.

Default (offline, CPU, a few minutes): the tiny preset learns the demo KnowDist corpus, then the
ICL demo tasks from that checkpoint, then SentiBench (sc/sst2 and multifaced/irony18, 20 items,
seed 42) scores the result when eval.data_dir exists (skipped with a log line otherwise). The
ICLDist stage checks its training prompts against SentiBench's test sentences, so it needs
eval.data_dir (../shared/sentibench) or an explicit --config.icl.leak_check=off (a warning; the
held-out guarantee then covers only the demo tasks):

  python -m sentijax.main --config=configs/pipeline.py
  python -m sentijax.main --config=configs/pipeline.py --config.icl.leak_check=off   # repo only

writes runs/pipeline/{knowdist,icldist,sentibench}/ (checkpoints, hf/, results.json). Rerun the
same command to resume an interrupted stage; finished stages are skipped.

Ablations (README): --config.pipeline.stages=knowdist,sentibench (KnowDist only),
icldist,sentibench (ICLDist only, from model.init or the preset), or the default (both).
Stage overrides: --config.stage.knowdist.train.steps=300 --config.stage.icldist.icl.shots=0-4 ...
"""
import ml_collections

from sentijax import config as base_config


def _section(**values):
  return ml_collections.ConfigDict(values)


def get_config():
  c = base_config.base()
  c.job = "pipeline"
  c.workdir = "runs/pipeline"
  c.model.preset = "tiny"
  c.icl = base_config.icl()
  c.icl.heldout = "sc/movies,sc/sst2,multifaced/irony18"
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.stages = "knowdist,icldist,sentibench"
  c.eval.seeds = "42"
  c.eval.max_examples = 20
  c.eval.max_new_tokens = 64
  c.eval.datasets = "sc/sst2,multifaced/irony18"
  c.stage = ml_collections.ConfigDict()
  c.stage.knowdist = ml_collections.ConfigDict({
      "data": _section(seq_len=256, truncation="left_prompt", chat_template=False),
      "train": _section(steps=200, learning_rate=3e-3, warmup_steps=20, eval_every=100,
                        eval_batches=2, log_every=20),
      "checkpoint": _section(every=100),
  })
  c.stage.icldist = ml_collections.ConfigDict({
      "data": _section(seq_len=256, truncation="drop", chat_template=False),
      "icl": _section(num_prompts=1200, shots="0-8"),
      "train": _section(steps=150, learning_rate=1e-3, warmup_steps=10, eval_every=75,
                        eval_batches=2, log_every=25),
      "checkpoint": _section(every=75),
  })
  c.stage.sentibench = ml_collections.ConfigDict({"eval": _section(batch_size=16)})
  return c
