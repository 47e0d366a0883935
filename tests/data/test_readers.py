"""Reading corpora (readers.py): validation naming file/line/key, the Mixtral and HF adapters,
load_corpus and the train/val split."""
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import ml_collections  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from sentijax.data import prompts, readers, writers  # pylint: disable=wrong-import-position
from sentijax.data import records as records_lib  # pylint: disable=wrong-import-position
from sentijax.data.records import CorpusError, Record  # pylint: disable=wrong-import-position
from sentijax.data.spec import DataSpec  # pylint: disable=wrong-import-position

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MIXTRAL = SHARED / "teacher_corpus" / "mixtral_reviews_500.jsonl"


def _line(record_id="a", prompt="Analyse: good", response="Positive.", **extra) -> str:
  return json.dumps({"id": record_id, "prompt": prompt, "response": response} | extra) + "\n"


def _write(path: Path, lines: list[str]) -> Path:
  path.write_text("".join(lines), encoding="utf-8")
  return path


# --------------------------------------------------------------------------- native records


def test_demo_corpus_is_valid_and_varied():
  records, stats = readers.read_records(records_lib.demo_corpus_path())
  assert 40 <= len(records) <= 60 and stats.num_skipped == 0
  assert len({r.id for r in records}) == len(records)
  perspectives = {r.meta["perspective"] for r in records}
  assert set(prompts.PERSPECTIVES) <= perspectives
  for r in records:
    sentences = re.findall(r"[.!?](?:\s|$)", r.response)
    assert 2 <= len(sentences) <= 6, r.id
    assert r.prompt == prompts.knowdist_prompt(r.meta["text"], r.meta["perspective"])
  assert readers.detect_format(records_lib.demo_corpus_path()) == "records"


@pytest.mark.parametrize("bad_line, key, reason", [
    ('{"id": "b", "prompt": "x", "response": \n', "malformed JSON", "malformed_json"),
    (json.dumps({"id": "b", "prompt": "x"}) + "\n", "'response'", "missing_key"),
    (json.dumps({"id": 7, "prompt": "x", "response": "y"}) + "\n", "'id'", "wrong_type"),
    (_line("b", response="   "), "'response'", "empty_value"),
    (_line("b", prompt=""), "'prompt'", "empty_value"),
    (_line("b", meta=[1]), "'meta'", "wrong_type"),
    (_line("b", messages=[{"role": "user"}]), "'messages'", "wrong_type"),
    (_line("a"), "duplicate id 'a'", "duplicate_id"),
])
def test_bad_line_names_file_line_and_key(tmp_path, bad_line, key, reason):
  path = _write(tmp_path / "c.jsonl", [_line("a"), bad_line, _line("c")])
  with pytest.raises(CorpusError) as error:
    readers.read_records(path)
  message = str(error.value)
  assert str(path) in message and "line 2" in message and key in message
  assert "skip_bad_records" in message  # says how to proceed
  records, stats = readers.read_records(path, skip_bad_records=True)
  assert [r.id for r in records] == ["a", "c"]
  assert stats.skipped == {reason: 1} and stats.num_skipped == 1 and stats.records == 2
  assert "line 2" in stats.first_errors[0]


def test_blank_lines_messages_and_meta_are_read(tmp_path):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  path = _write(tmp_path / "c.jsonl", [_line("a", meta={"k": 1}), "\n",
                                       _line("b", messages=messages)])
  records, stats = readers.read_corpus(path)
  assert stats.format == "records" and stats.blank_lines == 1
  assert records[0].meta == {"k": 1} and records[0].messages is None
  assert records[1].messages == messages


# --------------------------------------------------------------------------- mixtral adapter


@pytest.mark.skipif(not MIXTRAL.is_file(), reason="../shared/teacher_corpus not present")
def test_mixtral_adapter_on_real_teacher_sample():
  assert readers.detect_format(MIXTRAL) == "mixtral"
  records, stats = readers.read_corpus(MIXTRAL)
  raw = [json.loads(line) for line in MIXTRAL.read_text(encoding="utf-8").splitlines() if line]
  assert len(records) == len(raw) == stats.records and stats.num_skipped == 0
  assert len({r.id for r in records}) == len(records)  # the file repeats one ID
  assert sum("#" in r.id for r in records) == len(raw) - len({r["ID"] for r in raw})
  for record, row in zip(records, raw):
    assert record.response == row["mixtral_response"].strip()
    assert not record.response.startswith(" ")
    assert record.meta["source_id"] == str(row["ID"]) and record.meta["overall"] == row["Overall"]
    assert record.prompt == prompts.knowdist_prompt(row["Text"], record.meta["perspective"])
    expected = "aspects" if record.response.startswith("Opinion Target") else "rewrite"
    assert record.meta["perspective"] == expected
  again, _ = readers.read_corpus(MIXTRAL, format="mixtral")
  assert again == records


