"""Version-3 top-k entry coding: every listed id comes back at its position, the head in rank
order within half a log-prob step of the top-1 ratio, the tail within half a level step on
sqrt(p / p_1), the tail mass to float16; the quantisation KL (vs float64) <= 1e-3 nats per
position on peaked and flat distributions over a 49152-token vocabulary; exp-Golomb and
variable-width bits round trip; bad entries are refused."""
import numpy as np
import pytest

from sentijax.data import topk_entries as te
from sentijax.data import topk_format

ID_SPACE = 1 << 16


def _logits(positions: int, vocab: int, seed: int, peaked: bool) -> np.ndarray:
  """float64 logits: peaked = like an LM's (a Zipf prior over ids, noise and a few strong
  candidates: top-1 probabilities ~0.1 to ~0.99); flat = Gaussian noise only."""
  rng = np.random.default_rng(seed)
  if not peaked:
    return rng.normal(0, 3.0, (positions, vocab))
  logits = -1.1 * np.log1p(np.arange(vocab))[None] + rng.normal(0, 2.0, (positions, vocab))
  for i in range(positions):
    picks = rng.choice(vocab, 5, replace=False)
    logits[i, picks] += rng.uniform(4, 14) * np.sort(rng.random(5))[::-1]
  return logits


def _topk(logits: np.ndarray, k: int):
  """(ids, descending log-probs, log tail) of each row's top k, float64."""
  top = logits.max(-1, keepdims=True)
  lp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
  top_lp = np.take_along_axis(lp, ids, 1)
  return ids, top_lp, np.log1p(-np.exp(top_lp).sum(-1))


def _by_id(ids, values, row):
  order = np.argsort(ids[row])
  return ids[row][order], values[row][order]


@pytest.mark.parametrize("peaked", [True, False])
def test_round_trip_keeps_ids_head_order_and_the_level_bounds(peaked):
  k = 48
  ids, lp, log_tail = _topk(_logits(40, 3000, seed=int(peaked), peaked=peaked), k)
  lp[3, 30:], ids[3, 30:] = -np.inf, 0  # a server that listed fewer entries
  q = topk_format.quantiser({"encoding": topk_format.encoding(k, 3000)})
  got_ids, got_p = te.decode(te.encode(ids, lp, log_tail, q, ID_SPACE), q, k, ID_SPACE)
  assert got_ids.dtype == np.int32 and got_p.dtype == np.float32
  with np.errstate(divide="ignore"):
    got_lp = np.log(got_p.astype(np.float64))
  heads = tails = 0
  for m in range(len(ids)):
    valid = np.isfinite(lp[m])
    n = int(valid.sum())
    assert (got_p[m, n:] == 0).all() and (got_ids[m, n:] == 0).all()
    want_i, want_lp = _by_id(ids[:, :n], lp[:, :n], m)
    have_i, have_lp = _by_id(got_ids[:, :n], got_lp[:, :n], m)
    np.testing.assert_array_equal(have_i, want_i)  # every listed id, once
    rel_want, rel_have = want_lp - lp[m, 0], have_lp - got_lp[m, 0]
    head = rel_want >= -q.head_nats
    h = int(head.sum())
    # head: rank order kept, log-ratio to the top-1 within half a step (float32: 1e-6)
    np.testing.assert_array_equal(got_ids[m, :h], ids[m, :h])
    assert (np.abs(rel_have[head] - rel_want[head]) <= q.logprob_step / 2 + 1e-6).all()
    # tail: sqrt(p / p_1) within half a level step (the bottom level: within step / 2 too)
    u_err = np.abs(np.exp(rel_have[~head] / 2) - np.exp(rel_want[~head] / 2))
    assert (u_err <= q.level_step / 2 + 1e-6).all(), u_err.max()
    assert (np.diff(got_lp[m, h:n]) <= 1e-6).all()  # tail by level: non-increasing
    want_listed = -np.expm1(np.float16(log_tail[m]).astype(np.float64))
    # decode rescales positive float32 weights by one float32 factor to sum to 1 - tail: each
    # entry carries <= 3 IEEE roundings (weight, factor, product), 3 * 2**-24 = 1.8e-7 relative,
    # on any x86-64 CPU (no transcendental in float32); the float64 sum adds ~k * 1e-16.
    np.testing.assert_allclose(got_p[m].sum(dtype=np.float64), want_listed, rtol=1e-6)
    heads, tails = heads + h, tails + n - h
  assert heads > len(ids) and tails > 5 * len(ids)  # both parts exercised


@pytest.mark.parametrize("k, peaked", [(20, True), (128, True), (20, False), (128, False)])
def test_quantisation_costs_at_most_1e3_nats_per_position(k, peaked):
  """KL(float64 top-k + tail || decoded top-k + tail) over the k + 1 buckets, mean per
  position, 49152-token vocabulary, the store's default settings for k."""
  ids, lp, log_tail = _topk(_logits(48, 49152, seed=k, peaked=peaked), k)
  q = topk_format.quantiser({"encoding": topk_format.encoding(k, 49152)})
  got_ids, got_p = te.decode(te.encode(ids, lp, log_tail.astype(np.float32), q, ID_SPACE), q,
                             k, ID_SPACE)
  kl = []
  for m in range(len(ids)):
    want_i, want_lp = _by_id(ids, lp, m)
    have_i, have_p = _by_id(got_ids, got_p.astype(np.float64), m)
    assert (have_i == want_i).all()
    p, tail = np.exp(want_lp), np.exp(log_tail[m])
    q_tail = 1 - have_p.sum()
    kl.append((p * np.log(p / have_p)).sum() + tail * np.log(tail / q_tail))
  kl = np.array(kl)
  assert kl.min() >= -1e-9 and kl.mean() <= 1e-3, kl.mean()


