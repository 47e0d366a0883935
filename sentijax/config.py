"""The shared ConfigDict every job config starts from.

Each file in `configs/` calls `base()` and overrides what its job needs. Every key here can be set
from the command line with `--config.section.key=value`.
"""
import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "knowdist"  # knowdist | icldist | kd | sentibench | export | pipeline (sentijax/main.py)
  c.workdir = "runs/default"
  c.seed = 0
  c.distributed = _distributed()
  c.model = _model()
  c.mesh = _mesh()
  # Logical param/activation axis -> mesh axis (or None = replicated). "batch" places every batch
  # (training, held-out eval, SentiBench scoring, decoding); batch sizes must divide over it.
  c.sharding_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("vocab", "tensor"),
      ("head_dim", None),
      ("layers", None),
      ("norm", None),
  )
  c.data = _data()
  c.train = _train()
  c.checkpoint = _checkpoint()
  c.export_hf = False  # write an HF directory into <workdir>/hf at the end of training
  c.eval = _eval()
  return c


def _distributed() -> ml_collections.ConfigDict:
  """Multi-host startup (`sentijax.distributed`)."""
  # Multi-host: jax.distributed.initialize() when True (values from the cluster env when None).
  s = ml_collections.ConfigDict()
  s.enabled = False
  s.coordinator_address = ml_collections.FieldReference(None, field_type=str)
  s.num_processes = ml_collections.FieldReference(None, field_type=int)
  s.process_id = ml_collections.FieldReference(None, field_type=int)
  # Seconds each process waits for all the others to connect (JAX's default, 300, is too short
  # for large slices where hosts boot and install at different speeds).
  s.initialization_timeout = 900
  # This process's accelerators as a comma list ("0,1,2,3"); "" = auto (all of the host's, or
  # JAX_LOCAL_DEVICE_IDS; launch/gpu_slurm.sbatch sets it for one process per node).
  s.local_device_ids = ""
  return s


def _model() -> ml_collections.ConfigDict:
  """The student (or scored) model: a preset or an HF directory."""
  s = ml_collections.ConfigDict()
  s.preset = "tiny"  # used when init == "" (random init); see sentijax/models/presets.py
  s.init = ""  # local HF directory (config.json + safetensors) to start from
  # Only these decoder layers of model.init, ascending ("0,3,6,9,12,15,18,21,24,27": a 10-layer
  # student of a 30-layer teacher; embeddings, final norm, head and tokenizer kept); "" = all.
  s.init_layers = ""
  s.tokenizer = ""  # tokenizer dir; "" = model.init, or a demo tokenizer for presets
  s.dtype = "auto"  # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
  s.remat = False  # rematerialise each layer in the backward pass
  s.attention_chunk = 1024  # query block for long sequences (memory ~ block x length)
  return s


def _mesh() -> ml_collections.ConfigDict:
  """Device mesh sizes (`sentijax.sharding`)."""
  s = ml_collections.ConfigDict()
  s.data = -1  # -1 = all remaining devices
  # 0 = auto: fsdp over all devices when the replicated train state (params + 2 Adam moments,
  # 12 B/param) would exceed half a device's memory, else 1 (see sentijax/sharding.py).
  s.fsdp = 0
  s.tensor = 1
  s.device_memory_gb = 0.0  # auto rule: 0 = the device's bytes_limit (16 GiB if none)
  return s


def _data() -> ml_collections.ConfigDict:
  """The training corpus and how it becomes rows (`data/`)."""
  s = ml_collections.ConfigDict()
  s.corpus = ""  # JSONL / JSON / Parquet path; "" = the demo corpus shipped in the package
  s.format = "auto"  # auto | records | mixtral | hf
  s.val_corpus = ""  # "" = hold out val_fraction of the corpus
  s.val_fraction = 0.05
  s.skip_bad_records = False
  # Column names for HF `datasets` JSON/Parquet corpora (format="hf"); with no prompt column
  # the prompt is rebuilt from `text_column` with a KnowDist perspective chosen by prompt_seed.
  s.id_column = "id"
  s.prompt_column = "prompt"
  s.response_column = "response"
  s.text_column = ""
  s.prompt_seed = 0
  s.chat_template = False
  s.seq_len = 512
  s.truncation = "left_prompt"  # left_prompt | drop
  s.shuffle = True
  s.prefetch = 2  # batches read ahead by grain threads (0 = read in the training thread)
  s.cache_dir = ""  # "" = <workdir>/data
  return s


def _train() -> ml_collections.ConfigDict:
  """Optimizer, schedule, steps and the loop's cadence (`train/`)."""
  s = ml_collections.ConfigDict()
  s.steps = 200
  s.batch_size = 8  # rows per optimizer step (global)
  s.microbatches = 1  # gradient accumulation steps per optimizer step
  s.learning_rate = 3e-4
  s.end_lr_ratio = 0.1
  s.warmup_steps = 20
  s.schedule = "cosine"  # cosine | linear | constant
  s.weight_decay = 0.1
  s.b1 = 0.9
  s.b2 = 0.95
  s.grad_clip = 1.0
  s.loss_chunk = 512  # positions per output-projection chunk (0 = full [B, L, V] logits)
  s.log_every = 10  # steps per train-metrics line / TensorBoard point (0 = never)
  s.eval_every = 50
  s.eval_batches = 4
  s.peak_tflops = 0.0  # per device, for MFU; 0 = look up the device kind (unknown: no MFU)
  return s