def test_mixtral_adapter_validates_lines(tmp_path):
  good = {"ID": 1, "Text": "Nice place.", "Overall": 4.0, "mixtral_response": " I liked it."}
  lines = [json.dumps(good) + "\n",
           json.dumps(good | {"ID": 2, "mixtral_response": " "}) + "\n",
           json.dumps({"ID": 3, "Overall": 1.0, "mixtral_response": "x"}) + "\n",
           json.dumps(good) + "\n"]
  path = _write(tmp_path / "m.jsonl", lines)
  with pytest.raises(CorpusError, match=r"m\.jsonl, line 2: key 'mixtral_response' is empty"):
    readers.read_corpus(path)
  records, stats = readers.read_corpus(path, skip_bad_records=True)
  assert [r.id for r in records] == ["1"]
  assert stats.skipped == {"empty_value": 1, "missing_key": 1, "duplicate_id": 1}


# --------------------------------------------------------------------------- HF datasets adapter


def test_hf_adapter_json_and_parquet(tmp_path):
  import pandas as pd  # pylint: disable=import-outside-toplevel
  rows = [{"uid": f"u{i}", "question": f"Rate review {i}", "answer": f"Positive {i}.",
           "stars": i} for i in range(5)]
  json_path = tmp_path / "c.json"
  json_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  parquet_path = tmp_path / "c.parquet"
  pd.DataFrame(rows).to_parquet(parquet_path)
  columns = readers.HFColumns(id="uid", prompt="question", response="answer")
  assert readers.detect_format(json_path) == "hf" and readers.detect_format(parquet_path) == "hf"
  from_json, _ = readers.read_corpus(json_path, columns=columns)
  from_parquet, stats = readers.read_corpus(parquet_path, columns=columns)
  assert from_json == from_parquet and stats.format == "hf" and len(from_json) == 5
  assert from_json[2] == Record(id="u2", prompt="Rate review 2", response="Positive 2.",
                                meta={"stars": 2})


def test_hf_adapter_text_column_and_errors(tmp_path):
  import pandas as pd  # pylint: disable=import-outside-toplevel
  path = tmp_path / "t.parquet"
  pd.DataFrame({"review": ["Loved it", "Meh", "Bad"],
                "analysis": ["Positive.", "", "Negative."]}).to_parquet(path)
  columns = readers.HFColumns(response="analysis", text="review")
  with pytest.raises(CorpusError, match=r"t\.parquet, row 2: key 'analysis' is empty"):
    readers.read_corpus(path, columns=columns)
  records, stats = readers.read_corpus(path, columns=columns, skip_bad_records=True)
  assert stats.skipped == {"empty_value": 1} and len(records) == 2
  first = records[0]
  assert first.prompt == prompts.knowdist_prompt("Loved it", prompts.perspective_for(first.id))
  assert first.meta["perspective"] in prompts.PERSPECTIVES
  with pytest.raises(CorpusError, match="missing column.*available columns"):
    readers.read_corpus(path)


# --------------------------------------------------------------------------- writing


def _records(n: int, start: int = 0) -> list[Record]:
  return [Record(id=f"r{i}", prompt=f"p{i}", response=f"resp {i}", meta={"i": i})
          for i in range(start, start + n)]


def _spec(**overrides) -> DataSpec:
  cfg = ml_collections.ConfigDict({"corpus": "", "format": "auto", "val_corpus": "",
                                   "val_fraction": 0.05, "skip_bad_records": False})
  cfg.update(overrides)
  return DataSpec.from_config(cfg)


def test_load_corpus_demo_default_split_is_deterministic():
  train, val, stats = readers.load_corpus(_spec())
  records, _ = readers.read_records(records_lib.demo_corpus_path())
  assert len(train) + len(val) == len(records) and val
  assert {r.id for r in train}.isdisjoint({r.id for r in val})
  assert stats["num_train"] == len(train) and stats["val_source"] == "hash_split"
  json.dumps(stats)
  train2, val2, _ = readers.load_corpus(_spec())
  assert (train2, val2) == (train, val)
  # The split of a record depends only on its id, not on the rest of the corpus.
  subset = records[::-1][:30]
  _, sub_val = records_lib.split_train_val(subset, 0.05)
  expected_val = [r for r in subset if r.id in {v.id for v in val}]
  assert sub_val == expected_val or (not expected_val and len(sub_val) == 1)


def test_split_keeps_source_groups_together():
  records = [Record(id=f"{i}#{k}", prompt="p", response="r", meta={"source_id": str(i)})
             for i in range(200) for k in range(2)]
  train, val = records_lib.split_train_val(records, 0.2)
  train_groups = {r.meta["source_id"] for r in train}
  val_groups = {r.meta["source_id"] for r in val}
  assert train_groups.isdisjoint(val_groups) and 15 < len(val_groups) < 70
  assert records_lib.split_train_val(records, 0.0) == (records, [])
  with pytest.raises(CorpusError, match="val_fraction"):
    records_lib.split_train_val(records, 1.0)


def test_load_corpus_with_val_file_drops_overlap(tmp_path):
  train_path = tmp_path / "train.jsonl"
  val_path = tmp_path / "val.jsonl"
  writers.write_records(train_path, _records(6))
  writers.write_records(val_path, _records(2, start=4) + _records(1, start=9))
  train, val, stats = readers.load_corpus(
      _spec(corpus=str(train_path), val_corpus=str(val_path)))
  assert [r.id for r in train] == ["r0", "r1", "r2", "r3"]
  assert [r.id for r in val] == ["r4", "r5", "r9"]
  assert stats["dropped_overlapping_val"] == 2 and stats["val_source"] == "val_corpus"
