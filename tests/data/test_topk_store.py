"""The offline teacher store (format v2): write -> load -> packed rows carry the stored top-k (to
the quantisation bound) and tail at the right target positions; packing takes the stored ids as
they are; resumable writer; stored rows keep soft fields only at loss positions; the sampled
mode; the quantisation KL bound; ids in the narrowest width; the streaming loader's memory bound;
clear errors for a missing or corrupt shard, a width above k, another tokenizer and a v1 store
(with its converter)."""
import dataclasses
import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sentijax.data import dataset, packing, records, tokenizer as tok_lib, topk_codec, topk_store
from sentijax.data import topk_writer
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


def _write_v1(store, tok, scored):
  """A version-1 store as the old writer made it: one npz shard of int32 ids, float32 logprobs."""
  store.mkdir(parents=True)
  lines = [json.dumps(s.record.to_json(with_tokens=False), sort_keys=True).encode()
           for s in scored]
  arrays = {"ids": np.array([s.record.id for s in scored], dtype=str),
            "records_json": np.frombuffer(b"".join(lines), np.uint8),
            "record_offsets": np.cumsum([0] + [len(x) for x in lines], dtype=np.int64),
            "tokens": np.concatenate([s.record.tokens.ids for s in scored]).astype(np.int32),
            "token_offsets": np.cumsum([0] + [len(s.record.tokens.ids) for s in scored]),
            "loss_mask": np.concatenate([s.record.tokens.loss_mask for s in scored]).astype(
                np.uint8),
            "topk_ids": np.concatenate([s.ids for s in scored]).astype(np.int32),
            "topk_logprobs": np.concatenate([s.logprobs for s in scored]).astype(np.float32)}
  np.savez(store / "shard-00000.npz", **arrays)
  tok.save_pretrained(str(store / "tokenizer"))
  index = {"format": "sentijax-topk-v1", "k": K, "teacher": "t",
           "tokenizer": topk_store.tokenizer_identity(tok), "render": {"mode": "raw"},
           "shards": [{"file": "shard-00000.npz", "records": len(scored)}], "complete": True}
  (store / "index.json").write_text(json.dumps(index))


def test_a_v1_store_is_refused_with_the_converter_and_converts(tok, tmp_path):
  scored = _scored(5)
  _write_v1(tmp_path / "old", tok, scored)
  with pytest.raises(topk_store.StoreError, match=(
      rf"{tmp_path}/old/index.json: store format version 1 .*reads versions \(2, 3, 4\).*"
      rf"python -m sentijax.data.topk_store convert {tmp_path}/old")):
    topk_store.load(tmp_path / "old", 2)
  # the command the error names (`python -m sentijax.data.topk_store convert OLD NEW`)
  assert topk_store.main(["convert", str(tmp_path / "old"), str(tmp_path / "new")]) == 0
  got = topk_store.read_records(tmp_path / "new")
  assert [g.record.id for g in got] == [s.record.id for s in scored]
  for g, s in zip(got, scored):
    assert g.record.tokens.ids.tolist() == s.record.tokens.ids.tolist()
    np.testing.assert_array_equal(g.ids, s.ids)
    rel = lambda x: x - x[:, :1]  # noqa: E731
    np.testing.assert_allclose(rel(g.logprobs), rel(s.logprobs), atol=topk_store.LOGPROB_STEP / 2
                               + 1e-6)


