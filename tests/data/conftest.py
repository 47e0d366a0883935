"""Fixtures of tests/data: a tokenizer trained on the demo corpus, records of mixed lengths, and
those records packed into a dataset (built once per test package)."""
import pytest

from data.packing_fixtures import data_spec
from sentijax.data import dataset, readers
from sentijax.data import records as records_lib
from sentijax.data import tokenizer as tokenizer_lib
from sentijax.data.records import Record


@pytest.fixture(scope="package")
def tokenizer(tmp_path_factory):
  demo, _ = readers.read_records(records_lib.demo_corpus_path())
  texts = [t for r in demo for t in (r.prompt, r.response)]
  return tokenizer_lib.train_tokenizer(texts, 800, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="package")
def records():
  """The demo corpus (~200 tokens per record here) plus short records, so rows hold several
  sequences, and one over-long record, so left_prompt truncation happens."""
  demo = readers.read_records(records_lib.demo_corpus_path())[0]
  short = [Record(id=f"short-{i}", prompt=f"Rate review {i}: " + "good " * (i % 7),
                  response="Positive. " * (1 + i % 4)) for i in range(30)]
  long = Record(id="long", prompt="Summarise: " + "very long text " * 200, response="Neutral.")
  return demo[:20] + short[:15] + [long] + demo[20:] + short[15:]


@pytest.fixture(scope="package")
def packed(tokenizer, records, tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  return dataset.build_dataset(records, tokenizer, data_spec(cache), show_progress=False)
