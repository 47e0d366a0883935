"""Tokenise, mask, pack, store (array_record via tfds) and read (grain) KnowDist data."""
import collections
import copy
import json
import random

import ml_collections
import numpy as np
import pytest

from sentijax import config as config_lib
from sentijax.data import corpus, pipeline
from sentijax.data import tokenizer as tokenizer_lib
from sentijax.data.corpus import Record

SEQ_LEN = 256


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  records, _ = corpus.read_records(corpus.demo_corpus_path())
  texts = [t for r in records for t in (r.prompt, r.response)]
  return tokenizer_lib.train_tokenizer(texts, 800, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def records():
  """The demo corpus (~200 tokens per record here) plus short records, so rows hold several
  sequences, and one over-long record, so left_prompt truncation happens."""
  demo = corpus.read_records(corpus.demo_corpus_path())[0]
  short = [Record(id=f"short-{i}", prompt=f"Rate review {i}: " + "good " * (i % 7),
                  response="Positive. " * (1 + i % 4)) for i in range(30)]
  long = Record(id="long", prompt="Summarise: " + "very long text " * 200, response="Neutral.")
  return demo[:20] + short[:15] + [long] + demo[20:] + short[15:]


def _cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict({"seq_len": SEQ_LEN, "chat_template": False,
                                   "truncation": "left_prompt", "shuffle": True})
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def packed(tokenizer, records, tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  return pipeline.build_dataset(records, tokenizer, _cfg(), cache, seed=0, show_progress=False)


def _enc(tokenizer, text):
  return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- masks


def test_raw_mode_masks_only_response_and_eos(tokenizer):
  record = Record(id="x", prompt="Is this good?\n", response="Yes, very good.")
  (seq,), stats = pipeline.tokenize_records([record], tokenizer, chat_template=False,
                                            show_progress=False)
  prompt_ids = [tokenizer.bos_token_id] + _enc(tokenizer, record.prompt)
  response_ids = _enc(tokenizer, record.response) + [tokenizer.eos_token_id]
  assert stats["mode"] == "raw"
  assert seq.tokens.tolist() == prompt_ids + response_ids and seq.tokens.dtype == np.int32
  assert seq.loss_mask.tolist() == [0] * len(prompt_ids) + [1] * len(response_ids)


def test_chat_mode_masks_only_assistant_turn(tokenizer):
  record = Record(id="x", prompt="Is this good?", response="Yes, very good.")
  (seq,), stats = pipeline.tokenize_records([record], tokenizer, chat_template=True,
                                            show_progress=False)
  assert stats["mode"] == "chat" and stats["chat_boundary_fallback"] == 0
  prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": record.prompt}],
                                              tokenize=False, add_generation_prompt=True)
  mask = seq.loss_mask.astype(bool)
  assert tokenizer.decode(seq.tokens[~mask]) == prompt_text
  assert tokenizer.decode(seq.tokens[mask]) == record.response + tokenizer.eos_token
  assert mask.tolist() == sorted(mask.tolist())  # one contiguous response block at the end


def test_chat_mode_uses_messages_and_falls_back_to_raw(tokenizer):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
  record = Record(id="x", prompt="unused", response="Hello.", messages=messages)
  (seq,), _ = pipeline.tokenize_records([record], tokenizer, True, show_progress=False)
  prompt_part = tokenizer.decode(seq.tokens[seq.loss_mask == 0])
  assert "Be brief." in prompt_part and "unused" not in prompt_part
  no_template = copy.deepcopy(tokenizer)
  no_template.chat_template = None
  (raw,), stats = pipeline.tokenize_records([record], no_template, True, show_progress=False)
  assert stats["mode"] == "raw" and raw.tokens[0] == tokenizer.bos_token_id


# --------------------------------------------------------------------------- truncation


def _seq(num_prompt: int, num_response: int) -> pipeline.TokenizedSequence:
  tokens = np.concatenate([[0], np.arange(10, 9 + num_prompt),
                           np.arange(1000, 1000 + num_response)])
  mask = np.array([0] * num_prompt + [1] * num_response)
  return pipeline.TokenizedSequence(tokens.astype(np.int32), mask.astype(np.int32))


def test_left_prompt_truncation_keeps_bos_and_response():
  fitted, outcome = pipeline.fit_sequence(_seq(20, 5), seq_len=15, truncation="left_prompt",
                                          bos_id=0)
  assert outcome == "truncated_prompt" and len(fitted.tokens) == 16
  assert fitted.tokens[0] == 0 and fitted.tokens[-5:].tolist() == list(range(1000, 1005))
  assert fitted.tokens[1:11].tolist() == list(range(19, 29))  # the prompt's tail survives
  fitted, outcome = pipeline.fit_sequence(_seq(4, 30), 15, "left_prompt", bos_id=0)
  assert outcome == "truncated_response" and fitted.tokens.tolist() == [0] + list(
      range(1000, 1015))
  assert pipeline.fit_sequence(_seq(4, 30), 15, "drop", 0) == (None, "dropped_too_long")
  kept, outcome = pipeline.fit_sequence(_seq(4, 5), 15, "drop", 0)
  assert outcome == "kept" and len(kept.tokens) == 9
  assert pipeline.fit_sequence(_seq(4, 0), 15, "left_prompt", 0) == (
      None, "dropped_empty_response")


def test_drop_truncation_counts(tokenizer, records, tmp_path):
  sequences, _ = pipeline.tokenize_records(records, tokenizer, False, show_progress=False)
  lengths = sorted(len(s.tokens) - 1 for s in sequences)
  seq_len = lengths[len(lengths) // 2]
  ds = pipeline.build_dataset(records, tokenizer, _cfg(seq_len=seq_len, truncation="drop"),
                              tmp_path, show_progress=False)
  stats = ds.stats
  assert stats["dropped_too_long"] == sum(n > seq_len for n in lengths) > 0
  assert stats["records_used"] + stats["dropped_too_long"] == len(records) == stats["records_in"]
  with pytest.raises(pipeline.DataError, match=f"All {len(records)} records were dropped"):
    pipeline.build_dataset(records, tokenizer, _cfg(seq_len=8, truncation="drop"), tmp_path,
                           show_progress=False)


# --------------------------------------------------------------------------- packing


def _naive_first_fit(lengths, capacity):
  rows, room = [], []
  for item, length in enumerate(lengths):
    for r, free in enumerate(room):
      if free >= length:
        rows[r].append(item)
        room[r] -= length
        break
    else:
      rows.append([item])
      room.append(capacity - length)
  return rows


def test_first_fit_matches_naive():
  rng = random.Random(0)
  for _ in range(20):
    lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 200))]
    assert pipeline.first_fit(lengths, 64) == _naive_first_fit(lengths, 64)


