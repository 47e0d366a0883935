"""Corpus readers: native JSONL records, the Mixtral teacher sample, any local HF dataset file.

Adapters (`read_corpus(path, format=...)`):
  records  native JSONL (records.py).
  mixtral  the teacher sample ../shared/teacher_corpus/mixtral_reviews_500.jsonl: keys `ID`, `Text`,
           `Overall`, `mixtral_response`. The prompt is rebuilt from `Text` with a prompts.py
           template matching the response style (aspect analyses start with "Opinion Target",
           everything else is a first-person rewrite of the review); the response is stripped.
  hf       any local JSON/JSONL/Parquet file read with `datasets.load_dataset("json"|"parquet")`,
           with configurable column names (`HFColumns`).
  auto     parquet/unknown keys -> hf; first line with id/prompt/response -> records; with
           ID/Text/mixtral_response -> mixtral.

Every reader validates row by row. A bad row raises `CorpusError` naming the file, the 1-based line
(or row) and the key; with `skip_bad_records=True` it is skipped and counted in `ReadStats.skipped`
(reason -> count) and logged, never included. `load_corpus(spec)` reads `spec.corpus` (and
`spec.val_corpus`) and returns the train/val records.
"""
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sentijax.data import prompts
from sentijax.data.records import (REQUIRED_KEYS, BadRow, CorpusError, Record, record_from_json,
                                   require_str, split_key, split_train_val)
from sentijax.data.spec import FORMATS, DataSpec, HFColumns

logger = logging.getLogger("sentijax")

_MIXTRAL_KEYS = ("ID", "Text", "mixtral_response")
_MAX_LOGGED_ERRORS = 5


@dataclasses.dataclass
class ReadStats:
  """What a reader saw: rows read, records kept, rows skipped per reason, first error messages."""
  path: str
  format: str
  rows: int = 0
  records: int = 0
  blank_lines: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  first_errors: list[str] = dataclasses.field(default_factory=list)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def to_dict(self) -> dict:
    return dataclasses.asdict(self) | {"num_skipped": self.num_skipped}


class _RowCollector:
  """Collects records, enforcing unique ids and the skip/raise policy for bad rows."""

  def __init__(self, stats: ReadStats, skip_bad_records: bool, unit: str):
    self.stats = stats
    self.skip_bad_records = skip_bad_records
    self.unit = unit
    self.records: list[Record] = []
    self.seen_ids: dict[str, int] = {}

  def bad(self, number: int, error: BadRow) -> None:
    message = f"{self.stats.path}, {self.unit} {number}: {error}"
    if not self.skip_bad_records:
      raise CorpusError(
          f"{message}. Fix the {self.unit} or set data.skip_bad_records=True to skip bad "
          f"{self.unit}s.")
    self.stats.skipped[error.reason] = self.stats.skipped.get(error.reason, 0) + 1
    if len(self.stats.first_errors) < _MAX_LOGGED_ERRORS:
      self.stats.first_errors.append(message)

  def add(self, number: int, record: Record) -> None:
    if record.id in self.seen_ids:
      self.bad(number, BadRow(
          "duplicate_id", f"key 'id': duplicate id {record.id!r} (first seen at "
          f"{self.unit} {self.seen_ids[record.id]})"))
      return
    self.seen_ids[record.id] = number
    self.records.append(record)

  def finish(self) -> tuple[list[Record], ReadStats]:
    self.stats.records = len(self.records)
    if self.stats.num_skipped:
      logger.warning("%s: skipped %d bad %ss %s; first: %s", self.stats.path,
                     self.stats.num_skipped, self.unit, self.stats.skipped,
                     self.stats.first_errors[:3])
    return self.records, self.stats


