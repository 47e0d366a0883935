"""The data layer: records -> packed rows -> resumable batches.

  spec.py      DataSpec: `config.data` read once (DataSpec.from_config), passed everywhere below
  records.py   Record, its validation (errors name file/line/key), fingerprint, train/val split
  readers.py   corpus readers (native JSONL, Mixtral teacher sample, HF datasets), load_corpus(spec)
  writers.py   write_records / write_json_atomic (via sentijax.atomic), ResumableWriter
  packing.py   tokenise -> mask -> fit -> pack rows (optional per-token soft targets)
  dataset.py   rows stored as array_record (tfds), grain batches; build_train_val(...)
  tokenizer.py load / train tokenizers, tokenizer_fingerprint
  prompts.py, sentibench.py   KnowDist prompt templates; SentiBench data and prompts
"""
