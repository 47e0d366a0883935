"""The version-4 coding of a shard's top-k entries (topk_store.py): each position's list is
coded against the lists of earlier positions with the same tokens, by a range coder (PyPI
constriction) under adaptive integer-count models, so no table is stored.

Quantisation is version 3's (topk_entries.quantised); an entry's value symbol is its head code
(0 .. H: log-prob relative to the top-1 in `logprob_step`s, entries within `head_nats`) or
H + 1 + its tail level (step `level_step` on sqrt(p / p_1)), and decoding gives version 3's
probabilities (topk_entries.normalise). Read back, a position lists its entries by value symbol:
the head in the teacher's order (entries sharing a code too), the tail by level, then by id.

A shard's positions are coded in blocks (64, 128, ... then BLOCK positions). A position's
contexts are the last J positions of earlier blocks with the same current token (the token
before the predicted one) and the last J with the same predicted token: both come from the
shard's token ids, which the reader has before the entries. Per block, in this order:
  membership  every id listed at a context (and the predicted token) is a candidate; one binary
              symbol each says whether it is listed here (bucket: how many of the cur / target
              contexts list it, how many there are, is it the predicted token).
  escapes     the listed ids that are no candidate, by ascending rank in the id frequencies of
              the earlier blocks, as rank gaps: a symbol (bit length and the next 3 bits of the
              gap, topk_entries.split_values; bucket: the position's escape count and the gap's
              index, as bit lengths), the low bits plain (`id_bits_stream`).
  shape       each position's median value symbol (how flat it is; bucket: the median of its
              most recent cur context).
  values      each entry's value symbol (bucket: its mean value at the contexts that list it or
              none, how many do, is it the predicted token, the position's shape).
  ties        head entries sharing a code: each one's rank in the teacher's order (bucket: the
              tie's size).
Each bucket's model gives a symbol its count + 1/4; counts are integers updated after each block
by encoder and decoder alike, and the floats the coder gets are computed identically from them,
so the bytes and the decoding are the same on every machine. bench_store.py measures the sizes.
"""
from __future__ import annotations

import constriction
import numpy as np

from sentijax.data import topk_entries
from sentijax.data.topk_entries import Quantiser

J = 4  # contexts per key (cur token, predicted token)
BLOCK = 512  # positions per block (the first blocks are smaller: the models start empty)
FIRST_BLOCK = 64
ARRAYS = ("entry_counts", "range_code", "id_bits_stream", "log_tail")
_NONE = -1
_N_BITS = 8  # escape buckets: bit lengths of the count and the index, capped
_SYM_BITS, _SYM_MASK = 9, 511  # value symbols < 512 (topk_entries.check: <= 251 + 256)
_MEAN_BIN = 4  # value symbols per bin of an entry's mean value at its contexts
_CHUNK = 64  # positions whose candidates are gathered at a time (bounds the temporaries)
_TIE_BUCKETS = 15  # head ties of 2 .. 16+ entries


