"""Fixtures shared by the train tests: the demo tokenizer the served / on-policy ICL tests'
tiny teachers and students share (teacher_fixtures.VOCAB tokens), trained once per session."""
import pytest

from sentijax.data import tokenizer as tok_lib
from teacher import teacher_fixtures


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo_tok")
  tok_lib.train_tokenizer(teacher_fixtures.demo_texts(), teacher_fixtures.VOCAB, root)
  return root


@pytest.fixture(scope="session")
def tok(tok_dir):
  return tok_lib.load_tokenizer(tok_dir)
