"""KnowDist corpus records: validated reading, atomic and resumable writing, train/val split.

Native record format, one JSON object per line (JSONL):

  {"id": str, "prompt": str, "response": str,   # required; prompt/response non-empty
   "meta": {...},                               # optional JSON object (perspective, source, ...)
   "messages": [{"role": str, "content": str}, ...] | null}   # optional chat-form prompt

`messages`, when set, is the prompt as a conversation (e.g. system + user turns); with
`data.chat_template=True` the pipeline renders it instead of `prompt`, and `response` is always the
assistant turn that carries the loss. Other top-level keys are ignored.

Adapters (`read_corpus(path, format=...)`):
  records  native JSONL (above).
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
(reason -> count) and logged, never included.
"""
import dataclasses
import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sentijax.data import prompts

logger = logging.getLogger(__name__)

FORMATS = ("auto", "records", "mixtral", "hf")
REQUIRED_KEYS = ("id", "prompt", "response")
_MIXTRAL_KEYS = ("ID", "Text", "mixtral_response")
_MAX_LOGGED_ERRORS = 5


def demo_corpus_path() -> Path:
  """The small demo corpus shipped inside the package (used when `data.corpus == ""`)."""
  return Path(__file__).resolve().parent.parent / "assets" / "demo_corpus.jsonl"


class CorpusError(ValueError):
  """A corpus file or record is invalid; the message names file, line/row and key."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One KnowDist example: a prompt and the teacher's response."""
  id: str
  prompt: str
  response: str
  meta: dict = dataclasses.field(default_factory=dict)
  messages: list | None = None

  def to_json(self) -> dict:
    """The native JSON object (`messages` omitted when None)."""
    obj = {"id": self.id, "prompt": self.prompt, "response": self.response, "meta": self.meta}
    if self.messages is not None:
      obj["messages"] = self.messages
    return obj

  def to_line(self) -> str:
    """One JSONL line including the trailing newline."""
    return json.dumps(self.to_json(), ensure_ascii=False, sort_keys=False) + "\n"


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


@dataclasses.dataclass(frozen=True)
class HFColumns:
  """Column names for the `hf` adapter.

  `prompt` is used when the dataset has that column; otherwise `text` (if set) is turned into a
  KnowDist prompt with `prompts.perspective_for(id, prompt_seed)`. Without an `id` column the id is
  a hash of prompt and response. Remaining scalar columns go into `meta`.
  """
  id: str = "id"
  prompt: str = "prompt"
  response: str = "response"
  text: str = ""
  prompt_seed: int = 0


