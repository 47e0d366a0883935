"""Tokenise, mask, fit and pack records into rows (packing.py), soft targets aligned with them."""
import collections
import copy
import random

import numpy as np
import pytest

from data.packing_fixtures import SEQ_LEN, all_rows, data_spec, encode
from sentijax.data import dataset, packing, sequences
from sentijax.data.records import DataError, Record
from sentijax.data.spec import DataSpec


# --------------------------------------------------------------------------- masks


def test_raw_mode_masks_only_response_and_eos(tokenizer):
  record = Record(id="x", prompt="Is this good?\n", response="Yes, very good.")
  (seq,), stats = sequences.tokenize_records([record], tokenizer, chat_template=False,
                                            show_progress=False)
  prompt_ids = [tokenizer.bos_token_id] + encode(tokenizer, record.prompt)
  response_ids = encode(tokenizer, record.response) + [tokenizer.eos_token_id]
  assert stats["mode"] == "raw"
  assert seq.tokens.tolist() == prompt_ids + response_ids and seq.tokens.dtype == np.int32
  assert seq.loss_mask.tolist() == [0] * len(prompt_ids) + [1] * len(response_ids)


def test_chat_mode_masks_only_assistant_turn(tokenizer):
  record = Record(id="x", prompt="Is this good?", response="Yes, very good.")
  (seq,), stats = sequences.tokenize_records([record], tokenizer, chat_template=True,
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
  (seq,), _ = sequences.tokenize_records([record], tokenizer, True, show_progress=False)
  prompt_part = tokenizer.decode(seq.tokens[seq.loss_mask == 0])
  assert "Be brief." in prompt_part and "unused" not in prompt_part
  no_template = copy.deepcopy(tokenizer)
  no_template.chat_template = None
  (raw,), stats = sequences.tokenize_records([record], no_template, True, show_progress=False)
  assert stats["mode"] == "raw" and raw.tokens[0] == tokenizer.bos_token_id


def test_sequence_length_fn_counts_the_rendered_sequence(tokenizer):
  """The token count ICL prompts are fitted by: under the chat template, what transformers itself
  renders and tokenises for [user, assistant] (this template keeps content as it is); raw, bos +
  prompt + response + eos."""
  chat, raw = (sequences.sequence_length_fn(tokenizer, c) for c in (True, False))
  for prompt, answer in [("Sentence: The soup was cold.\nLabel:", " negative"),
                         ("Rate review 3: good good good ", "Positive. Positive.")]:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert chat(prompt, answer) == len(ids) > 10
    assert raw(prompt, answer) == 2 + len(encode(tokenizer, prompt)) + len(encode(tokenizer, answer))


# --------------------------------------------------------------------------- truncation


def _seq(num_prompt: int, num_response: int) -> sequences.TokenizedSequence:
  tokens = np.concatenate([[0], np.arange(10, 9 + num_prompt),
                           np.arange(1000, 1000 + num_response)])
  mask = np.array([0] * num_prompt + [1] * num_response)
  return sequences.TokenizedSequence(tokens.astype(np.int32), mask.astype(np.int32))


def test_left_prompt_truncation_keeps_bos_and_response():
  fitted, outcome = sequences.fit_sequence(_seq(20, 5), seq_len=15, truncation="left_prompt",
                                          bos_id=0)
  assert outcome == "truncated_prompt" and len(fitted.tokens) == 16
  assert fitted.tokens[0] == 0 and fitted.tokens[-5:].tolist() == list(range(1000, 1005))
  assert fitted.tokens[1:11].tolist() == list(range(19, 29))  # the prompt's tail survives
  fitted, outcome = sequences.fit_sequence(_seq(4, 30), 15, "left_prompt", bos_id=0)
  assert outcome == "truncated_response" and fitted.tokens.tolist() == [0] + list(
      range(1000, 1015))
  assert sequences.fit_sequence(_seq(4, 30), 15, "drop", 0) == (None, "dropped_too_long")
  kept, outcome = sequences.fit_sequence(_seq(4, 5), 15, "drop", 0)
  assert outcome == "kept" and len(kept.tokens) == 9
  assert sequences.fit_sequence(_seq(4, 0), 15, "left_prompt", 0) == (
      None, "dropped_empty_response")


def test_drop_truncation_counts(tokenizer, records, tmp_path):
  seqs, _ = sequences.tokenize_records(records, tokenizer, False, show_progress=False)
  lengths = sorted(len(s.tokens) - 1 for s in seqs)
  seq_len = lengths[len(lengths) // 2]
  ds = dataset.build_dataset(records, tokenizer, data_spec(tmp_path, seq_len=seq_len,
                                                       truncation="drop"), show_progress=False)
  stats = ds.stats
  assert stats["dropped_too_long"] == sum(n > seq_len for n in lengths) > 0
  assert stats["records_used"] + stats["dropped_too_long"] == len(records) == stats["records_in"]
  with pytest.raises(DataError, match=f"All {len(records)} records were dropped"):
    dataset.build_dataset(records, tokenizer, data_spec(tmp_path, seq_len=8, truncation="drop"),
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
    assert packing.first_fit(lengths, 64) == _naive_first_fit(lengths, 64)


# --------------------------------------------------------------------------- soft targets

SOFT_K = 3


def _every_token_soft(record, sequence):
  """Soft targets naming each token itself: ids [tok, tok + 1, 0], probs [0.75, 0.25, 0]."""
  del record
  n = len(sequence.tokens)
  ids = np.stack([sequence.tokens, sequence.tokens + 1, np.zeros(n, np.int32)], -1)
  return ids, np.tile(np.float32([0.75, 0.25, 0.0]), (n, 1))


def _first_response_soft(record, sequence):
  """One distribution at the first response token; none for records whose id ends in 0."""
  if record.id.endswith("0"):
    return None
  index = sequences.first_response_index(sequence)
  return sequences.soft_targets_at(len(sequence.tokens), SOFT_K, index,
                                 [int(sequence.tokens[index]), 5], [0.6, 0.4])


EVERY_TOKEN = sequences.SoftTargets(SOFT_K, _every_token_soft, "every-token-v1")
FIRST_RESPONSE = sequences.SoftTargets(SOFT_K, _first_response_soft, "first-response-v1")


def test_soft_targets_stay_aligned_with_targets_through_truncation_and_packing(tokenizer,
                                                                              records):
  packed = packing.pack_records(records, tokenizer, DataSpec(seq_len=SEQ_LEN), EVERY_TOKEN,
                                show_progress=False)
  assert packed.stats["truncated_prompt"] == 1 and packed.soft_width == SOFT_K
  for row in packed.iter_rows():
    assert set(row) == set(packing.FIELDS + sequences.SOFT_FIELDS)
    assert row["soft_ids"].shape == (SEQ_LEN, SOFT_K) and row["soft_probs"].dtype == np.float32
    used = row["segment_ids"] > 0
    # Every real position's soft target names the token that `targets` holds there.
    assert np.array_equal(row["soft_ids"][used, 0], row["targets"][used])
    assert np.array_equal(row["soft_ids"][used, 1], row["targets"][used] + 1)
    assert np.array_equal(row["soft_probs"][used], np.tile([0.75, 0.25, 0.0], (used.sum(), 1)))
    assert not row["soft_ids"][~used].any() and not row["soft_probs"][~used].any()
  assert packed.stats["num_soft_targets"] == packed.stats["num_tokens"]


def test_soft_target_at_first_response_token(tokenizer, records):
  packed = packing.pack_records(records, tokenizer, DataSpec(seq_len=SEQ_LEN), FIRST_RESPONSE,
                                show_progress=False)
  with_soft = 0
  for row in packed.iter_rows():
    for s in range(1, row["segment_ids"].max() + 1):
      where = np.flatnonzero(row["segment_ids"] == s)
      marked = where[row["soft_probs"][where].sum(-1) > 0]
      if not marked.size:
        continue
      with_soft += 1
      first_loss = where[np.argmax(row["weights"][where])]
      assert marked.tolist() == [first_loss]  # the position whose target is the first answer token
      assert row["soft_ids"][first_loss].tolist() == [row["targets"][first_loss], 5, 0]
      np.testing.assert_array_equal(row["soft_probs"][first_loss], np.float32([0.6, 0.4, 0]))
  assert with_soft == sum(not r.id.endswith("0") for r in records)
  assert packed.stats["num_soft_targets"] == with_soft


def _row_multiset(rows):
  return collections.Counter(tuple((k, r[k].dtype.str, r[k].tobytes()) for k in sorted(r))
                             for r in rows)


def test_soft_targets_cache_round_trip_batches_and_shards(tokenizer, records, packed, tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  from sentijax import sharding  # pylint: disable=import-outside-toplevel
  spec = data_spec(tmp_path)
  soft = dataset.build_dataset(records, tokenizer, spec, soft_targets=FIRST_RESPONSE,
                               show_progress=False)
  assert soft.soft_width == SOFT_K and not soft.stats["cache_hit"]
  assert soft.fields == packing.FIELDS + sequences.SOFT_FIELDS
  expected = list(packing.pack_records(records, tokenizer, spec, FIRST_RESPONSE,
                                       show_progress=False).iter_rows())
  # Stored rows == packed rows (tfds shuffles on write: compare as multisets), soft fields too;
  # the KnowDist rows of the same records are the same rows without the soft fields.
  assert _row_multiset(all_rows(soft)) == _row_multiset(expected)
  assert _row_multiset(all_rows(packed)) == _row_multiset(
      [{k: r[k] for k in packing.FIELDS} for r in expected])
  again = dataset.build_dataset(records, tokenizer, spec, soft_targets=FIRST_RESPONSE,
                                show_progress=False)
  assert again.stats["cache_hit"] and again.soft_width == SOFT_K and again.data_dir == soft.data_dir
  other = sequences.SoftTargets(SOFT_K, _first_response_soft, "first-response-v2")
  keys = {dataset.cache_key(records, tokenizer, spec, s) for s in (None, FIRST_RESPONSE, other)}
  assert len(keys) == 3
  batch = next(soft.batches(8, process_index=0, process_count=1))
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items() if k.startswith("soft")} == {
      "soft_ids": ((8, SEQ_LEN, SOFT_K), "int32"), "soft_probs": ((8, SEQ_LEN, SOFT_K), "float32")}
  halves = [next(soft.batches(8, process_index=p, process_count=2)) for p in range(2)]
  for key in sequences.SOFT_FIELDS:
    assert np.array_equal(np.concatenate([h[key] for h in halves]), batch[key])
  tail = list(soft.batches(8, process_index=0, process_count=1, shuffle=False, repeat=False))[-1]
  assert tail["soft_probs"].shape == (8, SEQ_LEN, SOFT_K)
  # On the training mesh the soft fields shard like the others: batch axis split, rest whole.
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  batch_sh = sharding.batch_sharding(mesh)
  arrays = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}
  n = mesh.shape["data"]
  assert arrays["soft_ids"].sharding.shard_shape(arrays["soft_ids"].shape) == (
      8 // n, SEQ_LEN, SOFT_K)
  assert arrays["inputs"].sharding.shard_shape(arrays["inputs"].shape) == (8 // n, SEQ_LEN)
  np.testing.assert_array_equal(np.asarray(arrays["soft_probs"]), batch["soft_probs"])


@pytest.mark.parametrize("result, match", [
    ((np.zeros((2, SOFT_K), np.int32), np.zeros((2, SOFT_K), np.float32)), r"shapes \(2, 3\)"),
    ("neg_ids", "non-negative integers"),
    ("too_much", "sum to more than 1"),
    ("nan", "finite"),
])
def test_bad_soft_targets_name_the_record(result, match):
  sequence = sequences.TokenizedSequence(np.arange(6, dtype=np.int32),
                                       np.int32([0, 0, 0, 1, 1, 1]))
  ids, probs = sequences.soft_targets_at(6, SOFT_K, 3, [4, 5], [0.5, 0.5])
  if result == "neg_ids":
    ids[3, 0] = -1
  elif result == "too_much":
    probs[3, 1] = 0.6
  elif result == "nan":
    probs[3, 0] = np.nan
  else:
    ids, probs = result
  bad = sequences.SoftTargets(SOFT_K, lambda r, s: (ids, probs), "bad")
  with pytest.raises(DataError, match=f"record 'r7'.*{match}"):
    bad.attach(Record(id="r7", prompt="p", response="r"), sequence)
  with pytest.raises(ValueError, match="width"):
    packing.pack_row([sequence], 16, soft_width=SOFT_K)
