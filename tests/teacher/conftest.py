"""A tiny HF teacher (Llama weights + byte-level BPE tokenizer) shared by the teacher tests."""
import json
import pathlib

import pytest

import hf_fixtures
from sentijax.data import records

VOCAB = 320


def demo_texts() -> list[str]:
  lines = records.demo_corpus_path().read_text(encoding="utf-8").splitlines()
  return [json.loads(line)["prompt"] + json.loads(line)["response"] for line in lines]


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> pathlib.Path:
  """An HF directory loadable by sentijax and transformers; weights varied enough that greedy
  outputs differ between prompts."""
  pytest.importorskip("torch")
  from sentijax.data import tokenizer as tok_lib
  root = tmp_path_factory.mktemp("teacher")
  tok_lib.train_tokenizer(demo_texts(), VOCAB, root)
  hf_fixtures.make_llama(root, vocab_size=VOCAB, weight_std=0.3)
  return root


@pytest.fixture(scope="session")
def local_teacher(teacher_dir):
  from sentijax import models
  from sentijax.data import tokenizer as tok_lib
  from sentijax.teacher.local import LocalTeacher
  cfg, params = models.load_hf(teacher_dir, dtype="float32")
  return LocalTeacher(cfg, params, tok_lib.load_tokenizer(teacher_dir), batch_size=4)
