"""Registry of labelled sentiment tasks: SentiBench's 12 datasets and any other in their layouts.

A task is a directory `<root>/<name>/` with `train.json` (required), and optionally `test.json`
and `val.json` or `dev.json`, each a JSON array of records in one of the SentiBench layouts
(`sentibench.LAYOUTS`): `classification` ({sentence, label}), `pstance` ({sentence, label,
target}), `atsa` / `acsa` ({sentence, aspects[]}), `asqp` ({sentence, quards[]}) or `opener`
({sentence, opinions[]}). The name is the path below the root ('sc/sst2', 'atsa/laptop14').

How the layout is found: a SentiBench name has its own; else `task.json` in the task dir
({"layout": ..., "labels": [...], "instruction": "..."}, all optional); else the parent dir
name when it is a layout ('atsa/laptop14' -> atsa); else the first train record's keys
(`quards` -> asqp, `opinions` -> opener, `label` (+ `target`) -> classification (pstance);
`aspects` alone is ambiguous between atsa and acsa and raises).

    registry = tasks.discover(["../shared/sentibench", "../shared/icl_sources"])
    spec = registry.get("atsa/laptop14")          # TaskSpec(layout='atsa', ...)
    train = tasks.load_examples(spec, "train")    # list[sentibench.Example]
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sentijax.data import sentibench

SPLIT_FILES = ("train", "val", "dev", "test")
TASK_FILE = "task.json"
_PARSER = {"atsa": "absa/atsa_rest16", "acsa": "absa/acsa_rest16", "asqp": "absa/asqp_rest16",
           "opener": "absa/opener"}
_METRIC = {"classification": "macro_f1", "pstance": "macro_f1", "atsa": "micro_f1",
           "acsa": "micro_f1", "asqp": "micro_f1", "opener": "graph_f1"}
_DEFAULT_INSTRUCTION = {
    "classification": "Read the text below and classify it. Reply with one label from: {labels}.",
    "pstance": "Read the text below and decide the author's stance towards %s. "
               "Reply with one label from: {labels}.",
    "atsa": "List the aspect terms in the sentence below with the sentiment towards each one, as "
            "(aspect term, polarity). Reply with a Python list of tuples, or [] when there is none.",
    "acsa": "List the aspect categories discussed in the sentence below with the sentiment towards "
            "each one, as (aspect category, polarity). Reply with a Python list of tuples, or [] "
            "when there is none.",
    "asqp": "List the sentiment quadruples in the sentence below as (aspect category, aspect term, "
            "opinion term, polarity). Reply with a Python list of tuples and nothing else.",
    "opener": "List the opinions in the sentence below as (holder, target, polar expression, "
              "polarity). Reply with a Python list of tuples and nothing else.",
}


class TaskError(ValueError):
  """A task name, directory or label set is unusable; the message names it."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One labelled task.

  Attributes:
    name: path below `root`, e.g. 'sc/sst2'.
    root: the directory holding `<name>/train.json`.
    layout: one of sentibench.LAYOUTS.
    labels: classification label strings (lower-cased), position = class id; () for extraction.
    instruction: the task's own instruction (SentiBench: from the templates; pstance has %s).
    splits: split name -> file path, e.g. {"train": ..., "test": ...}.
    sentibench: True for SentiBench's 12 datasets.
  """
  name: str
  root: str
  layout: str
  labels: tuple[str, ...]
  instruction: str
  splits: Mapping[str, str]
  sentibench: bool = False

  @property
  def kind(self) -> str:
    return "extraction" if self.layout in sentibench.LAYOUT_ARITY else "classification"

  @property
  def metric(self) -> str:
    """metrics.score_dataset metric: macro_f1 | micro_f1 | graph_f1."""
    return _METRIC[self.layout]

  @property
  def parser(self) -> str:
    """Name that `parsers.parse_tuples` parses this layout's answers with (extraction only)."""
    return _PARSER[self.layout]

  @property
  def verbalizers(self) -> list[str]:
    """Label strings with the leading space the scorer's first-token rule expects."""
    return [" " + label for label in self.labels]

  @property
  def eval_split(self) -> str:
    return "test" if "test" in self.splits else "val" if "val" in self.splits else "dev"


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8-sig") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise TaskError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
                    ) from None


