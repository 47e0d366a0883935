"""Tests for sentijax.data.sentibench (loader, label sequences, prompts)."""
import json
import pathlib
import random

import pytest

from sentijax.data import sentibench as sb

# (train, val, test) sizes from the SentiBench PROTOCOL.md table; None = no val split.
COUNTS = {
    "sc/imdb": (3000, 300, 1000),
    "sc/yelp2": (3000, 300, 1000),
    "sc/sst2": (3000, 300, 1821),
    "sc/twitter": (3000, 300, 1000),
    "multifaced/irony18": (3000, 300, 784),
    "multifaced/tweeteval": (3000, 300, 1421),
    "multifaced/pstance": (3000, 300, 2157),
    "multifaced/intimacy": (1287, 300, 396),
    "absa/atsa_rest16": (2000, None, 676),
    "absa/acsa_rest16": (2000, None, 676),
    "absa/asqp_rest16": (1264, 316, 544),
    "absa/opener": (1744, 249, 499),
}


@pytest.fixture(scope="module")
def data_dir() -> pathlib.Path:
  d = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "sentibench"
  if not d.is_dir():
    pytest.skip(f"SentiBench data not found at {d}")
  return d


@pytest.fixture(scope="module")
def official(data_dir):
  return sb.load_templates(str(data_dir / "protocol.json"))


def _raw(data_dir, name, split):
  with open(data_dir / name / f"{split}.json", encoding="utf-8-sig") as f:
    return json.load(f)


# ----------------------------------------------------------------------------- templates


def test_default_templates_match_protocol_settings(official):
  for path in (None, ""):
    default = sb.load_templates(path)
    assert default["k_shot"] == official["k_shot"] == 4
    assert default["seeds"] == official["seeds"] == [42, 52, 62]
    assert default["datasets"] == official["datasets"] == list(sb.DATASETS)
    assert default["classification"]["verbalizers"] == official["classification"]["verbalizers"]
    for key in ("join", "demo", "query", "pstance_demo"):
      assert default["prompt_format"][key] == official["prompt_format"][key]
    for name in sb.DATASETS:  # our own wording, never the official sentences
      assert default["instructions"][name] != official["instructions"][name]
    assert "%s" in default["instructions"][sb.PSTANCE]


def test_verbalizers_and_label_order(official):
  assert sb.verbalizers(official, "sc/twitter") == [" negative", " positive", " neutral"]
  assert sb.label_names(official, "multifaced/intimacy") == [
      "not intimate", "moderately intimate", "highly intimate"]
  with pytest.raises(KeyError, match="absa/opener"):
    sb.verbalizers(official, "absa/opener")


