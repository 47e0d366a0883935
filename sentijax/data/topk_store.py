"""The offline teacher store: records with the teacher's token ids and, at every response
(loss) position only, either its top-k next-token distribution plus the tail mass (mode `topk`)
or N tokens drawn from it at the KD temperature (mode `sample`), in compressed shards.

Layout of `store_dir`:

  index.json        {"format": "sentijax-topk", "version": 2, "mode": "topk" | "sample", "k",
                     "temperature" (sample: the temperature the draws come from; topk: 1),
                     "teacher", "tokenizer": {"name", "vocab", "size"}, "render": {"mode"},
                     "encoding": {"id_bits", "logprob_step", "codec"},
                     "shards": [{"file", "records", "tokens", "positions", "bytes", "sha256"}],
                     "complete": bool}
  shard-00000.bin   one shard (topk_codec container; each array compressed with `codec`):
                      ids             str     [n]     record ids
                      records_json    uint8   [bytes] the records' JSON lines (no token ids) ...
                      record_offsets  int64   [n + 1] ... and where each starts
                      tokens          id_bits [T]     the teacher's token ids, records concatenated
                      token_offsets   int64   [n + 1]
                      loss_mask       1 bit   [T]     1 on response tokens (never a record's first)
                    topk, per loss token (M = loss_mask.sum(), in order), for the token it predicts:
                      topk_ids        id_bits [M, k]  the teacher's k most likely ids, descending
                      logprob_deltas  uint8   [M, k]  quantised log-probs (topk_codec: codes
                                                      relative to the top-1, successive differences)
                      log_tail        float16 [M]     log(1 - sum of the k probabilities)
                    sample (N = k draws per position from softmax(logits / temperature)):
                      sample_ids      id_bits [M, N]  the distinct drawn ids (padding 0) ...
                      sample_counts   uint8   [M, N]  ... how often each was drawn (0 = padding)
                      sample_logprobs float16 [M, N]  the teacher's log p_T of each (tempered)
  tokenizer/        the teacher's tokenizer (a student trains with it: model.tokenizer=...)

Writes are atomic shard by shard (temp file, fsync, rename, then index.json replaced); a shard the
index does not list (a kill between the two) is removed by the next writer. A shard's bytes depend
only on its content, so the same records give the same store identity. A version-1 store
(format "sentijax-topk-v1": int32 ids, float32 logprobs, uncompressed npz) is refused with the
command that converts it (`convert_v1`).

    records, soft = topk_store.load(store_dir, width=8)
    train, val, stats = dataset.build_train_val(train_recs, val_recs, tok, spec, soft_targets=soft)

`load` returns pre-tokenised records and a `sequences.SoftTargets` that reads the soft targets of a
record when its packed row is built, decoding one shard at a time (at most `CACHED_SHARDS`
decoded shards in memory): topk stores give soft_ids / soft_probs (T = 1) / soft_tail, sample
stores soft_ids / soft_probs (= counts / N) / soft_logp (train/losses.py SOFT_FIELDS).

    python -m sentijax.data.topk_store convert OLD_V1_STORE NEW_STORE
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sentijax import atomic
from sentijax.data import sequences, topk_codec
from sentijax.data.records import BadRow, DataError, Record, make_tokens, record_from_json
from sentijax.data.tokenizer import vocab_fingerprint
from sentijax.data.writers import write_json_atomic

log = logging.getLogger("sentijax")

FORMAT = "sentijax-topk"
VERSION = 2
FORMAT_V1 = "sentijax-topk-v1"
MODES = ("topk", "sample")
INDEX = "index.json"
TOKENIZER_DIR = "tokenizer"
LOGPROB_STEP = 0.125  # nats; KL cost ~ step^2 / 24 per position (bench_store.py measures it)
CODEC = "lzma"  # bench_store.py: smallest of lzma / zlib / zstd on real top-k lists
CACHED_SHARDS = 2
_RECORD_ARRAYS = ("ids", "records_json", "record_offsets", "tokens", "token_offsets",
                  "loss_mask")
_MODE_ARRAYS = {"topk": ("topk_ids", "logprob_deltas", "log_tail"),
                "sample": ("sample_ids", "sample_counts", "sample_logprobs")}
_HEADER_KEYS = ("format", "version", "mode", "k", "temperature", "teacher", "tokenizer",
                "render", "encoding")


class StoreError(DataError):
  """A store is missing, incomplete, corrupt or does not fit the request; names the file."""


@dataclasses.dataclass
class ScoredRecord:
  """One record (with `tokens`) and the teacher's entries at its m loss tokens, in order.

  topk: `ids` descending by probability, `logprobs` their log-probabilities at T = 1 (-inf = no
  entry), `log_tail` log of the mass outside them (None: 1 - sum, computed on writing).
  sample: `ids` the distinct drawn ids (padding 0), `counts` their draw counts (0 = padding),
  `logprobs` the teacher's log-probabilities of them at the store's temperature.
  """
  record: Record
  ids: np.ndarray  # int [m, k]
  logprobs: np.ndarray  # float [m, k]
  log_tail: np.ndarray | None = None  # float [m] (topk)
  counts: np.ndarray | None = None  # int [m, k] (sample)


def tokenizer_identity(tokenizer: Any) -> dict:
  """{"name", "vocab", "size"}: what a store records of the tokenizer that made its ids."""
  return {"name": str(getattr(tokenizer, "name_or_path", "") or ""),
          "vocab": vocab_fingerprint(tokenizer), "size": len(tokenizer)}


# --------------------------------------------------------------------------- index


def _convert_hint(store_dir) -> str:
  return (f"convert it: python -m sentijax.data.topk_store convert {store_dir} "
          f"{str(store_dir).rstrip('/')}-v{VERSION} (or rerun configs/generate_topk.py into a new "
          "topk.store_dir)")


def read_index(store_dir: str | os.PathLike) -> dict:
  """The store's index.json, checked; StoreError naming the file when absent or invalid."""
  path = Path(store_dir) / INDEX
  if not path.is_file():
    raise StoreError(f"{path} not found: {store_dir} is not a top-k store (run "
                     "configs/generate_topk.py, or the job has not finished a shard yet).")
  try:
    index = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreError(f"{path}: not valid JSON ({e}).") from None
  found = index.get("format") if isinstance(index, dict) else None
  if found == FORMAT_V1:
    raise StoreError(f"{path}: store format version 1 ({FORMAT_V1!r}); this sentijax reads "
                     f"version {VERSION}: {_convert_hint(store_dir)}.")
  if found != FORMAT or index.get("version") != VERSION:
    raise StoreError(f"{path}: format {found!r} version {index.get('version')!r}, expected "
                     f"{FORMAT!r} version {VERSION} (written by another sentijax?).")
  missing = [k for k in _HEADER_KEYS + ("shards",) if k not in index]
  if missing:
    raise StoreError(f"{path}: missing key(s) {missing}.")
  if index["mode"] not in MODES:
    raise StoreError(f"{path}: mode {index['mode']!r}, expected one of {MODES}.")
  return index