def _detect_layout(name: str, directory: str, meta: Mapping[str, Any]) -> str:
  if name in sentibench.LAYOUT:
    return sentibench.LAYOUT[name]
  if "layout" in meta:
    layout = meta["layout"]
    if layout not in sentibench.LAYOUTS:
      raise TaskError(f"{os.path.join(directory, TASK_FILE)}: key 'layout' = {layout!r}; known: "
                      f"{', '.join(sentibench.LAYOUTS)}")
    return layout
  parent = name.split("/")[0] if "/" in name else ""
  if parent in sentibench.LAYOUT_ARITY:
    return parent
  records = _read_json(os.path.join(directory, "train.json"))
  first = records[0] if isinstance(records, list) and records else {}
  if not isinstance(first, dict):
    raise TaskError(f"{directory}/train.json: record 0 is not an object")
  if "quards" in first:
    return "asqp"
  if "opinions" in first:
    return "opener"
  if "label" in first:
    return "pstance" if "target" in first else "classification"
  raise TaskError(f"task {name!r} ({directory}): cannot tell its layout from train.json record "
                  f"keys {sorted(first)}; put it under atsa/ or acsa/ or write {TASK_FILE} with "
                  f"\"layout\" (one of {', '.join(sentibench.LAYOUTS)})")


def _labels(name: str, layout: str, directory: str, meta: Mapping[str, Any],
            templates: Mapping[str, Any]) -> tuple[str, ...]:
  if layout in sentibench.LAYOUT_ARITY:
    return ()
  if name in sentibench.LAYOUT:
    labels = sentibench.label_names(templates, name)
  elif "labels" in meta:
    labels = meta["labels"]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
      raise TaskError(f"{os.path.join(directory, TASK_FILE)}: key 'labels' must be a list of "
                      "strings")
  else:
    path = os.path.join(directory, "train.json")
    records = _read_json(path)
    labels = sorted({str(r["label"]).lower() for r in records
                     if isinstance(r, dict) and isinstance(r.get("label"), str) and r["label"]})
  labels = [x.strip().lower() for x in labels]
  if not labels or not all(labels):
    raise TaskError(f"task {name!r} ({directory}): empty label set (no labels in train.json and "
                    f"none in {TASK_FILE})")
  if len(set(labels)) != len(labels):
    raise TaskError(f"task {name!r} ({directory}): duplicate labels {labels}")
  return tuple(labels)


def make_spec(root: str | os.PathLike, name: str, templates: Mapping[str, Any] | None = None
              ) -> TaskSpec:
  """The TaskSpec of `<root>/<name>` (TaskError / FileNotFoundError naming what is wrong)."""
  root = os.fspath(root)
  directory = os.path.join(root, name)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"task {name!r}: directory not found: {directory}")
  splits = {s: os.path.join(directory, f"{s}.json") for s in SPLIT_FILES
            if os.path.isfile(os.path.join(directory, f"{s}.json"))}
  if "train" not in splits:
    raise FileNotFoundError(f"task {name!r}: {directory} has no train split (train.json); "
                            f"found: {sorted(os.listdir(directory))}")
  meta_path = os.path.join(directory, TASK_FILE)
  meta = _read_json(meta_path) if os.path.isfile(meta_path) else {}
  if not isinstance(meta, dict):
    raise TaskError(f"{meta_path}: expected a JSON object")
  templates = templates if templates is not None else sentibench.load_templates(None)
  layout = _detect_layout(name, directory, meta)
  labels = _labels(name, layout, directory, meta, templates)
  if name in sentibench.LAYOUT and name in templates["instructions"]:
    instruction = templates["instructions"][name]
  else:
    instruction = meta.get("instruction") or _DEFAULT_INSTRUCTION[layout].format(
        labels=", ".join(labels))
  if layout == "pstance" and "%s" not in instruction:
    raise TaskError(f"task {name!r}: a pstance instruction needs a %s target placeholder")
  return TaskSpec(name=name, root=root, layout=layout, labels=labels, instruction=instruction,
                  splits=splits, sentibench=name in sentibench.LAYOUT)


