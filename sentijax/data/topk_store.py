"""The offline teacher top-k store: records with the teacher's token ids and its top-k next-token
log-probabilities at every response position, in npz shards with an index.

Layout of `store_dir`:

  index.json        {"format", "k", "teacher", "tokenizer": {"name", "vocab", "size"},
                     "render": {"mode": "raw" | "chat"}, "shards": [{"file", "records", "tokens",
                     "positions", "sha256"}, ...], "complete": bool}
  shard-00000.npz   one shard (numpy .npz, no pickles):
                      ids            str    [n]        record ids
                      records_json   uint8  [bytes]    the records' JSON lines (no token ids) ...
                      record_offsets int64  [n + 1]    ... and where each starts
                      tokens         int32  [T]        the teacher's token ids, records concatenated
                      token_offsets  int64  [n + 1]
                      loss_mask      uint8  [T]        1 on response tokens (never a record's first)
                      topk_ids       int32  [M, k]     per loss token (M = loss_mask.sum(), in
                      topk_logprobs  float32 [M, k]    order): the teacher's k most likely ids for
                                                        it and their log-probabilities (temperature
                                                        1, fp32 log-softmax), descending; -inf =
                                                        no entry (a server gave fewer)
  tokenizer/        the teacher's tokenizer (a student trains with it: model.tokenizer=...)

Writes are atomic shard by shard: a shard file is written to a temp file, fsynced and renamed,
then index.json is replaced (atomically) with the shard added. A shard file the index does not
list (a kill between the two steps) is removed by the next writer. The bytes of a shard depend
only on its content (fixed zip timestamps), so the same records give the same store identity.

    records, soft = topk_store.load(store_dir, width=8)
    train, val, stats = dataset.build_train_val(train_recs, val_recs, tok, spec, soft_targets=soft)

`load` returns pre-tokenised records (`Record.tokens`: packing takes the ids as they are) and a
`packing.SoftTargets` whose rows follow the soft-target contract of packing.py: row t is the
teacher's top-`width` distribution for tokens[t] (probs = exp(logprobs), summing to <= 1).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sentijax import atomic
from sentijax.data import packing
from sentijax.data.records import BadRow, DataError, Record, make_tokens, record_from_json
from sentijax.data.tokenizer import vocab_fingerprint
from sentijax.data.writers import write_json_atomic

log = logging.getLogger("sentijax")

FORMAT = "sentijax-topk-v1"
INDEX = "index.json"
TOKENIZER_DIR = "tokenizer"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_ARRAYS = ("ids", "records_json", "record_offsets", "tokens", "token_offsets", "loss_mask",
           "topk_ids", "topk_logprobs")
_HEADER_KEYS = ("format", "k", "teacher", "tokenizer", "render")


class StoreError(DataError):
  """A top-k store is missing, incomplete, corrupt or does not fit the request; names the file."""


@dataclasses.dataclass
class ScoredRecord:
  """One record (with `tokens`) and the teacher's top-k at its m loss tokens, in order."""
  record: Record
  topk_ids: np.ndarray  # int32 [m, k]
  topk_logprobs: np.ndarray  # float32 [m, k]


def tokenizer_identity(tokenizer: Any) -> dict:
  """{"name", "vocab", "size"}: what a store records of the tokenizer that made its ids."""
  return {"name": str(getattr(tokenizer, "name_or_path", "") or ""),
          "vocab": vocab_fingerprint(tokenizer), "size": len(tokenizer)}


