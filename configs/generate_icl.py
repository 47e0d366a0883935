"""Teacher corpus for ICLDist: few-shot task prompts (the ICL builder) -> teacher answers and,
with logprobs, the teacher's distribution over the verbalizers (`meta.teacher_probs`).

Default (offline, ~1 min on 2 cores): a random `tiny` local teacher answers 64 greedy prompts
built from the demo tasks of the package into runs/generate_icl/corpus.jsonl (rerunning adds
nothing); the second command trains ICLDist on it:

  python -m sentijax.main --config=configs/generate_icl.py
  python -m sentijax.main --config=configs/icldist.py --config.icl.target=teacher_probs \
    --config.icl.teacher_corpus=runs/generate_icl/corpus.jsonl

A served teacher (raw prompts: the completions endpoint; its tokenizer maps logprob strings) on
real source tasks: the SentiBench train splits and ../shared/icl_sources, the held-out tasks
removed (the config's own icl.tasks / icl.heldout name the package demo tasks, which are not in
these dirs, so both are given). Extraction tasks (atsa, acsa, asqp, ...) get no
meta.teacher_probs; with icl.target=teacher_probs those records train on CE only and are counted
(data_stats.json: icl.no_distribution):

  python -m sentijax.main --config=configs/generate_icl.py --config.teacher.backend=openai \
    --config.teacher.base_url=http://127.0.0.1:8000/v1 --config.teacher.model=MODEL \
    --config.teacher.tokenizer=/models/MODEL --config.workdir=runs/generate_icl-served \
    --config.icl.task_dirs=../shared/sentibench,../shared/icl_sources --config.icl.tasks=all \
    --config.icl.heldout=sc/sst2,multifaced/irony18,absa/atsa_rest16

Train on it as above, with icl.teacher_corpus=runs/generate_icl-served/corpus.jsonl and the same
icl.task_dirs and icl.heldout.
"""
import ml_collections

from sentijax import config as base_config
from sentijax.teacher import config as teacher_config


def get_config():
  c = base_config.base()
  c.job = "generate_icl"
  c.workdir = "runs/generate_icl"
  c.model.preset = "tiny"
  c.teacher = teacher_config.teacher()
  c.teacher.endpoint = "completions"  # ICL prompts are raw text
  c.sampling = teacher_config.sampling()
  c.sampling.temperature = 0.0
  c.sampling.max_tokens = 32
  c.sampling.min_tokens = 1
  c.sampling.stop = "\n"
  c.serve = teacher_config.serve()
  c.icl = base_config.icl()
  # Classification tasks: their records carry a verbalizer distribution (extraction tasks such
  # as atsa/cafe have none; with icl.target=teacher_probs they would train on CE only).
  c.icl.tasks = "sc/products,sc/restaurants,emotion/chat"
  c.icl.heldout = "sc/movies"
  c.icl.num_prompts = 64
  c.icl.val_prompts = 0
  c.data.seq_len = 256
  c.generate = ml_collections.ConfigDict()
  # > 0: meta.teacher_probs (local backend: exact; openai: from the top-N first-token logprobs)
  c.generate.logprobs = 20
  # on: responses checked against leak_check_dirs and, as icl.leak_check (the same setting),
  # prompts built without SentiBench test sentences (eval.data_dir); a missing dir stops the job.
  c.generate.leak_check = "on"
  c.icl.leak_check = c.generate.get_ref("leak_check")
  c.generate.leak_check_dirs = "../shared/sentibench"
  c.generate.progress = True
  return c