class _BadRow(Exception):
  """Internal: one row failed validation (reason is a ReadStats.skipped key)."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


# --------------------------------------------------------------------------- validation


def _require_str(obj: Mapping, key: str, allow_empty: bool = False) -> str:
  if key not in obj:
    raise _BadRow("missing_key", f"missing key {key!r} (present keys: {sorted(obj)})")
  value = obj[key]
  if not isinstance(value, str):
    raise _BadRow("wrong_type", f"key {key!r} must be a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise _BadRow("empty_value", f"key {key!r} is empty")
  return value


def _validate_messages(messages: Any) -> list | None:
  if messages is None:
    return None
  if not isinstance(messages, list) or not messages:
    raise _BadRow("wrong_type", "key 'messages' must be a non-empty list of {role, content} "
                  f"objects or null, got {type(messages).__name__}")
  for i, message in enumerate(messages):
    if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
        or not isinstance(message.get("content"), str)):
      raise _BadRow("wrong_type", f"key 'messages' item {i} must be an object with string "
                    "'role' and 'content'")
  return messages


def _record_from_native(obj: Any) -> Record:
  if not isinstance(obj, dict):
    raise _BadRow("wrong_type", f"line must be a JSON object, got {type(obj).__name__}")
  record_id = _require_str(obj, "id")
  prompt = _require_str(obj, "prompt")
  response = _require_str(obj, "response")
  meta = obj.get("meta", {})
  if meta is None:
    meta = {}
  if not isinstance(meta, dict):
    raise _BadRow("wrong_type", f"key 'meta' must be a JSON object, got {type(meta).__name__}")
  messages = _validate_messages(obj.get("messages"))
  return Record(id=record_id, prompt=prompt, response=response, meta=meta, messages=messages)


def validate_record(record: Record | Mapping) -> Record:
  """A `Record` from a Record or a native dict; raises CorpusError (naming the key) if invalid."""
  obj = record.to_json() if isinstance(record, Record) else record
  try:
    return _record_from_native(obj)
  except _BadRow as e:
    record_id = obj.get("id") if isinstance(obj, Mapping) else None
    raise CorpusError(f"Invalid record (id={record_id!r}): {e}") from None


# --------------------------------------------------------------------------- readers


class _RowCollector:
  """Collects records, enforcing unique ids and the skip/raise policy for bad rows."""

  def __init__(self, stats: ReadStats, skip_bad_records: bool, unit: str):
    self.stats = stats
    self.skip_bad_records = skip_bad_records
    self.unit = unit
    self.records: list[Record] = []
    self.seen_ids: dict[str, int] = {}

  def bad(self, number: int, error: _BadRow) -> None:
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
      self.bad(number, _BadRow(
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
        collector.bad(number, _BadRow("malformed_json", f"malformed JSON ({e.msg} at column "
                                      f"{e.colno})"))


def _check_file(path: Path) -> Path:
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
      record = _record_from_native(obj)
    except _BadRow as e:
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
        raise _BadRow("wrong_type", f"line must be a JSON object, got {type(obj).__name__}")
      if "ID" not in obj:
        raise _BadRow("missing_key", f"missing key 'ID' (present keys: {sorted(obj)})")
      source_id = obj["ID"]
      if isinstance(source_id, bool) or not isinstance(source_id, (int, str)):
        raise _BadRow("wrong_type", f"key 'ID' must be an int or string, got "
                      f"{type(source_id).__name__}")
      text = _require_str(obj, "Text")
      response = _require_str(obj, "mixtral_response").strip()
      overall = obj.get("Overall")
      if overall is not None and (isinstance(overall, bool)
                                  or not isinstance(overall, (int, float))):
        raise _BadRow("wrong_type", f"key 'Overall' must be a number, got "
                      f"{type(overall).__name__}")
    except _BadRow as e:
      collector.bad(number, e)
      continue
    source_key = str(source_id)
    earlier = responses_by_source.setdefault(source_key, [])
    if response in earlier:
      collector.bad(number, _BadRow("duplicate_id", f"key 'ID': duplicate record for ID "
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
      response = _require_str(row, columns.response)
      if use_prompt:
        prompt = _require_str(row, columns.prompt)
      else:
        text = _require_str(row, columns.text)
      if has_id:
        raw_id = row[columns.id]
        if raw_id is None or isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
          raise _BadRow("wrong_type", f"key {columns.id!r} must be a string or int, got "
                        f"{type(raw_id).__name__}")
        record_id = str(raw_id)
        if not record_id.strip():
          raise _BadRow("empty_value", f"key {columns.id!r} is empty")
      else:
        source = prompt if use_prompt else text
        record_id = hashlib.sha256(f"{source}\x00{response}".encode()).hexdigest()[:16]
      meta = {k: v for k, v in row.items() if k not in used and _json_scalar(v)}
      if not use_prompt:
        perspective = prompts.perspective_for(record_id, columns.prompt_seed)
        prompt = prompts.knowdist_prompt(text, perspective)
        meta |= {"perspective": perspective, "text": text}
    except _BadRow as e:
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


# --------------------------------------------------------------------------- writers


def _fsync_dir(directory: Path) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return  # not supported on this platform / filesystem
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def open_temp_file(path: Path) -> tuple[int, str]:
  """(fd, name) of a new hidden temp file next to `path`, with the umask-default permissions."""
  tmp_name = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
  return os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp_name


def write_records(path: str | os.PathLike, records: Iterable[Record | Mapping]) -> int:
  """Atomically writes native JSONL: a temp file in the same directory, fsync, os.replace.

  If validation or the `records` iterable raises, the existing file is left unchanged and the temp
  file is removed. Returns the number of records written.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = open_temp_file(path)
  count = 0
  seen: set[str] = set()
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for item in records:
        record = validate_record(item)
        if record.id in seen:
          raise CorpusError(f"write_records({path}): duplicate id {record.id!r}")
        seen.add(record.id)
        f.write(record.to_line())
        count += 1
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_name, path)
  except BaseException:
    try:
      os.unlink(tmp_name)
    except FileNotFoundError:
      pass
    raise
  _fsync_dir(path.parent)
  return count


