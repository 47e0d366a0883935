"""Teacher corpus for KnowDist: user texts x analysis perspectives -> teacher analyses.

Default (offline, ~2 min on 2 cores): a random `tiny` local teacher (tokenizer trained on the demo
corpus) analyses the demo texts of the package under all seven perspectives into
runs/generate_knowdist/corpus.jsonl; `min_tokens` keeps a random teacher from stopping at once.
Running it again adds nothing (records are keyed by prompt + sampling):

  python -m sentijax.main --config=configs/generate_knowdist.py

Against an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, `sentijax.serve`), see README
"Teacher generation":

  python -m sentijax.main --config=configs/generate_knowdist.py --config.teacher.backend=openai \
    --config.teacher.base_url=http://127.0.0.1:8000/v1 --config.teacher.model=MODEL \
    --config.inputs.path=texts.jsonl --config.workdir=runs/kd-corpus

The same file serves a model (`--config.job=serve --config.model.init=HF_DIR`).
"""
import ml_collections

from sentijax import config as base_config


def teacher() -> ml_collections.ConfigDict:
  """Backend settings (local: the sentijax model of `config.model`)."""
  c = ml_collections.ConfigDict()
  c.backend = "local"  # local | openai
  c.batch_size = 16  # local: rows per jitted decode (and the server's batch)
  c.chat_template = False  # local: render prompts with the tokenizer's chat template
  c.base_url = "http://127.0.0.1:8000/v1"  # openai
  c.model = ""  # openai: served model name
  c.endpoint = "chat"  # openai: chat | completions
  c.api_key_env = ""  # openai: NAME of the env variable holding the key (never the key)
  c.concurrency = 8
  c.timeout_s = 120.0
  c.max_retries = 5
  c.backoff_s = 0.5
  c.max_backoff_s = 30.0
  c.tokenizer = ""  # openai: tokenizer dir mapping logprob token strings to ids
  c.system_prompt = ""
  return c


def sampling() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.temperature = 0.7  # 0 = greedy
  c.top_p = 0.95
  c.top_k = 0  # 0 = off
  c.max_tokens = 64
  c.min_tokens = 16  # end-of-text blocked before this many new tokens
  c.stop = ""  # stop strings separated by "|"
  c.seed = 0
  return c


def inputs() -> ml_collections.ConfigDict:
  """Unlabeled user texts (sentijax/teacher/inputs.py); path "" = the demo texts."""
  c = ml_collections.ConfigDict()
  c.path = ""  # JSONL / CSV / Parquet file, a saved HF dataset dir, or an HF dataset name
  c.format = "auto"  # auto | jsonl | csv | parquet | hf
  c.text_column = "text"
  c.id_column = "id"
  c.split = "train"
  c.min_chars = 1
  c.max_chars = 0  # 0 = no limit
  c.dedupe = True
  c.limit = 0  # 0 = all texts
  c.skip_bad_rows = False
  return c


def serve() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.host = "127.0.0.1"
  c.port = 8000
  c.max_wait_ms = 5.0  # how long the batcher gathers concurrent requests
  c.model_name = ""  # "" = model.init
  return c


def get_config():
  c = base_config.base()
  c.job = "generate_knowdist"
  c.workdir = "runs/generate_knowdist"
  c.model.preset = "tiny"
  c.teacher = teacher()
  c.sampling = sampling()
  c.inputs = inputs()
  c.serve = serve()
  c.generate = ml_collections.ConfigDict()
  c.generate.perspectives = "all"  # comma list of sentijax.data.prompts names, or all
  c.generate.logprobs = 0  # top-k logprobs per generated token stored in meta (0 = none)
  c.generate.leak_check_dirs = "../shared/sentibench"  # test sentences flagged ("" = off)
  c.generate.progress = True
  return c
