"""Shared by tests/data/test_packing.py and test_dataset.py: the sequence length, a DataSpec, the
packed-rows reader; the fixtures themselves (tokenizer, records, packed) live in conftest.py."""
from sentijax.data.spec import DataSpec

SEQ_LEN = 256


def data_spec(cache_dir, **overrides) -> DataSpec:
  return DataSpec(**({"seq_len": SEQ_LEN} | overrides), cache_dir=str(cache_dir))


def encode(tokenizer, text):
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def all_rows(ds) -> list[dict]:
  return [ds.source[i] for i in range(len(ds.source))]
