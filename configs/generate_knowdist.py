"""Teacher corpus for KnowDist: user texts x analysis perspectives -> teacher analyses.

Default (offline, ~1 min on 2 cores): a random `tiny` local teacher (tokenizer trained on the demo
corpus) analyses the 49 demo texts of the package under all seven perspectives (343 records) into
runs/generate_knowdist/corpus.jsonl; `min_tokens` keeps a random teacher from stopping at once.
Running it again adds nothing (records are keyed by prompt, sampling and the teacher settings;
a rerun with other settings in the same workdir stops, naming them):

  python -m sentijax.main --config=configs/generate_knowdist.py

Against an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, `sentijax.serve`), see README
"Teacher generation":

  python -m sentijax.main --config=configs/generate_knowdist.py --config.teacher.backend=openai \
    --config.teacher.base_url=http://127.0.0.1:8000/v1 --config.teacher.model=MODEL \
    --config.inputs.path=texts.jsonl --config.workdir=runs/kd-corpus

On N processes (`--config.distributed.*`, a workdir every host sees) each asks for its share and
process 0 merges the parts into one corpus.jsonl.

The same file serves a model (`--config.job=serve --config.model.init=HF_DIR`).
"""
import ml_collections

from sentijax import config as base_config
from sentijax.teacher import config as teacher_config


def get_config():
  c = base_config.base()
  c.job = "generate_knowdist"
  c.workdir = "runs/generate_knowdist"
  c.model.preset = "tiny"
  c.teacher = teacher_config.teacher()
  c.sampling = teacher_config.sampling()
  c.inputs = teacher_config.inputs()
  c.serve = teacher_config.serve()
  c.generate = ml_collections.ConfigDict()
  c.generate.perspectives = "all"  # comma list of sentijax.data.prompts names, or all
  c.generate.logprobs = 0  # top-k logprobs per generated token stored in meta (0 = none)
  # Inputs holding a SentiBench test sentence: inputs.on_leak (drop); responses: listed in
  # summary.json. A missing dir stops the job; generate.leak_check=off skips the check.
  c.generate.leak_check = "on"
  c.generate.leak_check_dirs = "../shared/sentibench"
  c.generate.progress = True
  return c