def context_tokens(tokens_T: np.ndarray, loss_mask_T: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(current token, predicted token) [M] of a shard's loss positions: the token before each
  loss token and the loss token (a record never starts with one)."""
  at = np.flatnonzero(np.asarray(loss_mask_T))
  tokens = np.asarray(tokens_T).astype(np.int64)
  return tokens[np.maximum(at - 1, 0)], tokens[at]


def block_starts(m: int) -> np.ndarray:
  """Start of each block, then m (no block when m = 0)."""
  if m == 0:
    return np.zeros(1, np.int64)
  starts, size, p = [0], FIRST_BLOCK, 0
  while p + size < m:
    p += size
    starts.append(p)
    size = min(2 * size, BLOCK)
  return np.array(starts + [m], np.int64)


def contexts(key_M: np.ndarray, starts: np.ndarray) -> np.ndarray:
  """[M, J]: the last J positions before a position's block with the same key (most recent
  first; -1 none)."""
  m = len(key_M)
  pos = np.arange(m, dtype=np.int64)
  block_start = np.repeat(starts[:-1], np.diff(starts))
  comb = key_M.astype(np.int64) * (m + 1) + pos
  order = np.argsort(comb, kind="stable")
  sorted_comb = comb[order]
  base = key_M.astype(np.int64) * (m + 1)
  lo = np.searchsorted(sorted_comb, base)
  hi = np.searchsorted(sorted_comb, base + block_start)
  out = np.full((m, J), -1, np.int64)
  for j in range(J):
    at = hi - 1 - j
    out[:, j] = np.where(at >= lo, order[np.maximum(at, 0)], -1)
  return out


class _Counts:
  """Integer counts [buckets, symbols]; a bucket's model gives count + 1/4 to each symbol."""

  def __init__(self, name: str, buckets: int, symbols: int):
    self.name = name
    self.n = np.zeros((buckets, symbols), np.int32)  # < 2**31 entries per shard

  def groups(self, bucket: np.ndarray):
    """(bucket, indices into `bucket` in order) per bucket present, ascending."""
    if not len(bucket):
      return
    key = np.sort(bucket.astype(np.int64) << 32 | np.arange(len(bucket)))
    order, b = key & 0xFFFFFFFF, key >> 32
    cut = np.concatenate([[0], np.flatnonzero(np.diff(b)) + 1, [len(b)]]).tolist()
    for start, end, at in zip(cut[:-1], cut[1:], b[cut[:-1]].tolist()):
      yield at, order[start:end]

  def model(self, b: int):
    return constriction.stream.model.Categorical(self.n[b] + 0.25, perfect=False)

  def encode(self, coder, symbols: np.ndarray, bucket: np.ndarray) -> None:
    for b, idx in self.groups(bucket):
      coder.encode(symbols[idx].astype(np.int32), self.model(b))

  def decode(self, coder, bucket: np.ndarray) -> np.ndarray:
    out = np.zeros(len(bucket), np.int64)
    for b, idx in self.groups(bucket):
      out[idx] = coder.decode(self.model(b), len(idx))
    return out

  def update(self, symbols: np.ndarray, bucket: np.ndarray) -> None:
    at, count = np.unique(bucket * self.n.shape[1] + symbols, return_counts=True)
    self.n.reshape(-1)[at] += count.astype(np.int32)


def _group_sums(x: np.ndarray, first: np.ndarray) -> np.ndarray:
  """Sums of x over the runs starting at `first` (np.add.reduceat, 3x faster)."""
  c = np.concatenate([[0], np.cumsum(x, dtype=np.int64)])
  return c[np.append(first[1:], len(x))] - c[first]


