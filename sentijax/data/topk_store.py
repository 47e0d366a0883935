"""The offline teacher store: records with the teacher's token ids and, at every response
(loss) position only, either its top-k next-token distribution plus the tail mass (mode `topk`)
or N tokens drawn from it at the KD temperature (mode `sample`), in compressed shards. Reading
here; the format (index.json, versions) in topk_format.py, writing in topk_writer.py, the entry
coding in topk_context.py (version 4), topk_entries.py (version 3) and topk_codec.py (container,
version 2).

Layout of `store_dir`: index.json, tokenizer/ (the teacher's tokenizer: a student trains with
it, model.tokenizer=...), and shards `shard-00000.bin` (topk_codec container; each array
compressed with the store's codec):
  ids             str     [n]     record ids
  records_json    uint8   [bytes] the records' JSON lines (no token ids) ...
  record_offsets  int64   [n + 1] ... and where each starts
  tokens          id_bits [T]     the teacher's token ids, records concatenated
  token_offsets   int64   [n + 1]
  loss_mask       1 bit   [T]     1 on response tokens (never a record's first)
then, per loss token (M = loss_mask.sum(), in order), for the token it predicts:
  topk    topk_context.ARRAYS (version 4: entry counts, one range-coded stream, plain low bits
          of rare ids; version 3: topk_entries.ARRAYS) with log_tail float16 [M] = log(1 - sum
          of the k probabilities)
  sample  sample_ids id_bits [M, N] (distinct drawn ids, padding 0), sample_counts uint8
          [M, N] (0 = padding), sample_logprobs float16 [M, N] (the teacher's tempered log p_T)

    records, soft = topk_store.load(store_dir, width=8)
    train, val, stats = dataset.build_train_val(train_recs, val_recs, tok, spec, soft_targets=soft)

`load` returns pre-tokenised records and a `sequences.SoftTargets` that reads the soft targets of a
record when its packed row is built, decoding one shard at a time (at most `CACHED_SHARDS`
decoded shards in memory): topk stores give soft_ids / soft_probs (T = 1) / soft_tail, sample
stores soft_ids / soft_probs (= counts / N) / soft_logp (train/losses.py SOFT_FIELDS).
Version-2 and version-3 stores load as they are (a version-3 store is resumed in version 3);
version-1 stores are refused with the converter:

    python -m sentijax.data.topk_store convert OLD_STORE NEW_STORE   # v1 or v2 -> v4
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from sentijax.data import sequences, topk_codec, topk_context, topk_entries
from sentijax.data.records import BadRow, Record, make_tokens, record_from_json
from sentijax.data.tokenizer import vocab_fingerprint
from sentijax.data.topk_format import (  # the store's public names (__all__)
    CODEC, FORMAT, FORMAT_V1, HEAD_NATS, INDEX, LEVEL_SCALE, LOGPROB_STEP, MODES, RECORD_ARRAYS,
    TOKENIZER_DIR, VERSION, ScoredRecord, StoreError, check_tokenizer, header, identity,
    iter_shards, mode_arrays, quantiser, read_index, read_shard, store_tokenizer,
    tokenizer_identity)
from sentijax.data.topk_writer import StoreWriter

__all__ = ["CACHED_SHARDS", "CODEC", "FORMAT", "HEAD_NATS", "LEVEL_SCALE", "LOGPROB_STEP",
           "MODES", "VERSION", "ScoredRecord", "StoreError", "StoreWriter", "check_tokenizer",
           "convert", "distill_support", "header", "identity", "iter_scored", "iter_shards",
           "load", "main", "read_index", "read_records", "read_shard", "read_v1",
           "store_tokenizer", "tokenizer_identity"]

log = logging.getLogger("sentijax")

CACHED_SHARDS = 2


def _shard_records(path: Path, a: dict[str, np.ndarray], vocab: str
                   ) -> Iterator[tuple[Record, int, int]]:
  """(record, first, end position) per record of a shard's record arrays, checked."""
  n = len(a["ids"])
  tok_off, rec_off = a["token_offsets"], a["record_offsets"]
  mask = a["loss_mask"].astype(np.int32)
  pos_off = np.concatenate([[0], np.cumsum(mask)])[tok_off] if len(tok_off) == n + 1 else None
  ok = (pos_off is not None and len(rec_off) == n + 1 and tok_off[-1] == len(a["tokens"])
        == len(mask) and rec_off[-1] == len(a["records_json"]))
  if not ok:
    raise StoreError(f"{path}: inconsistent arrays (record, token and position offsets).")
  raw = a["records_json"].tobytes()
  for i in range(n):
    where = f"{path}: record {i} ({a['ids'][i]!r})"
    try:
      obj = json.loads(raw[rec_off[i]:rec_off[i + 1]].decode("utf-8"))
      t0, t1 = tok_off[i], tok_off[i + 1]
      tokens = make_tokens(a["tokens"][t0:t1].astype(np.int32), mask[t0:t1], vocab, str(path))
      record = dataclasses.replace(record_from_json(obj), tokens=tokens)
    except (BadRow, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise StoreError(f"{where}: {e}") from None
    if record.id != str(a["ids"][i]):
      raise StoreError(f"{where}: id {record.id!r} in its JSON differs from the ids array.")
    yield record, int(pos_off[i]), int(pos_off[i + 1])


def _decode_entries(path: Path, index: dict, a: dict[str, np.ndarray], positions: int
                    ) -> dict[str, np.ndarray]:
  """A shard's per-position arrays decoded: {"ids", "probs", "tail" | "counts", "logp"}."""
  k = int(index["k"])
  if index["mode"] == "sample":
    out = {"ids": a["sample_ids"].view(np.int32), "counts": a["sample_counts"].astype(np.int32),
           "logp": a["sample_logprobs"].astype(np.float32)}
  elif index["version"] == 2:
    probs = topk_codec.dequantise(topk_codec.deltas_to_codes(a["logprob_deltas"]), a["log_tail"],
                                  index["encoding"]["logprob_step"])
    out = {"ids": a["topk_ids"].view(np.int32), "probs": probs}  # ids < 2**31: a view
  else:
    id_space = 1 << int(index["encoding"]["id_bits"])
    try:
      if index["version"] == 3:
        ids, probs = topk_entries.decode(a, quantiser(index), k, id_space)
      else:
        ids, probs = topk_context.decode(a, quantiser(index), k, id_space,
                                         *topk_context.context_tokens(a["tokens"],
                                                                      a["loss_mask"]))
    except (ValueError, IndexError) as e:
      raise StoreError(f"{path}: unreadable top-k entries ({e}).") from None
    out = {"ids": ids, "probs": probs}
  if index["mode"] == "topk":
    out["tail"] = np.exp(a["log_tail"].astype(np.float64)).astype(np.float32)
  if any(v.shape[0] != positions for v in out.values()) or out["ids"].shape[1:] != (k,):
    raise StoreError(f"{path}: entry arrays {[v.shape for v in out.values()]}, expected "
                     f"{positions} positions x k={k}.")
  return out


def iter_scored(store_dir: str | os.PathLike) -> Iterator[list[ScoredRecord]]:
  """Every stored record with its decoded entries, one shard at a time (topk: `logprobs` = log
  of the decoded probabilities)."""
  index = read_index(store_dir)
  for path, a in iter_shards(store_dir, index):
    recs = list(_shard_records(path, a, index["tokenizer"]["vocab"]))
    e = _decode_entries(path, index, a, recs[-1][2] if recs else 0)
    out = []
    for record, p0, p1 in recs:
      if index["mode"] == "sample":
        out.append(ScoredRecord(record, e["ids"][p0:p1], e["logp"][p0:p1],
                                counts=e["counts"][p0:p1]))
      else:
        with np.errstate(divide="ignore"):
          lp = np.log(e["probs"][p0:p1])
        out.append(ScoredRecord(record, e["ids"][p0:p1], lp,
                                np.log(e["tail"][p0:p1].astype(np.float64))))
    yield out


def read_records(store_dir: str | os.PathLike) -> list[ScoredRecord]:
  """Every stored record with its decoded entries, in shard order; unique ids checked."""
  out, seen = [], set()
  for shard in iter_scored(store_dir):
    for s in shard:
      if s.record.id in seen:
        raise StoreError(f"{s.record.tokens.source}: record {s.record.id!r} is stored twice.")
      seen.add(s.record.id)
      out.append(s)
  return out


class _ShardCache:
  """Decoded per-position arrays of at most `size` shards (least recently used dropped)."""

  def __init__(self, store_dir: Path, index: dict, size: int = CACHED_SHARDS):
    self.dir, self.index, self.size = store_dir, index, size
    self.cache: collections.OrderedDict[int, dict] = collections.OrderedDict()
    self.decodes = 0

  def get(self, shard: int) -> dict[str, np.ndarray]:
    if shard in self.cache:
      self.cache.move_to_end(shard)
      return self.cache[shard]
    while len(self.cache) >= self.size:
      self.cache.popitem(last=False)
    entry = self.index["shards"][shard]
    a = read_shard(self.dir, entry, mode_arrays(self.index))
    self.cache[shard] = _decode_entries(self.dir / entry["file"], self.index, a,
                                        int(entry["positions"]))
    self.decodes += 1
    return self.cache[shard]


def _check_width(store_dir, index: dict, width: int) -> int:
  k = int(index["k"])
  if index["mode"] == "sample":
    if int(width) not in (0, k):
      raise StoreError(f"{Path(store_dir) / INDEX}: a sample store holds {k} draws per token; "
                       f"kd.top_k={width} must be 0 or {k} (all draws are used).")
    return k
  if not 1 <= int(width) <= k:
    raise StoreError(f"{Path(store_dir) / INDEX}: the store holds the top {k} per token; "
                     f"kd.top_k={width} needs 1 <= kd.top_k <= {k} (lower kd.top_k, or rebuild "
                     f"the store with topk.k >= {width}).")
  return int(width)


def load(store_dir: str | os.PathLike, width: int) -> tuple[list[Record], sequences.SoftTargets]:
  """(pre-tokenised records, SoftTargets): the teacher's entries at every response token.

  topk: the first `width` <= k entries (probabilities at T = 1) and the tail beyond them;
  sample: all k draws (`width` 0 or k). Only the records' token arrays are read here; a record's
  soft targets are decoded when packing asks for them (at most CACHED_SHARDS shards decoded at
  once). The key holds the store's identity, so a packed-data cache made from another store (or
  another version of this one) is not reused.
  """
  store_dir = Path(store_dir)
  index = read_index(store_dir)
  width = _check_width(store_dir, index, width)
  if not index.get("complete"):
    log.warning("%s: the store job has not finished (complete=false); using the %d shards "
                "written so far.", store_dir, len(index["shards"]))
  recs, where, seen = [], {}, {}
  for shard, entry in enumerate(index["shards"]):
    path = store_dir / entry["file"]
    for record, p0, p1 in _shard_records(path, read_shard(store_dir, entry, RECORD_ARRAYS),
                                         index["tokenizer"]["vocab"]):
      if record.id in seen:
        raise StoreError(f"{path}: record {record.id!r} is also in {seen[record.id]}.")
      seen[record.id] = path
      recs.append(record)
      where[record.id] = (shard, p0, p1)
  if not recs:
    raise StoreError(f"{store_dir / INDEX}: the store holds no records.")
  cache = _ShardCache(store_dir, index)
  sample = index["mode"] == "sample"

  def fn(record: Record, sequence: sequences.TokenizedSequence):
    if record.id not in where:  # not a record of this store (e.g. mixed in): no soft target
      return None
    shard, p0, p1 = where[record.id]
    if not np.array_equal(sequence.tokens, record.tokens.ids):
      raise StoreError(f"{record.tokens.source}: record {record.id!r}: the sequence being packed "
                       "is not the store's token ids (packing must take Record.tokens as they "
                       "are).")
    e = cache.get(shard)
    at = record.tokens.loss_mask.astype(bool)
    n = len(at)
    fields = {"soft_ids": np.zeros((n, width), np.int32),
              "soft_probs": np.zeros((n, width), np.float32)}
    fields["soft_ids"][at] = e["ids"][p0:p1, :width]
    if sample:
      counts = e["counts"][p0:p1]
      fields["soft_probs"][at] = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
      fields["soft_logp"] = np.zeros((n, width), np.float32)
      fields["soft_logp"][at] = e["logp"][p0:p1]
    else:
      probs = e["probs"][p0:p1]
      fields["soft_probs"][at] = probs[:, :width]
      fields["soft_tail"] = np.zeros(n, np.float32)  # beyond the first `width`: theirs too
      fields["soft_tail"][at] = e["tail"][p0:p1] + probs[:, width:].sum(-1)
    return fields

  log.info("%s store %s: %d records, %d response tokens in %d shards, width %d of k=%d "
           "(teacher %s)", index["mode"], store_dir, len(recs),
           sum(int(e["positions"]) for e in index["shards"]), len(index["shards"]), width,
           int(index["k"]), index["teacher"])
  fields = ("soft_logp",) if sample else ("soft_tail",)
  return recs, sequences.SoftTargets(width, fn, f"topk-store:{identity(store_dir)}:{width}",
                                   extra_fields=fields)


def distill_support(store_dir: str | os.PathLike, temperature: float) -> str:
  """The `losses.Distill.support` a store feeds: "listed" (topk) or "sampled" (sample, whose
  draws hold only at the temperature they were made at: StoreError naming both otherwise)."""
  h = header(store_dir)
  if h["mode"] == "topk":
    return "listed"
  if abs(float(temperature) - float(h["temperature"])) > 1e-9:
    raise StoreError(f"{Path(store_dir) / INDEX}: a sample store drawn at temperature "
                     f"{h['temperature']}; kd.temperature={temperature} would make its estimate "
                     f"biased: set kd.temperature={h['temperature']} or rebuild the store with "
                     f"topk.temperature={temperature}.")
  return "sampled"



# --------------------------------------------------------------------------- conversion


def read_v1(store_dir: str | os.PathLike) -> Iterator[list[ScoredRecord]]:
  """The records of a version-1 store, one shard at a time (for `convert`)."""
  store_dir = Path(store_dir)
  index = json.loads((store_dir / INDEX).read_text(encoding="utf-8"))
  if index.get("format") != FORMAT_V1:
    raise StoreError(f"{store_dir / INDEX}: format {index.get('format')!r}, not {FORMAT_V1!r}.")
  for entry in index["shards"]:
    path = store_dir / entry["file"]
    with np.load(path, allow_pickle=False) as a:
      tok_off, mask = a["token_offsets"], a["loss_mask"].astype(np.int32)
      pos_off = np.concatenate([[0], np.cumsum(mask)])[tok_off]
      raw, rec_off = a["records_json"].tobytes(), a["record_offsets"]
      ids, lp = a["topk_ids"], a["topk_logprobs"]
      out = []
      for i in range(len(a["ids"])):
        obj = json.loads(raw[rec_off[i]:rec_off[i + 1]].decode("utf-8"))
        tokens = make_tokens(a["tokens"][tok_off[i]:tok_off[i + 1]],
                             mask[tok_off[i]:tok_off[i + 1]], index["tokenizer"]["vocab"],
                             str(path))
        out.append(ScoredRecord(dataclasses.replace(record_from_json(obj), tokens=tokens),
                                ids[pos_off[i]:pos_off[i + 1]], lp[pos_off[i]:pos_off[i + 1]]))
    yield out


def convert(old_dir: str | os.PathLike, new_dir: str | os.PathLike) -> dict:
  """Writes the version-1 or version-2 store `old_dir` as a version-4 store `new_dir` (same
  shards, records and top-k; log-probabilities quantised as versions 3 and 4 do; v1: tail = 1 -
  their sum); returns the new index."""
  from sentijax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  old_dir, new_dir = Path(old_dir), Path(new_dir)
  try:
    index = json.loads((old_dir / INDEX).read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError) as e:
    raise StoreError(f"{old_dir / INDEX}: not a readable store index ({e}).") from None
  if index.get("format") == FORMAT_V1:
    shards = read_v1(old_dir)
  elif read_index(old_dir)["version"] == 2:
    shards = iter_scored(old_dir)
  else:
    raise StoreError(f"{old_dir / INDEX}: format {FORMAT} version {index['version']}: this "
                     "sentijax reads it as it is (nothing to convert).")
  tok = tokenizer_lib.load_tokenizer(str(old_dir / TOKENIZER_DIR))
  if vocab_fingerprint(tok) != index["tokenizer"]["vocab"]:
    raise StoreError(f"{old_dir / TOKENIZER_DIR}: not the tokenizer the store's ids come from.")
  bits = index.get("encoding", {}).get("id_bits", 0)
  writer = StoreWriter(new_dir, k=int(index["k"]), teacher=index["teacher"], tokenizer=tok,
                       render=index["render"], mode=index.get("mode", "topk"),
                       temperature=float(index.get("temperature", 1.0)),
                       vocab_size=1 << bits if bits > topk_codec.id_bits(len(tok)) else 0)
  for scored in shards:
    todo = [s for s in scored if s.record.id not in writer.done_ids]
    if todo:
      writer.write_shard(todo)
  writer.finish(bool(index.get("complete")))
  return writer.index


def main(argv: Sequence[str]) -> int:
  if len(argv) != 3 or argv[0] != "convert":
    print("usage: python -m sentijax.data.topk_store convert OLD_STORE NEW_STORE  (v1/v2 -> v4)",
          file=sys.stderr)
    return 2
  new = convert(argv[1], argv[2])
  print(f"{argv[2]}: {len(new['shards'])} shards, "
        f"{sum(s['records'] for s in new['shards'])} records, format {FORMAT} v{VERSION}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
