"""The teacher corpus on disk: what counts as done across corpus.jsonl and per-process parts
(crash-cut lines, parts of an earlier run on more processes), and process 0's merge."""
import json

import pytest

from sentijax.data.records import CorpusError
from sentijax.teacher import corpus

SAMPLING = {"temperature": 0.0, "seed": 0}
SETTINGS = {"backend": "openai", "model": "m", "logprobs": 0}


def _record(record_id, settings=SETTINGS, sampling=SAMPLING):
  return {"id": record_id, "prompt": f"p-{record_id}", "response": f"r-{record_id}",
          "meta": {"sampling": sampling, "settings": settings}}


def _write(path, rows, tail=b""):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + tail)


def test_done_ids_span_corpus_and_every_part(tmp_path):
  _write(tmp_path / "corpus.jsonl", [_record("a")])
  _write(tmp_path / "parts/corpus.0.jsonl", [_record("b")], tail=b'{"id": "c", "pro')  # cut
  _write(tmp_path / "parts/corpus.3.jsonl", [_record("d")])  # a run on 4 processes
  assert corpus.done_ids(tmp_path, SAMPLING, SETTINGS) == {"a", "b", "d"}
  _write(tmp_path / "parts/corpus.1.jsonl", [_record("e")], tail=b"not json\n" + b"{}\n")
  with pytest.raises(CorpusError, match=r"corpus.1.jsonl, line 2"):
    corpus.done_ids(tmp_path, SAMPLING, SETTINGS)


def test_a_part_made_with_other_settings_is_refused(tmp_path):
  _write(tmp_path / "corpus.jsonl", [_record("a")])
  _write(tmp_path / "parts/corpus.1.jsonl", [_record("b", SETTINGS | {"model": "n"})])
  with pytest.raises(corpus.SettingsMismatch,
                     match=r"1 record\(s\).*corpus.1.jsonl line 1: teacher.model='n' there, "
                           r"'m' now"):
    corpus.done_ids(tmp_path, SAMPLING, SETTINGS)


def test_merge_appends_parts_in_item_order_once(tmp_path):
  _write(tmp_path / "corpus.jsonl", [_record("c"), _record("a")])  # kept as they are
  _write(tmp_path / "parts/corpus.0.jsonl", [_record("e"), _record("a"), _record("b")],
         tail=b'{"id": "x"')
  _write(tmp_path / "parts/corpus.1.jsonl", [_record("zz"), _record("d"), _record("b")])
  _write(tmp_path / "parts/rejects.0.jsonl", [{"id": "f", "error": "HTTP 500"},
                                              {"id": "d", "error": "timeout"}])  # d: done now
  (tmp_path / "parts/summary.0.json").write_text("{}")
  count = corpus.merge(tmp_path, ["a", "b", "c", "d", "e", "f"])
  rows = [json.loads(x) for x in (tmp_path / "corpus.jsonl").read_text().splitlines()]
  assert [r["id"] for r in rows] == ["c", "a", "b", "d", "e", "zz"] and count == 6
  assert rows[2] == _record("b")
  rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
  assert [r["id"] for r in rejects] == ["f"]
  assert not (tmp_path / "parts").exists()
  assert corpus.merge(tmp_path, []) == 6  # nothing left to merge: unchanged