def test_exp_golomb_and_variable_width_bits_round_trip():
  rng = np.random.default_rng(0)
  v = np.concatenate([np.arange(1, 300), rng.integers(1, 1 << 20, 5000)])
  sym, low, bits = te.split_values(v)
  assert sym.dtype == np.uint8 and (bits == te.symbol_low_bits(sym)).all()
  assert (bits[:7] == 0).all() and bits.max() == 16  # 1..15: the symbol alone; 2**20: 16 low
  packed = te.pack_varbits(low, bits)
  assert len(packed) == (int(bits.sum()) + 7) // 8
  padded = np.concatenate([packed, np.zeros(4, np.uint8)])
  np.testing.assert_array_equal(te.join_values(sym, te.read_varbits(padded, 0, bits)), v)
  start = int(bits[:1000].sum())  # from a bit offset inside the stream
  np.testing.assert_array_equal(
      te.join_values(sym[1000:], te.read_varbits(padded, start, bits[1000:])), v[1000:])


def test_bad_entries_are_refused():
  ids, lp, log_tail = _topk(_logits(4, 500, seed=0, peaked=True), 8)
  q = te.Quantiser(0.125, 3.0, 0.02)
  dup = ids.copy()
  dup[1, 5] = dup[1, 2]
  with pytest.raises(ValueError, match="listed twice"):
    te.encode(dup, lp, log_tail, q, ID_SPACE)
  with pytest.raises(ValueError, match="descending"):
    te.encode(ids, lp[:, ::-1], log_tail, q, ID_SPACE)
  holes = lp.copy()
  holes[0, 2] = -np.inf
  with pytest.raises(ValueError, match="missing .* after"):
    te.encode(ids, holes, log_tail, q, ID_SPACE)
  with pytest.raises(ValueError, match="outside"):
    te.encode(ids + ID_SPACE, lp, log_tail, q, ID_SPACE)
  with pytest.raises(ValueError, match="255"):
    te.encode(ids, lp, log_tail, te.Quantiser(0.125, 3.0, 0.0001), ID_SPACE)
  arrays = te.encode(ids, lp, log_tail, q, ID_SPACE)
  with pytest.raises(ValueError, match="do not match"):
    te.decode(arrays | {"tail_symbols": arrays["tail_symbols"][:-1]}, q, 8, ID_SPACE)
  with pytest.raises(ValueError, match="out of range"):
    te.decode(arrays, q, 4, ID_SPACE)  # more entries than k


def test_coding_in_chunks_gives_the_same_bytes_and_values(monkeypatch):
  """A shard is coded and decoded a few thousand positions at a time: chunks of 3 positions
  (with missing entries and positions without a tail) give what one chunk gives."""
  k = 32
  ids, lp, log_tail = _topk(_logits(50, 2000, seed=5, peaked=True), k)
  lp[7, 20:], ids[7, 20:] = -np.inf, 0
  lp[8, 1:], ids[8, 1:] = -np.inf, 0  # the top-1 only: no tail
  q = te.Quantiser(0.125, 3.0, 0.02)
  whole = te.encode(ids, lp, log_tail, q, ID_SPACE)
  want_ids, want_p = te.decode(whole, q, k, ID_SPACE)
  monkeypatch.setattr(te, "_ENCODE_ENTRIES", 3 * k)
  monkeypatch.setattr(te, "_DECODE_ENTRIES", 3 * k)
  monkeypatch.setattr(te, "_CHUNK", 50)  # values bit-packed at a time
  chunked = te.encode(ids, lp, log_tail, q, ID_SPACE)
  assert chunked.keys() == whole.keys()
  for name in whole:
    np.testing.assert_array_equal(chunked[name], whole[name], err_msg=name)
  got_ids, got_p = te.decode(whole, q, k, ID_SPACE)
  np.testing.assert_array_equal(got_ids, want_ids)
  np.testing.assert_array_equal(got_p, want_p)


def test_level_gaps_match_a_reference_and_invert():
  """A tail's (level, rank) entries per row -> level deltas and rank gaps, as a plain loop
  computes them (a row's first level as it is, a level group's first rank + 1), and back;
  rows without a tail in between."""
  rng = np.random.default_rng(3)
  counts = np.array([3, 0, 5, 1, 0, 4])
  level, rank, want_delta, want_gaps = [], [], [], []
  for c in counts:
    row = sorted(zip(rng.integers(0, 4, c).tolist(), rng.choice(50, c, replace=False).tolist()))
    prev_level, prev_rank = 0, -1
    for i, (lv, rk) in enumerate(row):
      want_delta.append(lv if i == 0 else lv - prev_level)
      want_gaps.append(rk + 1 if i == 0 or lv != prev_level else rk - prev_rank)
      prev_level, prev_rank = lv, rk
      level.append(lv)
      rank.append(rk)
  level, rank = np.array(level, np.int64), np.array(rank, np.int64)
  delta, gaps = te.level_gaps(level, rank, counts)
  np.testing.assert_array_equal(delta, want_delta)
  np.testing.assert_array_equal(gaps, want_gaps)
  assert (gaps >= 1).all()  # exp-Golomb codes v >= 1
  got_level, got_rank = te.levels_ranks(delta, gaps, counts)
  np.testing.assert_array_equal(got_level, level)
  np.testing.assert_array_equal(got_rank, rank)
