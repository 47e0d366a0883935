"""Task registry: SentiBench + icl_sources + user dirs, scorer-side generalisation, bad input."""
import json
import pathlib

import pytest

from sentijax.data import sentibench, tasks
from sentijax.eval import metrics, parsers

DEMO = pathlib.Path(tasks.__file__).resolve().parent.parent / "assets" / "icl_demo"


def _write(path: pathlib.Path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj), encoding="utf-8-sig")


def test_registry_holds_sentibench_and_icl_sources(shared_dir):
  reg = tasks.discover([str(shared_dir / "sentibench"), str(shared_dir / "icl_sources")])
  assert set(sentibench.DATASETS) <= set(reg.names())
  assert {"atsa/laptop14", "atsa/rest14", "acsa/laptop16"} <= set(reg.names())
  assert len(reg.names()) == 15
  for name in sentibench.DATASETS:
    spec = reg.get(name)
    assert spec.sentibench and spec.layout == sentibench.LAYOUT[name]
    assert spec.metric == metrics.metric_of(name)
  assert reg.get("sc/twitter").labels == ("negative", "positive", "neutral")
  assert reg.get("multifaced/intimacy").labels[0] == "not intimate"
  lap = reg.get("atsa/laptop14")
  assert (lap.layout, lap.kind, lap.metric, lap.sentibench) == ("atsa", "extraction", "micro_f1",
                                                                  False)
  assert sorted(lap.splits) == ["dev", "test", "train"] and lap.eval_split == "test"
  assert reg.get("acsa/laptop16").layout == "acsa"
  train = tasks.load_examples(reg.get("acsa/laptop16"), "train")
  assert len(train) == 2000
  # acsa label: category lower-cased, '#' -> ' ' (same builder as SentiBench's acsa_rest16).
  assert train[0].gold[0] == ("keyboard design_features", "positive")
  # A non-SentiBench task scores like its SentiBench counterpart.
  golds = [ex.gold for ex in train[:20]]
  assert metrics.score_dataset("acsa/laptop16", golds, golds, metric=lap.metric) == 100.0
  pred = parsers.parse_tuples("[('keyboard design_features', 'positive')]", reg.get(
      "acsa/laptop16").parser)
  assert pred == [("keyboard design_features", "positive")]


def test_demo_tasks_ship_in_the_package():
  reg = tasks.discover(str(DEMO))
  assert reg.names() == ["atsa/cafe", "emotion/chat", "sc/movies", "sc/products",
                         "sc/restaurants"]
  assert reg.get("sc/products").labels == ("negative", "neutral", "positive")
  assert reg.get("emotion/chat").verbalizers == [" anger", " joy", " sadness"]
  movies = reg.get("sc/movies")  # task.json sets labels and instruction
  assert movies.instruction.startswith("Read the movie review")
  task = tasks.load_task(movies)
  assert len(task.train) == 80 and len(task.test) == 60
  assert {ex.gold for ex in task.test} == {"negative", "positive"}


def test_user_dir_layouts_and_selection(tmp_path):
  _write(tmp_path / "mine/stance/train.json",
         [{"sentence": "go team", "label": "FAVOR", "target": "the team"}])
  _write(tmp_path / "mine/quads/train.json", [{"sentence": "ok", "quards": []}])
  _write(tmp_path / "mine/graph/train.json", [{"sentence": "ok", "opinions": []}])
  reg = tasks.discover(str(tmp_path))
  assert [reg.get(n).layout for n in ("mine/stance", "mine/quads", "mine/graph")] == \
      ["pstance", "asqp", "opener"]
  assert "%s" in reg.get("mine/stance").instruction
  assert [s.name for s in reg.select("mine/graph, mine/quads")] == ["mine/graph", "mine/quads"]
  assert len(reg.select("all")) == 3


def test_bad_inputs_are_clear_errors(tmp_path):
  reg = tasks.discover(str(DEMO))
  with pytest.raises(tasks.TaskError, match=r"unknown task 'sc/nope'; registered: atsa/cafe"):
    reg.get("sc/nope")
  with pytest.raises(tasks.TaskError, match="unknown task 'x'"):
    reg.select("sc/movies,x")
  _write(tmp_path / "a/only_test/test.json", [{"sentence": "s", "label": "positive"}])
  with pytest.raises(FileNotFoundError, match=r"'a/only_test'.*no train split.*test\.json"):
    tasks.discover(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="task directory not found"):
    tasks.discover(str(tmp_path / "missing"))
  bad = tmp_path / "b"
  _write(bad / "c/empty/train.json", [{"sentence": "s", "label": ""}])
  with pytest.raises(tasks.TaskError, match=r"'c/empty'.*empty label set"):
    tasks.make_spec(bad, "c/empty")
  _write(bad / "c/meta/train.json", [{"sentence": "s", "label": "x"}])
  _write(bad / "c/meta/task.json", {"labels": []})
  with pytest.raises(tasks.TaskError, match=r"'c/meta'.*empty label set"):
    tasks.make_spec(bad, "c/meta")
  _write(bad / "c/meta/task.json", {"layout": "tuples"})
  with pytest.raises(tasks.TaskError, match=r"task\.json: key 'layout' = 'tuples'"):
    tasks.make_spec(bad, "c/meta")
  _write(bad / "c/aspects/train.json", [{"sentence": "s", "aspects": []}])
  with pytest.raises(tasks.TaskError, match="cannot tell its layout"):
    tasks.make_spec(bad, "c/aspects")
  with pytest.raises(ValueError, match="unknown SentiBench dataset 'c/meta'.*metric="):
    metrics.score_dataset("c/meta", ["x"], ["x"])
  with pytest.raises(ValueError, match="unknown metric 'f2'"):
    metrics.score_dataset("c/meta", ["x"], ["x"], metric="f2")
  with pytest.raises(ValueError, match="unknown layout 'tuples'"):
    sentibench.load_split(bad, "c/meta", "train", layout="tuples")