def store_tokenizer(store_dir: str | os.PathLike) -> dict:
  """The tokenizer identity recorded in the store ({"name", "vocab", "size"})."""
  return dict(read_index(store_dir)["tokenizer"])


def check_tokenizer(store_dir: str | os.PathLike, tokenizer: Any) -> None:
  """Raises StoreError unless `tokenizer` has the vocabulary the store's ids come from."""
  want, got = store_tokenizer(store_dir), tokenizer_identity(tokenizer)
  if want["vocab"] != got["vocab"]:
    raise StoreError(
        f"{Path(store_dir) / INDEX}: the store's token ids come from tokenizer {want['name']!r} "
        f"(vocab {want['vocab'][:16]}, {want['size']} ids) but the student's tokenizer "
        f"{got['name']!r} has another vocabulary ({got['vocab'][:16]}, {got['size']} ids). Use "
        f"the teacher's tokenizer (--config.model.tokenizer={Path(store_dir) / TOKENIZER_DIR}) or "
        "rebuild the store with a teacher that shares the student's vocabulary.")


def identity(store_dir: str | os.PathLike) -> str:
  """sha256 of the store's header and its shards' content hashes (changes with any content)."""
  index = read_index(store_dir)
  blob = {k: index[k] for k in _HEADER_KEYS} | {"shards": index["shards"]}
  return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- writing


