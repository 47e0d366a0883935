"""Writing corpora (writers.py): atomic write_records, the resumable writer's repair and refusal."""
import json
from pathlib import Path

import pytest

from sentijax.data import readers, writers
from sentijax.data.records import CorpusError, Record


def _line(record_id="a", prompt="Analyse: good", response="Positive.", **extra) -> str:
  return json.dumps({"id": record_id, "prompt": prompt, "response": response} | extra) + "\n"


def _write(path: Path, lines: list[str]) -> Path:
  path.write_text("".join(lines), encoding="utf-8")
  return path


def _records(n: int, start: int = 0) -> list[Record]:
  return [Record(id=f"r{i}", prompt=f"p{i}", response=f"resp {i}", meta={"i": i})
          for i in range(start, start + n)]


def test_write_records_round_trip_without_leftovers(tmp_path):
  path = tmp_path / "sub" / "out.jsonl"
  assert writers.write_records(path, _records(3)) == 3
  assert readers.read_records(path)[0] == _records(3)
  assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]


def test_write_records_keeps_old_file_when_interrupted(tmp_path):
  path = tmp_path / "out.jsonl"
  writers.write_records(path, _records(2))
  before = path.read_bytes()

  def failing():
    yield from _records(5, start=10)
    raise RuntimeError("generator died")

  with pytest.raises(RuntimeError, match="generator died"):
    writers.write_records(path, failing())
  with pytest.raises(CorpusError, match="duplicate id"):
    writers.write_records(path, _records(2) + _records(1))
  with pytest.raises(CorpusError, match="'response' is empty"):
    writers.write_records(path, [{"id": "x", "prompt": "p", "response": ""}])
  assert path.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_resumable_writer_skips_done_ids(tmp_path):
  path = tmp_path / "gen.jsonl"
  with writers.ResumableWriter(path) as writer:
    assert [writer.write(r) for r in _records(3)] == [True, True, True]
    assert not writer.write(_records(1)[0])
  with writers.ResumableWriter(path) as writer:
    assert writer.done_ids == {"r0", "r1", "r2"} and len(writer) == 3
    todo = list(writer.pending(_records(5)))
    assert [r.id for r in todo] == ["r3", "r4"]
    for record in todo:
      writer.write(record)
  assert readers.read_records(path)[0] == _records(5)


def test_resumable_writer_repairs_truncated_last_line(tmp_path):
  path = tmp_path / "gen.jsonl"
  writers.write_records(path, _records(2))
  with open(path, "ab") as f:
    f.write(_records(1, start=2)[0].to_line().encode()[:-9])  # crash mid-record
  with writers.ResumableWriter(path) as writer:
    assert writer.repaired_bytes > 0 and writer.done_ids == {"r0", "r1"}
    writer.write(_records(1, start=2)[0])
  assert readers.read_records(path)[0] == _records(3)
  # A complete last record that only lost its newline is kept.
  path.write_bytes(path.read_bytes().rstrip(b"\n"))
  with writers.ResumableWriter(path) as writer:
    assert writer.repaired_bytes == 0 and len(writer) == 3
    writer.write(_records(1, start=3)[0])
  assert readers.read_records(path)[0] == _records(4)


def test_resumable_writer_refuses_corrupt_middle_line(tmp_path):
  path = _write(tmp_path / "gen.jsonl", [_line("a"), "{oops\n", _line("b")])
  with pytest.raises(CorpusError, match=r"gen\.jsonl, line 2: cannot resume"):
    writers.ResumableWriter(path)


# --------------------------------------------------------------------------- load_corpus
