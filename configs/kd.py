"""Logit distillation: the student matches a teacher's next-token distributions.

Default (offline, any CPU machine, ~2 min on 2 cores): a random `tiny` preset teacher (seed 1)
distilled online into a `tiny` student (seed 0) on the demo corpus shipped in the package, with
a BPE tokenizer trained on it; loss = 0.5 CE + 0.5 KL(teacher || student), per response token:

  python -m sentijax.main --config=configs/kd.py

logs train/ce falling (6.9 -> 4.1 in 100 steps) next to train/kd, the teacher's forward TFLOP/s
apart from the student's, and eval/loss + eval/kl_teacher (held-out KL to the teacher) at steps
0, 50, 100; writes checkpoints, TensorBoard events, the tokenizer, data_stats.json and an HF
export (runs/kd/hf) into the workdir. Rerunning resumes from the last checkpoint. A random teacher
is nearly uniform (held-out KL 0.025 at step 0, 0.34 at step 100 as the CE half fits the corpus):
a smoke test. A trained teacher, the KnowDist demo student:

  python -m sentijax.main --config=configs/knowdist.py
  python -m sentijax.main --config=configs/kd.py --config.teacher.model_dir=runs/knowdist/hf \
    --config.workdir=runs/kd-from-knowdist

takes the held-out KL to that teacher 2.78 -> 0.67 in 100 steps (0.80 with --config.kd.loss=ce,
the CE-only baseline) and the held-out CE to 5.29 (5.36 CE-only).

Real run (Qwen2.5-72B-Instruct teacher, Qwen2.5-1.5B-Instruct student, same tokenizer; the
teacher forward runs in the step, sharded over the mesh with the student):

  python -m sentijax.main --config=configs/kd.py \
    --config.teacher.model_dir=/models/Qwen2.5-72B-Instruct \
    --config.model.init=/models/Qwen2.5-1.5B-Instruct --config.data.corpus=/data/knowdist.jsonl \
    --config.data.chat_template=True --config.data.seq_len=2048 --config.kd.loss=jsd \
    --config.kd.beta=0.5 --config.kd.top_k=0 --config.train.batch_size=64 \
    --config.train.steps=3000 --config.train.learning_rate=1e-5 --config.model.remat=True \
    --config.mesh.data=1 --config.mesh.fsdp=-1 --config.workdir=runs/kd-qwen72b-1.5b

Offline (a top-k teacher store written by configs/generate_topk.py; no teacher in the step):

  python -m sentijax.main --config=configs/kd.py --config.kd.mode=offline \
    --config.kd.store=runs/generate_topk/store --config.kd.top_k=8

logs eval/kl_teacher_bucketed (the held-out KL over the stored top-k + the tail bucket, a lower
bound of the full KL), eval/kd and kd_support_mass (train/ and eval/: the student's probability on
the stored ids). Add --config.kd.eval_teacher=runs/knowdist/hf to load that teacher only for
scoring: eval/kl_teacher, the held-out full-vocabulary KL.

On-policy (README: On-policy distillation): each step the first round(kd.lmbda x batch) rows keep
their prompts and get responses sampled by the current student (kd.seq_kd=True: by the teacher;
kd.rollout.temperature / top_p / max_new_tokens; eos and kd.rollout.stop strings end a
response), the teacher in the step:

  python -m sentijax.main --config=configs/kd.py --config.kd.mode=on_policy \
    --config.kd.loss=reverse --config.kd.alpha=1.0 --config.workdir=runs/kd-onpolicy

logs, besides train/kd and eval/kl_teacher (steps 0, 50, 100): train/rkl_token (the per-token
reverse-KL estimate log q(x) - log p(x) on the student's samples), train/onpolicy_fraction,
train/rollout_tokens_per_s, train/rollout_length, train/rollout_dropped. A resume samples the
same tokens (rollout keys by seed, step and row). Measured (2 shared CPU cores, ~2 min): train/kd
(the reverse KL on the student's samples) 0.025 -> 0.009 in 100 steps, eval/kl_teacher 0.025 ->
0.0125 -> 0.0097 at steps 0 / 50 / 100, rollouts of 59-64 tokens at 1-5k tokens/s (a random
teacher is nearly uniform: a smoke test, as above). --config.kd.rollout.estimator=token (with
kd.loss=reverse) trains on the sampled-token estimator instead (a policy gradient with advantage
-(log q - log p), only the teacher's log-prob of the sampled token used).

A served teacher (README: On-policy distillation, "A served teacher"; train/served.py): the
teacher on an OpenAI-compatible server (vLLM, sentijax.serve) scores the student's samples,
teacher-forced (echo + logprobs), for the sampled-token estimator; the KnowDist demo student
served by `python -m sentijax.main --config=configs/serve.py --config.model.init=runs/knowdist/hf`:

  python -m sentijax.main --config=configs/kd.py --config.kd.mode=on_policy \
    --config.kd.loss=reverse --config.kd.alpha=1.0 --config.kd.rollout.estimator=token \
    --config.teacher.backend=openai --config.teacher.base_url=http://127.0.0.1:8000/v1 \
    --config.teacher.model=runs/knowdist/hf --config.teacher.tokenizer=runs/knowdist/hf \
    --config.workdir=runs/kd-onpolicy-served

checks the tokenizers and probes the server before training, then logs train/rkl_token (1.92 at
step 20, 2.00 at 100: the same run as the local teacher's to sampling noise), train/teacher_score_s
(0.05-0.07 s per step on 2 CPU cores), train/teacher_requests and train/teacher_retries.
Adding --config.kd.rollout.overlap=True scores step t + 1's samples (drawn by the params step t
starts from) on the server while step t trains: the scoring time hidden, rows one update old
(train/rollout_lag=1); checkpoints hold the prepared batch, so a rerun resumes exactly.

Sparse supports (kd.top_k > 0 online, every store) keep the teacher's tail as one bucket and take
the student's probabilities from its full softmax (kd.tail=bucket); kd.tail=renorm is the old
renormalised form, blind to the student's mass outside the support (README: Logit distillation).
"""
from sentijax import config as base_config


def get_config():
  c = base_config.base()
  c.job = "kd"
  c.workdir = "runs/kd"
  c.model.preset = "tiny"
  c.kd = base_config.kd()
  c.teacher = base_config.kd_teacher()
  c.data.seq_len = 256
  c.train.steps = 100
  c.train.batch_size = 8
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 10
  c.train.log_every = 20
  c.train.eval_every = 50
  c.train.eval_batches = 2
  c.checkpoint.every = 50
  c.export_hf = True
  return c