def _entry_arrays(scored: Sequence[ScoredRecord], mode: str, k: int, step: float
                  ) -> dict[str, np.ndarray]:
  """The mode's per-position arrays of a shard, shapes checked."""
  for s in scored:
    m = int(s.record.tokens.loss_mask.sum())
    extra = s.counts if mode == "sample" else None
    shapes = [a.shape for a in (s.ids, s.logprobs) + ((extra,) if mode == "sample" else ())]
    if mode == "sample" and extra is None or any(shape != (m, k) for shape in shapes):
      raise ValueError(f"record {s.record.id!r}: entry arrays {shapes}, expected ({m}, {k}) "
                       f"(loss tokens x k) for mode {mode!r}")
  ids = np.concatenate([s.ids for s in scored]).reshape(-1, k)
  lp = np.concatenate([s.logprobs for s in scored]).reshape(-1, k)
  if mode == "sample":
    counts = np.concatenate([s.counts for s in scored]).reshape(-1, k)
    if (counts < 0).any() or (counts > 255).any():
      raise ValueError("sample counts must be in [0, 255] (at most 255 draws per position)")
    return {"sample_ids": ids, "sample_counts": counts.astype(np.uint8),
            "sample_logprobs": np.where(counts > 0, lp, 0.0).astype(np.float16)}
  tails = [topk_codec.log_tail(s.logprobs) if s.log_tail is None else s.log_tail
           for s in scored]
  return {"topk_ids": ids,
          "logprob_deltas": topk_codec.codes_to_deltas(topk_codec.quantise(lp, step)),
          "log_tail": np.concatenate(tails).astype(np.float16)}


def _shard_arrays(scored: Sequence[ScoredRecord], mode: str, k: int, step: float
                  ) -> dict[str, np.ndarray]:
  lines = [json.dumps(s.record.to_json(with_tokens=False), ensure_ascii=False,
                      sort_keys=True).encode("utf-8") for s in scored]
  tokens = [s.record.tokens for s in scored]
  return {
      "ids": np.array([s.record.id for s in scored], dtype=str),
      "records_json": np.frombuffer(b"".join(lines), np.uint8),
      "record_offsets": np.cumsum([0] + [len(x) for x in lines], dtype=np.int64),
      "tokens": np.concatenate([t.ids for t in tokens]).astype(np.uint32),
      "token_offsets": np.cumsum([0] + [len(t.ids) for t in tokens], dtype=np.int64),
      "loss_mask": np.concatenate([t.loss_mask for t in tokens]).astype(np.uint8),
  } | _entry_arrays(scored, mode, k, step)


