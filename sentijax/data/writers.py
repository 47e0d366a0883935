"""Crash-safe writing: atomic files (temp + fsync + rename) and the resumable JSONL writer."""
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sentijax import atomic
from sentijax.data.records import CorpusError, Record, validate_record

logger = logging.getLogger("sentijax")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON with sorted keys to `path` atomically."""
  atomic.write_json(path, obj, indent=1, sort_keys=True)


def write_records(path: str | os.PathLike, records: Iterable[Record | Mapping]) -> int:
  """Atomically writes native JSONL: a temp file in the same directory, fsync, os.replace.

  If validation or the `records` iterable raises, the existing file is left unchanged and the temp
  file is removed. Returns the number of records written.
  """
  count = 0
  seen: set[str] = set()
  with atomic.atomic_open(path) as f:
    for item in records:
      record = validate_record(item)
      if record.id in seen:
        raise CorpusError(f"write_records({path}): duplicate id {record.id!r}")
      seen.add(record.id)
      f.write(record.to_line())
      count += 1
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
