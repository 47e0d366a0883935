"""Export a training checkpoint to an HF directory (config.json, safetensors, tokenizer).

  python -m sentijax.main --config=configs/export.py --config.workdir=runs/knowdist \
      [--config.export.step=100] [--config.export.dir=/models/student] [--config.export.dtype=bfloat16]

Restores the params of the latest checkpoint (or `export.step`) of the run in `workdir`, not the
optimizer state, and writes them one tensor at a time (safetensors shards of <= 4 GiB plus
model.safetensors.index.json, each written atomically), by default to <workdir>/hf, in ~seconds
for the demo model. `transformers.AutoModelForCausalLM`
and `python -m sentijax.main --config=configs/sentibench.py --config.model.init=DIR` load it.
"""
import ml_collections

from sentijax import config as base_config


def get_config():
  c = base_config.base()
  c.job = "export"
  c.workdir = "runs/knowdist"
  c.export = ml_collections.ConfigDict()
  c.export.step = 0  # 0 = the latest checkpoint
  c.export.dir = ""  # "" = <workdir>/hf
  c.export.dtype = ""  # "" = float32 (the training params); bfloat16 halves the size
  return c