class _State:
  """What encoder and decoder share: the models, unigram id counts, decoded lists so far."""

  def __init__(self, m: int, k: int, q: Quantiser, id_space: int):
    self.k, self.id_space = k, id_space
    self.id_bits = int(id_space - 1).bit_length()
    if id_space != 1 << self.id_bits:
      raise ValueError(f"id space {id_space}: expected a power of 2")
    self.head_codes = int(np.rint(q.head_nats / q.logprob_step)) + 1
    self.symbols = self.head_codes + q.max_level() + 1
    s = self.symbols
    self.member = _Counts("membership", (J + 1) ** 4 * 2, 2)
    self.escape = _Counts("escapes", _N_BITS * _N_BITS, 8 * (self.id_bits + 2))  # split_values
    self.shape = _Counts("shape", s + 1, s)
    self.value = _Counts("values", (s // _MEAN_BIN + 1) * 5 * 2 * s, s)
    self.tie = _Counts("ties", _TIE_BUCKETS, k)
    self.unigram = np.zeros(id_space, np.int64)
    self.packed = np.zeros((m, k), np.int64)  # id << 13 | value symbol, by value then id
    self.n = np.zeros(m, np.int64)

  def rank_of(self) -> tuple[np.ndarray, np.ndarray]:
    """(id -> rank, rank -> id) by descending count so far (ties: lower id first)."""
    perm = np.argsort(-self.unigram, kind="stable")
    rank = np.empty_like(perm)
    rank[perm] = np.arange(len(perm))
    return rank, perm

  def candidates(self, p0: int, p1: int, ctx_MxC: np.ndarray, tgt_M: np.ndarray):
    """Candidates of positions p0..p1, by (row, id): (row, id, membership bucket, value
    bucket part: the mean value over the contexts listing it, how many, is it the target);
    _CHUNK positions at a time (the temporaries: ~2J k int64s per position)."""
    parts = []
    for c0 in range(p0, p1, _CHUNK):
      part = self._candidates(c0, min(p1, c0 + _CHUNK), ctx_MxC, tgt_M)
      parts.append((part[0] + (c0 - p0),) + part[1:])
    return tuple(np.concatenate(x) for x in zip(*parts))

  def _candidates(self, p0: int, p1: int, ctx_MxC: np.ndarray, tgt_M: np.ndarray):
    v, nc_ctx, ib = self.id_space, ctx_MxC.shape[1], self.id_bits
    c = ctx_MxC[p0:p1]
    row, src = np.nonzero(c >= 0)
    n = self.n[c[row, src]]
    b, sb = p1 - p0, _SYM_BITS + 4
    # one int64 per context entry: row, id, source, value symbol (np.sort beats argsort 4x)
    start = np.repeat(c[row, src] * self.k - np.cumsum(n) + n, n)
    key = self.packed.ravel()[start + np.arange(len(start))]
    key |= np.repeat((row << (ib + sb)) | (src << _SYM_BITS), n)
    key = np.concatenate([key, (np.arange(b) << (ib + sb)) | (tgt_M[p0:p1] << sb)
                          | (nc_ctx << _SYM_BITS)])
    key.sort()
    sym, src, key = key & _SYM_MASK, (key >> _SYM_BITS) & 15, key >> sb
    first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    in_ctx = src < nc_ctx
    n1 = _group_sums(in_ctx & (src % 2 == 0), first)
    n2 = _group_sums(in_ctx & (src % 2 == 1), first)
    total = _group_sums(np.where(in_ctx, sym, 0), first)
    ukey = key[first]
    row_c, id_c = ukey >> ib, ukey & (v - 1)
    a1 = (c[:, 0::2] >= 0).sum(1)[row_c]
    a2 = (c[:, 1::2] >= 0).sum(1)[row_c]
    t = (id_c == tgt_M[p0:p1][row_c]).astype(np.int64)
    bucket = (((n1 * (J + 1) + a1) * (J + 1) + n2) * (J + 1) + a2) * 2 + t
    seen = n1 + n2
    mean = np.where(seen > 0, (2 * total + seen) // np.maximum(2 * seen, 1), self.symbols)
    return tuple(x.astype(np.int32) for x in (  # small: the block's copies are int32
        row_c, id_c, bucket, value_part(mean, seen, t, self.symbols)))

  def update_lists(self, p0: int, rows: np.ndarray, ids: np.ndarray, syms: np.ndarray,
                   b: int) -> None:
    """Stores positions p0..p0+b's entries (sorted by row, value, tie rank, id)."""
    n = np.bincount(rows, minlength=b)
    col = np.arange(len(rows)) - np.repeat(np.cumsum(n) - n, n)
    self.packed[p0 + rows, col] = (ids << (_SYM_BITS + 4)) | syms
    self.n[p0:p0 + b] = n
    self.unigram += np.bincount(ids, minlength=self.id_space)

  @property
  def ids(self) -> np.ndarray:
    return self.packed >> (_SYM_BITS + 4)

  @property
  def syms(self) -> np.ndarray:
    return self.packed & _SYM_MASK


class _Io:
  """One direction of the range coder: encode the symbols given, or decode them."""

  def __init__(self, coder, low_bits: np.ndarray | None = None):
    self.coder, self.encoding = coder, low_bits is None
    self.stats: dict[str, int] = {}  # bits per model (encoding)
    self.lows: list[np.ndarray] = []
    self.bits: list[np.ndarray] = []
    self.padded = None if low_bits is None else np.concatenate(
        [np.asarray(low_bits, np.uint8), np.zeros(4, np.uint8)])
    self.bit_at = 0

  def code(self, counts: _Counts, bucket: np.ndarray, symbols: np.ndarray | None
           ) -> np.ndarray:
    """The symbols (encoded, or decoded when None), then counted in their buckets."""
    if self.encoding:
      before = self.coder.num_bits()
      counts.encode(self.coder, symbols, bucket)
      self.stats[counts.name] = self.stats.get(counts.name, 0) + self.coder.num_bits() - before
    else:
      symbols = counts.decode(self.coder, bucket)
    counts.update(symbols, bucket)
    return symbols

  def low(self, nbits: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """Plain low bits (appended, or read when None)."""
    if self.encoding:
      self.lows.append(values)
      self.bits.append(nbits)
      return values
    out = topk_entries.read_varbits(self.padded, self.bit_at, nbits)
    self.bit_at += int(nbits.sum())
    return out


def _escape_buckets(rows: np.ndarray, n_esc: np.ndarray) -> np.ndarray:
  """Bucket of each escape gap (rows sorted): its index in the position and the count (bit
  lengths, capped)."""
  first = np.concatenate([[0], np.flatnonzero(rows[1:] != rows[:-1]) + 1])
  index = np.arange(len(rows)) - np.repeat(first, np.diff(np.append(first, len(rows))))
  ib = np.minimum(np.frexp((index + 1).astype(np.float64))[1], _N_BITS - 1)
  nb = np.minimum(np.frexp(n_esc[rows].astype(np.float64))[1], _N_BITS - 1)
  return nb * _N_BITS + ib


def value_symbols(valid: np.ndarray, head: np.ndarray, codes: np.ndarray, levels: np.ndarray,
                  head_codes: int) -> np.ndarray:
  """[rows, k]: head code, or head_codes + tail level, per entry (-1: no entry)."""
  return np.where(valid, np.where(head, codes, head_codes + levels), _NONE)


def value_part(mean: np.ndarray, seen: np.ndarray, t: np.ndarray, symbols: int) -> np.ndarray:
  """An entry's value bucket before the position's shape: its mean value at the contexts that
  list it (symbols: none), how many do, is it the predicted token."""
  return ((mean // _MEAN_BIN) * 5 + np.minimum(seen, 4)) * 2 + t


def _shape(syms: np.ndarray, n: np.ndarray) -> np.ndarray:
  """A position's median value symbol (`syms` [rows, k] ascending, entries first): how flat
  its distribution is (0 when it lists nothing)."""
  return np.where(n > 0, syms[np.arange(len(n)), n // 2 if len(n) else n], 0)


def _block(st: _State, io: _Io, p0: int, p1: int, ctx: np.ndarray, tgt_M: np.ndarray,
           n_M: np.ndarray, truth: tuple[np.ndarray, np.ndarray] | None) -> None:
  """Codes positions p0..p1 (`truth`: their (ids, value symbols) [b, k] when encoding)."""
  b, v = p1 - p0, st.id_space
  row_c, id_c, bucket, vpart = st.candidates(p0, p1, ctx, tgt_M)
  if truth is not None:
    valid = np.arange(st.k)[None, :] < n_M[p0:p1, None]
    rows_l, cols_l = np.nonzero(valid)
    key_l = rows_l * v + truth[0][rows_l, cols_l]
    cand = row_c.astype(np.int64) * v + id_c  # ascending (candidates come by row, id)
    hit = _in_sorted(cand, np.sort(key_l))
  hit = io.code(st.member, bucket, hit.astype(np.int64) if truth else None).astype(bool)
  n_esc = n_M[p0:p1] - np.bincount(row_c[hit], minlength=b)
  if (n_esc < 0).any():
    raise ValueError("more entries decoded than the entry counts")
  r_rows = np.repeat(np.arange(b), n_esc)
  rank, perm = st.rank_of()
  gaps = e_low = None
  if truth is not None:
    esc = ~_in_sorted(key_l, cand)
    e_rank = np.sort(rows_l[esc] * v + rank[truth[0][rows_l, cols_l][esc]]) % v
    _, gaps = topk_entries.level_gaps(np.zeros(len(e_rank), np.int64), e_rank, n_esc)
    gaps_sym, e_low, _ = topk_entries.split_values(gaps)
  e_sym = io.code(st.escape, _escape_buckets(r_rows, n_esc),
                  gaps_sym.astype(np.int64) if truth else None)
  e_bits = topk_entries.symbol_low_bits(e_sym.astype(np.uint8)).astype(np.int64)
  gaps = topk_entries.join_values(e_sym, io.low(e_bits, e_low))
  _, e_rank = topk_entries.levels_ranks(np.zeros(len(gaps), np.int64), gaps, n_esc)
  if len(e_rank) and e_rank.max() >= v:
    raise ValueError("entry ranks out of range")
  v_rows = np.concatenate([row_c[hit], r_rows])
  v_ids = np.concatenate([id_c[hit], perm[e_rank]])
  if truth is not None:
    shape_true = _shape(np.sort(np.where(valid, truth[1], _SYM_MASK), axis=1), n_M[p0:p1])
  prev = ctx[p0:p1, 0]
  shape_bucket = np.where(prev >= 0, _shape(st.packed[prev] & _SYM_MASK, st.n[prev]),
                          st.symbols)
  shape = io.code(st.shape, shape_bucket, shape_true if truth else None)
  v_part = np.concatenate([vpart[hit], value_part(
      np.full(len(r_rows), st.symbols), np.zeros(len(r_rows), np.int64),
      (v_ids[int(hit.sum()):] == tgt_M[p0:p1][r_rows]).astype(np.int64),
      st.symbols)])
  v_bucket = v_part * st.symbols + shape[v_rows]
  v_true = None
  if truth is not None:
    v_true = _lookup(key_l, truth[1][rows_l, cols_l], v_rows * v + v_ids)
  v_sym = io.code(st.value, v_bucket, v_true)
  if (v_sym >= st.symbols).any():
    raise ValueError("value symbols out of range")
  _keep_head_order(st, io, p0, b, v_rows, v_ids, v_sym,
                   None if truth is None else (key_l, cols_l))


def _keep_head_order(st: _State, io: _Io, p0: int, b: int, rows: np.ndarray, ids: np.ndarray,
                     syms: np.ndarray, columns: tuple[np.ndarray, np.ndarray] | None) -> None:
  """Head entries sharing a code keep the teacher's order: each entry of such a tie codes its
  rank in it (bucket: the tie's size); then the block's lists are stored. `columns` (encoding):
  (row * id_space + id, the teacher's column) of every listed entry."""
  ib, rb = st.id_bits, int(st.k).bit_length()
  key = np.sort(((rows << _SYM_BITS | syms) << ib) | ids)
  rows, syms, ids = key >> (ib + _SYM_BITS), (key >> ib) & _SYM_MASK, key & (st.id_space - 1)
  group = rows << _SYM_BITS | syms
  start = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
  size = np.diff(np.append(start, len(group)))
  g_size = np.repeat(size, size)
  tied = (syms < st.head_codes) & (g_size > 1)
  ranks = None
  if columns is not None:  # rank of each entry's teacher column within its group
    order = np.argsort(group << rb | _lookup(*columns, rows << ib | ids))
    ranks = np.empty(len(group), np.int64)
    ranks[order] = np.arange(len(group)) - np.repeat(start, size)
    ranks = ranks[tied]
  r = np.zeros(len(group), np.int64)
  r[tied] = io.code(st.tie, np.minimum(g_size[tied], _TIE_BUCKETS + 1) - 2, ranks)
  key = np.sort((group << rb | r) << ib | ids)
  st.update_lists(p0, key >> (ib + rb + _SYM_BITS), key & (st.id_space - 1),
                  (key >> (ib + rb)) & _SYM_MASK, b)


def encode(ids_MxK: np.ndarray, logprobs_MxK: np.ndarray, log_tail_M: np.ndarray,
           cur_M: np.ndarray, tgt_M: np.ndarray, q: Quantiser, id_space: int,
           stats: dict | None = None) -> dict[str, np.ndarray]:
  """The ARRAYS of one shard's entries (`cur_M` / `tgt_M`: the token before the predicted one
  and the predicted one, per position; `stats`, if given, gets the range code's bits per
  model: bench_store.py's breakdown)."""
  topk_entries.check(q)
  m, k = np.shape(ids_MxK)
  ids, lp = topk_entries._checked(ids_MxK, logprobs_MxK, id_space)  # pylint: disable=W0212
  valid, head, codes, levels = topk_entries.quantised(ids, lp, q)
  st = _State(m, k, q, id_space)
  sym_MxK = value_symbols(valid, head, codes, levels, st.head_codes)
  n_M = valid.sum(1)
  starts = block_starts(m)
  ctx = _interleave(contexts(cur_M, starts), contexts(tgt_M, starts))
  io = _Io(constriction.stream.queue.RangeEncoder())
  for p0, p1 in zip(starts[:-1], starts[1:]):
    _block(st, io, p0, p1, ctx, tgt_M, n_M, (ids[p0:p1], sym_MxK[p0:p1]))
  if stats is not None:
    stats.update(io.stats)
  return {"entry_counts": n_M.astype(np.uint16),
          "range_code": io.coder.get_compressed().astype(np.uint32),
          "id_bits_stream": topk_entries.pack_varbits(
              np.concatenate([np.zeros(0, np.int64)] + io.lows),
              np.concatenate([np.zeros(0, np.int64)] + io.bits)),
          "log_tail": np.asarray(log_tail_M, np.float16)}


def _interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[M, 2J]: cur context 1, target context 1, cur context 2, ..."""
  out = np.empty((len(a), 2 * J), np.int64)
  out[:, 0::2], out[:, 1::2] = a, b
  return out


def _in_sorted(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """x in ref (ascending), elementwise (np.isin hashes: 10x slower here)."""
  at = np.minimum(np.searchsorted(ref, x), max(len(ref) - 1, 0))
  return ref[at] == x if len(ref) else np.zeros(len(x), bool)


def _lookup(keys: np.ndarray, values: np.ndarray, want: np.ndarray) -> np.ndarray:
  order = np.argsort(keys)
  return values[order[np.searchsorted(keys[order], want)]]


def decode(a: dict[str, np.ndarray], q: Quantiser, k: int, id_space: int, cur_M: np.ndarray,
           tgt_M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [M, k], probabilities float32 [M, k]) of a shard's ARRAYS (0 = no entry)."""
  topk_entries.check(q)
  n_M = a["entry_counts"].astype(np.int64)
  m = len(n_M)
  if (n_M > k).any() or len(cur_M) != m or len(tgt_M) != m:
    raise ValueError("entry counts out of range or not one per position")
  st = _State(m, k, q, id_space)
  starts = block_starts(m)
  ctx = _interleave(contexts(cur_M, starts), contexts(tgt_M, starts))
  io = _Io(constriction.stream.queue.RangeDecoder(np.asarray(a["range_code"], np.uint32)),
           a["id_bits_stream"])
  for p0, p1 in zip(starts[:-1], starts[1:]):
    _block(st, io, p0, p1, ctx, tgt_M, n_M, None)
  if (io.bit_at + 7) // 8 != len(a["id_bits_stream"]):
    raise ValueError("id bit stream length does not match the symbols")
  return _probs(st, q, a["log_tail"])

def _probs(st: _State, q: Quantiser, log_tail_M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32, probabilities float32) [M, k]: version 3's weights of the value symbols,
  scaled to 1 - tail; 0 where a position lists fewer than k."""
  w = np.concatenate([np.exp(-np.arange(st.head_codes) * q.logprob_step), q.level_weights()])
  missing = np.arange(st.k)[None, :] >= st.n[:, None]
  probs = w[st.syms].astype(np.float32)
  probs[missing] = 0.0
  ids = st.ids.astype(np.int32)
  ids[missing] = 0
  return ids, topk_entries.normalise(probs, log_tail_M)