def _iter_json_lines(path: Path, stats: ReadStats, collector: _RowCollector
                    ) -> Iterator[tuple[int, Any]]:
  """(1-based line number, parsed JSON) per non-blank line; malformed lines go to the collector."""
  with open(path, "r", encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        stats.blank_lines += 1
        continue
      stats.rows += 1
      try:
        yield number, json.loads(line)
      except json.JSONDecodeError as e:
        collector.bad(number, BadRow("malformed_json", f"malformed JSON ({e.msg} at column "
                                     f"{e.colno})"))


def _check_file(path: str | os.PathLike) -> Path:
  path = Path(path)
  if not path.is_file():
    raise CorpusError(f"Corpus file not found: {path}")
  return path


def read_records(path: str | os.PathLike, skip_bad_records: bool = False
                ) -> tuple[list[Record], ReadStats]:
  """Reads a native records JSONL file."""
  path = _check_file(path)
  stats = ReadStats(path=str(path), format="records")
  collector = _RowCollector(stats, skip_bad_records, "line")
  for number, obj in _iter_json_lines(path, stats, collector):
    try:
      record = record_from_json(obj)
    except BadRow as e:
      collector.bad(number, e)
      continue
    collector.add(number, record)
  return collector.finish()


def _mixtral_template(response: str) -> str:
  """Aspect analyses in the Mixtral sample start with 'Opinion Target'; the rest are rewrites."""
  return prompts.ASPECTS if "Opinion Target" in response[:200] else prompts.REWRITE


def read_mixtral(path: str | os.PathLike, skip_bad_records: bool = False
                ) -> tuple[list[Record], ReadStats]:
  """Reads the Mixtral teacher sample (keys ID, Text, Overall, mixtral_response).

  Record ids are `str(ID)`; a repeated ID with a different response (the same review analysed
  twice) gets `ID#2`, `ID#3`, ...; `meta["source_id"]` keeps the ID so the train/val split keeps
  both on the same side. A repeated ID with an identical response is a duplicate.
  """
  path = _check_file(path)
  stats = ReadStats(path=str(path), format="mixtral")
  collector = _RowCollector(stats, skip_bad_records, "line")
  responses_by_source: dict[str, list[str]] = {}
  for number, obj in _iter_json_lines(path, stats, collector):
    try:
      if not isinstance(obj, dict):
        raise BadRow("wrong_type", f"line must be a JSON object, got {type(obj).__name__}")
      if "ID" not in obj:
        raise BadRow("missing_key", f"missing key 'ID' (present keys: {sorted(obj)})")
      source_id = obj["ID"]
      if isinstance(source_id, bool) or not isinstance(source_id, (int, str)):
        raise BadRow("wrong_type", f"key 'ID' must be an int or string, got "
                     f"{type(source_id).__name__}")
      text = require_str(obj, "Text")
      response = require_str(obj, "mixtral_response").strip()
      overall = obj.get("Overall")
      if overall is not None and (isinstance(overall, bool)
                                  or not isinstance(overall, (int, float))):
        raise BadRow("wrong_type", f"key 'Overall' must be a number, got "
                     f"{type(overall).__name__}")
    except BadRow as e:
      collector.bad(number, e)
      continue
    source_key = str(source_id)
    earlier = responses_by_source.setdefault(source_key, [])
    if response in earlier:
      collector.bad(number, BadRow("duplicate_id", f"key 'ID': duplicate record for ID "
                                   f"{source_key} with an identical mixtral_response"))
      continue
    earlier.append(response)
    record_id = source_key if len(earlier) == 1 else f"{source_key}#{len(earlier)}"
    template = _mixtral_template(response)
    meta = {"source": "mixtral_reviews", "source_id": source_key, "overall": overall,
            "perspective": template, "text": text}
    collector.add(number, Record(id=record_id, prompt=prompts.knowdist_prompt(text, template),
                                 response=response, meta=meta))
  return collector.finish()


def _json_scalar(value: Any) -> bool:
  return value is None or isinstance(value, (str, int, float, bool))


def read_hf(path: str | os.PathLike, columns: HFColumns = HFColumns(),
            skip_bad_records: bool = False) -> tuple[list[Record], ReadStats]:
  """Reads a local JSON/JSONL/Parquet file with `datasets.load_dataset` (works offline)."""
  import datasets  # pylint: disable=import-outside-toplevel  (slow import)
  path = _check_file(path)
  builder = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "json"
  try:
    table = datasets.load_dataset(builder, data_files=str(path), split="train")
  except Exception as e:  # datasets raises many types for unreadable files
    raise CorpusError(f"{path}: datasets.load_dataset({builder!r}) failed: {e}") from e
  names = set(table.column_names)
  use_prompt = columns.prompt in names
  missing = [c for c in (columns.response,) if c not in names]
  if not use_prompt and not (columns.text and columns.text in names):
    missing.append(columns.prompt if not columns.text else f"{columns.prompt} or {columns.text}")
  if missing:
    raise CorpusError(
        f"{path}: missing column(s) {missing}; available columns: {sorted(names)}. Set the column "
        "names (data.prompt_column / data.response_column / data.text_column / data.id_column).")
  has_id = columns.id in names
  used = {columns.id, columns.prompt, columns.response, columns.text}
  stats = ReadStats(path=str(path), format="hf")
  collector = _RowCollector(stats, skip_bad_records, "row")
  for number, row in enumerate(table, start=1):
    stats.rows += 1
    try:
      response = require_str(row, columns.response)
      if use_prompt:
        prompt = require_str(row, columns.prompt)
      else:
        text = require_str(row, columns.text)
      if has_id:
        raw_id = row[columns.id]
        if raw_id is None or isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
          raise BadRow("wrong_type", f"key {columns.id!r} must be a string or int, got "
                       f"{type(raw_id).__name__}")
        record_id = str(raw_id)
        if not record_id.strip():
          raise BadRow("empty_value", f"key {columns.id!r} is empty")
      else:
        source = prompt if use_prompt else text
        record_id = hashlib.sha256(f"{source}\x00{response}".encode()).hexdigest()[:16]
      meta = {k: v for k, v in row.items() if k not in used and _json_scalar(v)}
      if not use_prompt:
        perspective = prompts.perspective_for(record_id, columns.prompt_seed)
        prompt = prompts.knowdist_prompt(text, perspective)
        meta |= {"perspective": perspective, "text": text}
    except BadRow as e:
      collector.bad(number, e)
      continue
    collector.add(number, Record(id=record_id, prompt=prompt, response=response, meta=meta))
  return collector.finish()


def detect_format(path: str | os.PathLike) -> str:
  """'records', 'mixtral' or 'hf' from the extension and the first non-blank line's keys."""
  path = _check_file(path)
  if path.suffix.lower() in (".parquet", ".pq"):
    return "hf"
  with open(path, "r", encoding="utf-8") as f:
    first = next((line for line in f if line.strip()), None)
  if first is None:
    raise CorpusError(f"{path}: the corpus file is empty.")
  try:
    obj = json.loads(first)
  except json.JSONDecodeError:
    return "hf"  # e.g. a pretty-printed JSON array; datasets can read it
  if isinstance(obj, dict):
    if all(k in obj for k in REQUIRED_KEYS):
      return "records"
    if all(k in obj for k in _MIXTRAL_KEYS):
      return "mixtral"
  return "hf"


def read_corpus(path: str | os.PathLike, format: str = "auto",  # pylint: disable=redefined-builtin
                skip_bad_records: bool = False, columns: HFColumns = HFColumns()
                ) -> tuple[list[Record], ReadStats]:
  """Reads any supported corpus file; see the module docstring for formats."""
  if format not in FORMATS:
    raise CorpusError(f"Unknown corpus format {format!r}; expected one of {FORMATS}.")
  if format == "auto":
    format = detect_format(path)
  if format == "records":
    return read_records(path, skip_bad_records)
  if format == "mixtral":
    return read_mixtral(path, skip_bad_records)
  return read_hf(path, columns, skip_bad_records)


def load_corpus(spec: DataSpec) -> tuple[list[Record], list[Record], dict]:
  """(train_records, val_records, stats) for `spec.corpus` (the packaged demo corpus when "").

  Val is `spec.val_corpus` when set (train records with an id or source_id also in val are
  dropped and counted), else a hash-of-id split with `spec.val_fraction`. `stats` is
  JSON-serialisable.
  """
  corpus = spec.corpus_path
  records, read_stats = read_corpus(corpus, spec.format, spec.skip_bad_records, spec.columns)
  stats: dict[str, Any] = {"corpus": read_stats.to_dict()}
  if spec.val_corpus:
    val, val_stats = read_corpus(spec.val_corpus, spec.format, spec.skip_bad_records,
                                 spec.columns)
    val_keys = {r.id for r in val} | {split_key(r) for r in val}
    train = [r for r in records if r.id not in val_keys and split_key(r) not in val_keys]
    stats |= {"val_source": "val_corpus", "val_corpus": val_stats.to_dict(),
              "dropped_overlapping_val": len(records) - len(train)}
    if len(records) != len(train):
      logger.warning("Dropped %d train records whose id also appears in %s.",
                     len(records) - len(train), spec.val_corpus)
  else:
    train, val = split_train_val(records, spec.val_fraction)
    stats |= {"val_source": "hash_split"}
  if not train:
    raise CorpusError(f"{corpus}: no usable training records.")
  stats |= {"num_train": len(train), "num_val": len(val)}
  logger.info("Corpus %s: %d train / %d val records.", corpus, len(train), len(val))
  return train, val, stats
