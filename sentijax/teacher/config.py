"""Config sections of the teacher jobs (configs/generate_knowdist.py, configs/generate_icl.py)
and of `sentijax.serve`."""
import ml_collections


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
  # openai: longest wait a server's Retry-After (seconds or HTTP-date) may ask for; a 429 pauses
  # every worker of the client that long (plus a small random spread)
  c.max_retry_after_s = 300.0
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
  # transformers' repetition penalty (local: applied in the sampler; openai: sent as the vLLM /
  # SGLang extra `repetition_penalty`); 1 = none, and then absent from record ids
  c.repetition_penalty = 1.0
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
  c.on_leak = "drop"  # a text holding a SentiBench test sentence: drop | flag (kept, listed) | fail
  return c


def serve() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.host = "127.0.0.1"
  c.port = 8000
  c.max_wait_ms = 5.0  # how long the batcher gathers concurrent requests
  c.model_name = ""  # "" = model.init
  return c
