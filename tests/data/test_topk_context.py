"""Version-4 top-k entry coding (range-coded against earlier positions with the same tokens):
decoding gives exactly what the version-3 quantiser makes of every list (ids, head order, tail
levels, the tail mass; reference computed here in float64), the quantisation KL (vs float64)
<= 1e-3 nats per position, the same bytes on every run (a pinned digest: the format's constants
and models), and a version-3 store still loads and is resumed as version 3."""
import hashlib
import json

import numpy as np
import pytest

from sentijax.data import records, tokenizer as tok_lib, topk_codec, topk_context as tc
from sentijax.data import topk_entries, topk_format, topk_store, topk_writer
from sentijax.data.records import Record, Tokens


def _lists(positions: int, vocab: int, k: int, seed: int, ties: bool = True):
  """(ids, descending float64 log-probs, log tail, cur tokens, predicted tokens) of a toy LM:
  a position's logits follow its current token (12 of them: lists repeat across positions, as a
  teacher's do) plus noise; with `ties`, some heads hold entries with equal log-probs, listed
  with the higher id first (so the teacher's order is not the id order)."""
  rng = np.random.default_rng(seed)
  base = -1.1 * np.log1p(rng.permutation(vocab))[None] + rng.normal(0, 2.0, (12, vocab))
  for row in base:
    row[rng.choice(vocab, 4, replace=False)] += rng.uniform(3, 9, 4)
  cur = rng.integers(0, 12, positions)
  logits = base[cur] + rng.normal(0, 1.0, (positions, vocab))
  lp = logits - logits.max(-1, keepdims=True)
  lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
  ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
  top = np.take_along_axis(lp, ids, 1)
  if ties:
    for m in range(0, positions, 3):
      ids[m, 1:3] = np.sort(ids[m, 1:3])[::-1]
      top[m, 1] = top[m, 2]
  tgt = np.where(rng.random(positions) < 0.5, ids[:, 0], rng.integers(0, vocab, positions))
  return ids, top, np.log1p(-np.exp(top).sum(-1)), cur, tgt


def _reference(ids, lp, log_tail, q):
  """Per position, what version 3's quantiser keeps, in the order version 4 reads it back: the
  head (within head_nats of the top-1) in the teacher's order, then the tail by level and id;
  probabilities from the codes / levels scaled to 1 - tail (float16 log tail)."""
  out_ids, out_p = np.zeros(ids.shape, np.int64), np.zeros(ids.shape)
  u_head = np.exp(-q.head_nats / 2)
  top_level = np.rint(u_head / q.level_step)
  for m in range(len(ids)):
    n = int(np.isfinite(lp[m]).sum())
    rel = lp[m, 0] - lp[m, :n]
    head = rel <= q.head_nats
    level = np.clip(np.rint((u_head - np.exp(-rel / 2)) / q.level_step), 0, top_level)
    w = np.where(head, np.exp(-np.rint(rel / q.logprob_step) * q.logprob_step),
                 np.maximum(u_head - level * q.level_step, q.level_step / 4) ** 2)
    tail = np.flatnonzero(~head)
    order = np.concatenate([np.flatnonzero(head), tail[np.lexsort((ids[m, tail], level[tail]))]])
    listed = -np.expm1(np.float64(np.float16(log_tail[m])))
    out_ids[m, :n], out_p[m, :n] = ids[m, order], listed * w[order] / w.sum()
  return out_ids, out_p