# --------------------------------------------------------------------------- index


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
  if not isinstance(index, dict) or index.get("format") != FORMAT:
    raise StoreError(f"{path}: format {index.get('format') if isinstance(index, dict) else None!r}"
                     f", expected {FORMAT!r}.")
  missing = [k for k in _HEADER_KEYS + ("shards",) if k not in index]
  if missing:
    raise StoreError(f"{path}: missing key(s) {missing}.")
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


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
  """An .npz (np.load reads it) whose bytes depend only on the arrays: fixed zip timestamps."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
    for name in _ARRAYS:
      with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), "w",
                   force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arrays[name]), allow_pickle=False)
  return buf.getvalue()


def _shard_arrays(scored: Sequence[ScoredRecord], k: int) -> dict[str, np.ndarray]:
  lines = [json.dumps(s.record.to_json(with_tokens=False), ensure_ascii=False,
                      sort_keys=True).encode("utf-8") for s in scored]
  tokens = [s.record.tokens for s in scored]
  for s, t in zip(scored, tokens):
    m = int(t.loss_mask.sum())
    if s.topk_ids.shape != (m, k) or s.topk_logprobs.shape != (m, k):
      raise ValueError(f"record {s.record.id!r}: top-k arrays {s.topk_ids.shape} / "
                       f"{s.topk_logprobs.shape}, expected ({m}, {k}) (loss tokens x k)")
  return {
      "ids": np.array([s.record.id for s in scored], dtype=str),
      "records_json": np.frombuffer(b"".join(lines), np.uint8),
      "record_offsets": np.cumsum([0] + [len(x) for x in lines], dtype=np.int64),
      "tokens": np.concatenate([t.ids for t in tokens]).astype(np.int32),
      "token_offsets": np.cumsum([0] + [len(t.ids) for t in tokens], dtype=np.int64),
      "loss_mask": np.concatenate([t.loss_mask for t in tokens]).astype(np.uint8),
      "topk_ids": np.concatenate([s.topk_ids for s in scored]).astype(np.int32).reshape(-1, k),
      "topk_logprobs": np.concatenate([s.topk_logprobs for s in scored]).astype(
          np.float32).reshape(-1, k)}


class StoreWriter:
  """Appends shards to a store; reopening an existing store resumes it (same header required).

    writer = StoreWriter(dir, k=20, teacher="...", tokenizer=tok, render={"mode": "raw"})
    todo = [r for r in records if r.id not in writer.done_ids]
    writer.write_shard(scored_records)
    writer.finish(complete=True)
  """

  def __init__(self, store_dir: str | os.PathLike, *, k: int, teacher: str, tokenizer: Any,
               render: dict, read_only: bool = False):
    """`read_only`: only read what is stored (the other hosts of a multi-host job, once the
    writing host has opened the store); `write_shard` then only records the ids."""
    self.dir, self.read_only = Path(store_dir), read_only
    header = {"format": FORMAT, "k": int(k), "teacher": teacher,
              "tokenizer": tokenizer_identity(tokenizer), "render": dict(render)}
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
    for path, arrays in iter_shards(self.dir, self.index, names=("ids",)):
      self.done_ids.update(str(x) for x in arrays["ids"])

  @property
  def k(self) -> int:
    return int(self.index["k"])

  def _remove_orphans(self) -> None:
    listed = {s["file"] for s in self.index["shards"]}
    for path in self.dir.iterdir():
      orphan = path.name.startswith("shard-") and path.suffix == ".npz" and path.name not in listed
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
    arrays = _shard_arrays(scored, self.k)
    data = _npz_bytes(arrays)
    name = f"shard-{len(self.index['shards']):05d}.npz"
    with atomic.atomic_open(self.dir / name, "wb") as f:  # temp, fsync, rename, fsync dir
      f.write(data)
    entry = {"file": name, "records": len(scored), "tokens": int(len(arrays["tokens"])),
             "positions": int(len(arrays["topk_ids"])),
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


def iter_shards(store_dir: str | os.PathLike, index: dict | None = None,
                names: Sequence[str] = _ARRAYS) -> Iterator[tuple[Path, dict[str, np.ndarray]]]:
  """(path, {name: array}) per listed shard, content hash verified; StoreError naming the file."""
  store_dir = Path(store_dir)
  index = read_index(store_dir) if index is None else index
  for entry in index["shards"]:
    path = store_dir / entry["file"]
    if not path.is_file():
      raise StoreError(f"{path}: shard listed in {store_dir / INDEX} is missing; restore it or "
                       "rerun the store job into a new store_dir.")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
      raise StoreError(f"{path}: content does not match its sha256 in {store_dir / INDEX} "
                       "(corrupt or replaced shard).")
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in names}
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
      raise StoreError(f"{path}: unreadable shard ({type(e).__name__}: {e}).") from None
    if len(arrays["ids"]) != entry["records"]:
      raise StoreError(f"{path}: {len(arrays['ids'])} records, the index says {entry['records']}.")
    yield path, arrays


def _shard_records(path: Path, a: dict[str, np.ndarray], k: int, vocab: str
                   ) -> Iterator[ScoredRecord]:
  n = len(a["ids"])
  tok_off, rec_off = a["token_offsets"], a["record_offsets"]
  mask = a["loss_mask"].astype(np.int32)
  pos_off = np.concatenate([[0], np.cumsum(mask)])[tok_off] if len(tok_off) == n + 1 else None
  ok = (pos_off is not None and len(rec_off) == n + 1 and tok_off[-1] == len(a["tokens"])
        == len(mask) and rec_off[-1] == len(a["records_json"])
        and a["topk_ids"].shape == a["topk_logprobs"].shape == (int(mask.sum()), k))
  if not ok:
    raise StoreError(f"{path}: inconsistent arrays (offsets, token and top-k lengths, k={k}).")
  raw = a["records_json"].tobytes()
  for i in range(n):
    where = f"{path}: record {i} ({a['ids'][i]!r})"
    try:
      obj = json.loads(raw[rec_off[i]:rec_off[i + 1]].decode("utf-8"))
      t0, t1 = tok_off[i], tok_off[i + 1]
      tokens = make_tokens(a["tokens"][t0:t1], mask[t0:t1], vocab, str(path))
      record = dataclasses.replace(record_from_json(obj), tokens=tokens)
    except (BadRow, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise StoreError(f"{where}: {e}") from None
    if record.id != str(a["ids"][i]):
      raise StoreError(f"{where}: id {record.id!r} in its JSON differs from the ids array.")
    p0, p1 = pos_off[i], pos_off[i + 1]
    yield ScoredRecord(record, a["topk_ids"][p0:p1], a["topk_logprobs"][p0:p1])


def read_records(store_dir: str | os.PathLike) -> list[ScoredRecord]:
  """Every stored record with its full top-k, in shard order; unique ids checked."""
  index = read_index(store_dir)
  out, seen = [], {}
  for path, arrays in iter_shards(store_dir, index):
    for s in _shard_records(path, arrays, int(index["k"]), index["tokenizer"]["vocab"]):
      if s.record.id in seen:
        raise StoreError(f"{path}: record {s.record.id!r} is also in {seen[s.record.id]}.")
      seen[s.record.id] = path
      out.append(s)
  return out


def load(store_dir: str | os.PathLike, width: int) -> tuple[list[Record], packing.SoftTargets]:
  """(pre-tokenised records, SoftTargets of width K): the teacher's top-K at every response token.

  K <= the stored k. The SoftTargets key holds the store's identity, so a packed-data cache made
  from another store (or another version of this one) is not reused.
  """
  index = read_index(store_dir)
  k = int(index["k"])
  if not 1 <= int(width) <= k:
    raise StoreError(f"{Path(store_dir) / INDEX}: the store holds the top {k} per token; a soft "
                     f"width of {width} needs 1 <= width <= {k} (lower it, or rebuild the store "
                     f"with topk.k >= {width}).")
  if not index.get("complete"):
    log.warning("%s: the store job has not finished (complete=false); using the %d shards "
                "written so far.", store_dir, len(index["shards"]))
  scored = read_records(store_dir)
  if not scored:
    raise StoreError(f"{Path(store_dir) / INDEX}: the store holds no records.")
  width = int(width)
  table = {s.record.id: (s.record.tokens, s.topk_ids[:, :width].copy(),
                         np.exp(s.topk_logprobs[:, :width]).astype(np.float32)) for s in scored}

  def fn(record: Record, sequence: packing.TokenizedSequence):
    entry = table.get(record.id)
    if entry is None:  # not a record of this store (e.g. mixed in): no soft target
      return None
    tokens, ids_MxK, probs_MxK = entry
    if not np.array_equal(sequence.tokens, tokens.ids):
      raise StoreError(f"{tokens.source}: record {record.id!r}: the sequence being packed is not "
                       "the store's token ids (packing must take Record.tokens as they are).")
    at = tokens.loss_mask.astype(bool)
    soft_ids = np.zeros((len(tokens.ids), width), np.int32)
    soft_probs = np.zeros((len(tokens.ids), width), np.float32)
    soft_ids[at], soft_probs[at] = ids_MxK, probs_MxK
    return soft_ids, soft_probs

  log.info("top-k store %s: %d records, %d response tokens, width %d of k=%d (teacher %s)",
           store_dir, len(scored), sum(len(s.topk_ids) for s in scored), width, k,
           index["teacher"])
  return ([s.record for s in scored],
          packing.SoftTargets(width, fn, f"topk-store:{identity(store_dir)}"))
