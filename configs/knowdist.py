"""KnowDist (stage 1): next-token loss on teacher analyses of user texts, prompt masked.

Default (offline, any CPU machine, ~40 s on 2 cores): the `tiny` preset (164k params) from
scratch on the demo corpus that ships in the package, with a BPE tokenizer trained on it:

  python -m sentijax.main --config=configs/knowdist.py

prints the train loss falling (6.95 -> ~1.7 in 200 steps; the 49-record demo corpus is
memorised, held-out loss ~5.7) and writes checkpoints, TensorBoard events, the trained tokenizer
and an HF export (runs/knowdist/hf) into the workdir. Rerunning resumes from the last checkpoint.
On the real teacher sample (`--config.data.corpus=../shared/teacher_corpus/
mixtral_reviews_500.jsonl`) the same model goes 6.93 -> ~5.3 in 60 steps, held-out too.

Real run (Llama-3.2-1B-Instruct student on a teacher corpus, one GPU/TPU host or more):

  python -m sentijax.main --config=configs/knowdist.py \
    --config.model.init=/models/Llama-3.2-1B-Instruct \
    --config.data.corpus=/data/knowdist.jsonl --config.data.chat_template=True \
    --config.data.seq_len=2048 --config.train.batch_size=64 --config.train.steps=3000 \
    --config.train.learning_rate=1e-5 --config.model.remat=True --config.mesh.fsdp=-1 \
    --config.mesh.data=1 --config.workdir=runs/knowdist-llama1b

The real teacher sample: --config.data.corpus=../shared/teacher_corpus/mixtral_reviews_500.jsonl
"""
from sentijax import config as base_config


def get_config():
  c = base_config.base()
  c.job = "knowdist"
  c.workdir = "runs/knowdist"
  c.model.preset = "tiny"
  c.data.seq_len = 256
  c.train.steps = 200
  c.train.batch_size = 8
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 20
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.eval_batches = 2
  c.checkpoint.every = 100
  c.export_hf = True
  return c