def _checkpoint() -> ml_collections.ConfigDict:
  """Orbax checkpoints (`sentijax.checkpoint`)."""
  s = ml_collections.ConfigDict()
  s.every = 50
  s.keep = 2
  s.async_save = True
  return s


def _eval() -> ml_collections.ConfigDict:
  """SentiBench scoring, by the sentibench job and during training (`eval/`)."""
  s = ml_collections.ConfigDict()
  s.data_dir = "../shared/sentibench"
  s.templates = ""  # "" = templates shipped in the package; or a protocol.json path
  s.datasets = "all"  # comma list like "sc/sst2,absa/opener" or "all"
  s.seeds = "42,52,62"
  s.max_examples = 0  # 0 = all test items
  s.max_examples_extraction = -1  # the 4 extraction datasets; -1 = eval.max_examples
  s.batch_size = 16
  s.max_new_tokens = 150
  s.during_training = ""  # datasets scored every train.eval_every steps ("" = none)
  # Fidelity to the official harness (README "Fidelity"), here and during training:
  s.generation_config = "auto"  # auto: the model.init dir's generation_config.json | ignore
  s.decode_cleanup = "auto"  # auto: as transformers 4.44 (tokenizer config) | on | off
  s.aggregation = "mean"  # mean over seeds | official (round to 4 dp, / 12, missing = 0)
  # Tokens of compute one XLA compilation is worth when choosing batch shapes (eval/buckets.py):
  # -1 = estimate for the model and platform, 0 = least padding (most shapes).
  s.compile_cost_tokens = -1.0
  # Run the instruction every prompt of a dataset starts with once, not per prompt
  # (sentijax/prefix.py): 19% fewer tokens on sc/sst2, ~half on the extraction datasets.
  s.shared_prefix = True
  return s


def icl() -> ml_collections.ConfigDict:
  """The `icl` section of the ICLDist job (configs/icldist.py, configs/pipeline.py)."""
  c = ml_collections.ConfigDict()
  c.task_dirs = ""  # comma list of task roots (sentijax.data.tasks); "" = the package demo tasks
  c.tasks = "all"  # source tasks (names under task_dirs), held-out ones removed
  # Never trained on (no task, no sentence of any split), scored during training; names or
  # families: "atsa/*" (a glob on names), "layout:atsa" (every task of that layout);
  # "" = eval.during_training.
  c.heldout = ""
  c.shots = "0-8"  # demos per prompt: "K" or "MIN-MAX", shrunk to fit data.seq_len
  c.num_prompts = 2000  # training prompts (gold targets)
  c.val_prompts = 64  # held-out-loss prompts, queries from a hash split of each source task
  c.val_fraction = 0.05
  c.rename_prob = 0.5  # share of prompts whose verbalizers are renamed (demos relabelled)
  c.shuffle_labels = True  # label order shuffled in paraphrased instructions
  c.paraphrase = True  # paraphrased instructions as well as the task's own
  c.balance = True  # queries balanced over classes
  # gold | teacher | teacher_probs | on_policy (context distillation: the student samples the
  # answer to its student_shots prompt, a teacher seeing the k-shot prompt scores it; the kd and
  # teacher sections set the divergence, kd.rollout.* the sampling: configs/icldist.py)
  c.target = "gold"
  c.student_shots = 0  # on_policy: the student's demos, the first of the teacher's (0..min shots)
  c.teacher_corpus = ""  # JSONL records (KnowDist format) whose meta.task names the task
  c.temperature = 1.0  # teacher_probs: KL temperature
  c.alpha = 0.5  # teacher_probs: loss = (1 - alpha) CE + alpha KL
  # teacher_probs: bucket = the verbalizers + one bucket for "any other answer" (the student's
  # mass there is charged); renorm = both renormalised over the verbalizers (biased: blind to it)
  c.tail = "bucket"
  c.soft_width = 8  # teacher_probs: most verbalizers per record
  c.drop_leaks = True  # drop source examples carrying held-out/test sentences (else fail)
  # on: every SentiBench test sentence (eval.data_dir) is kept out of training, and a missing
  # eval.data_dir stops the job; off: not checked (a warning; held-out tasks still filtered).
  c.leak_check = "on"
  c.mix_corpus = ""  # optional KnowDist corpus mixed into the training records
  c.mix_fraction = 0.0  # mixed records = mix_fraction x training prompts
  c.seed = 0  # prompt sampling seed (added to config.seed)
  return c


