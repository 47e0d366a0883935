"""The offline teacher store (format v2): write -> load -> packed rows carry the stored top-k (to
the quantisation bound) and tail at the right target positions; packing takes the stored ids as
they are; resumable writer; stored rows keep soft fields only at loss positions; the sampled
mode; the quantisation KL bound; ids in the narrowest width; the streaming loader's memory bound;
clear errors for a missing or corrupt shard, a width above k, another tokenizer and a v1 store
(with its converter)."""
import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sentijax.data import dataset, packing, records, tokenizer as tok_lib, topk_codec, topk_store
from sentijax.data.records import BadRow, Record, Tokens
from sentijax.data.spec import DataSpec

K = 6


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  demo = [json.loads(x) for x in records.demo_corpus_path().read_text().splitlines()]
  return tok_lib.train_tokenizer([r["prompt"] + r["response"] for r in demo], 300,
                                 tmp_path_factory.mktemp("tok"))


def _scored(n: int, seed: int = 0, vocab_size: int = 300) -> list[topk_store.ScoredRecord]:
  """Records whose token ids are random (not what the tokenizer makes of their text), with a
  prompt part and a response part, and random descending top-K logprobs."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p, r = int(rng.integers(3, 12)), int(rng.integers(2, 9))
    ids = rng.integers(5, vocab_size, p + r).astype(np.int32)
    mask = np.array([0] * p + [1] * r, np.int32)
    probs = -np.sort(-rng.dirichlet(np.ones(K + 4), r), axis=1)[:, :K]  # a distribution's top K
    lp = np.log(probs).astype(np.float32)
    top = np.stack([rng.choice(vocab_size, K, replace=False) for _ in range(r)]).astype(np.int32)
    rec = Record(f"r{i}", f"prompt {i}", f"response {i}", {"source_id": f"s{i // 2}"},
                 tokens=Tokens(ids, mask))
    out.append(topk_store.ScoredRecord(rec, top, lp))
  return out


def _write(store, tok, scored, per_shard=3):
  w = topk_store.StoreWriter(store, k=K, teacher="t", tokenizer=tok, render={"mode": "raw"})
  for i in range(0, len(scored), per_shard):
    w.write_shard(scored[i:i + per_shard])
  w.finish(True)
  return w


def test_load_packs_the_stored_topk_at_the_target_positions(tok, tmp_path):
  scored = _scored(7)
  _write(tmp_path, tok, scored)
  width = 4
  recs, soft = topk_store.load(tmp_path, width)
  assert soft.extra_fields == ("soft_tail",)
  assert [r.id for r in recs] == [s.record.id for s in scored]
  vocab = tok_lib.vocab_fingerprint(tok)
  assert all(r.tokens == dataclasses.replace(s.record.tokens, vocab=vocab)
             and r.meta == s.record.meta for r, s in zip(recs, scored))
  assert soft.width == width and topk_store.identity(tmp_path) in soft.key
  spec = DataSpec(seq_len=40, cache_dir=str(tmp_path / "cache"))
  packed = packing.pack_records(recs, tok, spec, soft, show_progress=False)
  assert packed.stats["pretokenized"] == 7 and packed.stats["records_used"] == 7
  by_seq = {}
  half = topk_store.LOGPROB_STEP / 2
  for row_ids, row in zip(packed.rows, packed.iter_rows()):
    offset = 0
    for j in row_ids:
      s = scored[j]
      n = len(s.record.tokens.ids)
      span = slice(offset, offset + n - 1)
      # not re-tokenised: the stored (random) ids are the inputs and targets
      np.testing.assert_array_equal(row["inputs"][span], s.record.tokens.ids[:-1])
      np.testing.assert_array_equal(row["targets"][span], s.record.tokens.ids[1:])
      np.testing.assert_array_equal(row["weights"][span], s.record.tokens.loss_mask[1:])
      loss = np.flatnonzero(row["weights"][span]) + offset
      np.testing.assert_array_equal(row["soft_ids"][loss], s.ids[:, :width])
      # ratios to the top-1 within half a quantisation step; the tail (the mass beyond the
      # first `width`, stored as float16 log) within float16's relative precision
      got = np.log(row["soft_probs"][loss].astype(np.float64))
      want = s.logprobs[:, :width].astype(np.float64)
      np.testing.assert_allclose(got - got[:, :1], want - want[:, :1], atol=half + 1e-6, rtol=0)
      tail = 1 - np.exp(want).sum(-1)
      # the stored tail (beyond k) to float16; the dropped entries k > i >= width quantised
      beyond = 1 - np.exp(s.logprobs.astype(np.float64)).sum(-1)
      bound = 2e-3 * beyond + np.expm1(2 * half) * (tail - beyond) + 1e-6
      assert (np.abs(row["soft_tail"][loss] - tail) <= bound).all()
      np.testing.assert_allclose(row["soft_probs"][loss].sum(-1) + row["soft_tail"][loss], 1,
                                 atol=1e-5)
      assert not row["soft_probs"][span][row["weights"][span] == 0].any()
      assert not row["soft_tail"][span][row["weights"][span] == 0].any()
      by_seq[j] = True
      offset += n - 1
    assert not row["soft_probs"][offset:].any()
  assert sorted(by_seq) == list(range(7))


def test_identity_depends_on_content_only(tok, tmp_path):
  _write(tmp_path / "a", tok, _scored(5))
  _write(tmp_path / "b", tok, _scored(5))
  _write(tmp_path / "c", tok, _scored(5, seed=1))
  assert (tmp_path / "a" / "shard-00000.bin").read_bytes() == (
      tmp_path / "b" / "shard-00000.bin").read_bytes()
  assert topk_store.identity(tmp_path / "a") == topk_store.identity(tmp_path / "b")
  assert topk_store.identity(tmp_path / "a") != topk_store.identity(tmp_path / "c")


def test_writer_resumes_and_removes_a_shard_the_index_does_not_list(tok, tmp_path):
  scored = _scored(6)
  w = topk_store.StoreWriter(tmp_path, k=K, teacher="t", tokenizer=tok, render={"mode": "raw"})
  w.write_shard(scored[:3])
  index_before = (tmp_path / "index.json").read_text()
  w.write_shard(scored[3:])
  # a kill between the shard's rename and the index update: the shard exists, unlisted
  (tmp_path / "index.json").write_text(index_before)
  (tmp_path / ".shard-00002.bin.dead.tmp").write_bytes(b"half")
  w2 = topk_store.StoreWriter(tmp_path, k=K, teacher="t", tokenizer=tok, render={"mode": "raw"})
  assert w2.done_ids == {"r0", "r1", "r2"}
  assert sorted(p.name for p in tmp_path.glob("*shard*")) == ["shard-00000.bin"]
  with pytest.raises(ValueError, match="already in the store"):
    w2.write_shard(scored[2:4])
  w2.write_shard(scored[3:])
  assert [s.record.id for s in topk_store.read_records(tmp_path)] == [f"r{i}" for i in range(6)]
  with pytest.raises(topk_store.StoreError, match=r"other \['k'\]"):
    topk_store.StoreWriter(tmp_path, k=K + 1, teacher="t", tokenizer=tok, render={"mode": "raw"})


def test_clear_errors(tok, tmp_path):
  _write(tmp_path, tok, _scored(6))
  with pytest.raises(topk_store.StoreError,
                     match=rf"{tmp_path}/index.json: the store holds the top 6 .* kd.top_k=7"):
    topk_store.load(tmp_path, 7)
  with pytest.raises(topk_store.StoreError, match="index.json not found"):
    topk_store.load(tmp_path / "nothing", 2)
  shard = tmp_path / "shard-00001.bin"
  data = bytearray(shard.read_bytes())
  data[-100] ^= 1
  shard.write_bytes(bytes(data))
  with pytest.raises(topk_store.StoreError, match="shard-00001.bin: content does not match"):
    topk_store.load(tmp_path, 2)
  shard.unlink()
  with pytest.raises(topk_store.StoreError, match="shard-00001.bin: shard listed in .* missing"):
    topk_store.load(tmp_path, 2)


def test_another_tokenizer_is_refused(tok, tmp_path):
  other = tok_lib.train_tokenizer(["a completely different corpus of words"] * 3, 280,
                                  tmp_path / "other")
  scored = _scored(3, vocab_size=280)
  scored = [dataclasses.replace(s, record=dataclasses.replace(s.record, tokens=dataclasses.replace(
      s.record.tokens, vocab=tok_lib.vocab_fingerprint(tok)))) for s in scored]
  _write(tmp_path / "store", tok, scored)
  assert topk_store.store_tokenizer(tmp_path / "store")["vocab"] == tok_lib.vocab_fingerprint(tok)
  topk_store.check_tokenizer(tmp_path / "store", tok)
  with pytest.raises(topk_store.StoreError, match="another vocabulary"):
    topk_store.check_tokenizer(tmp_path / "store", other)
  recs, soft = topk_store.load(tmp_path / "store", 2)
  spec = DataSpec(seq_len=40, cache_dir=str(tmp_path / "cache"))
  with pytest.raises(records.DataError, match=r"shard-00000.bin: record 'r0'.*another vocabulary"):
    packing.pack_records(recs, other, spec, soft, show_progress=False)


def test_pretokenized_json_records_round_trip():
  obj = {"id": "a", "prompt": "p", "response": "r", "token_ids": [1, 7, 9], "loss_mask": [0, 0, 1]}
  rec = records.record_from_json(obj)
  assert rec.tokens.ids.tolist() == [1, 7, 9] and records.record_from_json(rec.to_json()) == rec
  assert records.corpus_fingerprint([rec]) != records.corpus_fingerprint(
      [dataclasses.replace(rec, tokens=None)])
  cases = [({"id": "a", "prompt": "p", "response": "r", "token_ids": [1, 2]}, "loss_mask"),
           (obj | {"loss_mask": [1, 1, 1]}, "loss_mask"),
           (obj | {"token_ids": [1, -2, 3]}, "token_ids"),
           (obj | {"loss_mask": [0, 1]}, "same length")]
  for bad, needle in cases:
    with pytest.raises(BadRow, match=needle):
      records.record_from_json(bad)
