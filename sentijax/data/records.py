"""Corpus records: the `Record` type, row validation, fingerprint and the train/val split.

Native record format, one JSON object per line (JSONL):

  {"id": str, "prompt": str, "response": str,   # required; prompt/response non-empty
   "meta": {...},                               # optional JSON object (perspective, source, ...)
   "messages": [{"role": str, "content": str}, ...] | null}   # optional chat-form prompt

`messages`, when set, is the prompt as a conversation (e.g. system + user turns); with
`data.chat_template=True` packing renders it instead of `prompt`, and `response` is always the
assistant turn that carries the loss. Other top-level keys are ignored.

Pre-tokenised records (e.g. from the offline top-k store, sentijax/data/topk_store.py) also carry
`"token_ids": [int, ...]`, `"loss_mask": [0|1, ...]` (same length, 1 on the tokens that carry the
loss, never on the first) and optionally `"vocab"` (`tokenizer.vocab_fingerprint` of the
tokenizer that made the ids). Packing then takes these ids as they are instead of tokenising
prompt and response (`Record.tokens`); prompt and response stay for reading and the val split.

Readers (readers.py) and writers (writers.py) validate with the functions here; a bad row is a
`BadRow` (reason + message naming the key) that the reader turns into a `CorpusError` naming the
file and line.
"""
import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

REQUIRED_KEYS = ("id", "prompt", "response")


def demo_corpus_path() -> Path:
  """The small demo corpus shipped inside the package (used when `data.corpus == ""`)."""
  return Path(__file__).resolve().parent.parent / "assets" / "demo_corpus.jsonl"


class CorpusError(ValueError):
  """A corpus file or record is invalid; the message names file, line/row and key."""


class DataError(ValueError):
  """The data cannot be turned into training batches (all records dropped, bad options, ...)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Tokens:
  """A record's token ids as packing must use them (not re-tokenised).

  ids int32 [n], loss_mask int32 [n] (1 on loss tokens, 0 on tokens[0]); `vocab`: the
  vocabulary fingerprint of the tokenizer that made them ("" = not recorded, not checked);
  `source`: where they come from (a store file), for error messages.
  """
  ids: np.ndarray
  loss_mask: np.ndarray
  vocab: str = ""
  source: str = ""

  def __eq__(self, other) -> bool:
    return (isinstance(other, Tokens) and self.vocab == other.vocab
            and np.array_equal(self.ids, other.ids)
            and np.array_equal(self.loss_mask, other.loss_mask))

  __hash__ = None  # mutable arrays inside


def make_tokens(ids: Any, loss_mask: Any, vocab: str = "", source: str = "") -> Tokens:
  """Checked `Tokens`; raises BadRow naming the key (token_ids / loss_mask)."""
  try:
    ids_n = np.asarray(ids)
    mask_n = np.asarray(loss_mask)
  except (TypeError, ValueError):
    raise BadRow("wrong_type", "keys 'token_ids' and 'loss_mask' must be lists of ints") from None
  for key, arr in (("token_ids", ids_n), ("loss_mask", mask_n)):
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
      raise BadRow("wrong_type", f"key {key!r} must be a flat list of ints")
  if len(ids_n) < 2 or len(ids_n) != len(mask_n):
    raise BadRow("wrong_type", f"keys 'token_ids' ({len(ids_n)}) and 'loss_mask' "
                 f"({len(mask_n)}) must have the same length >= 2")
  if (ids_n < 0).any() or ids_n.max() > np.iinfo(np.int32).max:
    raise BadRow("wrong_type", "key 'token_ids' must hold ids in [0, 2^31)")
  if not np.isin(mask_n, (0, 1)).all() or mask_n[0] != 0 or not mask_n.any():
    raise BadRow("wrong_type", "key 'loss_mask' must be 0/1 with at least one 1 and a 0 first "
                 "(no position predicts the first token)")
  if not isinstance(vocab, str):
    raise BadRow("wrong_type", "key 'vocab' must be a string")
  return Tokens(ids_n.astype(np.int32), mask_n.astype(np.int32), vocab, source)


@dataclasses.dataclass(frozen=True)
class Record:
  """One training example: a prompt and the answer that carries the loss (and, pre-tokenised,
  the token ids packing takes as they are)."""
  id: str
  prompt: str
  response: str
  meta: dict = dataclasses.field(default_factory=dict)
  messages: list | None = None
  tokens: Tokens | None = None

  def to_json(self, with_tokens: bool = True) -> dict:
    """The native JSON object (`messages` omitted when None, token ids when absent)."""
    obj = {"id": self.id, "prompt": self.prompt, "response": self.response, "meta": self.meta}
    if self.messages is not None:
      obj["messages"] = self.messages
    if with_tokens and self.tokens is not None:
      obj["token_ids"] = self.tokens.ids.tolist()
      obj["loss_mask"] = self.tokens.loss_mask.tolist()
      if self.tokens.vocab:
        obj["vocab"] = self.tokens.vocab
    return obj

  def to_line(self) -> str:
    """One JSONL line including the trailing newline."""
    return json.dumps(self.to_json(), ensure_ascii=False, sort_keys=False) + "\n"


class BadRow(Exception):
  """One row failed validation; `reason` is a ReadStats.skipped key, the message names the key."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def require_str(obj: Mapping, key: str, allow_empty: bool = False) -> str:
  """obj[key] as a (non-empty) string, else BadRow naming the key."""
  if key not in obj:
    raise BadRow("missing_key", f"missing key {key!r} (present keys: {sorted(obj)})")
  value = obj[key]
  if not isinstance(value, str):
    raise BadRow("wrong_type", f"key {key!r} must be a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise BadRow("empty_value", f"key {key!r} is empty")
  return value


def _validate_messages(messages: Any) -> list | None:
  if messages is None:
    return None
  if not isinstance(messages, list) or not messages:
    raise BadRow("wrong_type", "key 'messages' must be a non-empty list of {role, content} "
                 f"objects or null, got {type(messages).__name__}")
  for i, message in enumerate(messages):
    if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
        or not isinstance(message.get("content"), str)):
      raise BadRow("wrong_type", f"key 'messages' item {i} must be an object with string "
                   "'role' and 'content'")
  return messages


