"""The version-3 coding of a shard's top-k entries (topk_store.py): a head in rank order, a tail
grouped into probability levels, ids as frequency ranks in exp-Golomb codes.

Per position (n <= k listed entries, descending; missing entries, if any, last):
  head  the entries within `head_nats` of the top-1, in rank order, log-probs relative to the top-1
        quantised to `logprob_step` (as version 2): their order and values are kept.
  tail  the rest (p < p_1 * exp(-head_nats)), quantised on u = sqrt(p / p_1) with step
        `level_step` (levels L = round((u_H - u) / level_step), u_H = exp(-head_nats / 2)):
        entries sharing a level decode to the same probability, so their order carries nothing;
        they are stored by ascending frequency rank and only the gaps between ranks are coded.
        KL(p || q) ~ 2 sum (sqrt p - sqrt q)^2 per entry, so a uniform step on u spends the same
        error on every entry whatever its probability (bench_store.py measures the KL).
  ids   each id is replaced by its rank in the shard's own frequency table (`rank_table`: the
        shard's `TABLE_SIZE` most frequent listed ids, most frequent first; other ids follow in
        id order), then coded as v = rank + 1 (head) or the gap to the previous rank of the same
        level (tail, >= 1): a symbol byte (bit length of v and its next 3 bits: an lzma-friendly
        column) and the remaining low bits, bit-packed.
Decoding gives, per position, the head in rank order, then the tail by level, then by frequency
rank: probabilities p_i = (1 - tail) * w_i / sum w, w = exp(-code * step) (head) or u_L^2 (tail).
"""
from __future__ import annotations

import dataclasses

import numpy as np

TABLE_SIZE = 4096
_TOP_BITS = 3  # bits of v after its leading one that go into the symbol byte
_CHUNK = 1 << 16  # values bit-packed at a time (bounds the int64 temporaries: 0.5 MB each)
_DECODE_ENTRIES = 1 << 14  # entries decoded at a time
_ENCODE_ENTRIES = 1 << 18  # entries encoded at a time (temporaries ~2 MB per [rows, k] array)
ARRAYS = ("rank_table", "entry_counts", "head_counts", "head_codes", "tail_levels",
          "head_symbols", "tail_symbols", "id_bits_stream", "log_tail")


@dataclasses.dataclass(frozen=True)
class Quantiser:
  """The version-3 settings (recorded in index.json "encoding")."""
  logprob_step: float  # nats, head log-probs relative to the top-1
  head_nats: float  # entries within this of the top-1 form the head
  level_step: float  # step on sqrt(p / p_1) in the tail

  @property
  def u_head(self) -> float:
    return float(np.exp(-self.head_nats / 2))

  def max_level(self) -> int:
    return int(np.rint(self.u_head / self.level_step))

  def level_weights(self) -> np.ndarray:
    """p / p_1 of each tail level (the bottom one, u in [0, step / 2), at u = step / 4)."""
    u = self.u_head - np.arange(self.max_level() + 1) * self.level_step
    return np.maximum(u, self.level_step / 4) ** 2


def check(q: Quantiser) -> None:
  if not (0 < q.logprob_step and 0 <= q.head_nats and 0 < q.level_step):
    raise ValueError(f"quantiser {q}: steps must be > 0 and head_nats >= 0")
  if q.head_nats / q.logprob_step > 250 or q.max_level() > 255:
    raise ValueError(f"quantiser {q}: more than 255 head codes or tail levels (coarser steps)")


# --------------------------------------------------------------------------- exp-Golomb


def _bit_length(v: np.ndarray) -> np.ndarray:
  return np.frexp(v.astype(np.float64))[1].astype(np.int64)  # exact for v < 2**53


