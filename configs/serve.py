"""Serve a sentijax model behind the OpenAI API (`sentijax.serve`, README "Serving").

    python -m sentijax.main --config=configs/serve.py --config.model.init=/work/models/smollm2 \
      --config.serve.port=8000

serves /v1/models, /v1/completions and /v1/chat/completions (streaming, n, seed, logprobs, echo)
at http://127.0.0.1:8000/v1 until SIGTERM / Ctrl-C, which drains the requests in flight. With a
key: `export SERVE_KEY=...` and `--config.serve.api_key_env=SERVE_KEY` (clients send
`Authorization: Bearer $SERVE_KEY`). Without model.init it serves a random `tiny` preset.
"""
from sentijax import config as base_config
from sentijax.teacher import config as teacher_config


def get_config():
  c = base_config.base()
  c.job = "serve"
  c.workdir = "runs/serve"
  c.model.preset = "tiny"
  c.teacher = teacher_config.teacher()  # batch_size, chat_template of the local model
  c.serve = teacher_config.serve()  # host, port, model_name, max_wait_ms
  c.serve.max_batch = 16  # decode rows shared by all requests (continuous batching)
  c.serve.max_queue = 64  # choices waiting for a free row; more -> 429 + Retry-After
  c.serve.max_body_bytes = 4 << 20  # larger request bodies -> 413
  c.serve.request_timeout_s = 600.0  # unanswered after this -> 504 (its rows are freed)
  c.serve.retry_after_s = 1  # Retry-After of 429 / 503 answers
  c.serve.drain_timeout_s = 60.0  # SIGTERM: longest wait for the requests in flight
  c.serve.api_key_env = ""  # NAME of the env variable holding the key ("" = no key)
  return c
