"""SentiBench loader, gold label sequences and few-shot prompt construction.

Mirrors the official SentiBench harness (HITSZ-HLT/Sentiment-Distillation @ 2810fc2:
`icl_multifaced.py` for the 8 classification sets, `fsa.py` for the 4 extraction sets).
Data is read from a directory laid out as `<data_dir>/<dataset>/{train,test,...}.json`
(JSON arrays, UTF-8 with BOM); nothing from the release is shipped in this package.

Official details reproduced here:
  * Classification gold and demo labels are `label.lower()`; P-Stance puts the TEST item's
    target into the instruction with `%` and writes demo labels as
    `{label}(opinion towards '{demo target}')`.
  * Demos: `random.seed(seed)` once per (dataset, seed) run, then `random.sample(train, k)`
    for each test item in file order. We use a private `random.Random(seed)`, which draws the
    same sequence, and sample `range(len(train))` (same indices as sampling the list).
  * Extraction label sequences: `data/sentibench_labels.py`.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import random
from typing import Any, Mapping, Sequence

from sentijax.data import sentibench_labels as labels

DATASETS: tuple[str, ...] = (
    "sc/imdb",
    "sc/yelp2",
    "sc/sst2",
    "sc/twitter",
    "multifaced/irony18",
    "multifaced/tweeteval",
    "multifaced/pstance",
    "multifaced/intimacy",
    "absa/asqp_rest16",
    "absa/opener",
    "absa/atsa_rest16",
    "absa/acsa_rest16",
)

CATEGORIES: dict[str, str] = {
    "sc/imdb": "basic",
    "sc/yelp2": "basic",
    "sc/sst2": "basic",
    "sc/twitter": "basic",
    "multifaced/irony18": "multifaceted",
    "multifaced/tweeteval": "multifaceted",
    "multifaced/pstance": "multifaceted",
    "multifaced/intimacy": "multifaceted",
    "absa/asqp_rest16": "fine-grained",
    "absa/opener": "fine-grained",
    "absa/atsa_rest16": "fine-grained",
    "absa/acsa_rest16": "fine-grained",
}

CLASSIFICATION_DATASETS: tuple[str, ...] = DATASETS[:8]
EXTRACTION_DATASETS: tuple[str, ...] = DATASETS[8:]
PSTANCE = "multifaced/pstance"

# Tuple arity of the label sequence of each extraction dataset.
TUPLE_ARITY: dict[str, int] = {
    "absa/atsa_rest16": 2,
    "absa/acsa_rest16": 2,
    "absa/asqp_rest16": 4,
    "absa/opener": 4,
}

# Record layout of each dataset: which keys hold the label and how its label sequence is built.
# Other labelled tasks in the same JSON layouts (see sentijax.data.tasks) name one of these.
LAYOUTS: tuple[str, ...] = ("classification", "pstance", "atsa", "acsa", "asqp", "opener")
LAYOUT: dict[str, str] = {
    **{name: "classification" for name in CLASSIFICATION_DATASETS},
    PSTANCE: "pstance",
    "absa/atsa_rest16": "atsa",
    "absa/acsa_rest16": "acsa",
    "absa/asqp_rest16": "asqp",
    "absa/opener": "opener",
}
LAYOUT_ARITY: dict[str, int] = {"atsa": 2, "acsa": 2, "asqp": 4, "opener": 4}


DEFAULT_TEMPLATES = "sentibench_templates.json"

_REQUIRED_TEMPLATE_KEYS: tuple[str, ...] = (
    "k_shot",
    "seeds",
    "datasets",
    "prompt_format",
    "prompt_format.join",
    "prompt_format.demo",
    "prompt_format.query",
    "prompt_format.pstance_demo",
    "classification",
    "classification.verbalizers",
    "instructions",
)

_RECORD_KEYS: dict[str, tuple[str, ...]] = {
    "classification": ("sentence", "label"),
    "pstance": ("sentence", "label", "target"),
    "atsa": ("sentence", "aspects"),
    "acsa": ("sentence", "aspects"),
    "asqp": ("sentence", "quards"),
    "opener": ("sentence", "opinions"),
}


# --------------------------------------------------------------------------- templates


def _default_templates_text() -> tuple[str, str]:
  res = importlib.resources.files("sentijax") / "assets" / DEFAULT_TEMPLATES
  return str(res), res.read_text(encoding="utf-8-sig")


def load_templates(path: str | os.PathLike | None = None) -> dict[str, Any]:
  """Loads prompt templates in the protocol.json schema.

  Args:
    path: a protocol.json-style file (e.g. the official `sentibench/protocol.json`);
      None or "" loads the package default `sentijax/assets/sentibench_templates.json`.

  Returns:
    The parsed dict, validated: required keys present, an instruction for every dataset in
    `datasets` and verbalizers for every classification dataset in it.

  Raises:
    FileNotFoundError / ValueError naming the file (and the missing key or JSON line).
  """
  if path is None or str(path) == "":
    where, text = _default_templates_text()
  else:
    where = str(path)
    if not os.path.isfile(where):
      raise FileNotFoundError(f"SentiBench templates file not found: {where}")
    with open(where, encoding="utf-8-sig") as f:
      text = f.read()
  try:
    templates = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{where}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
  if not isinstance(templates, dict):
    raise ValueError(f"{where}: expected a JSON object at top level, "
                     f"got {type(templates).__name__}")
  for dotted in _REQUIRED_TEMPLATE_KEYS:
    node: Any = templates
    for part in dotted.split("."):
      if not isinstance(node, dict) or part not in node:
        raise ValueError(f"{where}: missing key '{dotted}'")
      node = node[part]
  k = templates["k_shot"]
  if not isinstance(k, int) or isinstance(k, bool) or k < 0:
    raise ValueError(f"{where}: key 'k_shot' must be a non-negative int, got {k!r}")
  if not isinstance(templates["seeds"], list) or not all(
      isinstance(s, int) for s in templates["seeds"]):
    raise ValueError(f"{where}: key 'seeds' must be a list of ints")
  for key in ("datasets",):
    if not isinstance(templates[key], list):
      raise ValueError(f"{where}: key '{key}' must be a list of dataset names")
  for key in ("prompt_format", "classification", "instructions"):
    if not isinstance(templates[key], dict):
      raise ValueError(f"{where}: key '{key}' must be an object")
  for name in templates["datasets"]:
    if name not in CATEGORIES:
      raise ValueError(f"{where}: key 'datasets' has unknown dataset {name!r}")
    if name not in templates["instructions"]:
      raise ValueError(f"{where}: missing key 'instructions.{name}'")
    if name in CLASSIFICATION_DATASETS:
      verbs = templates["classification"]["verbalizers"].get(name)
      if not isinstance(verbs, list) or not verbs or not all(isinstance(v, str) for v in verbs):
        raise ValueError(f"{where}: missing key 'classification.verbalizers.{name}' "
                         "(a non-empty list of strings)")
  pstance_inst = templates["instructions"].get(PSTANCE)
  if pstance_inst is not None and "%s" not in pstance_inst:
    raise ValueError(f"{where}: 'instructions.{PSTANCE}' needs a %s target placeholder")
  return templates


def verbalizers(templates: Mapping[str, Any], name: str) -> list[str]:
  """The verbalizer strings of a classification dataset (with leading space), in label order."""
  try:
    return list(templates["classification"]["verbalizers"][name])
  except KeyError:
    raise KeyError(f"no verbalizers for dataset {name!r} in the templates") from None


def label_names(templates: Mapping[str, Any], name: str) -> list[str]:
  """The label strings (stripped verbalizers, as the official `.strip()`); position = class id."""
  return [v.strip() for v in verbalizers(templates, name)]


# --------------------------------------------------------------------------- label sequences


def label_tuples(name: str, record: Mapping[str, Any]) -> list[tuple[str, ...]]:
  """Gold tuples of an extraction record of dataset `name` (or of a layout, e.g. 'atsa')."""
  return labels.BUILDERS[LAYOUT.get(name, name)](record)


def label_string(label: str | Sequence[tuple[str, ...]]) -> str:
  """Demo label text: the string itself, or the Python list repr of the tuples."""
  return label if isinstance(label, str) else str(list(label))


# --------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class Example:
  """One record of a split.

  Attributes:
    index: position in its JSON file.
    sentence: input text.
    gold: lower-cased label (classification) or list of label tuples (extraction).
    target: P-Stance target, else None.
    label: the demo label string (`gold` as text: the label or the tuple-list repr).
    raw: the original record (e.g. OpeNER `opinions` with char offsets for exact scoring).
  """
  index: int
  sentence: str
  gold: str | list[tuple[str, ...]]
  target: str | None = None
  label: str = ""
  raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Task:
  """A SentiBench dataset: demo pool (train.json) and evaluation split."""
  name: str
  kind: str  # "classification" | "extraction"
  category: str  # basic | multifaceted | fine-grained
  train: list[Example]
  test: list[Example]
  split: str = "test"
  layout: str = ""  # one of LAYOUTS ("" = the SentiBench dataset's)


def _read_json_list(path: str) -> list[Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"SentiBench file not found: {path}")
  try:
    with open(path, encoding="utf-8-sig") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e})") from None
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
  return data


def _make_example(layout: str, index: int, rec: Any, path: str) -> Example:
  if not isinstance(rec, dict):
    raise ValueError(f"{path}: record {index}: expected an object, got {type(rec).__name__}")
  for key in _RECORD_KEYS[layout]:
    if key not in rec:
      raise ValueError(f"{path}: record {index}: missing key '{key}'")
  if not isinstance(rec["sentence"], str):
    raise ValueError(f"{path}: record {index}: 'sentence' must be a string")
  try:
    if layout in LAYOUT_ARITY:
      gold: Any = label_tuples(layout, rec)
    else:
      if not isinstance(rec["label"], str):
        raise TypeError("'label' must be a string")
      gold = labels.classification_label(rec)
  except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
    raise ValueError(f"{path}: record {index}: malformed label fields: {e!r}") from None
  target = rec.get("target") if layout == "pstance" else None
  return Example(index=index, sentence=rec["sentence"], gold=gold, target=target,
                 label=label_string(gold), raw=rec)


def _layout_of(name: str, layout: str | None) -> str:
  if layout is None:
    if name not in CATEGORIES:
      raise ValueError(f"unknown SentiBench dataset {name!r}; known: {', '.join(DATASETS)} "
                       "(other tasks: pass layout=, see sentijax.data.tasks)")
    return LAYOUT[name]
  if layout not in LAYOUTS:
    raise ValueError(f"task {name!r}: unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
  return layout


def load_split(data_dir: str | os.PathLike, name: str, split: str,
               layout: str | None = None) -> list[Example]:
  """Loads `<data_dir>/<name>/<split>.json` as Examples.

  `layout`: one of LAYOUTS for a task outside SentiBench (None = the SentiBench dataset's).
  """
  layout = _layout_of(name, layout)
  d = os.path.join(os.fspath(data_dir), name)
  if not os.path.isdir(d):
    raise FileNotFoundError(f"dataset directory not found: {d}")
  path = os.path.join(d, f"{split}.json")
  return [_make_example(layout, i, r, path) for i, r in enumerate(_read_json_list(path))]


def load_task(data_dir: str | os.PathLike, name: str, split: str = "test",
              layout: str | None = None) -> Task:
  """Loads a dataset: demo pool from train.json and the `split` file (default test.json)."""
  layout = _layout_of(name, layout)
  test = load_split(data_dir, name, split, layout)
  train = load_split(data_dir, name, "train", layout)
  kind = "extraction" if layout in LAYOUT_ARITY else "classification"
  return Task(name=name, kind=kind, category=CATEGORIES.get(name, "other"), train=train,
              test=test, split=split, layout=layout)


# --------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A few-shot prompt for one evaluation item."""
  index: int  # position of the item in the split file
  text: str
  gold: str | list[tuple[str, ...]]
  demo_ids: tuple[int, ...]  # indices into task.train


def sample_demo_ids(n_train: int, k: int, n_items: int, seed: int) -> list[tuple[int, ...]]:
  """Demo indices per item: `random.seed(seed)` once, then `random.sample(train, k)` per item."""
  if k > n_train:
    raise ValueError(f"k={k} demonstrations requested but the demo pool has {n_train}")
  rng = random.Random(seed)
  pool = range(n_train)
  return [tuple(rng.sample(pool, k)) for _ in range(n_items)]


def build_prompt_text(task: Task, templates: Mapping[str, Any], item: Example,
                      demo_ids: Sequence[int]) -> str:
  """Instruction, empty line, demos, query joined with the template `join` string."""
  fmt = templates["prompt_format"]
  instruction = templates["instructions"][task.name]
  pstance = (task.layout or LAYOUT.get(task.name)) == "pstance"
  if pstance:
    try:
      instruction = instruction % item.target
    except TypeError as e:
      raise ValueError(f"P-Stance instruction needs exactly one %s placeholder: {e}") from None
  parts = [instruction, ""]
  for i in demo_ids:
    demo = task.train[i]
    if pstance:
      parts.append(fmt["pstance_demo"].format(sentence=demo.sentence, label=demo.label,
                                              target=demo.target))
    else:
      parts.append(fmt["demo"].format(sentence=demo.sentence, label=demo.label))
  parts.append(fmt["query"].format(sentence=item.sentence))
  return fmt["join"].join(parts)


def build_prompts(task: Task, templates: Mapping[str, Any], seed: int, k: int | None = None,
                  max_examples: int = 0) -> list[Prompt]:
  """Few-shot prompts for the evaluation items of `task`, in file order.

  Args:
    task: from `load_task`.
    templates: from `load_templates`.
    seed: run seed (42, 52, 62 in the protocol).
    k: demonstrations per prompt; None = templates["k_shot"].
    max_examples: if > 0 keep only the first N items; their demos equal the full run's.
  """
  if task.name not in templates["instructions"]:
    raise KeyError(f"templates have no instruction for dataset {task.name!r}")
  k = templates["k_shot"] if k is None else k
  items = task.test[:max_examples] if max_examples > 0 else task.test
  ids = sample_demo_ids(len(task.train), k, len(items), seed)
  return [Prompt(index=item.index, text=build_prompt_text(task, templates, item, d),
                 gold=item.gold, demo_ids=d) for item, d in zip(items, ids)]
