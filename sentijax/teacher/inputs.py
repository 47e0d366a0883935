"""Unlabeled user texts for teacher jobs: JSONL, CSV, Parquet or an HF `datasets` dataset.

    texts, stats = load_texts(InputSpec(path="reviews.csv", text_column="review"))
    texts[0]  # SourceText(id="reviews.csv:2", text="...")  (id column, else file:line)

Rows are validated one by one; a bad row (not an object, missing or non-string text, duplicate
id) raises InputError naming the file and the 1-based line (CSV: the line the row ends on,
Parquet/HF: the row), unless `skip_bad_rows`. Texts are stripped; texts outside
[min_chars, max_chars] are dropped; with `dedupe` a text with the identity of an earlier one
(`identity.sentence_key`: case, spacing, punctuation, tokenisation ignored) is dropped. An empty
path gives the demo texts of the package (the user texts of the demo corpus).

With a leak checker (the SentiBench test sentences), a text that is or contains one is dropped,
kept and listed, or fails the job (`inputs.on_leak` = drop | flag | fail); stats count them.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sentijax.data import identity, records

FORMATS = ("auto", "jsonl", "csv", "parquet", "hf")
ON_LEAK = ("drop", "flag", "fail")
_MAX_LISTED = 100


class InputError(ValueError):
  """A bad input file or row; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class SourceText:
  id: str
  text: str


@dataclasses.dataclass(frozen=True)
class InputSpec:
  path: str = ""
  format: str = "auto"
  text_column: str = "text"
  id_column: str = "id"
  split: str = "train"  # HF datasets by name
  min_chars: int = 1
  max_chars: int = 0  # 0 = no limit
  dedupe: bool = True
  limit: int = 0  # 0 = all
  skip_bad_rows: bool = False
  on_leak: str = "drop"  # a text holding a SentiBench test sentence: drop | flag | fail

  def __post_init__(self):
    if self.on_leak not in ON_LEAK:
      raise InputError(f"inputs.on_leak={self.on_leak!r}: expected one of {ON_LEAK}")

  @classmethod
  def from_config(cls, c) -> "InputSpec":
    return cls(**{f.name: type(f.default)(c[f.name]) for f in dataclasses.fields(cls)})


def demo_texts() -> list[SourceText]:
  """The user texts inside the demo corpus prompts (after 'Text: '), one per demo record."""
  out = []
  for line in records.demo_corpus_path().read_text(encoding="utf-8").splitlines():
    row = json.loads(line)
    out.append(SourceText(row["id"], row["prompt"].rsplit("\nText: ", 1)[-1].strip()))
  return out


def _format(spec: InputSpec) -> str:
  if spec.format != "auto":
    if spec.format not in FORMATS:
      raise InputError(f"inputs.format must be one of {FORMATS}, got {spec.format!r}")
    return spec.format
  suffix = Path(spec.path).suffix.lower()
  if suffix in (".jsonl", ".json"):
    return "jsonl"
  if suffix in (".csv", ".tsv"):
    return "csv"
  if suffix == ".parquet":
    return "parquet"
  return "hf"


def _rows(spec: InputSpec, fmt: str) -> Iterator[tuple[str, int, Any]]:
  """(unit, number, row) per row; an unparsable JSON line is yielded as an exception."""
  path = spec.path
  if fmt in ("jsonl", "csv", "parquet") and not os.path.isfile(path):
    raise InputError(f"input file not found: {path}")
  if fmt == "jsonl":
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, start=1):
        if line.strip():
          try:
            yield "line", number, json.loads(line)
          except json.JSONDecodeError as e:
            yield "line", number, InputError(f"invalid JSON ({e.msg}, column {e.colno})")
  elif fmt == "csv":
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
      for row in reader:
        yield "line", reader.line_num, row
  elif fmt == "parquet":
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
      yield "row", number, row
  else:
    import datasets  # pylint: disable=import-outside-toplevel
    ds = (datasets.load_from_disk(path) if os.path.isdir(path)
          else datasets.load_dataset(path, split=spec.split))
    if isinstance(ds, datasets.DatasetDict):
      if spec.split not in ds:
        raise InputError(f"{path}: no split {spec.split!r} (have {sorted(ds)})")
      ds = ds[spec.split]
    for number, row in enumerate(ds, start=1):
      yield "row", number, row


def _leaks(spec: InputSpec, checker, text_id: str, text: str, where: str, stats: dict) -> bool:
  """True when the text is to be dropped for holding SentiBench test sentences."""
  hits = checker.hits(text) if checker is not None else []
  if not hits:
    return False
  stats["leaks"] += 1
  if len(stats["leak_ids"]) < _MAX_LISTED:
    stats["leak_ids"].append({"id": text_id, "sentences": hits[:5]})
  if spec.on_leak == "fail":
    raise InputError(f"{where}: text {text_id!r} holds a SentiBench test sentence: {hits[0]!r}; "
                     "remove it, or set inputs.on_leak=drop (or flag)")
  return spec.on_leak == "drop"


def load_texts(spec: InputSpec, checker=None) -> tuple[list[SourceText], dict]:
  """The kept texts and stats (rows, kept, dropped per reason, texts holding test sentences);
  `checker`: a `leaks.LeakChecker` of SentiBench test sentences, or None (not checked)."""
  stats = {"path": spec.path or "(demo texts)", "rows": 0, "kept": 0, "bad": 0, "too_short": 0,
           "too_long": 0, "duplicates": 0, "on_leak": spec.on_leak if checker else "unchecked",
           "leaks": 0, "leak_ids": []}
  if not spec.path:
    rows = ((("demo", i + 1, {spec.text_column: t.text, spec.id_column: t.id})
             for i, t in enumerate(demo_texts())))
  else:
    rows = _rows(spec, _format(spec))
  out: list[SourceText] = []
  ids: set[str] = set()
  seen: set[str] = set()
  for unit, number, row in rows:
    stats["rows"] += 1
    try:
      if isinstance(row, Exception):
        raise row
      if not isinstance(row, dict):
        raise InputError(f"row must be an object, got {type(row).__name__}")
      text = row.get(spec.text_column)
      if not isinstance(text, str):
        raise InputError(f"key {spec.text_column!r} must be a string, got "
                         f"{type(text).__name__} (keys: {sorted(row)[:10]})")
      raw_id = row.get(spec.id_column)
      text_id = str(raw_id) if raw_id not in (None, "") else f"{Path(spec.path).name}:{number}"
      if text_id in ids:
        raise InputError(f"duplicate id {text_id!r} (key {spec.id_column!r})")
    except InputError as e:
      message = f"{spec.path}, {unit} {number}: {e}"
      if not spec.skip_bad_rows:
        raise InputError(f"{message}. Fix the row or set inputs.skip_bad_rows=True.") from None
      stats["bad"] += 1
      continue
    text = text.strip()
    if len(text) < max(spec.min_chars, 1):
      stats["too_short"] += 1
      continue
    if spec.max_chars and len(text) > spec.max_chars:
      stats["too_long"] += 1
      continue
    if _leaks(spec, checker, text_id, text, f"{spec.path or 'demo texts'}, {unit} {number}",
              stats):
      continue
    if spec.dedupe:
      key = identity.sentence_key(text) or text
      if key in seen:
        stats["duplicates"] += 1
        continue
      seen.add(key)
    ids.add(text_id)
    out.append(SourceText(text_id, text))
    if spec.limit and len(out) >= spec.limit:
      break
  stats["kept"] = len(out)
  return out, stats