@pytest.mark.parametrize("k", [8, 48])
def test_decoding_gives_the_v3_quantised_lists_exactly(k):
  vocab, id_space = 3000, 4096
  ids, lp, log_tail, cur, tgt = _lists(700, vocab, k, seed=k)
  lp[5, k // 2:], ids[5, k // 2:] = -np.inf, 0  # a server that listed fewer entries
  q = topk_format.quantiser({"encoding": topk_format.encoding(k, vocab)})
  arrays = tc.encode(ids, lp, log_tail, cur, tgt, q, id_space)
  got_ids, got_p = tc.decode(arrays, q, k, id_space, cur, tgt)
  assert got_ids.dtype == np.int32 and got_p.dtype == np.float32
  want_ids, want_p = _reference(ids, lp, log_tail, q)
  assert np.isfinite(want_p).all() and np.isfinite(log_tail).all()
  np.testing.assert_array_equal(got_ids, want_ids)
  tied = [m for m in range(0, 700, 3) if lp[m, 0] - lp[m, 2] <= q.head_nats]
  assert len(tied) > 50 and (got_ids[tied, 1] > got_ids[tied, 2]).all()  # teacher, not id order
  # Holds on any IEEE-754 CPU: the decoder computes the weights and the row sums in float64 (CPU
  # differences ~1e-16) and rounds to float32 three times per entry (weight, factor, product:
  # <= 3 x 2^-24 = 1.8e-7 relative), no float32 transcendental or long float32 sum involved
  np.testing.assert_allclose(got_p, want_p, rtol=1e-6, atol=0)
  # the contexts were used: smaller than version 3's coding of the same lists
  v3 = topk_entries.encode(ids, lp, log_tail, q, id_space)
  size = lambda a: sum(len(topk_codec.compress(np.ascontiguousarray(x).tobytes(), "lzma"))  # noqa
                       for x in a.values())
  assert size(arrays) < 0.9 * size(v3), (size(arrays), size(v3))


@pytest.mark.parametrize("k", [20, 128])
def test_quantisation_costs_at_most_1e3_nats_per_position(k):
  """KL(float64 top-k + tail || decoded top-k + tail) over the k + 1 buckets, mean per
  position, 49152-token vocabulary, the store's default settings for k."""
  ids, lp, log_tail, cur, tgt = _lists(96, 49152, k, seed=k, ties=False)
  q = topk_format.quantiser({"encoding": topk_format.encoding(k, 49152)})
  arrays = tc.encode(ids, lp, log_tail.astype(np.float32), cur, tgt, q, 1 << 16)
  got_ids, got_p = tc.decode(arrays, q, k, 1 << 16, cur, tgt)
  kl = []
  for m in range(len(ids)):
    want, have = np.argsort(ids[m]), np.argsort(got_ids[m])
    assert (ids[m][want] == got_ids[m][have]).all()
    p, pq = np.exp(lp[m][want]), got_p[m][have].astype(np.float64)
    tail = np.exp(log_tail[m])
    kl.append((p * np.log(p / pq)).sum() + tail * np.log(tail / (1 - pq.sum())))
  kl = np.array(kl)
  assert kl.min() >= -1e-9 and 1e-5 < kl.mean() <= 1e-3, kl.mean()


def test_the_bytes_are_pinned():
  """Encoding is deterministic and its bytes are the format: a change of a model, a bucket or
  a block size makes stores unreadable (a new format version), so this digest moves only with
  VERSION. Log-probs sit at code / level centres, so no float rounding decides a symbol."""
  rng = np.random.default_rng(7)
  k, m, q = 16, 300, topk_entries.Quantiser(0.125, 3.0, 0.02)
  u_head = np.exp(-1.5)
  sym = np.sort(rng.integers(0, 25 + 9, (m, k)), axis=1)  # head codes 0..24, tail levels 0..8
  sym[:, 0] = 0
  rel = np.where(sym < 25, sym * 0.125, -2 * np.log(u_head - (sym - 25) * 0.02))
  cur = rng.integers(0, 6, m)
  ids = np.stack([rng.choice(200, k, replace=False) + 40 * c for c in cur])
  arrays = tc.encode(ids, -rel, np.full(m, -1.0), cur, ids[:, 0], q, 512)
  again = tc.encode(ids, -rel, np.full(m, -1.0), cur, ids[:, 0], q, 512)
  digest = hashlib.sha256(b"".join(np.ascontiguousarray(arrays[n]).tobytes()
                                   for n in tc.ARRAYS)).hexdigest()
  assert digest == hashlib.sha256(b"".join(np.ascontiguousarray(again[n]).tobytes()
                                           for n in tc.ARRAYS)).hexdigest()
  assert digest == "45410fdad204f3b686dd6f5a289efaa30501ed12af3a41e64283655fcbede059", digest
  got_ids, _ = tc.decode(arrays, q, k, 512, cur, ids[:, 0])
  np.testing.assert_array_equal(np.sort(got_ids, 1), np.sort(ids, 1))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  demo = [json.loads(x) for x in records.demo_corpus_path().read_text().splitlines()]
  return tok_lib.train_tokenizer([r["prompt"] + r["response"] for r in demo], 300,
                                 tmp_path_factory.mktemp("tok"))


def _scored(n: int, k: int, seed: int) -> list[topk_store.ScoredRecord]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p, r = int(rng.integers(3, 8)), int(rng.integers(20, 40))
    ids, lp, log_tail, _, _ = _lists(r, 300, k, seed=seed * 100 + i)
    tokens = rng.integers(5, 300, p + r).astype(np.int32)
    rec = Record(f"r{seed}-{i}", "p", "r", tokens=Tokens(tokens, np.array([0] * p + [1] * r)))
    out.append(topk_store.ScoredRecord(rec, ids, lp, log_tail))
  return out


def test_a_v3_store_still_loads_and_is_resumed_as_v3(tok, tmp_path, monkeypatch):
  k = 12
  first, second = _scored(4, k, seed=1), _scored(3, k, seed=2)
  monkeypatch.setattr(topk_writer, "VERSION", 3)  # the previous writer
  w = topk_store.StoreWriter(tmp_path / "v3", k=k, teacher="t", tokenizer=tok,
                             render={"mode": "raw"})
  w.write_shard(first)
  monkeypatch.setattr(topk_writer, "VERSION", 4)
  w = topk_store.StoreWriter(tmp_path / "v3", k=k, teacher="t", tokenizer=tok,
                             render={"mode": "raw"})  # resumed: its shards stay version 3
  w.write_shard(second)
  w.finish(True)
  assert topk_store.read_index(tmp_path / "v3")["version"] == 3
  for entry in topk_store.read_index(tmp_path / "v3")["shards"]:
    header, _ = topk_codec.read_header((tmp_path / "v3" / entry["file"]).read_bytes())
    assert {a["name"] for a in header["arrays"]} >= set(topk_entries.ARRAYS)
  v4 = topk_store.StoreWriter(tmp_path / "v4", k=k, teacher="t", tokenizer=tok,
                              render={"mode": "raw"})
  v4.write_shard(first + second)
  assert topk_store.read_index(tmp_path / "v4")["version"] == 4
  header, _ = topk_codec.read_header((tmp_path / "v4" / "shard-00000.bin").read_bytes())
  code = {a["name"]: a for a in header["arrays"]}["range_code"]  # stored as it is, not lzma
  assert code.get("codec") == "none" and code["size"] == 4 * code["shape"][0]
  old, new = topk_store.read_records(tmp_path / "v3"), topk_store.read_records(tmp_path / "v4")
  assert [o.record.id for o in old] == [n.record.id for n in new] == [
      s.record.id for s in first + second]
  for o, n in zip(old, new):  # the same quantised lists (tail ties: v3 by frequency rank)
    for m in range(len(o.ids)):
      np.testing.assert_array_equal(np.sort(o.ids[m]), np.sort(n.ids[m]))
      np.testing.assert_allclose(o.logprobs[m][np.argsort(o.ids[m])],
                                 n.logprobs[m][np.argsort(n.ids[m])], rtol=0, atol=1e-5)
  recs, soft = topk_store.load(tmp_path / "v3", 5)
  assert len(recs) == 7 and soft.width == 5


@pytest.mark.parametrize("m", [0, 1, 2, 65])
def test_tiny_shards_and_empty_positions_round_trip(m):
  """No position, one, or a first block plus one; the last position lists nothing."""
  q = topk_entries.Quantiser(0.125, 3.0, 0.02)
  ids = (np.arange(m * 8).reshape(m, 8) * 7) % 50
  lp = -np.arange(m * 8, dtype=np.float64).reshape(m, 8) * 0.3 - 0.1
  if m:
    ids[-1], lp[-1] = 0, -np.inf
  cur, tgt = np.arange(m) % 3, ids[:, 0]
  with np.errstate(invalid="ignore"):  # the empty position's log-ratios
    arrays = tc.encode(ids, lp, np.full(m, -1.0), cur, tgt, q, 64)
  got_ids, got_p = tc.decode(arrays, q, 8, 64, cur, tgt)
  assert got_ids.shape == got_p.shape == (m, 8)
  np.testing.assert_array_equal(np.sort(got_ids, 1), np.sort(ids, 1))
  assert (got_p[-1:] == 0).all() if m else True