def test_load_templates_errors(tmp_path):
  missing = tmp_path / "nope.json"
  with pytest.raises(FileNotFoundError, match="nope.json"):
    sb.load_templates(str(missing))
  bad = tmp_path / "bad.json"
  bad.write_text('{"k_shot": 4,\n "seeds": [42,\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad\.json: malformed JSON at line \d+"):
    sb.load_templates(str(bad))
  base = sb.load_templates(None)
  for drop, key in ((("classification", "verbalizers"), "classification.verbalizers"),
                    (("instructions", "absa/opener"), "instructions.absa/opener"),
                    (("k_shot",), "k_shot")):
    t = json.loads(json.dumps(base))
    node = t
    for part in drop[:-1]:
      node = node[part]
    del node[drop[-1]]
    p = tmp_path / f"t_{len(drop)}_{drop[-1].replace('/', '_')}.json"
    p.write_text(json.dumps(t), encoding="utf-8")
    with pytest.raises(ValueError, match=f"{p.name}: missing key '{key}'"):
      sb.load_templates(str(p))


# ----------------------------------------------------------------------------- loader


@pytest.mark.parametrize("name", sb.DATASETS)
def test_load_every_dataset(data_dir, official, name):
  n_train, n_val, n_test = COUNTS[name]
  assert (data_dir / name / "test.json").read_bytes()[:3] == b"\xef\xbb\xbf"  # BOM handled
  task = sb.load_task(str(data_dir), name)
  assert (len(task.train), len(task.test)) == (n_train, n_test)
  assert task.category == sb.CATEGORIES[name]
  assert [e.index for e in task.test] == list(range(n_test))
  if n_val is not None:
    assert len(sb.load_split(data_dir, name, "val")) == n_val
  if name in sb.CLASSIFICATION_DATASETS:
    assert task.kind == "classification"
    labels = set(sb.label_names(official, name))
    assert {e.gold for e in task.test} == labels
    assert {e.label for e in task.train} == labels
    assert all(e.gold == e.raw["label"].lower() for e in task.test)
    assert all((e.target is not None) == (name == sb.PSTANCE) for e in task.test)
  else:
    assert task.kind == "extraction"
    arity = sb.TUPLE_ARITY[name]
    for e in task.train + task.test:
      assert isinstance(e.gold, list)
      assert all(isinstance(t, tuple) and len(t) == arity for t in e.gold)
      assert all(isinstance(x, str) for t in e.gold for x in t)
      assert e.label == str(e.gold)


def test_atsa_acsa_share_files_but_differ(data_dir):
  atsa = sb.load_task(data_dir, "absa/atsa_rest16")
  acsa = sb.load_task(data_dir, "absa/acsa_rest16")
  assert [e.sentence for e in atsa.test] == [e.sentence for e in acsa.test]
  assert atsa.train[0].gold == [("place", "negative")]
  assert acsa.train[0].gold == [("restaurant general", "negative")]
  assert acsa.test[0].gold == [("food quality", "positive")] and atsa.test[0].gold == []


# ----------------------------------------------------------------------------- prompts


def _module_random_demos(train_records, n_items, seed, k=4):
  """Independent re-implementation: module-level random on the record list itself."""
  state = random.getstate()
  try:
    random.seed(seed)
    out = []
    for _ in range(n_items):
      demos = random.sample(train_records, k)
      ids = tuple(next(i for i, r in enumerate(train_records) if r is d) for d in demos)
      out.append(ids)
  finally:
    random.setstate(state)
  return out


@pytest.mark.parametrize("name", ["sc/sst2", "multifaced/pstance", "absa/opener"])
def test_demo_ids_match_module_random(data_dir, official, name):
  task = sb.load_task(data_dir, name)
  prompts = sb.build_prompts(task, official, seed=42, max_examples=25)
  expected = _module_random_demos(_raw(data_dir, name, "train"), 25, 42)
  assert [p.demo_ids for p in prompts] == expected
  # sample(range(n)) and sample(list) draw the same indices.
  assert sb.sample_demo_ids(len(task.train), 4, 25, 42) == expected
  assert sb.build_prompts(task, official, seed=52, max_examples=3)[0].demo_ids != expected[0]


def test_max_examples_is_prefix_of_full_run(data_dir, official):
  task = sb.load_task(data_dir, "sc/sst2")
  full = sb.build_prompts(task, official, seed=62)
  head = sb.build_prompts(task, official, seed=62, max_examples=7)
  assert len(full) == 1821 and head == full[:7]
  assert [p.index for p in head] == list(range(7))
  assert sb.build_prompts(task, official, seed=62, k=2, max_examples=1)[0].demo_ids == (
      sb.sample_demo_ids(3000, 2, 1, 62)[0])


def test_prompt_text_sst2_exact(data_dir, official):
  task = sb.load_task(data_dir, "sc/sst2")
  p = sb.build_prompts(task, official, seed=42, max_examples=1)[0]
  train, test = _raw(data_dir, "sc/sst2", "train"), _raw(data_dir, "sc/sst2", "test")
  lines = [official["instructions"]["sc/sst2"], ""]
  for i in p.demo_ids:
    lines.append(f"Sentence: {train[i]['sentence']}\nLabel: {train[i]['label'].lower()}\n")
  lines.append(f"Sentence: {test[0]['sentence']}\nLabel:")
  assert p.text == "\n".join(lines)
  assert p.text.startswith(official["instructions"]["sc/sst2"] + "\n\nSentence: ")
  assert p.text.count("\nLabel:") == 5 and p.text.endswith("\nLabel:")
  assert p.gold == test[0]["label"].lower() and p.index == 0


def test_prompt_text_pstance_exact(data_dir, official):
  task = sb.load_task(data_dir, sb.PSTANCE)
  p = sb.build_prompts(task, official, seed=42, max_examples=2)[1]
  train, test = _raw(data_dir, sb.PSTANCE, "train"), _raw(data_dir, sb.PSTANCE, "test")
  lines = [official["instructions"][sb.PSTANCE] % test[1]["target"], ""]
  for i in p.demo_ids:
    lines.append(f"Sentence: {train[i]['sentence']}\nLabel: {train[i]['label'].lower()}"
                 f"(opinion towards '{train[i]['target']}')\n")
  lines.append(f"Sentence: {test[1]['sentence']}\nLabel:")
  assert p.text == "\n".join(lines)
  assert f'towards "{test[1]["target"]}"' in p.text
  default = sb.build_prompts(task, sb.load_templates(None), seed=42, max_examples=2)[1]
  assert default.demo_ids == p.demo_ids and test[1]["target"] in default.text.split("\n")[0]


def test_prompt_text_atsa_exact(data_dir, official):
  task = sb.load_task(data_dir, "absa/atsa_rest16")
  p = sb.build_prompts(task, official, seed=52, max_examples=3)[2]
  lines = [official["instructions"]["absa/atsa_rest16"], ""]
  for i in p.demo_ids:
    lines.append(f"Sentence: {task.train[i].sentence}\nLabel: {task.train[i].gold}\n")
  lines.append(f"Sentence: {task.test[2].sentence}\nLabel:")
  assert p.text == "\n".join(lines)


def test_k_larger_than_pool_errors(data_dir, official):
  task = sb.load_task(data_dir, "sc/sst2")
  with pytest.raises(ValueError, match="demo pool"):
    sb.build_prompts(task, official, seed=42, k=4000, max_examples=1)


# ----------------------------------------------------------------------------- bad input


def _write(path: pathlib.Path, text: str):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8-sig")


def test_bad_inputs_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="sc/sst2"):
    sb.load_task(tmp_path, "sc/sst2")  # no dataset dir
  _write(tmp_path / "sc/sst2/train.json", '[{"sentence": "a", "label": "positive"}]')
  with pytest.raises(FileNotFoundError, match=r"sc/sst2/test\.json"):
    sb.load_task(tmp_path, "sc/sst2")
  _write(tmp_path / "sc/sst2/test.json", '[{"sentence": "a",\n "label": }]')
  with pytest.raises(ValueError, match=r"sc/sst2/test\.json: malformed JSON at line 2"):
    sb.load_task(tmp_path, "sc/sst2")
  _write(tmp_path / "sc/sst2/test.json", '{"sentence": "a"}')
  with pytest.raises(ValueError, match=r"test\.json: expected a JSON array"):
    sb.load_task(tmp_path, "sc/sst2")
  _write(tmp_path / "sc/sst2/test.json", '[{"sentence": "a", "label": "positive"}, '
         '{"sentence": "b"}]')
  with pytest.raises(ValueError, match=r"test\.json: record 1: missing key 'label'"):
    sb.load_task(tmp_path, "sc/sst2")
  _write(tmp_path / "absa/opener/test.json", '[{"sentence": "a", "opinions": [{"x": 1}]}]')
  with pytest.raises(ValueError, match=r"opener/test\.json: record 0: malformed label"):
    sb.load_split(tmp_path, "absa/opener", "test")
  with pytest.raises(ValueError, match="unknown SentiBench dataset"):
    sb.load_task(tmp_path, "sc/nope")
  _write(tmp_path / "sc/sst2/test.json", '[{"sentence": "a", "label": "Positive"}]')
  task = sb.load_task(tmp_path, "sc/sst2")  # BOM-prefixed files load fine
  assert task.test[0].gold == "positive"