class StoreWriter:
  """Appends shards to a store; reopening an existing store resumes it (same header required).

    writer = StoreWriter(dir, k=20, teacher="...", tokenizer=tok, render={"mode": "raw"})
    todo = [r for r in records if r.id not in writer.done_ids]
    writer.write_shard(scored_records)
    writer.finish(complete=True)

  `mode="sample"`: k = draws per position, `temperature` the one they come from. `vocab_size`:
  ids are stored in the narrowest width holding it (default the tokenizer's length; a teacher
  with more embedding rows passes its own).
  """

  def __init__(self, store_dir: str | os.PathLike, *, k: int, teacher: str, tokenizer: Any,
               render: dict, mode: str = "topk", temperature: float = 1.0,
               vocab_size: int = 0, codec: str = CODEC, read_only: bool = False):
    """`read_only`: only read what is stored (the other hosts of a multi-host job, once the
    writing host has opened the store); `write_shard` then only records the ids."""
    if mode not in MODES:
      raise ValueError(f"store mode {mode!r}: expected one of {MODES}")
    self.dir, self.read_only = Path(store_dir), read_only
    size = max(int(vocab_size), len(tokenizer))
    header = {"format": FORMAT, "version": VERSION, "mode": mode, "k": int(k),
              "temperature": float(temperature) if mode == "sample" else 1.0,
              "teacher": teacher, "tokenizer": tokenizer_identity(tokenizer),
              "render": dict(render),
              "encoding": {"id_bits": topk_codec.id_bits(size), "logprob_step": LOGPROB_STEP,
                           "codec": codec}}
    if read_only:
      self.index = read_index(self.dir)
      self.done_ids = {str(x) for _, a in iter_shards(self.dir, self.index, ("ids",))
                       for x in a["ids"]}
      return
    self.dir.mkdir(parents=True, exist_ok=True)
    if (self.dir / INDEX).is_file():
      self.index = read_index(self.dir)
      header["tokenizer"]["name"] = self.index["tokenizer"].get("name", "")  # vocab decides
      changed = [key for key in _HEADER_KEYS if self.index[key] != header[key]]
      if changed:
        raise StoreError(
            f"{self.dir / INDEX}: the store was made with other {changed} "
            f"({ {key: self.index[key] for key in changed} } vs { {k: header[k] for k in changed} }"
            "); use another topk.store_dir or remove this store.")
    else:
      self.index = header | {"shards": [], "complete": False}
      write_json_atomic(self.dir / INDEX, self.index)
    if not (self.dir / TOKENIZER_DIR).is_dir():
      tmp = self.dir / f".{TOKENIZER_DIR}.{os.getpid()}.tmp"
      tokenizer.save_pretrained(str(tmp))
      os.replace(tmp, self.dir / TOKENIZER_DIR)
    self._remove_orphans()
    self.done_ids: set[str] = set()
    for _, arrays in iter_shards(self.dir, self.index, names=("ids",)):
      self.done_ids.update(str(x) for x in arrays["ids"])

  @property
  def k(self) -> int:
    return int(self.index["k"])

  def _remove_orphans(self) -> None:
    listed = {s["file"] for s in self.index["shards"]}
    for path in self.dir.iterdir():
      orphan = path.name.startswith("shard-") and path.suffix == ".bin" and path.name not in listed
      if orphan or (path.name.startswith(".shard-") and path.name.endswith(".tmp")):
        log.warning("%s: removing %s left by an interrupted write", self.dir, path.name)
        path.unlink()

  def write_shard(self, scored: Sequence[ScoredRecord]) -> str:
    """Writes one shard atomically and lists it in the index; returns its file name."""
    if not scored:
      raise ValueError("write_shard: no records")
    dup = [s.record.id for s in scored if s.record.id in self.done_ids]
    if dup or len({s.record.id for s in scored}) != len(scored):
      raise ValueError(f"write_shard: record ids already in the store or repeated: {dup[:5]}")
    if self.read_only:
      self.done_ids.update(s.record.id for s in scored)
      return ""
    vocab = self.index["tokenizer"]["vocab"]
    other = [s.record.id for s in scored if s.record.tokens.vocab not in ("", vocab)]
    if other:
      raise ValueError(f"write_shard: records {other[:5]} were tokenised with another vocabulary")
    enc = self.index["encoding"]
    arrays = _shard_arrays(scored, self.index["mode"], self.k, enc["logprob_step"])
    id_arrays = ("tokens", "topk_ids", "sample_ids")
    data = topk_codec.encode_shard(arrays, enc["codec"], {
        name: enc["id_bits"] for name in id_arrays if name in arrays} | {"loss_mask": 1})
    name = f"shard-{len(self.index['shards']):05d}.bin"
    with atomic.atomic_open(self.dir / name, "wb") as f:  # temp, fsync, rename, fsync dir
      f.write(data)
    entry = {"file": name, "records": len(scored), "tokens": int(len(arrays["tokens"])),
             "positions": int(arrays["loss_mask"].sum()), "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}
    self.index = self.index | {"shards": self.index["shards"] + [entry]}
    write_json_atomic(self.dir / INDEX, self.index)
    self.done_ids.update(s.record.id for s in scored)
    return name

  def finish(self, complete: bool) -> None:
    """Marks the store complete (every record of the corpus stored) or not."""
    if self.read_only:
      return
    self.index = self.index | {"complete": bool(complete)}
    write_json_atomic(self.dir / INDEX, self.index)


# --------------------------------------------------------------------------- reading


def read_shard(store_dir: str | os.PathLike, entry: dict, names: Sequence[str]
               ) -> dict[str, np.ndarray]:
  """The named arrays of one listed shard (memory-mapped, hash verified, only those decoded)."""
  path = Path(store_dir) / entry["file"]
  if not path.is_file():
    raise StoreError(f"{path}: shard listed in {Path(store_dir) / INDEX} is missing; restore it "
                     "or rerun the store job into a new store_dir.")
  data = np.memmap(path, np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
  try:
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
      raise StoreError(f"{path}: content does not match its sha256 in "
                       f"{Path(store_dir) / INDEX} (corrupt or replaced shard).")
    arrays = topk_codec.decode_arrays(memoryview(data), names)
  except topk_codec.CodecError as e:
    raise StoreError(f"{path}: unreadable shard ({e}).") from None
  finally:
    del data
  if "ids" in arrays and len(arrays["ids"]) != entry["records"]:
    raise StoreError(f"{path}: {len(arrays['ids'])} records, the index says {entry['records']}.")
  return arrays


def iter_shards(store_dir: str | os.PathLike, index: dict | None = None,
                names: Sequence[str] | None = None
                ) -> Iterator[tuple[Path, dict[str, np.ndarray]]]:
  """(path, {name: array}) per listed shard, one at a time; default: every array."""
  index = read_index(store_dir) if index is None else index
  names = tuple(names or _RECORD_ARRAYS + _MODE_ARRAYS[index["mode"]])
  for entry in index["shards"]:
    yield Path(store_dir) / entry["file"], read_shard(store_dir, entry, names)


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
  """A shard's per-position arrays decoded: {"ids", "probs", "tail" | "logp"} [M, k] / [M]."""
  k = int(index["k"])
  if index["mode"] == "sample":
    ids, counts, lp = a["sample_ids"], a["sample_counts"], a["sample_logprobs"]
    out = {"ids": ids.view(np.int32), "counts": counts.astype(np.int32),
           "logp": lp.astype(np.float32)}
  else:
    ids, deltas, log_tail = a["topk_ids"], a["logprob_deltas"], a["log_tail"]
    probs = topk_codec.dequantise(topk_codec.deltas_to_codes(deltas), log_tail,
                                  index["encoding"]["logprob_step"])
    out = {"ids": ids.view(np.int32), "probs": probs,  # ids < 2**31: a view, no copy
           "tail": np.exp(log_tail.astype(np.float64)).astype(np.float32)}
  if any(v.shape[0] != positions for v in out.values()) or out["ids"].shape[1:] != (k,):
    raise StoreError(f"{path}: entry arrays {[v.shape for v in out.values()]}, expected "
                     f"{positions} positions x k={k}.")
  return out


def read_records(store_dir: str | os.PathLike) -> list[ScoredRecord]:
  """Every stored record with its decoded entries, in shard order; unique ids checked
  (topk: `logprobs` = log of the decoded probabilities)."""
  index = read_index(store_dir)
  out, seen = [], {}
  for path, a in iter_shards(store_dir, index):
    recs = list(_shard_records(path, a, index["tokenizer"]["vocab"]))
    e = _decode_entries(path, index, a, recs[-1][2] if recs else 0)
    for record, p0, p1 in recs:
      if record.id in seen:
        raise StoreError(f"{path}: record {record.id!r} is also in {seen[record.id]}.")
      seen[record.id] = path
      if index["mode"] == "sample":
        out.append(ScoredRecord(record, e["ids"][p0:p1], e["logp"][p0:p1],
                                counts=e["counts"][p0:p1]))
      else:
        with np.errstate(divide="ignore"):
          lp = np.log(e["probs"][p0:p1])
        out.append(ScoredRecord(record, e["ids"][p0:p1], lp,
                                np.log(e["tail"][p0:p1].astype(np.float64))))
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
    a = read_shard(self.dir, entry, _MODE_ARRAYS[self.index["mode"]])
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
    for record, p0, p1 in _shard_records(path, read_shard(store_dir, entry, _RECORD_ARRAYS),
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


def header(store_dir: str | os.PathLike) -> dict:
  """The store's settings (mode, k, temperature, encoding, ...) without its shard list."""
  index = read_index(store_dir)
  return {k: index[k] for k in _HEADER_KEYS}


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


# --------------------------------------------------------------------------- version 1


def read_v1(store_dir: str | os.PathLike) -> Iterator[list[ScoredRecord]]:
  """The records of a version-1 store, one shard at a time (for `convert_v1`)."""
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


def convert_v1(old_dir: str | os.PathLike, new_dir: str | os.PathLike) -> dict:
  """Writes the version-1 store `old_dir` as a version-2 store `new_dir` (same shards, records
  and top-k; log-probabilities quantised, tail = 1 - their sum); returns the new index."""
  from sentijax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  old_dir, new_dir = Path(old_dir), Path(new_dir)
  index = json.loads((old_dir / INDEX).read_text(encoding="utf-8"))
  tok = tokenizer_lib.load_tokenizer(str(old_dir / TOKENIZER_DIR))
  if vocab_fingerprint(tok) != index["tokenizer"]["vocab"]:
    raise StoreError(f"{old_dir / TOKENIZER_DIR}: not the tokenizer the store's ids come from.")
  writer = StoreWriter(new_dir, k=int(index["k"]), teacher=index["teacher"], tokenizer=tok,
                       render=index["render"])
  for scored in read_v1(old_dir):
    todo = [s for s in scored if s.record.id not in writer.done_ids]
    if todo:
      writer.write_shard(todo)
  writer.finish(bool(index.get("complete")))
  return writer.index


def main(argv: Sequence[str]) -> int:
  if len(argv) != 3 or argv[0] != "convert":
    print("usage: python -m sentijax.data.topk_store convert OLD_V1_STORE NEW_STORE",
          file=sys.stderr)
    return 2
  new = convert_v1(argv[1], argv[2])
  print(f"{argv[2]}: {len(new['shards'])} shards, "
        f"{sum(s['records'] for s in new['shards'])} records, format {FORMAT} v{VERSION}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