def _write_v2(store, tok, scored):
  """A version-2 store as the previous writer made it (one shard, lzma)."""
  store.mkdir(parents=True)
  bits = topk_codec.id_bits(len(tok))
  arrays = topk_writer.record_arrays(scored) | topk_codec.v2_arrays(
      np.concatenate([s.ids for s in scored]), np.concatenate([s.logprobs for s in scored]),
      np.concatenate([topk_codec.log_tail(s.logprobs) for s in scored]), 0.125)
  data = topk_codec.encode_shard(arrays, "lzma", {"tokens": bits, "topk_ids": bits,
                                                  "loss_mask": 1})
  (store / "shard-00000.bin").write_bytes(data)
  tok.save_pretrained(str(store / "tokenizer"))
  (store / "index.json").write_text(json.dumps({
      "format": "sentijax-topk", "version": 2, "mode": "topk", "k": K, "temperature": 1.0,
      "teacher": "t", "tokenizer": topk_store.tokenizer_identity(tok), "render": {"mode": "raw"},
      "encoding": {"id_bits": bits, "logprob_step": 0.125, "codec": "lzma"},
      "shards": [{"file": "shard-00000.bin", "records": len(scored),
                  "tokens": int(len(arrays["tokens"])), "positions": int(len(arrays["log_tail"])),
                  "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}],
      "complete": True}))


def test_a_v2_store_loads_and_converts_to_v4(tok, tmp_path):
  scored = _scored(5)
  for s in scored[:2]:  # entries deeper than the head (HEAD_NATS) too
    s.logprobs[:, 3:] -= 4.0
  _write_v2(tmp_path / "old", tok, scored)
  old = topk_store.read_records(tmp_path / "old")  # version 2 still reads
  recs, soft = topk_store.load(tmp_path / "old", 4)
  assert [r.id for r in recs] == [s.record.id for s in scored] and soft.width == 4
  with pytest.raises(topk_store.StoreError, match=(
      rf"{tmp_path}/old/index.json: a version-2 store; .* appends to versions \(3, 4\): "
      rf"convert it: python -m sentijax.data.topk_store convert {tmp_path}/old")):
    topk_store.StoreWriter(tmp_path / "old", k=K, teacher="t", tokenizer=tok,
                           render={"mode": "raw"})
  assert topk_store.main(["convert", str(tmp_path / "old"), str(tmp_path / "new")]) == 0
  assert topk_store.read_index(tmp_path / "new")["version"] == 4
  new = topk_store.read_records(tmp_path / "new")
  assert [n.record.id for n in new] == [s.record.id for s in scored]
  q = topk_store.quantiser(topk_store.read_index(tmp_path / "new"))
  deep = 0
  for n, o, s in zip(new, old, scored):
    assert n.record == o.record
    np.testing.assert_array_equal(n.log_tail, o.log_tail)  # float16 values, copied
    for m in range(len(s.ids)):
      order_n, order_o = np.argsort(n.ids[m]), np.argsort(o.ids[m])
      np.testing.assert_array_equal(n.ids[m][order_n], np.sort(s.ids[m]))  # the same id set
      rel_n = n.logprobs[m][order_n] - n.logprobs[m, 0]
      rel_o = o.logprobs[m][order_o] - o.logprobs[m, 0]
      head = rel_o >= -q.head_nats
      # head: v2's codes re-coded exactly (same step); tail: within half a level on sqrt(p/p1)
      np.testing.assert_allclose(rel_n[head], rel_o[head], atol=1e-5, rtol=0)
      assert (np.abs(np.exp(rel_n[~head] / 2) - np.exp(rel_o[~head] / 2))
              <= q.level_step / 2 + 1e-6).all()
      deep += int((~head).sum())
  assert deep > 0
  with pytest.raises(topk_store.StoreError, match="version 4: this sentijax reads it as it is"):
    topk_store.convert(tmp_path / "new", tmp_path / "again")
  index = json.loads((tmp_path / "new" / "index.json").read_text())
  (tmp_path / "new" / "index.json").write_text(json.dumps(index | {"version": 9}))
  with pytest.raises(topk_store.StoreError, match=(
      r"new/index.json: format 'sentijax-topk' version 9, expected 'sentijax-topk' version 2 "
      r"or 3 or 4")):
    topk_store.load(tmp_path / "new", 2)


@pytest.mark.parametrize("vocab, bits", [(300, 9), (49152, 16), (65536, 16), (65537, 17),
                                         (128256, 17)])
def test_ids_take_the_narrowest_width(vocab, bits):
  assert topk_codec.id_bits(vocab) == bits
  values = np.random.default_rng(vocab).integers(0, vocab, 1001)
  values[0] = vocab - 1
  packed = topk_codec.pack_bits(values, bits)
  assert len(packed) == (1001 * bits + 7) // 8
  np.testing.assert_array_equal(topk_codec.unpack_bits(packed, bits, 1001), values)
  with pytest.raises(ValueError, match="more than"):
    topk_codec.pack_bits(np.array([1 << bits]), bits)


def _sampled(scored, n_draws: int, seed: int = 0):
  """The records of `scored` with N draws per position from their top-K (as the distribution)."""
  rng = np.random.default_rng(seed)
  out = []
  for s in scored:
    p = np.exp(s.logprobs.astype(np.float64))
    ids, counts = np.zeros((len(p), n_draws), np.int32), np.zeros((len(p), n_draws), np.int32)
    lp = np.zeros((len(p), n_draws), np.float32)
    for m in range(len(p)):
      u, c = np.unique(rng.choice(K, n_draws, p=p[m] / p[m].sum()), return_counts=True)
      ids[m, :len(u)], counts[m, :len(u)], lp[m, :len(u)] = s.ids[m, u], c, s.logprobs[m, u]
    out.append(topk_store.ScoredRecord(s.record, ids, lp, counts=counts))
  return out


def test_sample_store_gives_weights_and_tempered_logprobs(tok, tmp_path):
  n_draws = 12
  sampled = _sampled(_scored(4), n_draws)
  w = topk_store.StoreWriter(tmp_path, k=n_draws, teacher="t", tokenizer=tok,
                             render={"mode": "raw"}, mode="sample", temperature=2.0)
  w.write_shard(sampled)
  w.finish(True)
  assert topk_store.distill_support(tmp_path, 2.0) == "sampled"
  with pytest.raises(topk_store.StoreError, match=r"drawn at temperature 2.0; kd.temperature=1"):
    topk_store.distill_support(tmp_path, 1.0)
  with pytest.raises(topk_store.StoreError, match=r"12 draws per token; kd.top_k=5 must be 0 or"):
    topk_store.load(tmp_path, 5)
  recs, soft = topk_store.load(tmp_path, 0)
  assert soft.width == n_draws and soft.extra_fields == ("soft_logp",)
  packed = packing.pack_records(recs, tok, DataSpec(seq_len=40), soft, show_progress=False)
  for row_ids, row in zip(packed.rows, packed.iter_rows()):
    offset = 0
    for j in row_ids:
      s, n = sampled[j], len(sampled[j].record.tokens.ids)
      loss = np.flatnonzero(row["weights"][offset:offset + n - 1]) + offset
      np.testing.assert_array_equal(row["soft_ids"][loss], s.ids)
      # counts / N is one float32 rounding of an exact ratio (IEEE division is correctly
      # rounded on every CPU): half an ulp, well inside 2 eps of the value.
      np.testing.assert_allclose(row["soft_probs"][loss], s.counts / n_draws,
                                 rtol=2 * np.finfo(np.float32).eps)
      np.testing.assert_allclose(row["soft_logp"][loss], s.logprobs, atol=2e-3, rtol=0)  # fp16
      offset += n - 1


def test_stored_rows_keep_soft_fields_only_at_loss_positions(tok, tmp_path):
  scored = _scored(9)
  _write(tmp_path / "store", tok, scored)
  recs, soft = topk_store.load(tmp_path / "store", 4)
  spec = DataSpec(seq_len=40, cache_dir=str(tmp_path / "cache"))
  ds = dataset.build_dataset(recs, tok, spec, soft_targets=soft, show_progress=False)
  stored = ds.source._rows  # pylint: disable=protected-access  # the layout on disk
  dense = [ds.source[i] for i in range(len(ds.source))]
  for i in range(len(stored)):
    row = stored[i]
    assert row["soft_ids"].shape == (len(row["soft_pos"]), 4)
    np.testing.assert_array_equal(row["soft_pos"], np.flatnonzero(row["weights"] > 0))
    assert dense[i]["soft_probs"].shape == (40, 4) and dense[i]["soft_tail"].shape == (40,)
  want = sorted(r["inputs"].tobytes() + r["soft_probs"].tobytes() + r["soft_tail"].tobytes()
                for r in packing.pack_records(recs, tok, spec, soft,
                                              show_progress=False).iter_rows())
  assert sorted(r["inputs"].tobytes() + r["soft_probs"].tobytes() + r["soft_tail"].tobytes()
                for r in dense) == want
  batch = ds.batch_at(0, 4, process_index=0, process_count=1)
  assert batch["soft_tail"].shape == (4, 40) and batch["soft_ids"].shape == (4, 40, 4)
  assert ds.stats["num_soft_targets"] == sum(int(s.record.tokens.loss_mask.sum()) for s in scored)


_MEMORY_PROBE = textwrap.dedent("""
    import json, pathlib, sys, tracemalloc
    import numpy as np
    from sentijax.data import packing, tokenizer as tok_lib, topk_store
    from sentijax.data.spec import DataSpec
    store = sys.argv[1]
    tok = tok_lib.load_tokenizer(store + "/tokenizer")
    tracemalloc.start()
    index = topk_store.read_index(store)
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    one = topk_store._ShardCache(pathlib.Path(store), index, 1).get(0)  # one shard alone
    one = tracemalloc.get_traced_memory()[1] - before
    recs, soft = topk_store.load(store, 128)
    packed = packing.pack_records(recs, tok, DataSpec(seq_len=512), soft, show_progress=False)
    own = tracemalloc.get_traced_memory()[0]  # records and fitted sequences: training's own
    tracemalloc.reset_peak()
    rows = 0
    for row in packed.iter_rows():
      rows += 1
    print(json.dumps({"own": own, "one": one, "peak": tracemalloc.get_traced_memory()[1],
                      "rows": rows, "positions": packed.stats["num_soft_targets"]}))
""")


class _Uncompressed(topk_store.StoreWriter):
  encoding_overrides = {"codec": "none"}


def test_streaming_load_holds_about_two_decoded_shards(tok, tmp_path):
  """12 shards of 3000 positions at k=128: building every packed row holds two decoded shards
  and the working set of decoding a third beyond the records themselves (tracemalloc peak in a
  fresh process; numpy buffers are traced)."""
  rng = np.random.default_rng(0)
  k, shards, per_shard, response = 128, 12, 30, 100
  w = _Uncompressed(tmp_path, k=k, teacher="t", tokenizer=tok, render={"mode": "raw"})
  for shard in range(shards):
    batch = []
    for i in range(per_shard):
      ids = rng.integers(5, 300, 20 + response).astype(np.int32)
      mask = np.array([0] * 20 + [1] * response, np.int32)
      lp = -rng.exponential(0.05, (response, k)).cumsum(1)  # descending, top-1 near 0
      top = np.argsort(rng.random((response, 300)), axis=1)[:, :k].astype(np.int32)
      rec = Record(f"r{shard}-{i}", "p", "r", tokens=Tokens(ids, mask))
      batch.append(topk_store.ScoredRecord(rec, top, lp))
    w.write_shard(batch)
  w.finish(True)
  done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path)], capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(done.stdout.strip().splitlines()[-1])
  assert got["positions"] == shards * per_shard * response
  decoded_shard = per_shard * response * (k * (4 + 4) + 4)  # ids, probs, tail
  row = 512 * (5 * 4 + k * 8 + 4)
  # two decoded shards cached and the working set of decoding a third (version 4: the shard's
  # lists and a block's candidates, ~12 MB here whatever the shard's size); every shard decoded
  # at once (the v1 loader) would be >= 12 decoded shards
  assert got["peak"] <= got["one"] + 2 * decoded_shard + 4 * row + (1 << 20), (got,
                                                                                decoded_shard)
  assert got["peak"] < 12 * decoded_shard, got


def test_missing_entries_load_as_padding(tok, tmp_path):
  """A server that gives fewer than k entries at a position (-inf log-probs, id 0): they load
  as probability 0 and the tail keeps the mass of the rest."""
  scored = _scored(3)
  s = scored[1]
  s.logprobs[0, 3:] = -np.inf
  s.ids[0, 3:] = 0
  _write(tmp_path, tok, scored)
  got = topk_store.read_records(tmp_path)[1]
  assert np.isneginf(got.logprobs[0, 3:]).all() and np.isfinite(got.logprobs[0, :3]).all()
  listed = np.exp(s.logprobs[0, :3].astype(np.float64))
  np.testing.assert_allclose(np.exp(got.log_tail[0]), 1 - listed.sum(), rtol=2e-3)
  np.testing.assert_allclose(np.exp(got.logprobs[0, :3]).sum(), listed.sum(), rtol=1e-3)
