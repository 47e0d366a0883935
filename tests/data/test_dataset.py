"""Packed rows stored as array_record and read with grain (dataset.py): the cache, batches,
deterministic shuffle, resume, host shards, the last batch, building from the config."""
import collections
import copy
import json

import numpy as np
import pytest

from data.packing_fixtures import SEQ_LEN, all_rows, data_spec, encode
from sentijax import config as config_lib
from sentijax.data import dataset, packing, readers, sequences
from sentijax.data.spec import DataSpec


def test_packing_invariants(tokenizer, records, packed):
  seqs, _ = sequences.tokenize_records(records, tokenizer, False, show_progress=False)
  expected = []
  for sequence in seqs:
    fitted, _ = sequences.fit_sequence(sequence, SEQ_LEN, "left_prompt", tokenizer.bos_token_id)
    expected.append((tuple(fitted.tokens.tolist()), tuple(fitted.loss_mask[1:].tolist())))
  rows = all_rows(packed)
  assert len(rows) == packed.num_rows and packed.num_rows < len(records) - 20  # packing happened
  assert packed.stats["truncated_prompt"] == 1
  found = []
  for row in rows:
    assert set(row) == set(packing.FIELDS)
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
  prompt_tokens = {tuple(encode(tokenizer, r.prompt)) for r in records}
  for row in all_rows(packed):
    for s in range(1, row["segment_ids"].max() + 1):
      where = row["segment_ids"] == s
      first_loss = int(np.argmax(row["weights"][where]))
      assert row["weights"][where][first_loss:].all()  # response block is contiguous
      prompt_targets = tuple(row["targets"][where][:first_loss].tolist())
      assert any(p[-len(prompt_targets):] == prompt_targets for p in prompt_tokens)


def test_cache_hit_reuses_rows(tokenizer, records, packed):
  cache_dir = packed.data_dir.rsplit("/", 1)[0]
  again = dataset.build_dataset(records, tokenizer, data_spec(cache_dir), show_progress=False)
  assert again.stats["cache_hit"] and not packed.stats["cache_hit"]
  assert again.data_dir == packed.data_dir
  changed = dataset.build_dataset(records[:-1], tokenizer, data_spec(cache_dir),
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
  rows = sorted(r["inputs"].tobytes() for r in all_rows(packed))
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
    for key in packing.FIELDS:
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
      r["inputs"].tobytes() for r in all_rows(packed))
  tail = np.concatenate([b["segment_ids"] for b in batches])[n:]
  assert not tail.any()


def test_build_train_val_from_config(tokenizer, tmp_path):
  cfg = config_lib.base()
  cfg.workdir = str(tmp_path / "run")
  cfg.data.seq_len = SEQ_LEN
  cfg.data.chat_template = True
  cfg.data.prefetch = 3
  spec = DataSpec.from_config(cfg.data, workdir=cfg.workdir, seed=cfg.seed)
  train_records, val_records, corpus_stats = readers.load_corpus(spec)
  train, val, stats = dataset.build_train_val(train_records, val_records, tokenizer, spec,
                                              show_progress=False)
  assert train.stats["mode"] == "chat" and train.shuffle and not val.shuffle
  assert corpus_stats["num_train"] == train.stats["records_in"] == stats["train"]["records_in"]
  assert corpus_stats["num_val"] == val.stats["records_in"] > 0
  assert train.data_dir.startswith(str(tmp_path / "run" / "data"))
  assert (train.prefetch, train.seed, train.soft_width) == (3, cfg.seed, 0)
  assert train.fields == packing.FIELDS
  json.dumps(stats)
  batch = next(train.batches(2, process_index=0, process_count=1))
  assert batch["weights"].sum() > 0
