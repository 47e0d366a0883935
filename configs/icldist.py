"""ICLDist (stage 2): few-shot, instruction-diverse task prompts; held-out tasks scored.

Default (offline, any CPU machine, a few minutes on 2 cores): the `tiny` preset from scratch, a BPE
tokenizer trained on the demo tasks shipped in the package (sentijax/assets/icl_demo), `gold`
targets, sc/movies, sc/sst2 and multifaced/irony18 held out and scored at step 0, every
train.eval_every steps and at the end:

  python -m sentijax.main --config=configs/icldist.py

writes checkpoints, TensorBoard events, <workdir>/sentibench/step_N.json, an HF export
(runs/icldist/hf), <workdir>/heldout_audit.json (what the held-out filter dropped, per task) and
<workdir>/icl_prompts.jsonl (every prompt trained on). Rerunning resumes from the last
checkpoint. Every SentiBench test sentence is kept out of training, so SentiBench must be at
eval.data_dir (../shared/sentibench); without it the job stops, naming the setting. On the repo
alone add --config.icl.leak_check=off (a warning; sc/movies scored, sc/sst2 and irony18 skipped
with a log line). Measured (4.4 min wall on a
shared 2-core CPU): train loss 6.95 -> 0.84, val loss 0.96; the 164k-param model stays near
chance on the held-out tasks with this full recipe (sc/movies 33.3 -> 33.3, sc/sst2 33.3 -> 43.7,
irony18 28.6 -> 38.7 macro-F1 on 40 items): it shows the mechanics, not the effect (see
tests/train/test_icldist.py for a setting where the tiny model does gain on an unseen task).

After KnowDist, on SentiBench train splits of the non-held-out tasks plus ../shared/icl_sources
(a real student; the paper's setting at small scale):

  python -m sentijax.main --config=configs/icldist.py \
    --config.model.init=runs/knowdist/hf \
    --config.icl.task_dirs=../shared/sentibench,../shared/icl_sources \
    --config.icl.heldout=sc/sst2,multifaced/irony18,absa/atsa_rest16 \
    --config.eval.data_dir=../shared/sentibench --config.workdir=runs/icldist-real

An unseen task TYPE rather than an unseen data set: icl.heldout takes families, 'layout:atsa'
(every ATSA task of every dir: absa/atsa_rest16, atsa/laptop14, atsa/rest14) or 'atsa/*' (a glob
on names); add --config.icl.heldout=layout:atsa,sc/sst2,multifaced/irony18 to the command above.

Targets: icl.target=gold (the label / tuple list as SentiBench demos write it), teacher (records of
icl.teacher_corpus, KnowDist format, meta.task naming the task) or teacher_probs (also
meta.teacher_probs = {verbalizer: p}: KL over the verbalizers' first tokens plus one bucket for
"any other answer" (icl.tail=bucket; renorm = over the verbalizers only, biased) at
icl.temperature, mixed with CE by icl.alpha: the one distillation term, losses.Distill).

On-policy ICLDist (context distillation, train/icl_onpolicy.py): icl.target=on_policy; the teacher
sees the k-shot prompt, the student the same query with its first icl.student_shots demos, the
student samples the answer and both score it (kd.* below: the divergence and rollouts as the kd
job's on-policy mode; teacher.*: a local model_dir / preset, or a served backend=openai):

  python -m sentijax.main --config=configs/icldist.py     # the gold demo above: runs/icldist/hf
  python -m sentijax.main --config=configs/icldist.py --config.icl.target=on_policy \
    --config.icl.shots=4 --config.icl.student_shots=0 --config.model.init=runs/icldist/hf \
    --config.teacher.model_dir=runs/icldist/hf --config.train.steps=100 \
    --config.train.learning_rate=1e-3 --config.workdir=runs/icldist-onpolicy

(the demo student as its own 4-shot teacher; without teacher.model_dir a random `tiny` teacher)
logs train/rkl_token (the per-token reverse-KL estimate on the student's answers),
train/onpolicy_fraction, train/rollout_tokens_per_s, train/rollout_length, train/rollout_dropped
(served: train/teacher_score_s) next to train/kd, eval/loss (the student's, on held-out queries in
its own prompts), eval/kl_teacher (local teacher: KL(teacher on the k-shot prompt || student on
its own) per gold-answer token of those queries) and the held-out tasks as above; <workdir>/icl_prompts.jsonl lists the teacher's
prompts (split "train") and the student's ("student"). Measured (under 2 min wall on a shared
2-core CPU, 3 held-out scorings included): rollouts ~2600 tokens/s, 7-9 sampled tokens per
answer, train/rkl_token ~0.002-0.02, eval/kl_teacher 0.0021 -> 0.0028, held-out scores unchanged:
this tiny student's 4-shot and 0-shot answers already agree (mechanics, not the effect). SmolLM2-135M-Instruct, its 8-shot self as
the teacher of its 0-shot self (README "On-policy ICLDist" has the served-teacher form):

  python -m sentijax.main --config=configs/icldist.py --config.icl.target=on_policy \
    --config.icl.shots=8 --config.icl.student_shots=0 --config.icl.rename_prob=0 \
    --config.model.init=/work/models/smollm2 --config.teacher.model_dir=/work/models/smollm2 \
    --config.icl.task_dirs=../shared/sentibench,../shared/icl_sources \
    --config.icl.heldout=sc/sst2,multifaced/irony18,absa/atsa_rest16 \
    --config.eval.data_dir=../shared/sentibench --config.data.seq_len=1024 \
    --config.train.learning_rate=1e-5 --config.train.warmup_steps=10 \
    --config.workdir=runs/icldist-onpolicy-smollm2
"""
from sentijax import config as base_config


def get_config():
  c = base_config.base()
  c.job = "icldist"
  c.workdir = "runs/icldist"
  c.model.preset = "tiny"
  c.icl = base_config.icl()
  c.icl.heldout = "sc/movies,sc/sst2,multifaced/irony18"
  c.icl.shots = "0-8"
  c.icl.num_prompts = 1600
  c.data.seq_len = 256
  c.data.truncation = "drop"  # prompts are built to fit: nothing is ever cut
  c.train.steps = 200
  c.train.batch_size = 8
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 20
  c.train.log_every = 25
  c.train.eval_every = 100
  c.train.eval_batches = 2
  c.checkpoint.every = 100
  c.eval.seeds = "42"
  c.eval.max_examples = 40
  c.eval.max_new_tokens = 64
  c.export_hf = True
  # icl.target=on_policy only (context distillation, train/icl_onpolicy.py): the divergence and
  # the rollouts read as the kd job reads them (kd.loss / alpha / beta / lmbda, kd.rollout.*),
  # the teacher as its teacher section (a local model_dir / preset, or a served backend=openai).
  c.kd = base_config.kd()
  c.kd.mode = "on_policy"
  c.kd.loss = "reverse"
  c.kd.alpha = 1.0
  c.kd.rollout.max_new_tokens = 32  # ICL answers are short; prompts leave room for this many
  c.kd.rollout.stop = "\n"  # an answer ends at its line (SentiBench's format)
  c.teacher = base_config.kd_teacher()
  return c