class ResumableWriter:
  """Append-only JSONL writer for long generation jobs that may be killed at any moment.

  Opening an existing file reads the ids already written (so `write` skips them) and repairs a
  truncated last line left by a crash: a last line without a newline that is not a complete valid
  record is cut off; a complete one gets its newline. Each `write` appends one line, then flushes
  and fsyncs. A malformed line before the last one raises CorpusError (that is not a crash
  artifact). Thread-safe.

    with ResumableWriter(path) as writer:
      for record in writer.pending(records): writer.write(record)
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.repaired_bytes = 0
    self._done: set[str] = set()
    self._lock = threading.Lock()
    if self.path.exists():
      self._repair_tail()
      self._read_done_ids()
    self._file = open(self.path, "ab")  # pylint: disable=consider-using-with

  def _repair_tail(self) -> None:
    with open(self.path, "r+b") as f:
      data = f.read()
      if not data or data.endswith(b"\n"):
        return
      cut = data.rfind(b"\n") + 1  # 0 when the only line is truncated
      tail = data[cut:]
      try:
        validate_record(json.loads(tail.decode("utf-8")))
        f.write(b"\n")  # a complete record that only lost its newline
        logger.warning("%s: added the missing newline after the last record.", self.path)
      except (ValueError, UnicodeDecodeError):  # JSONDecodeError and CorpusError are ValueErrors
        f.truncate(cut)
        self.repaired_bytes = len(tail)
        logger.warning("%s: removed a truncated last line (%d bytes) left by an interrupted "
                       "write.", self.path, len(tail))
      f.flush()
      os.fsync(f.fileno())

  def _read_done_ids(self) -> None:
    with open(self.path, "r", encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          record = validate_record(json.loads(line))
        except (json.JSONDecodeError, CorpusError) as e:
          raise CorpusError(f"{self.path}, line {number}: cannot resume, {e}. Only the last line "
                            "can be repaired automatically; fix or remove this line.") from None
        self._done.add(record.id)

  @property
  def done_ids(self) -> frozenset[str]:
    with self._lock:
      return frozenset(self._done)

  def __contains__(self, record_id: str) -> bool:
    with self._lock:
      return record_id in self._done

  def __len__(self) -> int:
    with self._lock:
      return len(self._done)

  def pending(self, records: Iterable[Record]) -> Iterator[Record]:
    """The records (or ids-bearing objects) not yet written."""
    for record in records:
      if record.id not in self:
        yield record

  def write(self, record: Record | Mapping) -> bool:
    """Appends and fsyncs one record; returns False (writes nothing) if its id is already done."""
    record = validate_record(record)
    line = record.to_line().encode("utf-8")
    with self._lock:
      if record.id in self._done:
        return False
      self._file.write(line)
      self._file.flush()
      os.fsync(self._file.fileno())
      self._done.add(record.id)
    return True

  def close(self) -> None:
    with self._lock:
      if not self._file.closed:
        self._file.close()

  def __enter__(self) -> "ResumableWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


# --------------------------------------------------------------------------- fingerprint, split


def corpus_fingerprint(records: Iterable[Record]) -> str:
  """sha256 of the records' canonical JSON, in order (cache key for tokenised data)."""
  digest = hashlib.sha256()
  for record in records:
    digest.update(json.dumps(record.to_json(), sort_keys=True, ensure_ascii=False).encode())
    digest.update(b"\n")
  return digest.hexdigest()