def _all_rows(ds) -> list[dict]:
  return [ds.source[i] for i in range(len(ds.source))]


def test_packing_invariants(tokenizer, records, packed):
  sequences, _ = pipeline.tokenize_records(records, tokenizer, False, show_progress=False)
  expected = []
  for sequence in sequences:
    fitted, _ = pipeline.fit_sequence(sequence, SEQ_LEN, "left_prompt", tokenizer.bos_token_id)
    expected.append((tuple(fitted.tokens.tolist()), tuple(fitted.loss_mask[1:].tolist())))
  rows = _all_rows(packed)
  assert len(rows) == packed.num_rows and packed.num_rows < len(records) - 20  # packing happened
  assert packed.stats["truncated_prompt"] == 1
  found = []
  for row in rows:
    assert set(row) == set(pipeline.FIELDS)
    assert row["inputs"].shape == (SEQ_LEN,) and row["weights"].dtype == np.float32
    seg = row["segment_ids"]
    k = seg.max()
    used = seg > 0
    assert used.tolist() == sorted(used.tolist(), reverse=True)  # padding only at the end
    assert seg[used].tolist() == sorted(seg[used].tolist())  # segments in order 1..k
    assert set(seg[used].tolist()) == set(range(1, k + 1))
    assert not row["weights"][~used].any() and not row["inputs"][~used].any()
    assert not row["positions"][~used].any()
    for s in range(1, k + 1):
      where = seg == s
      inputs, targets = row["inputs"][where], row["targets"][where]
      assert row["positions"][where].tolist() == list(range(where.sum()))
      assert inputs[1:].tolist() == targets[:-1].tolist()
      found.append((tuple(inputs.tolist()) + (int(targets[-1]),),
                    tuple(row["weights"][where].astype(int).tolist())))
  assert sorted(found) == sorted(expected)  # every sequence exactly once, never split
  assert packed.num_tokens == sum(len(t) - 1 for t, _ in expected) == packed.stats["num_tokens"]


def test_weights_zero_on_prompt_tokens(tokenizer, records, packed):
  prompt_tokens = {tuple(_enc(tokenizer, r.prompt)) for r in records}
  for row in _all_rows(packed):
    for s in range(1, row["segment_ids"].max() + 1):
      where = row["segment_ids"] == s
      first_loss = int(np.argmax(row["weights"][where]))
      assert row["weights"][where][first_loss:].all()  # response block is contiguous
      prompt_targets = tuple(row["targets"][where][:first_loss].tolist())
      assert any(p[-len(prompt_targets):] == prompt_targets for p in prompt_tokens)


def test_cache_hit_reuses_rows(tokenizer, records, packed):
  cache_dir = packed.data_dir.rsplit("/", 1)[0]
  again = pipeline.build_dataset(records, tokenizer, _cfg(), cache_dir, show_progress=False)
  assert again.stats["cache_hit"] and not packed.stats["cache_hit"]
  assert again.data_dir == packed.data_dir
  changed = pipeline.build_dataset(records[:-1], tokenizer, _cfg(), cache_dir,
                                   show_progress=False)
  assert changed.data_dir != packed.data_dir and not changed.stats["cache_hit"]