def _task_dirs(root: str) -> Iterable[str]:
  """Names (relative paths) of the dirs below `root` that hold split files."""
  for here, dirs, files in os.walk(root):
    dirs.sort()
    if any(f"{s}.json" in files for s in SPLIT_FILES) and os.path.abspath(here) != \
        os.path.abspath(root):
      yield os.path.relpath(here, root).replace(os.sep, "/")
      dirs[:] = []


@dataclasses.dataclass(frozen=True)
class Registry:
  """Tasks by name (first root wins on a name clash)."""
  tasks: Mapping[str, TaskSpec]

  def get(self, name: str) -> TaskSpec:
    if name not in self.tasks:
      raise TaskError(f"unknown task {name!r}; registered: {', '.join(sorted(self.tasks)) or '-'}")
    return self.tasks[name]

  def names(self) -> list[str]:
    return list(self.tasks)

  def select(self, names: str | Sequence[str]) -> list[TaskSpec]:
    """'all' / 'a,b' / a list -> specs (unknown names raise TaskError)."""
    return [self.get(n) for n in parse_names(names, self.names())]


def parse_names(names: str | Sequence[str], all_names: Sequence[str] = ()) -> list[str]:
  """'all' / 'a, b' / a list -> unique names in order ('all' = `all_names`)."""
  if isinstance(names, str):
    items = (list(all_names) if names.strip() == "all"
             else [n.strip() for n in names.split(",") if n.strip()])
  else:
    items = [str(n) for n in names]
  return list(dict.fromkeys(items))


def discover(roots: str | Sequence[str], templates: Mapping[str, Any] | None = None) -> Registry:
  """Registers every task dir below each root (comma list or sequence of directories)."""
  roots = parse_names(roots)
  templates = templates if templates is not None else sentibench.load_templates(None)
  specs: dict[str, TaskSpec] = {}
  for root in roots:
    if not os.path.isdir(root):
      raise FileNotFoundError(f"task directory not found: {root}")
    for name in _task_dirs(root):
      if name not in specs:
        specs[name] = make_spec(root, name, templates)
  return Registry(specs)


def load_examples(spec: TaskSpec, split: str) -> list[sentibench.Example]:
  """The Examples of one split of a task."""
  if split not in spec.splits:
    raise FileNotFoundError(f"task {spec.name!r}: no {split}.json in "
                            f"{os.path.join(spec.root, spec.name)}")
  return sentibench.load_split(spec.root, spec.name, split, layout=spec.layout)


def load_task(spec: TaskSpec, split: str | None = None) -> sentibench.Task:
  """A sentibench.Task (demo pool = train, items = `split`, default the eval split)."""
  return sentibench.load_task(spec.root, spec.name, split or spec.eval_split, layout=spec.layout)


def is_family(entry: str) -> bool:
  """True for a task family: 'layout:NAME' or a glob ('atsa/*')."""
  return entry.startswith("layout:") or any(c in entry for c in "*?[")


def match(entry: str, specs: Mapping[str, TaskSpec]) -> list[str]:
  """Names of `specs` that `entry` stands for: 'layout:atsa' every task of that layout, a glob
  on names ('atsa/*': the tasks under atsa/, not absa/atsa_rest16) the names it matches, else
  the name itself; [] when none."""
  if entry.startswith("layout:"):
    layout = entry[len("layout:"):].strip()
    if layout not in sentibench.LAYOUTS:
      raise TaskError(f"task family {entry!r}: unknown layout {layout!r}; known: "
                      f"{', '.join(sentibench.LAYOUTS)}")
    return [n for n, spec in specs.items() if spec.layout == layout]
  if is_family(entry):
    return [n for n in specs if fnmatch.fnmatchcase(n, entry)]
  return [entry] if entry in specs else []
