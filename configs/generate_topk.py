"""Offline teacher top-k for logit distillation: the teacher scores every record of a corpus
(teacher forcing over prompt + response, no generation) and stores its top-k next-token
log-probabilities at each response token, with its token ids, in <workdir>/store.

Default (offline, any CPU machine): a random `tiny` local teacher (tokenizer trained on the demo
corpus) scores the 49 records of the package's demo corpus, k=20:

  python -m sentijax.main --config=configs/generate_topk.py

writes runs/generate_topk/store/{index.json, shard-0000N.bin, tokenizer/} (4 shards of 16
records) and runs/generate_topk/summary.json, and logs
  "top-k store runs/generate_topk/store: 49 written, 0 already there, 0 rejected, 0 skipped
  ...; 49 records in 4 shards, k=20, 8752 tokens scored in 49.6 s" (~1 min on a loaded 2-core
  machine, mostly compilation and the tokenizer).
Rerunning adds nothing; a killed run rerun with the same command completes the same store.
Distil it (configs/kd.py takes the store's tokenizer; train/kd > 0: the teacher is seed 1):

  python -m sentijax.main --config=configs/kd.py --config.kd.mode=offline \
    --config.kd.store=runs/generate_topk/store --config.kd.top_k=8

A real teacher (local, sharded over the mesh) on a real corpus, rendered with the chat template:

  python -m sentijax.main --config=configs/generate_topk.py \
    --config.model.init=/models/Llama-3.1-8B-Instruct --config.mesh.tensor=4 \
    --config.data.corpus=/data/knowdist.jsonl --config.data.chat_template=True \
    --config.teacher.batch_size=32 --config.topk.shard_records=1024 --config.workdir=runs/topk-8b

A sampled store (unbiased estimate of the forward KL at the KD temperature; Anshumann et al.
2025): 32 draws per response token at T = 1 (on SmolLM2 ~42 bytes per position, as top-20 +
tail: bench/README.md), trained with kd.temperature equal to topk.temperature:

  python -m sentijax.main --config=configs/generate_topk.py --config.topk.mode=sample \
    --config.topk.k=32 --config.workdir=runs/generate_sample
  python -m sentijax.main --config=configs/kd.py --config.kd.mode=offline \
    --config.kd.store=runs/generate_sample/store --config.kd.top_k=32

A served teacher that echoes prompt logprobs (vLLM, `sentijax.serve`; k <= 20):

  python -m sentijax.main --config=configs/generate_topk.py --config.teacher.backend=openai \
    --config.teacher.base_url=http://127.0.0.1:8000/v1 --config.teacher.model=MODEL \
    --config.teacher.tokenizer=/models/MODEL --config.data.corpus=/data/knowdist.jsonl
"""
import ml_collections

from sentijax import config as base_config
from sentijax.teacher import config as teacher_config


def get_config():
  c = base_config.base()
  c.job = "generate_topk"
  c.workdir = "runs/generate_topk"
  c.seed = 1  # the random demo teacher's init: not the seed-0 student of configs/kd.py
  c.model.preset = "tiny"
  c.teacher = teacher_config.teacher()
  c.teacher.endpoint = "completions"  # prompt logprobs (echo) exist only there
  c.serve = teacher_config.serve()
  c.topk = ml_collections.ConfigDict()
  c.topk.mode = "topk"  # topk: the k most likely ids + tail mass | sample: k draws (local only)
  c.topk.k = 20  # topk: ids + logprobs per response token (servers: <= 20); sample: draws (<= 255)
  c.topk.temperature = 1.0  # sample: draws from softmax(logits / T): train with kd.temperature=T
  c.topk.store_dir = ""  # "" = <workdir>/store
  c.topk.shard_records = 16  # records per shard (one atomic write); real corpora: ~1024
  c.topk.logits_chunk = 256  # positions per output-projection chunk (local teacher)
  c.topk.max_len = 0  # longer records are skipped; 0 = the teacher's max positions
  c.topk.echo_max_tokens = 0  # servers that refuse max_tokens=0 with echo: 1 (ignored token)
  c.topk.progress = True
  c.generate = ml_collections.ConfigDict()
  c.generate.leak_check = "on"  # off: no check (a missing leak_check_dirs stops the job)
  c.generate.leak_check_dirs = "../shared/sentibench"  # responses holding test sentences flagged
  return c
