"""SentiBench runs on disk: a results file (the scorer's schema) and its predictions.

A run is
  * a sentibench job workdir: `<dir>/results.json`, predictions `<dir>/predictions/`;
  * a training workdir (`<dir>/sentibench/step_N.json`, highest N) or that sentibench/ dir;
  * one results file: `results.json` (predictions in `predictions/` beside it) or `step_N.json`
    (predictions in `predictions/step_N/` beside it, when that exists).
Prediction files are `<dataset with / -> _>_<seed>.jsonl` ({"index", "gold", "prediction"}).
`publish` writes gold-free copies (results + predictions) small enough to commit without
redistributing the benchmark's labels; `eval.compare` fills their gold from the test split.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

from sentijax import atomic
from sentijax.eval import report, scorer

_STEP = re.compile(r"^step_(\d+)\.json$")


@dataclasses.dataclass
class Run:
  """One run to compare: its results file, results dict and predictions directory (or None)."""
  label: str
  results_path: str
  results: dict
  predictions_dir: str | None
  looked_for: str  # where predictions were looked for (for notes)

  @property
  def aggregation(self) -> str:
    return str(self.results.get("aggregation", "mean"))

# --------------------------------------------------------------------------- loading runs


def _last_step(directory: str) -> str | None:
  steps = [(int(m.group(1)), n) for n in os.listdir(directory) if (m := _STEP.match(n))]
  return os.path.join(directory, max(steps)[1]) if steps else None


def resolve(path: str | os.PathLike) -> tuple[str, str]:
  """(results file, its predictions directory) of a run dir, sentibench/ dir or results file.

  The predictions directory is where predictions would be; it may not exist.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "results.json")):
      path = os.path.join(path, "results.json")
    else:
      step = None
      if os.path.isdir(os.path.join(path, "sentibench")):
        step = _last_step(os.path.join(path, "sentibench"))
      step = step or _last_step(path)
      if step is None:
        raise FileNotFoundError(
            f"{path}: no results.json, sentibench/step_N.json or step_N.json in it; pass a "
            "sentibench job workdir, a training workdir or a results file")
      path = step
  elif not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such run directory or results file")
  directory, name = os.path.split(os.path.abspath(path))
  m = _STEP.match(name)
  preds = os.path.join(directory, "predictions", f"step_{m.group(1)}" if m else "")
  return path, os.path.normpath(preds)


def default_label(results_path: str) -> str:
  """'base' for base/results.json, 'icl@step_200' for icl/sentibench/step_200.json."""
  directory, name = os.path.split(os.path.abspath(results_path))
  m = _STEP.match(name)
  if m:
    owner = os.path.dirname(directory) if os.path.basename(directory) == "sentibench" else directory
    return f"{os.path.basename(owner)}@step_{m.group(1)}"
  stem, owner = os.path.splitext(name)[0], os.path.basename(directory)
  return owner if stem == "results" else f"{owner}/{stem}"


def load_run(path: str | os.PathLike, label: str | None = None) -> Run:
  """Reads a run's results file (validated) and locates its predictions."""
  results_path, preds = resolve(path)
  try:
    results = report.load_results(results_path)
  except json.JSONDecodeError as e:
    raise ValueError(f"{results_path}: not valid JSON ({e})") from None
  datasets = results.get("datasets") if isinstance(results, dict) else None
  if not isinstance(datasets, dict) or not datasets:
    raise ValueError(f"{results_path}: no 'datasets' mapping; expected the scorer's results "
                     "schema {\"datasets\": {name: {\"seeds\": {seed: score}, ...}}, ...}")
  for name, entry in datasets.items():
    seeds = entry.get("seeds") if isinstance(entry, dict) else None
    if not isinstance(seeds, dict) or not seeds:
      raise ValueError(f"{results_path}: datasets[{name!r}] has no 'seeds' mapping of scores")
    bad = [s for s, v in seeds.items() if not str(s).lstrip("-").isdigit()
           or not isinstance(v, (int, float))]
    if bad:
      raise ValueError(f"{results_path}: datasets[{name!r}]['seeds'] needs integer seeds with "
                       f"numeric scores; got {bad[0]!r}: {seeds[bad[0]]!r}")
  return Run(label or default_label(results_path), results_path, results,
             preds if os.path.isdir(preds) else None, preds)


def read_predictions(path: str) -> dict[int, dict]:
  """{item index: row} of one predictions file; errors name the file and line."""
  rows: dict[int, dict] = {}
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not JSON ({e})") from None
      missing = [k for k in ("index", "prediction") if k not in row]
      if missing:
        raise ValueError(f"{path}:{line_no}: row lacks {missing}")
      if row["index"] in rows:
        raise ValueError(f"{path}:{line_no}: item index {row['index']} appears twice")
      rows[int(row["index"])] = row
  return rows


def publish(runs: Sequence[Run], dest: str | os.PathLike) -> list[str]:
  """Writes `<dest>/<label>/results.json` and `predictions/` of each run without gold labels
  (compare reads them back with `--data-dir`); returns the run dirs written."""
  out = []
  for run in runs:
    run_dir = os.path.join(os.fspath(dest), re.sub(r"[^A-Za-z0-9._+-]+", "_", run.label))
    atomic.write_json(os.path.join(run_dir, "results.json"), run.results)
    for name, entry in run.results["datasets"].items():
      for seed in entry["seeds"]:
        src = (scorer.predictions_path(run.predictions_dir, name, int(seed))
               if run.predictions_dir else "")
        if os.path.isfile(src):
          rows = [{k: v for k, v in r.items() if k != "gold"}
                  for _, r in sorted(read_predictions(src).items())]
          scorer.write_jsonl(scorer.predictions_path(os.path.join(run_dir, "predictions"), name,
                                                     int(seed)), rows)
    out.append(run_dir)
  return out
