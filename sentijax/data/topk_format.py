"""The top-k store's format: constants, index.json (read and checked), the header's encoding
settings, the tokenizer a store was made with, the store's identity and its errors.

index.json: {"format": "sentijax-topk", "version": 3, "mode": "topk" | "sample", "k",
  "temperature" (sample: the temperature the draws come from; topk: 1), "teacher",
  "tokenizer": {"name", "vocab", "size"}, "render": {"mode"},
  "encoding": {"id_bits", "codec", "logprob_step", "head_nats", "level_step"},
  "shards": [{"file", "records", "tokens", "positions", "bytes", "sha256"}], "complete": bool}
Version 4 codes top-k entries as topk_context.py describes (version 3's quantisation, each list
range-coded against the lists of earlier positions with the same tokens); version 3
(topk_entries.py) and version 2 (rank-ordered bit-packed ids, 8-bit log-prob codes:
topk_codec.py) are still read, and converted by `python -m sentijax.data.topk_store convert OLD
NEW`; version 1 ("sentijax-topk-v1") only converted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sentijax.data import topk_codec, topk_context, topk_entries
from sentijax.data.records import DataError, Record
from sentijax.data.tokenizer import vocab_fingerprint

FORMAT = "sentijax-topk"
VERSION = 4
READABLE = (2, 3, 4)
APPENDABLE = (3, 4)  # a writer resumes a store in its own version
FORMAT_V1 = "sentijax-topk-v1"
MODES = ("topk", "sample")
INDEX = "index.json"
TOKENIZER_DIR = "tokenizer"
LOGPROB_STEP = 0.125  # nats, head log-probs relative to the top-1 (error <= step / 2)
HEAD_NATS = 3.0  # entries within this of the top-1 keep their order and log-prob codes
LEVEL_SCALE = 0.08  # tail step on sqrt(p / p_1) = LEVEL_SCALE / sqrt(k): KL ~ 7e-4 nats/position
CODEC = "lzma"  # bench_store.py: smallest of lzma / zlib / zstd on real top-k lists
HEADER_KEYS = ("format", "version", "mode", "k", "temperature", "teacher", "tokenizer",
               "render", "encoding")
RECORD_ARRAYS = ("ids", "records_json", "record_offsets", "tokens", "token_offsets",
                 "loss_mask")
SAMPLE_ARRAYS = ("sample_ids", "sample_counts", "sample_logprobs")
V2_TOPK_ARRAYS = ("topk_ids", "logprob_deltas", "log_tail")


class StoreError(DataError):
  """A store is missing, incomplete, corrupt or does not fit the request; names the file."""


@dataclasses.dataclass
class ScoredRecord:
  """One record (with `tokens`) and the teacher's entries at its m loss tokens, in order.

  topk: `ids` descending by probability, `logprobs` their log-probabilities at T = 1 (-inf = no
  entry, after the listed ones), `log_tail` log of the mass outside them (None: 1 - sum, computed
  on writing). Read back (versions 3, 4), the head keeps this order; tail entries come by level
  (equal probabilities), then by frequency rank (version 3) or id (version 4).
  sample: `ids` the distinct drawn ids (padding 0), `counts` their draw counts (0 = padding),
  `logprobs` the teacher's log-probabilities of them at the store's temperature.
  """
  record: Record
  ids: np.ndarray  # int [m, k]
  logprobs: np.ndarray  # float [m, k]
  log_tail: np.ndarray | None = None  # float [m] (topk)
  counts: np.ndarray | None = None  # int [m, k] (sample)


def mode_arrays(index: dict) -> tuple[str, ...]:
  """The arrays a shard's per-position entries decode from, for this store's mode and version
  (version 4: with the token ids its contexts come from)."""
  if index["mode"] == "sample":
    return SAMPLE_ARRAYS
  return {2: V2_TOPK_ARRAYS, 3: topk_entries.ARRAYS}.get(
      index["version"], topk_context.ARRAYS + ("tokens", "loss_mask"))


def encoding(k: int, vocab_size: int, codec: str = CODEC, level_scale: float = LEVEL_SCALE
             ) -> dict:
  """The "encoding" header of a new store (`level_scale`: the tail step times sqrt(k))."""
  return {"id_bits": topk_codec.id_bits(vocab_size), "codec": codec,
          "logprob_step": LOGPROB_STEP, "head_nats": HEAD_NATS,
          "level_step": round(level_scale / math.sqrt(max(int(k), 1)), 6)}


def quantiser(index: dict) -> topk_entries.Quantiser:
  e = index["encoding"]
  return topk_entries.Quantiser(float(e["logprob_step"]), float(e["head_nats"]),
                                float(e["level_step"]))


def tokenizer_identity(tokenizer: Any) -> dict:
  """{"name", "vocab", "size"}: what a store records of the tokenizer that made its ids."""
  return {"name": str(getattr(tokenizer, "name_or_path", "") or ""),
          "vocab": vocab_fingerprint(tokenizer), "size": len(tokenizer)}


def convert_hint(store_dir) -> str:
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
                     f"versions {READABLE}: {convert_hint(store_dir)}.")
  if found != FORMAT or index.get("version") not in READABLE:
    raise StoreError(f"{path}: format {found!r} version {index.get('version')!r}, expected "
                     f"{FORMAT!r} version {' or '.join(map(str, READABLE))} (written by another "
                     "sentijax?).")
  missing = [k for k in HEADER_KEYS + ("shards",) if k not in index]
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
  blob = {k: index[k] for k in HEADER_KEYS} | {"shards": index["shards"]}
  return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def header(store_dir: str | os.PathLike) -> dict:
  """The store's settings (mode, k, temperature, encoding, ...) without its shard list."""
  index = read_index(store_dir)
  return {k: index[k] for k in HEADER_KEYS}


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
  names = tuple(dict.fromkeys(names or RECORD_ARRAYS + mode_arrays(index)))
  for entry in index["shards"]:
    yield Path(store_dir) / entry["file"], read_shard(store_dir, entry, names)