# --------------------------------------------------------------------------- reading


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
  return len(a) == len(b) and all(
      set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batch_schema(packed):
  batch = next(packed.batches(4, process_index=0, process_count=1))
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      "inputs": ((4, SEQ_LEN), "int32"), "targets": ((4, SEQ_LEN), "int32"),
      "weights": ((4, SEQ_LEN), "float32"), "segment_ids": ((4, SEQ_LEN), "int32"),
      "positions": ((4, SEQ_LEN), "int32")}


def test_shuffle_is_deterministic_and_reshuffles_each_epoch(packed):
  n = packed.num_rows
  first = _take(packed.batches(4, process_index=0, process_count=1), 6)
  assert _same(first, _take(packed.batches(4, process_index=0, process_count=1), 6))
  other_seed = copy.copy(packed)
  other_seed.seed = 1
  assert not _same(first, _take(other_seed.batches(4, process_index=0, process_count=1), 6))
  stream = [r.tobytes() for b in _take(packed.batches(1, process_index=0, process_count=1), 2 * n)
            for r in b["inputs"]]
  rows = sorted(r["inputs"].tobytes() for r in _all_rows(packed))
  assert sorted(stream[:n]) == rows and sorted(stream[n:]) == rows  # each epoch sees every row
  assert stream[:n] != stream[n:]  # ... in a different order
  unshuffled = [b["inputs"][0].tobytes() for b in _take(
      packed.batches(1, process_index=0, process_count=1, shuffle=False), n)]
  assert unshuffled == [packed.source[i]["inputs"].tobytes() for i in range(n)]


def test_resume_matches_uninterrupted_run(packed):
  uninterrupted = _take(packed.batches(4, process_index=0, process_count=1), 15)
  iterator = packed.batches(4, process_index=0, process_count=1)
  _take(iterator, 9)
  state = json.loads(json.dumps(iterator.get_state()))
  assert state["step"] == 9
  resumed = packed.batches(4, process_index=0, process_count=1)
  resumed.set_state(state)
  assert _same(_take(resumed, 6), uninterrupted[9:])
  assert _same(_take(packed.batches(4, start_step=9, process_index=0, process_count=1), 6),
               uninterrupted[9:])
  assert _same([packed.batch_at(12, 4, 0, 1)], uninterrupted[12:13])
  prefetched = packed.batches(4, start_step=5, process_index=0, process_count=1, prefetch=2)
  assert _same(_take(prefetched, 10), uninterrupted[5:])
  with pytest.raises(ValueError, match="batch_size=4 but this run uses 8"):
    packed.batches(8, process_index=0, process_count=1).set_state(state)


def test_host_shards_partition_the_global_batch(packed):
  global_batches = _take(packed.batches(6, process_index=0, process_count=1), 12)
  shards = [_take(packed.batches(6, process_index=p, process_count=2), 12) for p in range(2)]
  for step, full in enumerate(global_batches):
    a, b = shards[0][step], shards[1][step]
    assert a["inputs"].shape == (3, SEQ_LEN)
    for key in pipeline.FIELDS:
      assert np.array_equal(np.concatenate([a[key], b[key]]), full[key])
  # Resuming the 2-process run from a 1-process state gives the same rows.
  iterator = packed.batches(6, process_index=1, process_count=2)
  iterator.set_state({"step": 7, "batch_size": 6, "seed": 0, "shuffle": True})
  assert np.array_equal(next(iterator)["inputs"], global_batches[7]["inputs"][3:])
  with pytest.raises(ValueError, match="multiple of the process count"):
    packed.batches(5, process_index=0, process_count=2)


def test_single_epoch_pads_last_batch(packed):
  n = packed.num_rows
  batches = list(packed.batches(4, process_index=0, process_count=1, shuffle=False,
                                repeat=False))
  assert len(batches) == -(-n // 4)
  rows = np.concatenate([b["inputs"] for b in batches])
  assert collections.Counter(r.tobytes() for r in rows[:n]) == collections.Counter(
      r["inputs"].tobytes() for r in _all_rows(packed))
  tail = np.concatenate([b["segment_ids"] for b in batches])[n:]
  assert not tail.any()


def test_build_train_val_from_config(tokenizer, tmp_path):
  cfg = config_lib.base()
  cfg.workdir = str(tmp_path / "run")
  cfg.data.seq_len = SEQ_LEN
  cfg.data.chat_template = True
  train, val, stats = pipeline.build_train_val(cfg, tokenizer, show_progress=False)
  assert train.stats["mode"] == "chat" and train.shuffle and not val.shuffle
  assert stats["corpus"]["num_train"] == train.stats["records_in"]
  assert stats["corpus"]["num_val"] == val.stats["records_in"] > 0
  assert train.data_dir.startswith(str(tmp_path / "run" / "data"))
  json.dumps(stats)
  batch = next(train.batches(2, process_index=0, process_count=1))
  assert batch["weights"].sum() > 0