def kd() -> ml_collections.ConfigDict:
  """The `kd` section of the logit-distillation job (configs/kd.py, sentijax/train/kd.py)."""
  c = ml_collections.ConfigDict()
  c.loss = "forward"  # ce | forward | reverse | jsd (ce: no distillation, KL still evaluated)
  c.alpha = 0.5  # loss = (1 - alpha) CE + alpha divergence, both per response token
  c.beta = 0.5  # jsd: M = beta teacher + (1 - beta) student; 0 = forward KL, 1 = reverse KL
  c.temperature = 1.0  # both distributions tempered; the divergence is scaled by T^2
  c.top_k = 0  # online: 0 = full vocab, k = the teacher's top-k + one tail bucket;
  #              offline: stored entries per token used (required, > 0)
  # Sparse supports (top_k > 0, offline stores): bucket = the k listed tokens + one bucket for
  # all others, the student's probabilities from its full softmax (its leaked mass is charged; a
  # lower bound of the full divergence); renorm = both renormalised over the k tokens (biased:
  # blind to the student's mass elsewhere; refused for top_k = 1)
  c.tail = "bucket"
  # online (teacher forward in the step) | offline (a top-k teacher store) | on_policy (online,
  # responses sampled by the student: see lmbda below)
  c.mode = "online"
  c.store = ""  # offline: directory of a top-k teacher store
  # offline, or on_policy with a served teacher: an HF teacher dir used only to score the
  # held-out FULL-vocabulary KL (eval/kl_teacher*); "" = offline the store's support only
  # (eval/kl_teacher_bucketed), served none
  c.eval_teacher = ""
  # Also log eval/kl_teacher_onpolicy at every held-out eval: KL(student || teacher) over the
  # full vocabulary on responses the student samples for the val rows' prompts (kd.rollout.*
  # settings, keys of step 0: the same draws each eval), the quantity on-policy distillation
  # minimises; any kd.mode with a teacher model at hand (teacher.* or kd.eval_teacher)
  c.eval_onpolicy = False
  # on_policy (GKD): the first round(lmbda x batch) rows of each batch keep their prompts and get
  # responses sampled by the CURRENT student (seq_kd=True: by the teacher); the rest keep the
  # corpus responses. Needs an online teacher (teacher.*); the student's own samples get no CE.
  c.lmbda = 1.0
  c.seq_kd = False
  c.rollout = ml_collections.ConfigDict()
  c.rollout.temperature = 1.0  # 1 = the student's own distribution (what reverse KL is of)
  c.rollout.top_p = 1.0
  c.rollout.max_new_tokens = 64  # a response ends at eos or here (and at data.seq_len)
  # Stop strings separated by "|" (as sampling.stop): a sampled token whose text contains one
  # ends the response (kept and trained on, like eos); "" = eos only.
  c.rollout.stop = ""
  # On the student's samples: full = kd.loss over the vocabulary; token = the sampled-token
  # reverse-KL estimator log q(x) - log p(x) as a policy-gradient advantage (needs kd.loss=reverse;
  # only the teacher's log-prob of the sampled token is used)
  c.rollout.estimator = "full"
  # A served teacher (teacher.backend=openai) scores step t + 1's samples while the device runs
  # step t: hidden scoring time, rows one update old (train/onpolicy.py Overlapped)
  c.rollout.overlap = False
  return c


def kd_teacher() -> ml_collections.ConfigDict:
  """The `teacher` section of the logit-distillation job: where the online teacher comes from."""
  c = ml_collections.ConfigDict()
  c.model_dir = ""  # local HF directory of the teacher (config.json + safetensors)
  c.preset = "tiny"  # used when model_dir == "": a random init (tests, the offline demo)
  c.tokenizer = ""  # teacher tokenizer dir; "" = model_dir's (a preset shares the student's)
  c.dtype = "auto"  # teacher params and compute: auto = bfloat16 on GPU/TPU, float32 on CPU
  c.seed = 1  # random init of a preset teacher
  # kd.mode=on_policy only: local = the teacher model above, run in the step; openai = a served
  # teacher (vLLM, sentijax.serve) scoring the student's samples through /v1/completions with
  # echo + logprobs (train/served.py); then base_url, model and tokenizer are required
  c.backend = "local"
  c.base_url = "http://127.0.0.1:8000/v1"
  c.model = ""  # the served model's name
  c.echo_max_tokens = 0  # max_tokens of a scoring request (1 for servers refusing 0)
  # N > 0: the scoring request also asks for the teacher's top-N log-probs per token, and each
  # sampled token's loss is the reverse-KL estimator PLUS the tail-aware bucketed reverse KL over
  # those N ids + one tail bucket (1 - their mass; student side exact), weight 1 each. The server
  # must return >= N (vLLM --max-logprobs); fewer stops the run. 0 = the estimator only.
  c.top_logprobs = 0
  c.endpoint = "completions"  # scoring always posts to /completions
  c.api_key_env = ""  # NAME of the env variable holding the key (never the key)
  c.concurrency = 8  # scoring requests in flight
  c.timeout_s = 120.0
  c.max_retries = 5
  c.backoff_s = 0.5
  c.max_backoff_s = 30.0
  c.max_retry_after_s = 300.0
  c.system_prompt = ""  # the client's; scoring sends token ids only
  return c
