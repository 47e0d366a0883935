r"""SentiBench evaluation of a local HF checkpoint (12 datasets x 3 seeds, scores x100).

Command (from the repo root):

  python -m sentijax.main --config=configs/sentibench.py \
      --config.model.init=DIR --config.eval.data_dir=../shared/sentibench --config.workdir=OUT

Useful overrides:
  --config.eval.templates=../shared/sentibench/protocol.json   official instruction strings
  --config.eval.datasets=sc/sst2,absa/opener  --config.eval.seeds=42  --config.eval.max_examples=100
  --config.eval.max_examples_extraction=50   (the 4 extraction datasets: their own item count)
  --config.model.dtype=float32   (exact parity runs; "auto" = bf16 on GPU/TPU, fp32 on CPU)
  --config.eval.batch_size=32   (rows of <=512 tokens)
  --config.eval.seeds=42 --config.eval.aggregation=official   the official scripts' numbers
  --config.eval.generation_config=ignore   raw logits (default auto: the model's
      generation_config.json repetition_penalty / eos ids, as transformers generate applies them)
  --config.eval.decode_cleanup=off   (default auto: transformers 4.44's decode clean-up when the
      tokenizer config asks for it)
  --config.eval.compilation_cache=off   (default auto: ~/.cache/sentijax/xla, reused across runs)
  --config.eval.compile_cost_tokens=0   (batch shapes: default -1 estimates what a compilation
      costs on this platform and pads to fewer shapes when that is cheaper; 0 = least padding)
  --config.eval.shared_prefix=False   (run whole prompts; default: the instruction once)

Work per seed: 11,974 prompts (9,579 classification: one forward each, no decoding; 2,395
extraction: greedy decoding up to 150 tokens), ~5M prompt tokens (IMDb prompts average ~1.6k
and reach ~4.5k tokens: batches shrink with length); each dataset's instruction runs once
(eval.shared_prefix). Each distinct (batch, length) shape compiles once (sentijax/eval/buckets.py:
on a CPU ~5 shapes for 200 sst2 prompts, on a GPU 1-2 per dataset). Measured on a 2-core CPU
with SmolLM2-135M fp32 (bench/README.md): sc/sst2 first 200 items ~2.5 min; the first 16 items
of all 12 datasets ~11 min. Not yet measured on an accelerator.

Output in OUT: results.json {"datasets": {"sc/sst2": {"seeds": {"42": ..}, "mean": ..}, ..},
"average": ..}, predictions/<dataset>_<seed>.jsonl (index, gold, prediction, scores),
results.md (table by category) and results.png (bar chart); the table is also printed.
"""
import ml_collections

import sentijax.config


def get_config() -> ml_collections.ConfigDict:
  c = sentijax.config.base()
  c.job = "sentibench"
  c.workdir = "runs/sentibench"
  c.model.init = ""  # required: local HF directory (config.json + safetensors + tokenizer)
  c.model.dtype = "auto"  # params + activations: bfloat16 on GPU/TPU, float32 on CPU
  c.eval.datasets = "all"
  c.eval.seeds = "42,52,62"
  c.eval.max_examples = 0
  c.eval.batch_size = 16
  c.eval.max_new_tokens = 150
  # Persistent XLA compilation cache: auto (~/.cache/sentijax/xla) | off | a directory.
  c.eval.compilation_cache = "auto"
  return c
