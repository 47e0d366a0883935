"""Atomic files: readers see the old file or the complete new one, never a partial one.

    with atomic.atomic_open(path) as f:     # text; "wb" for bytes
      f.write(...)

writes a hidden temp file beside `path` (same filesystem), fsyncs it, renames it over `path`
and fsyncs the directory so the rename survives a crash. If the body raises, `path` is left as
it was and the temp file is removed. Every file sentijax writes (corpora, results, configs,
safetensors, stores) goes through here.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(directory: str | os.PathLike) -> None:
  """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
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


def open_temp_file(path: str | os.PathLike) -> tuple[int, str]:
  """(fd, name) of a new hidden temp file next to `path`, with the umask-default permissions."""
  path = Path(path)
  tmp_name = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
  return os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp_name


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"
                ) -> Iterator[IO[Any]]:
  """A file object for `mode` "w" or "wb" whose content replaces `path` only on success."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = open_temp_file(path)
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  fsync_dir(path.parent)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1,
               sort_keys: bool = False) -> None:
  """`obj` as JSON (UTF-8, non-ASCII kept, trailing newline) written atomically to `path`."""
  with atomic_open(path) as f:
    json.dump(obj, f, indent=indent, sort_keys=sort_keys, ensure_ascii=False)
    f.write("\n")
