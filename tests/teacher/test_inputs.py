"""Teacher inputs: JSONL/CSV/Parquet/HF, dedupe, length filters, errors naming file and line;
the SentiBench leak checker."""
import json

import pytest

from sentijax.sampling import SamplingSettings
from sentijax.teacher import inputs, leaks
from sentijax.teacher.generate import knowdist_items, parse_perspectives
from sentijax.teacher.common import record_key

ROWS = [{"id": "a", "text": "Great food."}, {"id": "b", "text": "  great   FOOD. "},
        {"id": "c", "text": "x"}, {"id": "d", "text": "A very long text " * 10},
        {"id": "e", "text": "Bad service."}]


def _spec(path, **kw):
  return inputs.InputSpec(path=str(path), min_chars=3, max_chars=100, **kw)


def _write_all(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  jsonl = tmp_path / "t.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  csv_path = tmp_path / "t.csv"
  csv_path.write_text("id,text\n" + "".join(f'{r["id"]},"{r["text"]}"\n' for r in ROWS))
  parquet = tmp_path / "t.parquet"
  pq.write_table(pa.Table.from_pylist(ROWS), parquet)
  return [jsonl, csv_path, parquet]


def test_formats_dedupe_and_filters(tmp_path):
  for path in _write_all(tmp_path):
    texts, stats = inputs.load_texts(_spec(path))
    assert [(t.id, t.text) for t in texts] == [("a", "Great food."), ("e", "Bad service.")], path
    assert (stats["duplicates"], stats["too_short"], stats["too_long"]) == (1, 1, 1)
  texts, _ = inputs.load_texts(_spec(tmp_path / "t.jsonl", dedupe=False))
  assert [t.id for t in texts] == ["a", "b", "e"]


def test_hf_dataset_dir(tmp_path):
  datasets = pytest.importorskip("datasets")
  datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
  texts, _ = inputs.load_texts(_spec(tmp_path / "ds"))
  assert [t.id for t in texts] == ["a", "e"]


@pytest.mark.parametrize("content,needle", [
    ('{"id": "a", "text": "ok text"}\n{"id": "b", "text": 3}\n', "line 2: key 'text'"),
    ('{"id": "a", "text": "ok text"}\n\n{"id": "a", "text": "other"}\n', "line 3: duplicate id"),
    ('{"id": "a", "text": "ok text"}\n{"id": "b", "te\n', "line 2: invalid JSON"),
    ('[1, 2]\n{"id": "z", "text": "fine text"}\n', "line 1: row must be an object"),
])
def test_bad_rows_name_file_and_line(tmp_path, content, needle):
  path = tmp_path / "bad.jsonl"
  path.write_text(content)
  with pytest.raises(inputs.InputError, match="bad.jsonl") as e:
    inputs.load_texts(_spec(path))
  assert needle in str(e.value)
  texts, stats = inputs.load_texts(_spec(path, skip_bad_rows=True))
  assert stats["bad"] == 1 and texts


def test_csv_error_line_and_missing_file(tmp_path):
  path = tmp_path / "t.csv"
  path.write_text('id,body\n1,"multi\nline"\n')
  with pytest.raises(inputs.InputError, match=r"t.csv, line 3: key 'text'"):
    inputs.load_texts(_spec(path))
  with pytest.raises(inputs.InputError, match="not found"):
    inputs.load_texts(_spec(tmp_path / "nope.jsonl"))


def test_demo_texts_and_items():
  texts, stats = inputs.load_texts(inputs.InputSpec())
  assert stats["kept"] == len(texts) > 10 and not any(t.text.startswith("Text:") for t in texts)
  s = SamplingSettings(max_tokens=4)
  items = knowdist_items(texts[:2], parse_perspectives("all"), s)
  assert len(items) == 14 and len({i.id for i in items}) == 14
  assert items[0].id == record_key(items[0].prompt, s) != record_key(
      items[0].prompt, SamplingSettings(max_tokens=5))
  with pytest.raises(ValueError, match="unknown"):
    parse_perspectives("polarity,nope")


def test_leak_checker():
  checker = leaks.LeakChecker({"the food was cold and bland .": "sc/x", "yum!": "sc/y"})
  assert checker.hits("Analysis: THE food  was cold and bland . So negative.") == [
      "the food was cold and bland ."]
  assert checker.hits("He left.  Yum!\nThen more.") == ["yum!"]  # short: whole sentences
  assert checker.hits("He said yum! twice") == []
  assert checker.hits("The food was cold. Yummy!") == []


def test_leaks_from_sentibench(sentibench_dir):
  checker = leaks.from_task_dirs(str(sentibench_dir))
  sentence = next(s for s in checker.task_of if len(s.split()) > 6)
  assert checker.hits(f"Quote: {sentence.upper()} end") == [sentence]