def record_from_json(obj: Any) -> Record:
  """A Record from a parsed native JSON object; raises BadRow naming the offending key."""
  if not isinstance(obj, dict):
    raise BadRow("wrong_type", f"line must be a JSON object, got {type(obj).__name__}")
  record_id = require_str(obj, "id")
  prompt = require_str(obj, "prompt")
  response = require_str(obj, "response")
  meta = obj.get("meta", {})
  if meta is None:
    meta = {}
  if not isinstance(meta, dict):
    raise BadRow("wrong_type", f"key 'meta' must be a JSON object, got {type(meta).__name__}")
  messages = _validate_messages(obj.get("messages"))
  tokens = None
  if "token_ids" in obj or "loss_mask" in obj:
    if "token_ids" not in obj or "loss_mask" not in obj:
      raise BadRow("missing_key", "pre-tokenised records need both 'token_ids' and 'loss_mask'")
    tokens = make_tokens(obj["token_ids"], obj["loss_mask"], obj.get("vocab", ""))
  return Record(id=record_id, prompt=prompt, response=response, meta=meta, messages=messages,
                tokens=tokens)


def validate_record(record: Record | Mapping) -> Record:
  """A `Record` from a Record or a native dict; raises CorpusError (naming the key) if invalid."""
  obj = record.to_json(with_tokens=False) if isinstance(record, Record) else record
  try:
    checked = record_from_json(obj)
    if isinstance(record, Record) and record.tokens is not None:
      t = record.tokens
      checked = dataclasses.replace(checked, tokens=make_tokens(t.ids, t.loss_mask, t.vocab,
                                                                t.source))
    return checked
  except BadRow as e:
    record_id = obj.get("id") if isinstance(obj, Mapping) else None
    raise CorpusError(f"Invalid record (id={record_id!r}): {e}") from None


def corpus_fingerprint(records: Iterable[Record]) -> str:
  """sha256 of the records' canonical JSON and token ids, in order (cache key for tokenised
  data)."""
  digest = hashlib.sha256()
  for record in records:
    digest.update(json.dumps(record.to_json(with_tokens=False), sort_keys=True,
                             ensure_ascii=False).encode())
    if record.tokens is not None:
      t = record.tokens
      digest.update(b"\x00tokens" + t.vocab.encode() + t.ids.astype("<i4").tobytes()
                    + t.loss_mask.astype("<i4").tobytes())
    digest.update(b"\n")
  return digest.hexdigest()


def split_key(record: Record) -> str:
  """What keeps records together in the train/val split: meta['source_id'], else the id."""
  return str(record.meta.get("source_id", record.id))


def _unit_hash(key: str) -> float:
  digest = hashlib.sha256(f"val-split:{key}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_train_val(records: list[Record], val_fraction: float
                   ) -> tuple[list[Record], list[Record]]:
  """Deterministic hash-of-id split (records sharing meta['source_id'] stay together).

  Independent of record order and of other records, so a grown corpus keeps old assignments.
  With val_fraction > 0 at least one group goes to val.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise CorpusError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
  if val_fraction == 0.0 or not records:
    return list(records), []
  hashes = {key: _unit_hash(key) for key in {split_key(r) for r in records}}
  val_keys = {key for key, u in hashes.items() if u < val_fraction}
  if not val_keys:
    val_keys = {min(hashes, key=hashes.get)}
  train = [r for r in records if split_key(r) not in val_keys]
  val = [r for r in records if split_key(r) in val_keys]
  if not train:
    raise CorpusError(f"Corpus too small to split: all {len(records)} records fell into val "
                      f"(val_fraction={val_fraction}).")
  return train, val
