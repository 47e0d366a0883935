"""A teacher job's corpus on disk: `<workdir>/corpus.jsonl`, written by one or many processes.

One process appends to corpus.jsonl itself (`ResumableWriter`: one fsynced line per record).
With N processes each appends to its own part, `<workdir>/parts/corpus.<process>.jsonl` (and
`rejects.<process>.jsonl`, `summary.<process>.json`); at the end process 0 merges the parts into
corpus.jsonl (atomically: the old lines, then the new records in item order) and removes them. A
job killed before the merge leaves its parts; the next run, on any number of processes, counts
their records as done and merges them too.

A corpus holds records of ONE set of answer settings (sampling + `backend.answer_settings`):
`done_ids` refuses a workdir whose records were made otherwise, naming each differing setting.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sentijax import atomic
from sentijax.data.records import CorpusError
from sentijax.teacher import backend

CORPUS = "corpus.jsonl"
REJECTS = "rejects.jsonl"
PARTS = "parts"

# The config key behind each answer setting every backend has (messages name what to change);
# a backend's own: its CONFIG_KEYS.
_CONFIG_KEYS = {"backend": "teacher.backend", "logprobs": "generate.logprobs"}


class SettingsMismatch(ValueError):
  """The workdir's corpus was made with other answer settings than this run."""


def own_paths(workdir: Path, index: int, count: int) -> tuple[Path, Path]:
  """(records, rejects) file this process appends to."""
  if count == 1:
    return workdir / CORPUS, workdir / REJECTS
  parts = workdir / PARTS
  return parts / f"corpus.{index}.jsonl", parts / f"rejects.{index}.jsonl"


def _lines(path: Path) -> list[tuple[int, bytes, dict | None]]:
  """(line number, raw line with newline, record or None for a crash-truncated last line)."""
  if not path.exists():
    return []
  data = path.read_bytes()
  raw = data.splitlines(keepends=True)
  out = []
  for number, line in enumerate(raw, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or not isinstance(row.get("id"), str):
        raise ValueError("not a record with a string id")
    except (ValueError, UnicodeDecodeError) as e:
      if number == len(raw) and not line.endswith(b"\n"):  # cut by a crash; its writer repairs
        out.append((number, line, None))
        continue
      raise CorpusError(f"{path}, line {number}: cannot resume ({e}); fix or remove the line")
    out.append((number, line if line.endswith(b"\n") else line + b"\n", row))
  return out


def _files(workdir: Path) -> list[Path]:
  return [workdir / CORPUS] + sorted((workdir / PARTS).glob("corpus.*.jsonl"))


def _config_key(key: str, settings: Mapping[str, Any]) -> str:
  if key.startswith("sampling."):
    return key
  return _CONFIG_KEYS.get(key) or backend.config_key(settings.get("backend"), key) or key


def _differences(got: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
  keys = sorted(set(got) | set(want))
  return [f"{_config_key(k, want)}={got.get(k, '(unset)')!r} there, {want.get(k, '(unset)')!r} now"
          for k in keys if got.get(k) != want.get(k)]


def done_ids(workdir: Path, sampling: Mapping[str, Any], settings: Mapping[str, Any] | None
             ) -> set[str]:
  """Ids of the records in corpus.jsonl and every part; SettingsMismatch when any was made
  with other sampling / answer settings than `sampling` and `settings`."""
  done: set[str] = set()
  other, first = 0, None
  for path in _files(workdir):
    for number, _, row in _lines(path):
      if row is None:
        continue
      meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
      if meta.get("sampling") != sampling or meta.get("settings") != settings:
        other += 1
        first = first or (path, number, meta)
      done.add(row["id"])
  if other:
    path, number, meta = first
    if "settings" not in meta and settings is not None:
      why = ["it records no answer settings (meta.settings; made by an older sentijax)"]
    else:
      why = _differences({f"sampling.{k}": v for k, v in (meta.get("sampling") or {}).items()},
                         {f"sampling.{k}": v for k, v in sampling.items()})
      why += _differences(meta.get("settings") or {}, settings or {})
    raise SettingsMismatch(
        f"{workdir}: {other} record(s) were made with other settings than this run; first at "
        f"{path.name} line {number}: {'; '.join(why)}. One corpus holds one set of settings: "
        f"write to another workdir (--config.workdir=...), or move {path} away to regenerate.")
  return done


def merge(workdir: Path, order: Sequence[str]) -> int:
  """Process 0, after every process has finished: the parts' new records appended to
  corpus.jsonl in `order` (item ids; unknown ids after them, by id), their rejects (those not
  in the corpus) into rejects.jsonl, then the parts removed. Returns the corpus's record count."""
  corpus, parts = workdir / CORPUS, workdir / PARTS
  have_lines = _lines(corpus)
  have = {row["id"] for _, _, row in have_lines if row is not None}
  part_files = sorted(parts.glob("corpus.*.jsonl"))
  new: dict[str, bytes] = {}
  for path in part_files:
    for _, line, row in _lines(path):
      if row is not None and row["id"] not in have:
        new.setdefault(row["id"], line)
  rank = {record_id: i for i, record_id in enumerate(order)}
  key = lambda record_id: (rank.get(record_id, len(rank)), record_id)  # noqa: E731
  if new:
    with atomic.atomic_open(corpus, "wb") as f:
      for _, line, row in have_lines:
        if row is not None:
          f.write(line)
      for record_id in sorted(new, key=key):
        f.write(new[record_id])
  rejects = {}
  for path in sorted(parts.glob("rejects.*.jsonl")):
    for _, line, row in _lines(path):
      if row is not None and row["id"] not in have and row["id"] not in new:
        rejects.setdefault(row["id"], line)
  if part_files or rejects:
    with atomic.atomic_open(workdir / REJECTS, "wb") as f:
      for record_id in sorted(rejects, key=key):
        f.write(rejects[record_id])
  for path in sorted(parts.glob("*")) if parts.is_dir() else []:
    os.unlink(path)
  if parts.is_dir():
    os.rmdir(parts)
    atomic.fsync_dir(workdir)
  return len(have) + len(new)


def write_part_summary(workdir: Path, index: int, summary: dict) -> None:
  atomic.write_json(workdir / PARTS / f"summary.{index}.json", summary)


def combine_summaries(workdir: Path, count: int) -> dict:
  """The per-process summaries of this run added up (counts, finish reasons, leaks)."""
  parts = [json.loads((workdir / PARTS / f"summary.{i}.json").read_text(encoding="utf-8"))
           for i in range(count)]
  total = dict(parts[0])
  for key in ("written", "rejected", "completion_tokens", "unmapped_logprob_tokens"):
    total[key] = sum(p[key] for p in parts)
  total["finish_reasons"] = {}
  for p in parts:
    for reason, n in p["finish_reasons"].items():
      total["finish_reasons"][reason] = total["finish_reasons"].get(reason, 0) + n
  total["leaks"] = {"records": sum(p["leaks"]["records"] for p in parts),
                    "ids": [x for p in parts for x in p["leaks"]["ids"]][:100]}
  total["processes"] = count
  return total
