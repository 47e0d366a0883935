"""Writing a top-k store (format: topk_format.py): shards appended atomically, a resumable writer.

Writes are atomic shard by shard (temp file, fsync, rename, then index.json replaced); a shard the
index does not list (a kill between the two) is removed by the next writer. A shard's bytes depend
only on its content, so the same records give the same store identity.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sentijax import atomic
from sentijax.data import topk_codec, topk_context, topk_entries
from sentijax.data.topk_format import (APPENDABLE, FORMAT, HEADER_KEYS, INDEX, MODES,
                                       TOKENIZER_DIR, VERSION, ScoredRecord, StoreError,
                                       convert_hint, encoding, iter_shards, quantiser,
                                       read_index, tokenizer_identity)
from sentijax.data.writers import write_json_atomic

log = logging.getLogger("sentijax")

ID_ARRAYS = ("tokens", "rank_table", "sample_ids")  # bit-packed at the store's id width


def _entry_arrays(scored: Sequence[ScoredRecord], index: dict) -> dict[str, np.ndarray]:
  """The mode's per-position arrays of a shard, shapes checked."""
  mode, k = index["mode"], int(index["k"])
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
  tails = np.concatenate([topk_codec.log_tail(s.logprobs) if s.log_tail is None else s.log_tail
                          for s in scored])
  id_space = 1 << int(index["encoding"]["id_bits"])
  if index["version"] == 3:  # a version-3 store being resumed
    return topk_entries.encode(ids, lp, tails, quantiser(index), id_space)
  cur, tgt = topk_context.context_tokens(
      np.concatenate([s.record.tokens.ids for s in scored]),
      np.concatenate([s.record.tokens.loss_mask for s in scored]))
  return topk_context.encode(ids, lp, tails, cur, tgt, quantiser(index), id_space)


def record_arrays(scored: Sequence[ScoredRecord]) -> dict[str, np.ndarray]:
  """The records' arrays of a shard (ids, JSON lines, token ids, loss mask)."""
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
  }


def shard_arrays(scored: Sequence[ScoredRecord], index: dict) -> dict[str, np.ndarray]:
  """Every array of a shard of `scored` (records, then the mode's entries)."""
  return record_arrays(scored) | _entry_arrays(scored, index)


def _shard_ids(store_dir: Path, index: dict) -> set[str]:
  return {str(x) for _, a in iter_shards(store_dir, index, ("ids",)) for x in a["ids"]}


class StoreWriter:
  """Appends shards to a store; reopening an existing store resumes it (same header required).

    writer = StoreWriter(dir, k=20, teacher="...", tokenizer=tok, render={"mode": "raw"})
    todo = [r for r in records if r.id not in writer.done_ids]
    writer.write_shard(scored_records)
    writer.finish(complete=True)

  `mode="sample"`: k = draws per position, `temperature` the one they come from. `vocab_size`:
  ids are stored in the narrowest width holding it (default the tokenizer's length; a teacher
  with more embedding rows passes its own). `read_only`: only read what is stored (the other
  hosts of a multi-host job, once the writing host has opened the store); `write_shard` then only
  records the ids. A subclass may set `encoding_overrides` (e.g. {"codec": "none"}).
  """
  encoding_overrides: dict = {}

  def __init__(self, store_dir: str | os.PathLike, *, k: int, teacher: str, tokenizer: Any,
               render: dict, mode: str = "topk", temperature: float = 1.0,
               vocab_size: int = 0, read_only: bool = False):
    if mode not in MODES:
      raise ValueError(f"store mode {mode!r}: expected one of {MODES}")
    self.dir, self.read_only = Path(store_dir), read_only
    if read_only:
      self.index = read_index(self.dir)
      self.done_ids = _shard_ids(self.dir, self.index)
      return
    header = {"format": FORMAT, "version": VERSION, "mode": mode, "k": int(k),
              "temperature": float(temperature) if mode == "sample" else 1.0,
              "teacher": teacher, "tokenizer": tokenizer_identity(tokenizer),
              "render": dict(render),
              "encoding": encoding(k, max(int(vocab_size), len(tokenizer)))
                          | dict(self.encoding_overrides)}
    self.dir.mkdir(parents=True, exist_ok=True)
    if (self.dir / INDEX).is_file():
      self.index = read_index(self.dir)
      header["version"] = self.index["version"]  # a version-3 store is resumed as version 3
      if self.index["version"] not in APPENDABLE:
        raise StoreError(f"{self.dir / INDEX}: a version-{self.index['version']} store; this "
                         f"sentijax appends to versions {APPENDABLE}: {convert_hint(self.dir)}.")
      header["tokenizer"]["name"] = self.index["tokenizer"].get("name", "")  # vocab decides
      changed = [key for key in HEADER_KEYS if self.index[key] != header[key]]
      if "k" in changed and "encoding" in changed:
        changed.remove("encoding")  # its tail step follows k
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
    self.done_ids = _shard_ids(self.dir, self.index)

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
    arrays = shard_arrays(scored, self.index)
    data = topk_codec.encode_shard(arrays, enc["codec"], {
        name: enc["id_bits"] for name in ID_ARRAYS if name in arrays} | {"loss_mask": 1},
        stored=("range_code",))  # v4's range code: lzma would only spend time on it
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