def _split_key(record: Record) -> str:
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
  hashes = {key: _unit_hash(key) for key in {_split_key(r) for r in records}}
  val_keys = {key for key, u in hashes.items() if u < val_fraction}
  if not val_keys:
    val_keys = {min(hashes, key=hashes.get)}
  train = [r for r in records if _split_key(r) not in val_keys]
  val = [r for r in records if _split_key(r) in val_keys]
  if not train:
    raise CorpusError(f"Corpus too small to split: all {len(records)} records fell into val "
                      f"(val_fraction={val_fraction}).")
  return train, val


def cfg_get(cfg: Any, key: str, default: Any) -> Any:
  """`cfg.key` for a ConfigDict/object or `cfg[key]` for a mapping; `default` when absent."""
  if isinstance(cfg, Mapping):
    return cfg.get(key, default)
  try:
    return getattr(cfg, key)
  except (AttributeError, KeyError):
    return default


def hf_columns_from_config(cfg_data: Any) -> HFColumns:
  """HFColumns from optional `data.{id,prompt,response,text}_column` / `data.prompt_seed` keys."""
  return HFColumns(id=cfg_get(cfg_data, "id_column", "id"),
                   prompt=cfg_get(cfg_data, "prompt_column", "prompt"),
                   response=cfg_get(cfg_data, "response_column", "response"),
                   text=cfg_get(cfg_data, "text_column", ""),
                   prompt_seed=cfg_get(cfg_data, "prompt_seed", 0))


def load_corpus(cfg_data: Any) -> tuple[list[Record], list[Record], dict]:
  """(train_records, val_records, stats) from the `config.data` section.

  `corpus == ""` is the packaged demo corpus. Val is `val_corpus` when set (train records with an
  id or source_id also in val are dropped and counted), else a hash-of-id split with
  `val_fraction`. `stats` is JSON-serialisable.
  """
  corpus = cfg_get(cfg_data, "corpus", "") or str(demo_corpus_path())
  fmt = cfg_get(cfg_data, "format", "auto")
  skip = bool(cfg_get(cfg_data, "skip_bad_records", False))
  columns = hf_columns_from_config(cfg_data)
  records, read_stats = read_corpus(corpus, fmt, skip, columns)
  stats: dict[str, Any] = {"corpus": read_stats.to_dict()}
  val_corpus = cfg_get(cfg_data, "val_corpus", "")
  if val_corpus:
    val, val_stats = read_corpus(val_corpus, fmt, skip, columns)
    val_keys = {r.id for r in val} | {_split_key(r) for r in val}
    train = [r for r in records if r.id not in val_keys and _split_key(r) not in val_keys]
    stats |= {"val_source": "val_corpus", "val_corpus": val_stats.to_dict(),
              "dropped_overlapping_val": len(records) - len(train)}
    if len(records) != len(train):
      logger.warning("Dropped %d train records whose id also appears in %s.",
                     len(records) - len(train), val_corpus)
  else:
    train, val = split_train_val(records, float(cfg_get(cfg_data, "val_fraction", 0.05)))
    stats |= {"val_source": "hash_split"}
  if not train:
    raise CorpusError(f"{corpus}: no usable training records.")
  stats |= {"num_train": len(train), "num_val": len(val)}
  logger.info("Corpus %s: %d train / %d val records.", corpus, len(train), len(val))
  return train, val, stats
