"""Byte-level BPE training, saving, offline reloading."""
import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sentijax.data import readers, records
from sentijax.data import tokenizer as tokenizer_lib

VOCAB_SIZE = 700
REPO = Path(__file__).resolve().parents[2]


def _demo_texts() -> list[str]:
  demo, _ = readers.read_records(records.demo_corpus_path())
  return [t for r in demo for t in (r.prompt, r.response)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("tok")
  return tokenizer_lib.train_tokenizer(_demo_texts(), VOCAB_SIZE, out_dir), out_dir


def test_special_tokens_and_vocab(trained):
  tokenizer, _ = trained
  assert len(tokenizer) == VOCAB_SIZE
  assert tokenizer.bos_token == tokenizer_lib.BOS_TOKEN and tokenizer.bos_token_id == 0
  assert tokenizer.eos_token == tokenizer_lib.EOS_TOKEN and tokenizer.eos_token_id == 1
  assert tokenizer.pad_token_id == 2
  header = tokenizer("<|start_header_id|>user<|end_header_id|>",
                     add_special_tokens=False)["input_ids"]
  assert header[0] == 3 and header[-1] == 4


@pytest.mark.parametrize("text", [
    "The pasta was cooked perfectly.",
    "  Leading spaces, tabs\tand\nnewlines  ",
    "Unicode: café, naïve, 東京, emoji 😀🔥, and symbols {} <> $40!",
    "zxqv wkfj never-seen-before tokens 1234567890",
])
def test_round_trip(trained, text):
  tokenizer, _ = trained
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  assert tokenizer.decode(ids) == text


def test_reloads_offline_with_same_ids_and_chat_template(trained):
  tokenizer, out_dir = trained
  assert (out_dir / "tokenizer.json").is_file()
  reloaded = tokenizer_lib.load_tokenizer(out_dir)
  text = "Sure, let's schedule another meeting 🙃"
  assert (reloaded(text, add_special_tokens=False)["input_ids"]
          == tokenizer(text, add_special_tokens=False)["input_ids"])
  assert reloaded.eos_token_id == 1 and reloaded.pad_token_id == 2
  rendered = reloaded.apply_chat_template(
      [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
      tokenize=False)
  assert rendered == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi"
                      "<|end_of_text|><|start_header_id|>assistant<|end_header_id|>\n\n"
                      "Hello.<|end_of_text|>")
  assert tokenizer_lib.tokenizer_fingerprint(reloaded) == tokenizer_lib.tokenizer_fingerprint(
      tokenizer)


def test_fingerprint_changes_with_vocab_and_template(trained, tmp_path):
  tokenizer, _ = trained
  want = tokenizer_lib.tokenizer_fingerprint(tokenizer)
  assert len(want) == 64 and int(want, 16) >= 0  # sha256 hex digest
  smaller = tokenizer_lib.train_tokenizer(_demo_texts(), VOCAB_SIZE - 50, tmp_path)
  assert tokenizer_lib.tokenizer_fingerprint(smaller) != want
  no_template = copy.deepcopy(tokenizer)
  no_template.chat_template = None
  assert tokenizer_lib.tokenizer_fingerprint(no_template) != want


def test_training_is_deterministic(trained, tmp_path):
  _, out_dir = trained
  tokenizer_lib.train_tokenizer(_demo_texts(), VOCAB_SIZE, tmp_path)
  assert (tmp_path / "tokenizer.json").read_bytes() == (out_dir / "tokenizer.json").read_bytes()
  # ... also in a fresh process with a different hash seed.
  code = ("import sys; from sentijax.data import readers, records, tokenizer as t; "
          "rs = readers.read_records(records.demo_corpus_path())[0]; "
          f"t.train_tokenizer([x for r in rs for x in (r.prompt, r.response)], {VOCAB_SIZE}, "
          "sys.argv[1])")
  env = os.environ | {"PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
  subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh")], check=True, env=env,
                 cwd=REPO, capture_output=True, timeout=120)
  fresh = (tmp_path / "fresh" / "tokenizer.json").read_bytes()
  assert hashlib.sha256(fresh).digest() == hashlib.sha256(
      (out_dir / "tokenizer.json").read_bytes()).digest()


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    tokenizer_lib.load_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.train_tokenizer(["abc"], 100, tmp_path / "t")


def test_ids_containing_finds_every_token_holding_a_stop_string(tmp_path):
  texts = ["the food was good\n###\nthe wood", "good mood\n", "food ### food"] * 20
  tok = tokenizer_lib.train_tokenizer(texts, vocab_size=300, out_dir=tmp_path / "tok")
  got = tokenizer_lib.ids_containing(tok, ["ood", "", "\n"], limit=280)
  want = [i for i in range(280) if "ood" in tok.decode([i]) or "\n" in tok.decode([i])]
  assert got == want and got  # each id decoded on its own, by hand
  assert all(i < 280 for i in got)
  assert tokenizer_lib.ids_containing(tok, []) == [] == tokenizer_lib.ids_containing(tok, [""])