def split_values(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """v >= 1 -> (symbol bytes, low-bit values, their bit counts)."""
  v = v.astype(np.int64)
  b = _bit_length(v) - 1
  top = np.minimum(b, _TOP_BITS)
  low_bits = b - top
  sym = b * (1 << _TOP_BITS) + ((v >> low_bits) & ((1 << top) - 1)) * (1 << (_TOP_BITS - top))
  return sym.astype(np.uint8), v & ((1 << low_bits) - 1), low_bits


def join_values(sym: np.ndarray, low: np.ndarray) -> np.ndarray:
  b, top_code = sym.astype(np.int64) >> _TOP_BITS, sym.astype(np.int64) & ((1 << _TOP_BITS) - 1)
  top = np.minimum(b, _TOP_BITS)
  return (((1 << top) | (top_code >> (_TOP_BITS - top))) << (b - top)) | low


def symbol_low_bits(sym: np.ndarray) -> np.ndarray:
  """uint8: how many low bits follow each symbol."""
  b = np.asarray(sym, np.uint8) >> _TOP_BITS
  return b - np.minimum(b, _TOP_BITS)


def pack_varbits(values: np.ndarray, nbits: np.ndarray) -> np.ndarray:
  """Concatenates each value's `nbits` low bits (LSB first; nbits <= 24) into bytes."""
  total = int(np.sum(nbits, dtype=np.int64))
  out = np.zeros(total // 8 + 4, np.uint8)
  offset = 0
  for s in range(0, len(values), _CHUNK):
    ends = offset + np.cumsum(nbits[s:s + _CHUNK], dtype=np.int64)
    start = ends - nbits[s:s + _CHUNK]
    word = values[s:s + _CHUNK].astype(np.int64) << (start & 7)
    for j in range(4):  # a value of <= 24 bits at shift <= 7 spans <= 4 bytes
      np.bitwise_or.at(out, (start >> 3) + j, ((word >> (8 * j)) & 0xFF).astype(np.uint8))
    offset = int(ends[-1])
  return out[:(total + 7) // 8]


def read_varbits(padded: np.ndarray, start: int, nbits: np.ndarray) -> np.ndarray:
  """The values `pack_varbits` wrote from bit `start` on (`padded`: the bytes + 4 zero bytes)."""
  ends = start + np.cumsum(nbits, dtype=np.int64)
  first = ends - nbits
  byte = first >> 3
  word = sum(padded[byte + j].astype(np.int64) << (8 * j) for j in range(4))
  return (word >> (first & 7)) & ((np.int64(1) << nbits.astype(np.int64)) - 1)


# --------------------------------------------------------------------------- ranks


def rank_table(counts: np.ndarray) -> np.ndarray:
  """The TABLE_SIZE most frequent ids (`counts` per id), most frequent first (ties: lower id)."""
  order = np.argsort(-counts, kind="stable")[:TABLE_SIZE]
  return order[counts[order] > 0].astype(np.int64)


def _permutation(table: np.ndarray, id_space: int) -> np.ndarray:
  """rank -> id: the table's ids, then every other id ascending."""
  rest = np.ones(id_space, bool)
  rest[table] = False
  return np.concatenate([table, np.flatnonzero(rest)])


# --------------------------------------------------------------------------- encode


def _segment_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
  """Cumulative sums restarting where `starts` is True (starts[0] must be True)."""
  cs = np.cumsum(values, dtype=np.int64)
  before = (cs - values)[starts]
  return cs - before[np.cumsum(starts) - 1]


def _checked(ids_MxK: np.ndarray, logprobs_MxK: np.ndarray, id_space: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """(ids int64, log-probs float64) of some rows, ValueError unless they are a valid top-k."""
  lp = np.asarray(logprobs_MxK, np.float64)
  ids = np.asarray(ids_MxK, np.int64)
  valid = np.isfinite(lp)
  if (valid[:, 1:] & ~valid[:, :-1]).any():
    raise ValueError("top-k entries: missing (-inf) entries must come after the listed ones")
  if (np.diff(np.where(valid, lp, -1e300), axis=1) > 1e-6).any():
    raise ValueError("top-k entries: log-probabilities must be descending along each row")
  if valid.any() and (ids[valid].min() < 0 or ids[valid].max() >= id_space):
    raise ValueError(f"top-k entries: ids outside [0, {id_space})")
  if (np.diff(np.sort(np.where(valid, ids, -1 - np.arange(ids.shape[1])), axis=1)) == 0).any():
    raise ValueError("top-k entries: an id is listed twice at one position")
  return ids, lp


def quantised(ids: np.ndarray, lp: np.ndarray, q: Quantiser
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(valid, head, head codes, tail levels) [rows, k] of some checked rows."""
  valid = np.isfinite(lp)
  rel = np.where(valid, lp[:, :1] - lp, 0.0)
  head = valid & (rel <= q.head_nats)
  codes = np.rint(rel / q.logprob_step).astype(np.int64)
  levels = np.clip(np.rint((q.u_head - np.exp(-rel / 2)) / q.level_step), 0, q.max_level())
  return valid, head, codes, levels.astype(np.int64)


def head_parts(valid: np.ndarray, head: np.ndarray, codes: np.ndarray, rank: np.ndarray
               ) -> dict[str, np.ndarray]:
  """The head's coded pieces (counts, code steps, rank + 1 as symbols and low bits)."""
  h_sym, h_low, h_bits = split_values(rank[head] + 1)
  return {"entry_counts": valid.sum(1), "head_counts": head.sum(1),
          "head_codes": np.diff(codes, axis=1)[head[:, 1:]], "head_symbols": h_sym,
          "head_low": h_low, "head_bits": h_bits}


def level_gaps(level: np.ndarray, rank: np.ndarray, counts: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
  """(level deltas, rank gaps) of tail entries sorted by (row, level, rank); `counts` per row:
  a row's first level is stored as it is, a level group's first rank as rank + 1."""
  row_start = np.zeros(len(level), bool)
  row_start[(np.cumsum(counts) - counts)[counts > 0]] = True
  level_delta = level - np.concatenate([[0], level[:-1]])
  level_delta[row_start] = level[row_start]
  group_start = row_start | (level_delta > 0)
  gaps = rank - np.concatenate([[-1], rank[:-1]])
  gaps[group_start] = rank[group_start] + 1
  return level_delta, gaps


def levels_ranks(level_delta: np.ndarray, gaps: np.ndarray, counts: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of `level_gaps`: (levels, ranks)."""
  if not len(gaps):
    return level_delta.astype(np.int64), gaps.astype(np.int64)
  start = np.zeros(len(gaps), bool)
  start[(np.cumsum(counts) - counts)[counts > 0]] = True
  level = _segment_cumsum(level_delta, start)
  return level, _segment_cumsum(gaps, start | (level_delta > 0)) - 1


def _encode_rows(ids: np.ndarray, lp: np.ndarray, q: Quantiser, rank_of: np.ndarray
                 ) -> dict[str, np.ndarray]:
  """The coded pieces of some rows (`rank_of`: id -> frequency rank)."""
  valid, head, codes, levels = quantised(ids, lp, q)
  tail = valid & ~head
  rank = rank_of[ids]
  key = np.where(tail, levels << 32 | rank, np.int64(1) << 62)
  t = tail.sum(1)
  key = np.sort(key, axis=1)[t[:, None] > np.arange(ids.shape[1])]  # each row's tail, flat
  level_delta, gaps = level_gaps(key >> 32, key & 0xFFFFFFFF, t)
  t_sym, t_low, t_bits = split_values(gaps)
  return head_parts(valid, head, codes, rank) | {
      "tail_levels": level_delta, "tail_symbols": t_sym, "tail_low": t_low, "tail_bits": t_bits}


def encode(ids_MxK: np.ndarray, logprobs_MxK: np.ndarray, log_tail_M: np.ndarray,
           q: Quantiser, id_space: int) -> dict[str, np.ndarray]:
  """The ARRAYS of one shard's entries (descending log-probs, -inf = missing, missing last),
  coded _ENCODE_ENTRIES entries at a time."""
  check(q)
  m, k = np.shape(ids_MxK)
  step = max(1, _ENCODE_ENTRIES // max(k, 1))
  chunks = [slice(p, min(m, p + step)) for p in range(0, m, step)]
  counts = np.zeros(id_space, np.int64)
  for c in chunks:  # first pass: the shard's id frequencies
    ids, lp = _checked(ids_MxK[c], logprobs_MxK[c], id_space)
    counts += np.bincount(ids[np.isfinite(lp)], minlength=id_space)
  table = rank_table(counts)
  rank_of = np.argsort(_permutation(table, id_space))
  parts = [_encode_rows(*_checked(ids_MxK[c], logprobs_MxK[c], id_space), q, rank_of)
           for c in chunks]

  def cat(name: str, dtype) -> np.ndarray:
    return np.concatenate([np.zeros(0, dtype)] + [p[name].astype(dtype) for p in parts])

  return {"rank_table": table, "entry_counts": cat("entry_counts", np.uint16),
          "head_counts": cat("head_counts", np.uint16), "head_codes": cat("head_codes", np.uint8),
          "tail_levels": cat("tail_levels", np.uint8),
          "head_symbols": cat("head_symbols", np.uint8),
          "tail_symbols": cat("tail_symbols", np.uint8),
          "id_bits_stream": pack_varbits(
              np.concatenate([cat("head_low", np.uint32), cat("tail_low", np.uint32)]),
              np.concatenate([cat("head_bits", np.uint8), cat("tail_bits", np.uint8)])),
          "log_tail": np.asarray(log_tail_M, np.float16)}


# --------------------------------------------------------------------------- decode


def _starts(counts: np.ndarray) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def counts(a: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
  """(entries, head entries) per position, checked against k and the head's arrays."""
  n, h = a["entry_counts"].astype(np.int64), a["head_counts"].astype(np.int64)
  if (h > n).any() or (n > k).any() or (n[h == 0] > 0).any():
    raise ValueError("entry/head counts out of range")
  if len(a["head_symbols"]) != h.sum() or len(a["head_codes"]) != (h - 1).clip(0).sum():
    raise ValueError("entry arrays do not match the entry counts")
  return n, h


def head_entries(hh: np.ndarray, p0: int, head_codes: np.ndarray, q: Quantiser
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(rows, columns, weights p / p_1) of the heads of rows p0.. (`hh` entries each)."""
  row_h = np.repeat(np.arange(p0, p0 + len(hh)), hh)
  col_h = np.arange(len(row_h)) - np.repeat(np.cumsum(hh) - hh, hh)
  later = col_h > 0  # the head's codes after the top-1 (code 0)
  codes = _segment_cumsum(head_codes.astype(np.int64), col_h[later] == 1)
  w = np.ones(len(row_h))
  w[later] = np.exp(-np.arange(256) * q.logprob_step)[np.minimum(codes, 255)]
  return row_h, col_h, w


def normalise(probs_MxK: np.ndarray, log_tail_M: np.ndarray) -> np.ndarray:
  """Scales each row's weights (in place) to sum to 1 - exp(log_tail)."""
  total = probs_MxK.sum(-1, dtype=np.float64)
  listed = np.clip(-np.expm1(np.asarray(log_tail_M).astype(np.float64)), 0.0, 1.0)  # 1 - tail
  probs_MxK *= (listed / np.where(total > 0, total, 1.0)).astype(np.float32)[:, None]
  return probs_MxK


def decode(a: dict[str, np.ndarray], q: Quantiser, k: int, id_space: int
           ) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [M, k], probabilities float32 [M, k]) of a shard's ARRAYS (0 = no entry),
  decoded _DECODE_ENTRIES entries at a time (the temporaries stay ~1 MB)."""
  check(q)
  n, h = counts(a, k)
  m, t = len(n), n - h
  h_sym, t_sym = a["head_symbols"], a["tail_symbols"]
  if len(t_sym) != t.sum() or len(a["tail_levels"]) != t.sum():
    raise ValueError("entry arrays do not match the entry counts")
  hs, ts, cs = _starts(h), _starts(t), _starts((h - 1).clip(0))
  h_bits, t_bits = symbol_low_bits(h_sym), symbol_low_bits(t_sym)
  hb = np.concatenate([[0], np.cumsum(h_bits, dtype=np.int32)])[hs]
  tb = int(hb[-1]) + np.concatenate([[0], np.cumsum(t_bits, dtype=np.int32)])[ts]
  if (int(tb[-1]) + 7) // 8 != len(a["id_bits_stream"]):
    raise ValueError("id bit stream length does not match the symbols")
  padded = np.concatenate([np.asarray(a["id_bits_stream"], np.uint8), np.zeros(4, np.uint8)])
  perm = _permutation(np.asarray(a["rank_table"], np.int64), id_space).astype(np.int32)
  level_w = q.level_weights()
  ids, probs = np.zeros((m, k), np.int32), np.zeros((m, k), np.float32)
  step = max(1, _DECODE_ENTRIES // max(k, 1))
  for p0 in range(0, m, step):
    p1 = min(m, p0 + step)
    hh, tt = h[p0:p1], t[p0:p1]
    head_rank = join_values(h_sym[hs[p0]:hs[p1]],
                            read_varbits(padded, int(hb[p0]), h_bits[hs[p0]:hs[p1]])) - 1
    gaps = join_values(t_sym[ts[p0]:ts[p1]],
                       read_varbits(padded, int(tb[p0]), t_bits[ts[p0]:ts[p1]]))
    level, tail_rank = levels_ranks(a["tail_levels"][ts[p0]:ts[p1]].astype(np.int64), gaps, tt)
    if (head_rank >= id_space).any() or (tail_rank >= id_space).any() or (
        level > q.max_level()).any():
      raise ValueError("entry ranks or levels out of range")
    row_h, col_h, w = head_entries(hh, p0, a["head_codes"][cs[p0]:cs[p1]], q)
    row_t = np.repeat(np.arange(p0, p1), tt)
    col_t = np.arange(len(row_t)) - np.repeat(np.cumsum(tt) - tt, tt) + np.repeat(hh, tt)
    probs[row_h, col_h], probs[row_t, col_t] = w, level_w[level]
    ids[row_h, col_h], ids[row_t, col_t] = perm[head_rank], perm[tail_rank]
  return ids, normalise(probs, a["log_tail"])
